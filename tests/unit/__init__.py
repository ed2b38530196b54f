"""Unit and property tests of the core and the durability layer (no network)."""
