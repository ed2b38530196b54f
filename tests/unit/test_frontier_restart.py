"""The checkpointer's frontier survives a restart (issue 12, ``Frontier`` invariant 5):
an absent node passes the horizon when it was really last heard plus the horizon, not
a horizon after the restart."""

from __future__ import annotations

from pathlib import Path

from mesh import config
from mesh.core.crdt import VersionVector
from mesh.core.replica import Replica
from mesh.durable import DurableReplica
from mesh.store.datadir import init_store

T0 = 1_700_000_000_000
DAY = 86_400_000
H = config.FRONTIER_HORIZON_MS
GRACE = config.FRONTIER_RESUME_GRACE_MS
ENROLLED = ["edge", "r1", "r2", "r3"]


def _edge(tmp_path: Path) -> Path:
    """An edge that heard r1 and r2 at T0 (r2 then goes silent), listed r3 (never
    heard) at T0, retired nothing, and saved a snapshot a day later."""
    d = tmp_path / "edge"
    init_store(d, "s1", now_ms=T0, node_id="edge")
    dr = DurableReplica.open(d, snapshot_every=1)
    dr.execute(lambda r: r.receive("A", 5, txn="rx", now_ms=T0))[1].result()
    f = dr.replica.frontier
    for node in ("r1", "r2"):
        f.observe(node, VersionVector({"edge": 1, node: 0}), T0)
    assert f.members(ENROLLED, T0) == ENROLLED
    f.observe("r1", VersionVector({"edge": 1}), T0 + DAY)
    dr.execute(lambda r: r.receive("A", 1, txn="rx2", now_ms=T0 + DAY))[1].result()
    assert dr.maybe_snapshot()
    dr.close()
    return d


def test_an_absent_member_passes_the_horizon_at_the_original_time(tmp_path: Path) -> None:
    d = _edge(tmp_path)
    again = DurableReplica.open(d)  # restarted two days after T0
    assert again.rebuild_stats.snapshot_upto > 0
    f = again.replica.frontier
    f.observe("edge", again.replica.vv, T0 + 2 * DAY)
    f.observe("r1", VersionVector({"edge": 2}), T0 + 2 * DAY)
    assert f.members(ENROLLED, T0 + 2 * DAY) == ENROLLED
    # what r2 was known to hold survived: it still holds the frontier back
    assert f.stable(ENROLLED, T0 + 2 * DAY)[0].to_dict() == {}  # r3 holds nothing
    assert f.stable(["edge", "r1", "r2"], T0 + 2 * DAY)[0].get("edge") == 1
    f.observe("r1", VersionVector({"edge": 2}), T0 + H)
    assert f.members(ENROLLED, T0 + H) == ENROLLED
    f.observe("r1", VersionVector({"edge": 2}), T0 + H + 1)
    # r2 (last heard at T0) and r3 (listed at T0, never heard) pass the horizon at
    # T0 + horizon, as if the edge had never restarted (not T0 + 2 days + horizon)
    assert f.members(ENROLLED, T0 + H + 1) == ["edge", "r1"]
    assert f.stable(ENROLLED, T0 + H + 1)[0].get("edge") == 2
    # the checkpoint it proposes leaves them out
    got = again.maybe_checkpoint(T0 + H + 2, ENROLLED)
    assert got is not None
    got[1].result()
    last = again.replica.last_folded
    assert last is not None and last.frontier == {"edge": 2}
    again.close()


def test_after_a_restart_every_node_gets_the_grace_to_report(tmp_path: Path) -> None:
    """The snapshot may be older than the crash: a node whose last heard time in it is
    past the horizon is still counted for the grace after the restart, then not."""
    d = _edge(tmp_path)
    again = DurableReplica.open(d)  # restarted past r2's horizon
    f = again.replica.frontier
    now = T0 + H + DAY
    assert f.members(ENROLLED, now) == ENROLLED
    f.observe("r1", VersionVector({"edge": 2}), now + GRACE)
    f.observe("edge", again.replica.vv, now + GRACE)
    assert f.members(ENROLLED, now + GRACE) == ENROLLED
    f.observe("r2", VersionVector({"edge": 2}), now + GRACE)  # r2 is back in time
    assert f.members(ENROLLED, now + GRACE + 1) == ["edge", "r1", "r2"]
    again.close()


def test_the_frontier_round_trips_through_a_snapshot() -> None:
    r = Replica("s1", "edge", "edge", checkpointer="edge")
    r.frontier.observe("r1", VersionVector({"edge": 3, "r1": 7}), T0)
    r.frontier.members(["r1", "r9"], T0 + 5)
    r.frontier.retire("r4")
    snap = r.snapshot()
    copy = Replica("s1", "edge", "edge", checkpointer="edge")
    copy.restore(snap)
    assert copy.snapshot() == snap
    assert copy.frontier.stable(["r1"], T0 + 10)[0].to_dict() == {"edge": 3, "r1": 7}
    assert copy.frontier.members(["r1", "r4", "r9"], T0 + 10) == ["r1", "r9"]
