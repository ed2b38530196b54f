"""Deterministic simulation of a store mesh on the real replica and sync core."""

from __future__ import annotations

from mesh.sim.world import LinkModel, SimDisk, SimNode, World

__all__ = ["LinkModel", "SimDisk", "SimNode", "World"]
