"""A revocation racing the revoked node's envelopes (the bug behind the swarm seed
179089057466512 of store_life): the list names the last seq of the revoked node the store
keeps (``upto``), and every replica ends with exactly that prefix of its chain, whatever
arrived first: the list, the envelopes, or some of each, in any order, relayed by anyone.

The replica under test (r1) gets the revoked till's envelopes as a relay from the edge
would send them, and the list straight from its local source, in a chosen order; the
edge (the issuer) learns the list at the same moment. Every order must end in the same
state at both, with r1's own sales kept.
"""

from __future__ import annotations

import pytest

from mesh import config
from mesh.core.identity import (
    NodeKey,
    RevocationList,
    TrustStore,
    issue_revocations,
    revocation_bounds,
)
from mesh.core.sync import encode_batch
from mesh.errors import Malformed, RevokedCertificate
from mesh.sim import World
from mesh.sim.world import SimNode
from tests.unit.test_sync_review import _sell, _stock, _until

N = 6  # envelopes the revoked till r3 signs
BOUND = 3  # the store keeps r3's seqs 1..3


def _world(seed: int = 5) -> tuple[World, SimNode, SimNode, list[bytes]]:
    """edge and r1 linked; r3 linked to nobody, with ``N`` sales on its disk."""
    w = World(seed)
    for n in ("edge", "r1", "r3"):
        w.add_node(n, "edge" if n == "edge" else "register")
    w.connect("edge", "r1")
    w.connect("edge", "r3")
    w.run_until(20_000)
    edge, r1, r3 = w.nodes["edge"], w.nodes["r1"], w.nodes["r3"]
    _stock(edge)
    w.run_until(w.now + 100)
    w.set_link("edge", "r3", False)  # r3 is cut off: what it signs now reaches nobody
    w.run_until(w.now + 100)
    for i in range(N):
        _sell(r3, f"r3-{i}")
    _sell(r1, "r1-a")
    w.run_until(w.now + 100)
    assert edge.replica.vv.get("r3") == 0
    raws = r3.disk.read_origin("r3", 1, N)
    assert len(raws) == N
    r3.crash()  # the stolen till is gone; only copies of its envelopes travel on
    return w, edge, r1, raws


def _crl(w: World, bound: int | None = BOUND) -> RevocationList:
    return issue_revocations(w.store_key, store_id=w.store_id, version=1, revoked={"r3"},
                             upto=None if bound is None else {"r3": bound})


def _run(order: list[object], *, settle: bool = True, seed: int = 5,
         bound: int | None = BOUND) -> tuple[World, SimNode, SimNode]:
    """Deliver to r1, step by step: ``"L"`` the list (to the edge too), ``(a, b)``
    r3's seqs a..b as one batch relayed "from" the edge, ``"sell"`` a sale at r1,
    ``"now"`` no time between the previous step and the next."""
    w, edge, r1, raws = _world(seed)
    crl = _crl(w, bound)
    gap = True
    for step in order:
        if step == "now":
            gap = False
            continue
        if step == "L":
            for n in (edge, r1):
                n.handle(n.core.learn_revocations(crl, n.clock()))
        elif step == "sell":
            _sell(r1, f"r1-{w.now}")
        else:
            a, b = step  # type: ignore[misc]
            r1.driver.message("edge", encode_batch(raws[a - 1:b]))
        if gap:
            w.run_until(w.now + 5)
        gap = True
    if settle:
        w.run_until(w.now + 3 * config.SYNC_INTERVAL_MS)
    return w, edge, r1


ORDERS = {
    "list first": ["L", (1, N)],
    "list last": [(1, N), "L"],
    "interleaved": [(1, 2), "L", (3, N)],
    "one by one": [(1, 1), (2, 2), (3, 3), (4, 4), "L", (5, 5), (6, 6)],
    "above the bound buffered": [(5, N), "L", (1, 4)],
    "list while they are written": [(1, N), "now", "L"],
    "list between two of r1's sales": [(1, N), "sell", "L", "sell"],
}


def _digest(n: SimNode) -> bytes:
    return n.replica.state_digest()


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_every_order_of_a_revocation_and_the_revoked_nodes_envelopes_ends_alike(
        name: str) -> None:
    order = ORDERS[name]
    _, edge_ref, r1_ref = _run(["L", (1, N)] + (["sell", "sell"] if "sell" in order else []))
    w, edge, r1 = _run(order)
    for n in (edge, r1):
        assert n.replica.vv.get("r3") == BOUND, (name, n.node_id, n.replica.vv.to_dict())
        assert _digest(n) == _digest(r1_ref), (name, n.node_id)
    assert _digest(edge) == _digest(r1) == _digest(edge_ref)
    assert r1.replica.vv.get("r1") == r1_ref.replica.vv.get("r1")  # its own sales kept
    assert r1.core.lag("edge") == 0 and edge.core.lag("r1") == 0
    for n in (edge, r1):  # each envelope written once (the ledger's UNIQUE (origin, seq))
        rows = [(e.origin, e.seq) for e in n.disk.rows]
        assert len(rows) == len(set(rows)), (name, n.node_id)
    assert w.nodes["r3"].node_id == "r3"


def test_a_list_that_comes_while_the_envelopes_are_written_leaves_them_out_at_once() -> None:
    """r1 applied r3's 1..6 and queued them for its disk; the list comes before the
    write lands: the rebuild takes what is on disk plus what is queued (1..3 of it),
    not only what is on disk, so nothing r1 applied below the bound goes missing."""
    w, _, r1, raws = _world()
    r1.driver.message("edge", encode_batch(raws))
    _until(w, lambda: r1.replica.vv.get("r3") == N, 10, step=0.01)
    assert r1.replica.vv.get("r3") == N and r1.disk.durable < len(r1.disk.rows)
    r1.handle(r1.core.learn_revocations(_crl(w), r1.clock()))
    assert r1.replica.vv.get("r3") == BOUND
    assert r1.replica.vv.get("r1") == 1 and r1.replica.vv.get("edge") == 1


def test_buffered_envelopes_above_the_bound_are_not_applied_when_the_gap_fills() -> None:
    """r3's 5 and 6 wait in r1's out-of-order buffer (already verified) when the list
    (bound 5) comes; once 1..4 fill the gap, 5 is applied and 6 is not."""
    _, _, ref = _run(["L", (1, N)], bound=5)
    _, edge, r1 = _run([(5, N), "L", (1, 4)], bound=5)
    assert ref.replica.vv.get("r3") == 5
    assert r1.replica.vv.get("r3") == 5 and edge.replica.vv.get("r3") == 5
    assert _digest(r1) == _digest(ref)


def test_a_replica_that_applied_envelopes_above_the_bound_drops_them_and_keeps_the_archive(
) -> None:
    """r1 applied r3's 1..6 and relayed them to the edge; the list (bound 3) comes: both
    rebuild without 4..6, whose rows stay on their disks (the audit archive); a restart
    from a snapshot taken while they were held leaves them out too."""
    w, edge, r1, raws = _world()
    r1.driver.message("edge", encode_batch(raws))
    # ("from" the edge, so r1 sends them on only once the edge's summary shows it lacks them)
    _until(w, lambda: edge.replica.vv.get("r3") == N, 3 * config.SYNC_INTERVAL_MS)
    w.run_until(w.now + 100)
    assert r1.replica.vv.get("r3") == N and edge.replica.vv.get("r3") == N
    r1.durable.ledger.save_snapshot(*r1.durable.take_snapshot())  # holds r3's 4..6
    crl = _crl(w)
    for n in (edge, r1):
        n.handle(n.core.learn_revocations(crl, n.clock()))
        assert n.replica.vv.get("r3") == BOUND
        assert n.durable.rebuild_stats.excluded == N - BOUND
        assert len(n.disk.read_origin("r3", 1, N)) == N  # kept on disk, left out
    _sell(r1, "after")
    w.run_until(w.now + 100)
    before = _digest(r1)
    r1.crash()
    r1.restart()
    assert _digest(r1) == before
    assert r1.durable.rebuild_stats.excluded == N - BOUND
    w.run_until(w.now + 3 * config.SYNC_INTERVAL_MS)
    assert _digest(r1) == _digest(edge)
    # r3's envelopes above the bound, relayed again, are refused
    _until(w, lambda: r1.core.is_up("edge"), 30_000)
    r1.driver.message("edge", encode_batch(raws))
    w.run_until(w.now + 50)
    assert r1.replica.vv.get("r3") == BOUND
    assert r1.core.stats.get("revoked", 0) >= 1


def test_a_list_without_bounds_refuses_the_revoked_node_outright() -> None:
    """A list signed before bounds existed (or a device): refused from when each
    replica learns of it, nothing it applied before is dropped (the old behaviour)."""
    _, _, r1 = _run([(1, 2), "L", (3, N)], bound=None)
    assert r1.replica.vv.get("r3") == 2
    assert r1.durable.rebuild_stats.excluded == 0


# --- the list itself --------------------------------------------------------------------


def _trust_and_key() -> tuple[TrustStore, NodeKey]:
    key = NodeKey.from_bytes(b"\x07" * 32)
    return TrustStore("store-1", key.public_key), key


def test_a_list_without_bounds_signs_the_same_bytes_as_before_bounds() -> None:
    import orjson

    from mesh.core.identity import CRL_DOMAIN

    _, key = _trust_and_key()
    crl = issue_revocations(key, store_id="store-1", version=3, revoked={"a", "b"})
    old = CRL_DOMAIN + orjson.dumps({"store_id": "store-1", "version": 3,
                                     "revoked": ["a", "b"]}, option=orjson.OPT_SORT_KEYS)
    assert crl.body_bytes() == old  # lists signed by older versions still verify
    assert "upto" not in crl.to_dict()
    assert RevocationList.from_dict(crl.to_dict()) == crl


def test_bounds_are_signed_round_trip_and_are_checked() -> None:
    trust, key = _trust_and_key()
    crl = issue_revocations(key, store_id="store-1", version=1, revoked={"a", "device:x"},
                            upto={"a": 4})
    again = RevocationList.from_dict(crl.to_dict())
    assert again == crl and again.upto == {"a": 4}
    trust.apply_revocations(again)
    assert trust.revocation_bound("a") == 4 and trust.revocation_bound("device:x") is None
    tampered = dict(crl.to_dict(), upto={"a": 5})
    with pytest.raises(Exception, match="not signed"):
        RevocationList.from_dict(tampered).verify(key.public_key)
    with pytest.raises(Malformed):
        RevocationList.from_dict(dict(crl.to_dict(), upto={"b": 1}))  # b is not revoked
    with pytest.raises(Malformed):
        RevocationList.from_dict(dict(crl.to_dict(), upto={"a": -1}))
    with pytest.raises(ValueError):
        issue_revocations(key, store_id="store-1", version=2, revoked={"a"}, upto={"b": 1})


def test_check_admits_a_revoked_nodes_seqs_up_to_its_bound_only() -> None:
    from mesh.core.identity import issue_certificate

    trust, key = _trust_and_key()
    node = NodeKey.from_bytes(b"\x08" * 32)
    trust.add_certificate(issue_certificate(key, node_id="a", store_id="store-1",
                                            role="register", public_key=node.public_key,
                                            not_after=10**12))
    trust.apply_revocations(issue_revocations(key, store_id="store-1", version=1,
                                              revoked={"a"}, upto={"a": 4}))
    assert trust.check("a", 0, 4).node_id == "a"
    for seq in (5, None):  # a session (no seq) is refused whatever the bound
        with pytest.raises(RevokedCertificate):
            trust.check("a", 0, seq)
    trust.revoke("a")  # revoked here, outright
    with pytest.raises(RevokedCertificate):
        trust.check("a", 0, 1)


def test_the_next_list_carries_every_bound_forward_and_bounds_the_newly_revoked() -> None:
    trust, key = _trust_and_key()
    trust.apply_revocations(issue_revocations(key, store_id="store-1", version=1,
                                              revoked={"a", "old"}, upto={"a": 4}))
    heads = {"a": 9, "b": 7, "old": 3}
    upto = revocation_bounds(trust, {"a", "old", "b", "device:d"}, lambda n: heads[n])
    assert upto == {"a": 4, "b": 7, "old": 3}
