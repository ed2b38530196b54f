"""Certificates and revocations in the sync core (issue 10 items 19 and 23).

* A register that joins while the cloud is connected: its envelopes reach the cloud at
  once, with no ``not_enrolled`` refusal on the way (certificates before envelopes),
  and when a refusal does happen (the certificate message was lost), the receiver asks
  for the refused envelopes again once the certificate arrives (``rs``).
* A revocation issued on the edge reaches every node, which ends its session with the
  revoked node, refuses it from then on and never sends its envelopes on.
"""

from __future__ import annotations

from mesh import config
from mesh.core.identity import issue_revocations
from mesh.core.sync import NOT_REFUSALS
from mesh.sim import LinkModel, World
from mesh.sim.world import SimNode
from tests.unit.test_sync_review import _add_late, _digests, _sell, _stock, _until


def _store_with_cloud(seed: int, validity_ms: int | None = None) -> World:
    """edge, r1, r2 in one LAN mesh; the cloud over a FIFO WAN link to the edge only;
    every certificate valid ``validity_ms`` from the start (the world's default if None)."""
    w = World(seed)
    if validity_ms is not None:
        w.cert_validity_ms = validity_ms
    w.add_node("cloud", "cloud")
    w.add_node("edge", "edge")
    for r in ("r1", "r2"):
        w.add_node(r)
    for a, b in (("edge", "r1"), ("edge", "r2"), ("r1", "r2")):
        w.connect(a, b)
    w.connect("cloud", "edge", LinkModel(latency_ms=20, jitter_ms=0, kind="wan"))
    w.run_until(20_000)
    _stock(w.nodes["edge"])
    w.run_until(w.now + 100)
    return w


def _join_r3(w: World) -> SimNode:
    """r3 enrols at the edge (only the edge holds its certificate) and connects to the
    LAN nodes; then sells every 5 ms for 200 ms (a busy till: pushes never pause for a
    round trip of the WAN)."""
    r3 = _add_late(w, "r3", knows=("edge",))
    for x in ("edge", "r1", "r2"):
        w.connect(x, "r3")
    w.run_until(w.now + 10)
    for i in range(40):
        w.after(i * 5, lambda i=i: _sell(r3, f"x{i}"))
    return r3


def _refusals(node: SimNode) -> dict[str, int]:
    return {k: v for k, v in node.core.stats.items() if k not in NOT_REFUSALS}


def test_a_register_joining_while_the_cloud_is_connected_reaches_it_without_refusals(
) -> None:
    """Item 19: the cloud held none of a new register's envelopes while its certificate
    had not reached it. Before the fix the edge relayed r3's envelopes before the
    certificate; the cloud refused them (not_enrolled, a "security event" on the
    dashboard) and got them only at the next WAN summary, 15 s later."""
    for seed in range(3):
        w = _store_with_cloud(seed)
        _join_r3(w)
        w.run_until(w.now + 200)
        cloud = w.nodes["cloud"]
        took = _until(w, lambda c=cloud: c.replica.vv.get("r3") == 40, 20_000)
        assert took < 200, f"seed {seed}: the cloud took {took} ms more"
        assert len(_digests(w)) == 1
        for node in w.nodes.values():
            assert _refusals(node) == {}, (seed, node.node_id, node.core.stats)


def test_envelopes_refused_for_a_missing_certificate_are_asked_for_again() -> None:
    """The edge's first certificate message to the cloud is lost, so the cloud refuses
    r3's envelopes. Once a later one brings the certificate, the cloud asks for them
    again (``rs`` in its summary) and the edge resends at once, although r3's pushes
    keep coming (before the fix: only at the next WAN summary, 15 s later)."""
    w = _store_with_cloud(7)
    edge = w.nodes["edge"]
    dropped: list[bytes] = []

    def lose_first_certs(peer: str, data: bytes) -> bytes | None:
        if peer == "cloud" and data[:1] == b"C" and not dropped:
            dropped.append(data)
            return None
        return data
    edge.send_filter = lose_first_certs
    _join_r3(w)
    w.run_until(w.now + 200)
    cloud = w.nodes["cloud"]
    assert dropped and cloud.core.stats.get("not_enrolled", 0) > 0  # the refusal happened
    took = _until(w, lambda: cloud.replica.vv.get("r3") == 40, 20_000)
    assert took < 500, f"the cloud took {took} ms more"
    assert cloud.replica.pending_count() == 0
    assert len(_digests(w)) == 1


def test_a_summary_names_origins_whose_certificate_came_after_their_envelopes() -> None:
    """At the core: envelopes of an unknown origin are refused, then the certificate
    arrives: the receiver's next message to the sender is a summary with ``rs``."""
    import orjson

    w = _store_with_cloud(3)
    cloud, edge = w.nodes["cloud"], w.nodes["edge"]
    r3 = _add_late(w, "r3", knows=("edge",))
    w.connect("edge", "r3")
    w.run_until(w.now + 10)
    _sell(r3, "a")
    w.run_until(w.now + 5)
    raw = edge.disk.read_origin("r3", 1, 1)
    assert raw
    from mesh.core.sync import encode_batch

    now = cloud.clock()
    cloud.core.receive(encode_batch(raw), "edge", now)
    assert cloud.core.stats.get("not_enrolled") == 1
    out = cloud.core.receive(edge.core._certs_message(), "edge", now)
    vs = [e.data for e in out if getattr(e, "peer", None) == "edge" and e.data[:1] == b"V"]
    assert vs and orjson.loads(vs[0][1:])["rs"] == ["r3"]


# --- revocation -------------------------------------------------------------------------


def _mesh(seed: int) -> World:
    """edge and r1..r3 in one full LAN mesh, plus the cloud over WAN to the edge."""
    w = World(seed)
    w.add_node("cloud", "cloud")
    w.add_node("edge", "edge")
    regs = ("r1", "r2", "r3")
    for r in regs:
        w.add_node(r)
    lan = ("edge", *regs)
    for i, a in enumerate(lan):
        for b in lan[i + 1:]:
            w.connect(a, b)
    w.connect("cloud", "edge", LinkModel(latency_ms=20, jitter_ms=0, kind="wan"))
    w.run_until(20_000)
    _stock(w.nodes["edge"])
    w.run_until(w.now + 200)
    return w


def test_a_revocation_ends_the_revoked_nodes_sessions_everywhere_and_its_sales_are_refused(
) -> None:
    """Item 23: the edge adopts a revocation of r3 (as ``storemesh nodes revoke`` makes
    it do): every node, the cloud included, learns it within a few round trips, ends its
    session with r3 and refuses r3's later sales; nobody sends r3's envelopes on."""
    w = _mesh(11)
    edge, r3 = w.nodes["edge"], w.nodes["r3"]
    _sell(r3, "before")
    w.run_until(w.now + 100)
    assert all(n.replica.vv.get("r3") == 1 for n in w.nodes.values())
    crl = issue_revocations(w.store_key, store_id=w.store_id, version=1, revoked={"r3"})
    edge.handle(edge.core.learn_revocations(crl, edge.clock()))
    assert not edge.core.is_up("r3") and not r3.core.is_up("edge")
    others = [n for n in w.nodes.values() if n is not r3]
    took = _until(w, lambda: all(n.trust.crl_version == 1 and not n.core.is_up("r3")
                                 for n in others), 5000)
    assert took < 100, took  # pushed at once, not one summary interval per hop
    assert not any(r3.core.is_up(n.node_id) for n in others)
    for n in others:
        assert n.core.stats.get("revoked_session", 0) >= (0 if n.node_id == "cloud" else 1)
    # r3 sells on; a node that does not know yet relays it to one that does
    for i in range(5):
        _sell(r3, f"after-{i}")
    sends: list[str] = []
    for n in others:
        n.send_filter = (lambda me: lambda peer, data: (
            sends.append(me) if data[:1] == b"E" and b"after-" in data else None) or data
        )(n.node_id)
    w.run_until(w.now + 4 * config.SYNC_RTO_INITIAL_MS)
    for n in others:
        assert n.replica.vv.get("r3") == 1, n.node_id
    assert sends == []
    # a new session with r3 is refused at once by every node that holds the list
    out = edge.core.peer_up("r3", edge.clock())
    assert not edge.core.is_up("r3") and out and out[0].peer == "r3"  # type: ignore[union-attr]
    # the rest of the store still converges
    _sell(w.nodes["r1"], "r1-after")
    w.run_until(w.now + config.SYNC_WAN_INTERVAL_MS * 1.5)  # the cloud acknowledges too
    assert len({n.replica.state_digest() for n in others}) == 1
    assert all(n.core.lag(p) == 0 for n in others for p in n.core.peers)


def test_an_older_or_forged_revocation_list_changes_nothing() -> None:
    from mesh.core.identity import NodeKey
    from mesh.errors import BadSignature

    w = _mesh(12)
    edge = w.nodes["edge"]
    v2 = issue_revocations(w.store_key, store_id=w.store_id, version=2, revoked={"r2"})
    edge.handle(edge.core.learn_revocations(v2, edge.clock()))
    older = issue_revocations(w.store_key, store_id=w.store_id, version=1, revoked={"r1"})
    assert edge.core.learn_revocations(older, edge.clock()) == []
    assert edge.core.is_up("r1")
    forged = issue_revocations(NodeKey.from_bytes(b"\x01" * 32), store_id=w.store_id,
                               version=3, revoked={"r1"})
    try:
        edge.core.learn_revocations(forged, edge.clock())
    except BadSignature:
        pass
    else:
        raise AssertionError("a list not signed by the store key was adopted")
    assert edge.core.is_up("r1") and edge.trust.crl_version == 2


def test_a_new_staff_roster_reaches_every_node_at_once_and_a_forged_one_nowhere() -> None:
    """Issue 11: a staff member disabled on the edge (a new roster version) is refused
    store-wide within a few round trips, not one summary interval per hop: a newer
    roster is pushed to every peer whose summary shows an older one, and relayed on.
    An older roster, and one not signed by the store key, change nothing."""
    from mesh.core.auth import StaffEntry, issue_roster, make_pin_verifier
    from mesh.core.identity import NodeKey
    from mesh.errors import BadSignature

    w = _mesh(13)
    edge = w.nodes["edge"]
    pin = make_pin_verifier("2468", n=1024)
    staff = {"ann": StaffEntry("ann", "Ann", "cashier", False, pin)}
    far = 10**13
    v1 = issue_roster(w.store_key, store_id=w.store_id, version=1, not_after=far, staff=staff)
    edge.handle(edge.core.learn_roster(v1))
    took = _until(w, lambda: all(n.trust.roster_version == 1 for n in w.nodes.values()), 5000)
    assert took < 100, took
    disabled = {"ann": StaffEntry("ann", "Ann", "cashier", True, pin)}
    v2 = issue_roster(w.store_key, store_id=w.store_id, version=2, not_after=far,
                      staff=disabled)
    edge.handle(edge.core.learn_roster(v2))
    took = _until(w, lambda: all(n.trust.roster is not None
                                 and n.trust.roster.staff["ann"].disabled
                                 for n in w.nodes.values()), 5000)
    assert took < 100, took  # pushed at once (the cloud's WAN summary is 15 s away)
    assert edge.core.learn_roster(v1) == [] and edge.trust.roster_version == 2
    forged = issue_roster(NodeKey.from_bytes(b"\x02" * 32), store_id=w.store_id, version=9,
                          not_after=far, staff=staff)
    try:
        edge.core.learn_roster(forged)
    except BadSignature:
        pass
    else:
        raise AssertionError("a roster not signed by the store key was adopted")
    w.run_until(w.now + 1000)
    assert all(n.trust.roster_version == 2 for n in w.nodes.values())
