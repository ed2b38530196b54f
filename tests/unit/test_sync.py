"""The sync core driven by the simulated world: convergence under loss, duplication,
reordering, partitions, crashes; relay; back-pressure; hostile input."""

from __future__ import annotations

import hashlib

import pytest

from mesh import config
from mesh.core.sync import SyncCore, encode_batch
from mesh.sim import LinkModel, World


def _store(seed: int, registers: int = 3, model: LinkModel | None = None) -> World:
    w = World(seed)
    w.add_node("edge", "edge")
    for i in range(1, registers + 1):
        w.add_node(f"r{i}")
    ids = list(w.nodes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            w.connect(a, b, LinkModel(**vars_of(model)) if model else None)
    w.run_until(10)
    return w


def vars_of(m: LinkModel) -> dict[str, object]:
    return {k: getattr(m, k) for k in ("latency_ms", "jitter_ms", "loss", "duplicate",
                                       "bandwidth", "kind")}


def _receive(w: World, sku: str = "A", qty: int = 100) -> None:
    edge = w.nodes["edge"]
    edge.command(lambda r: r.receive(sku, qty, txn=f"rcv-{sku}", now_ms=edge.clock()))


def _sell(w: World, node: str, i: int, sku: str = "A") -> None:
    n = w.nodes[node]
    n.command(lambda r: r.sell(sku, 1, txn=f"{node}-{i}", now_ms=n.clock()))


def _digests(w: World) -> set[bytes]:
    return {n.replica.state_digest() for n in w.nodes.values() if n.alive}


def test_sales_reach_every_node_in_milliseconds() -> None:
    w = _store(1)
    _receive(w)
    w.run_until(w.now + 20)
    for i in range(10):
        for node in ("r1", "r2", "r3"):
            _sell(w, node, i)
        w.run_until(w.now + 5)
    w.run_until(w.now + 10)
    assert len(_digests(w)) == 1
    assert w.nodes["edge"].replica.on_hand("A") == 70


@pytest.mark.parametrize("seed", range(6))
def test_converges_under_loss_duplication_and_reordering(seed: int) -> None:
    w = _store(seed, model=LinkModel(latency_ms=2, jitter_ms=30, loss=0.2, duplicate=0.2))
    _receive(w)
    w.run_until(w.now + 3 * config.SYNC_RTO_INITIAL_MS)
    assert all(n.replica.knows_sku("A") for n in w.nodes.values())
    for i in range(40):
        w.after(i * 7, lambda i=i: _sell(w, f"r{1 + i % 3}", i))
    w.run_until(w.now + 400)
    assert len(_digests(w)) > 0
    # heal: stop loss, let anti-entropy (and retransmission) finish
    for link in w.links.values():
        link.loss = 0.0
    w.run_until(w.now + 3 * config.SYNC_RTO_INITIAL_MS)
    assert len(_digests(w)) == 1, f"reproduce with seed {seed}"
    assert w.nodes["r2"].replica.on_hand("A") == 60
    for node in w.nodes.values():
        assert node.replica.pending_count() == 0


def test_partition_both_sides_sell_then_converge_with_same_exceptions() -> None:
    w = _store(3)
    _receive(w, "LAST", 1)
    w.run_until(w.now + 20)
    for other in ("edge", "r2", "r3"):
        w.set_link("r1", other, False)
    _sell(w, "r1", 1, "LAST")
    _sell(w, "r2", 2, "LAST")
    w.run_until(w.now + 500)
    assert w.nodes["r1"].replica.available("LAST") == 0
    assert w.nodes["r3"].replica.available("LAST") == 0
    for other in ("edge", "r2", "r3"):
        w.set_link("r1", other, True)
    w.run_until(w.now + 2 * config.SYNC_INTERVAL_MS)
    assert len(_digests(w)) == 1
    lists = {tuple((e.origin, e.seq, e.short) for e in n.replica.exceptions())
             for n in w.nodes.values()}
    assert len(lists) == 1 and len(next(iter(lists))) == 1


def test_relay_over_a_chain_without_direct_links() -> None:
    w = World(4)
    for n in ("a", "b", "c", "d"):
        w.add_node(n, "edge" if n == "a" else "register")
    w.connect("a", "b")
    w.connect("b", "c")
    w.connect("c", "d")
    w.run_until(10)
    a = w.nodes["a"]
    a.command(lambda r: r.receive("A", 10, txn="rcv", now_ms=a.clock()))
    w.run_until(w.now + 10)  # well under one anti-entropy interval: relayed eagerly
    assert w.nodes["d"].replica.on_hand("A") == 10
    _sell(w, "d", 1)
    w.run_until(w.now + 10)
    assert len(_digests(w)) == 1


def test_crash_restart_loses_nothing_acknowledged() -> None:
    w = _store(5)
    _receive(w)
    w.run_until(w.now + 10)
    r1 = w.nodes["r1"]
    for i in range(30):
        w.after(i * 0.2, lambda i=i: _sell(w, "r1", i))
    w.after(3.1, r1.crash)  # mid-burst, some sales not yet durable
    w.run_until(w.now + 20)
    acked = {res.seq for res in r1.acked}
    w.after(50, r1.restart)
    w.run_until(w.now + 2 * config.SYNC_INTERVAL_MS)
    assert r1.alive and r1.replica.vv.get("r1") >= max(acked)
    assert len(_digests(w)) == 1
    # the node resumes its chain where the disk left it: new sales extend it. (A crash
    # is silent in the simulator, as a power cut is: the edge, which dials r1, holds its
    # stale session until the heartbeat misses, 1.5 x HEARTBEAT_S; meanwhile r1's sales
    # reach it by relay and anti-entropy, so allow for both.)
    _sell(w, "r1", 999)
    w.run_until(w.now + 3 * config.HEARTBEAT_S * 1000)
    assert len(_digests(w)) == 1
    assert w.nodes["edge"].replica.vv.get("r1") == r1.replica.vv.get("r1")


def test_late_joiner_catches_up_with_back_pressure() -> None:
    w = World(6)
    w.add_node("edge", "edge")
    w.add_node("r1")
    w.connect("edge", "r1")
    edge = w.nodes["edge"]
    edge.command(lambda r: r.receive("A", 1_000_000, txn="rcv", now_ms=edge.clock()))
    for i in range(12_000):
        edge.command(lambda r, i=i: r.sell("A", 1, txn=f"s{i}", now_ms=edge.clock()))
    w.run_until(w.now + 200)
    late = w.add_node("late")
    w.connect("edge", "late")
    w.connect("r1", "late")
    peak = 0

    def watch(kind: str, data: dict[str, object]) -> None:
        nonlocal peak
        for node in (edge, w.nodes["r1"]):
            if node.core.is_up("late"):
                peak = max(peak, node.core.peers["late"].inflight())
    w.observers.append(watch)
    w.run_until(w.now + 2000)
    assert late.replica.vv.get("edge") == 12_001
    assert len(_digests(w)) == 1
    assert 0 < peak <= config.MAX_INFLIGHT_PER_PEER


def test_hostile_messages_are_counted_not_raised() -> None:
    w = _store(7, registers=1)
    edge = w.nodes["edge"]
    r1 = w.nodes["r1"]
    _receive(w)
    w.run_until(w.now + 10)
    core: SyncCore = edge.core
    good = r1.command(lambda r: r.sell("A", 1, txn="x", now_ms=r1.clock()))
    assert good is not None and good.envelope is not None
    forged = bytearray(good.envelope.raw)
    forged[-10] = ord("0") if forged[-10] != ord("0") else ord("1")
    before = edge.replica.state_digest()
    for data in (b"", b"Z", b"V{not json", b"V[]", b'V{"vv":{"a":-1}}', b"E\x00\x00",
                 b"E\x00\x00\x00\x09abc", b"E" + b"\xff" * 4, b"C{}", b'C{"certs":[1]}',
                 encode_batch([bytes(forged)]), encode_batch([b"{garbage}"]),
                 b"E" + b"\x00" * (config.MAX_MESSAGE_BYTES + 1)):
        effects = core.receive(data, "r1", edge.clock())
        assert not any(type(e).__name__ == "Persist" for e in effects)
    assert edge.replica.state_digest() == before
    for reason in ("malformed", "bad_signature", "oversized"):
        assert core.stats.get(reason, 0) > 0, core.stats
    assert core.receive(b"V{}", "stranger", edge.clock()) == []
    assert core.stats["not_connected"] == 1


def test_same_seed_same_trace() -> None:
    def trace(seed: int) -> str:
        w = _store(seed, model=LinkModel(latency_ms=1, jitter_ms=10, loss=0.1, duplicate=0.1))
        _receive(w)
        w.run_until(w.now + 3 * config.SYNC_RTO_INITIAL_MS)
        for i in range(30):
            w.after(i * 3, lambda i=i: _sell(w, f"r{1 + i % 3}", i))
        w.run_until(w.now + 3000)
        h = hashlib.sha256()
        for key in sorted(w.links):
            link = w.links[key]
            h.update(f"{key}{link.messages}{link.bytes}".encode())
        for n in sorted(w.nodes):
            h.update(w.nodes[n].replica.state_digest())
        return h.hexdigest()
    assert trace(11) == trace(11)
    assert trace(11) != trace(12)


def test_a_summary_overtaken_by_a_newer_one_does_not_reopen_the_window() -> None:
    """A reordering link can deliver a peer's older summary after a newer one. What the
    peer acknowledged must not go back down, or the sender counts those envelopes as
    unacknowledged again and may resend them all (and exceed its window)."""
    import orjson

    w = _store(21, registers=1)
    _receive(w)
    for i in range(5):
        _sell(w, "edge", i)
    w.run_until(w.now + 50)
    edge = w.nodes["edge"].core
    peer = edge.peers["r1"]
    assert w.nodes["edge"].replica.vv.get("edge") == 6
    newer = b"V" + orjson.dumps({"vv": {"edge": 6}, "links": ["edge"], "nc": "", "crl": -1,
                                  "rx": 6})
    older = b"V" + orjson.dumps({"vv": {}, "links": ["edge"], "nc": "", "crl": -1, "rx": 0})
    edge.receive(newer, "r1", w.nodes["edge"].clock())
    effects = edge.receive(older, "r1", w.nodes["edge"].clock())
    assert peer.acked.get("edge") == 6
    assert peer.inflight() == 0
    assert not [e for e in effects if type(e).__name__ == "Fetch"]


def test_a_clock_set_back_before_any_timer_fired_still_sends_summaries() -> None:
    """The summary deadlines are wall-clock times. If the clock goes back (NTP step,
    staff fixing the date) before the first timer fired, the next wake-up must notice
    and send, not wait until the clock catches up with the old deadline."""
    w = World(5)
    w.add_node("edge", "edge")
    w.add_node("r1")
    w.connect("edge", "r1")
    edge = w.nodes["edge"]
    core: SyncCore = edge.core
    effects = core.on_timer(edge.clock() - 10 * 60_000)
    sent = [e for e in effects if type(e).__name__ == "Send" and e.data[:1] == b"V"]
    assert [e.peer for e in sent] == ["r1"]
    assert core.next_timer() is not None and core.next_timer() < edge.clock()


def test_a_forged_copy_of_an_envelope_does_not_stop_the_genuine_one() -> None:
    """An envelope a peer sends acknowledges that the peer holds it, but only once we
    have verified it: a forged copy of r1's next envelope, injected on edge's session
    to r1 before r1 made it, must not make r1 believe edge holds it (r1 would then
    never push the genuine one). Found by the swarm (a byzantine injector)."""
    from mesh.core.identity import NodeKey
    from mesh.core.replica import Replica

    w = _store(31, registers=1)
    w.run_until(w.now + 10)
    r1 = w.nodes["r1"]
    impostor = Replica(w.store_id, "r1", "register", NodeKey.generate())
    forged = impostor.receive("A", 5, txn="forged", now_ms=r1.clock()).envelope
    assert forged is not None
    r1.handle(r1.core.receive(encode_batch([forged.raw]), "edge", r1.clock()))
    assert r1.core.stats.get("bad_signature") == 1
    r1.command(lambda r: r.receive("A", 7, txn="genuine", now_ms=r1.clock()))
    w.run_until(w.now + 50)
    assert w.nodes["edge"].replica.vv.get("r1") == 1
    assert w.nodes["edge"].replica.on_hand("A") == 7


def test_an_equivocating_register_is_caught_on_the_live_path() -> None:
    """Issue 10 item 9, in the seeded world: r1 (or whoever holds its key) signs a second
    seq 1 after the first reached every node; r2 relays it to the edge. Every receiver
    that gets it raises one alert with the evidence and keeps the first; a tampered copy
    of the genuine one is counted as bad_signature, not as a duplicate."""
    from mesh.core.replica import Replica

    w = _store(41, registers=2)
    r1, edge = w.nodes["r1"], w.nodes["edge"]
    first = r1.command(lambda r: r.receive("A", 5, txn="a", now_ms=r1.clock()))
    assert first is not None and first.envelope is not None
    w.run_until(w.now + 50)
    assert all(n.replica.vv.get("r1") == 1 for n in w.nodes.values())
    twin = Replica(w.store_id, "r1", "register", r1.key)  # the same key, another history
    second = twin.receive("A", 500, txn="b", now_ms=r1.clock()).envelope
    assert second is not None and second.seq == 1 and second.raw != first.envelope.raw
    w.inject("r2", "edge", encode_batch([second.raw]))
    tampered = first.envelope.raw.replace(b'"p":5', b'"p":9')
    w.inject("r2", "edge", encode_batch([tampered]), delay=1)
    w.run_until(w.now + 50)
    assert [(a.kind, a.origin, a.seq, a.second) for a in edge.alerts] == [
        ("equivocation", "r1", 1, second.raw)]
    assert edge.core.stats["equivocation"] == 1 and edge.core.stats["bad_signature"] == 1
    assert edge.replica.on_hand("A") == 5 and len(_digests(w)) == 1


def test_a_peer_asking_for_pruned_envelopes_is_served_by_others() -> None:
    """A register's ledger no longer holds a prefix (pruned behind a checkpoint,
    ``mesh.durable`` invariant 8): a new node linked only to it gets nothing of that
    prefix from it, and the register does not spin re-reading storage; once linked to
    the edge (the archive) it catches up in full."""
    w = _store(53, registers=1)
    _receive(w)
    w.run_until(w.now + 20)
    for i in range(30):
        _sell(w, "r1", i)
        w.run_until(w.now + 2)
    w.run_until(w.now + 50)
    r1 = w.nodes["r1"]
    assert r1.replica.vv.get("r1") == 30 and w.nodes["edge"].replica.vv.get("r1") == 30
    assert r1.disk.prune({"r1": 20, "edge": 1}) == 21
    w.add_node("r9")
    w.connect("r9", "r1")
    reads = [0]
    real_read = r1.disk.read_origin

    def counted(origin: str, first: int, last: int, limit: int = config.LEDGER_PAGE
                ) -> list[bytes]:
        reads[0] += 1
        return real_read(origin, first, last, limit)
    r1.disk.read_origin = counted  # type: ignore[method-assign]
    w.run_until(w.now + 3 * config.SYNC_INTERVAL_MS)
    r9 = w.nodes["r9"]
    assert r9.replica.vv.get("r1") == 0  # nothing of the pruned prefix from r1
    assert not r1.core.stats.get("internal_error")
    assert 0 < reads[0] < 20  # about one read per summary, not a spin
    w.connect("r9", "edge")
    w.run_until(w.now + 3 * config.SYNC_INTERVAL_MS)
    assert r9.replica.vv.get("r1") == 30 and r9.replica.on_hand("A") == 70
    assert len(_digests(w)) == 1
