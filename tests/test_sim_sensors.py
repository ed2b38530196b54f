"""The sensor-stream workload (mesh.sim.sensors): deterministic, and the reconciliation
rules hold up against noise, drift, a failing and a mis-mapped sensor."""

from __future__ import annotations

from mesh.sim.sensors import Scenario, run


def test_same_seed_same_report_and_faults_are_caught() -> None:
    sc = Scenario(seed=7, skus=120, hours=4)
    a, b = run(sc), run(Scenario(seed=7, skus=120, hours=4))
    assert a == b
    assert run(Scenario(seed=8, skus=120, hours=4)) != a
    assert a["false_auto"] == 0, a["false_auto_examples"]
    assert a["auto"] > 0 and a["reviews"] > 0
    faults = a["faults"]
    # the failing scales and the mis-mapped reader are flagged, not believed
    assert set(faults["failing"]) | set(faults["mismapped"]) <= set(a["flagged_drifting"])
