"""storemesh: a CRDT-based peer-to-peer store mesh (stock, reservations, catalog)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
