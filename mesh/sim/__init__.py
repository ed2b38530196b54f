"""Deterministic simulation of a store mesh on the real replica and sync core."""

from __future__ import annotations

from mesh.sim.runner import RunContext, RunResult, derive_seed, run_scenario
from mesh.sim.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from mesh.sim.world import LinkModel, SimDisk, SimNode, World

__all__ = [
    "LinkModel",
    "RunContext",
    "RunResult",
    "Scenario",
    "ScenarioError",
    "SimDisk",
    "SimNode",
    "World",
    "derive_seed",
    "load_scenario",
    "parse_scenario",
    "run_scenario",
]
