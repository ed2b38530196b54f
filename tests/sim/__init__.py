"""The simulator: scenarios, faults, checker, swarms."""
