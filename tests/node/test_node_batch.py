"""The batched receive path: ``SyncCore.receive_many`` (pure) and the node's per-iteration
drain (a real Node on 127.0.0.1 with real, authenticated peer sessions).

What must hold: a batch has the effect of its messages received one by one; an origin's
run across messages costs one signature check and one ledger append; a bad envelope or
message from one peer costs the other peers nothing, and every count stays right."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

import mesh.core.envelope
from mesh import config
from mesh.core.envelope import Envelope
from mesh.core.replica import Replica
from mesh.core.sync import Persist, SyncCore, encode_batch
from mesh.http import api
from mesh.net import transport
from mesh.node.node import Node
from mesh.store.datadir import NodeIdentity, enrol_node, init_store
from tests.conftest import NOW, StoreKit
from tests.meshkit import bearer, issue_token, now_ms, wait_until


def _chain(r: Replica, n: int, sku: str = "A", now: int = NOW) -> list[Envelope]:
    """A receipt of ``sku`` then ``n - 1`` one-unit sales, all by ``r``."""
    out = [r.receive(sku, 10**6, txn=f"{r.node_id}-rx-{sku}", now_ms=now).envelope]
    for i in range(n - 1):
        out.append(r.sell(sku, 1, txn=f"{r.node_id}-{sku}-{i}", now_ms=now).envelope)
    assert all(e is not None for e in out)
    return [e for e in out if e is not None]


def _tampered(env: Envelope) -> bytes:
    """``env`` with one hex digit of its signature changed: decodes, does not verify."""
    raw = env.raw
    flip = b"1" if raw[-3:-2] != b"1" else b"2"
    return raw[:-3] + flip + raw[-2:]


def _core(kit: StoreKit, *peers: str) -> SyncCore:
    core = SyncCore(kit.replica("edge"), kit.trust, random.Random(0))
    for p in peers:
        core.peer_up(p, NOW)
    return core


def _persisted(effects: list[Any]) -> list[Envelope]:
    return [e for eff in effects if isinstance(eff, Persist) for e in eff.envelopes]


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts Ed25519 verifications of envelopes (the real function still runs)."""
    calls = [0]
    real = mesh.core.envelope.verify_signature

    def counting(*args: Any) -> bool:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(mesh.core.envelope, "verify_signature", counting)
    yield calls


# --- SyncCore.receive_many -----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_a_batch_has_the_effect_of_its_messages_one_by_one(kit: StoreKit, seed: int) -> None:
    rng = random.Random(seed)
    a = _chain(kit.replica("r1"), 12, "A")
    b = _chain(kit.replica("r2"), 9, "B")
    msgs: list[tuple[bytes, str]] = []
    for peer, chain in (("r1", a), ("r2", b)):
        i = 0
        while i < len(chain):  # messages of 1..4 envelopes, a duplicate now and then
            k = rng.randint(1, 4)
            msgs.append((encode_batch(e.raw for e in chain[i:i + k]), peer))
            if rng.random() < 0.3:
                msgs.append((encode_batch([chain[i].raw]), peer))
            i += k
    # interleave the two peers' messages, each peer's in order, with summaries between
    order = sorted(range(len(msgs)), key=lambda j: (rng.random(), j))
    by_peer: dict[str, list[tuple[bytes, str]]] = {"r1": [], "r2": []}
    for data, peer in msgs:
        by_peer[peer].append((data, peer))
    items: list[tuple[bytes, str]] = []
    for j in order:
        peer = msgs[j][1]
        items.append(by_peer[peer].pop(0))
        if rng.random() < 0.2:
            items.append((b"V" + orjson.dumps({"vv": {}, "links": [], "nc": "", "crl": -1,
                                               "rx": 0}), peer))

    one_by_one, batched = _core(kit, "r1", "r2"), _core(kit, "r1", "r2")
    persisted_one = [e for data, peer in items
                     for e in _persisted(one_by_one.receive(data, peer, NOW))]
    persisted_batch = _persisted(batched.receive_many(items, NOW))

    assert batched.replica.state_digest() == one_by_one.replica.state_digest()
    assert batched.replica.vv.to_dict() == {"r1": 12, "r2": 9}
    assert batched.stats == one_by_one.stats
    assert batched.received == one_by_one.received == 21
    assert batched.bytes_in == one_by_one.bytes_in
    for pid in ("r1", "r2"):
        assert batched.peers[pid].rx == one_by_one.peers[pid].rx
        assert batched.peers[pid].acked.to_dict() == one_by_one.peers[pid].acked.to_dict()
    assert sorted(persisted_batch, key=lambda e: (e.origin, e.seq)) == \
        sorted(persisted_one, key=lambda e: (e.origin, e.seq))
    for origin in ("r1", "r2"):  # apply order within an origin = seq order (ledger inv. 1)
        seqs = [e.seq for e in persisted_batch if e.origin == origin]
        assert seqs == sorted(seqs)


def test_an_origin_run_across_messages_costs_one_signature_and_one_persist(
        kit: StoreKit, signature_checks: list[int]) -> None:
    chain = _chain(kit.replica("r1"), 6)
    items = [(encode_batch([e.raw]), "r1") for e in chain]

    effects = _core(kit, "r1").receive_many(items, NOW)
    assert signature_checks[0] == 1
    assert [len(eff.envelopes) for eff in effects if isinstance(eff, Persist)] == [6]

    signature_checks[0] = 0
    core = _core(kit, "r1")
    for data, peer in items:
        core.receive(data, peer, NOW)
    assert signature_checks[0] == 6  # what the same messages cost one by one


def test_a_batch_is_cut_at_one_page(kit: StoreKit, signature_checks: list[int]) -> None:
    n = config.LEDGER_PAGE + 400
    chain = _chain(kit.replica("r1"), n)
    third = n // 3 + 1
    items = [(encode_batch(e.raw for e in chain[i:i + third]), "r1")
             for i in range(0, n, third)]
    core = _core(kit, "r1")
    effects = core.receive_many(items, NOW)
    assert core.replica.vv.get("r1") == n
    assert signature_checks[0] == 2  # two pages, each one chain (never one-at-a-time)
    assert [len(eff.envelopes) for eff in effects if isinstance(eff, Persist)] == \
        [2 * third, n - 2 * third]


def test_a_bad_envelope_or_message_costs_the_other_peers_nothing(kit: StoreKit) -> None:
    a = _chain(kit.replica("r1"), 4, "A")
    b = _chain(kit.replica("r2"), 4, "B")
    items = [
        (encode_batch([a[0].raw]), "r1"),
        (encode_batch([b[0].raw, b[1].raw]), "r2"),
        (encode_batch([_tampered(a[1])]), "r1"),  # forged: refused
        (b"E\x00\x00\x10\x00{", "r2"),  # truncated frame: the message is dropped
        (encode_batch([a[2].raw]), "r1"),  # cannot link past the forged one
        (encode_batch([b[2].raw, b[3].raw]), "r2"),
        (encode_batch([a[3].raw]), "stranger"),  # no session: refused, counted
    ]
    core = _core(kit, "r1", "r2")
    effects = core.receive_many(items, NOW)

    assert core.replica.vv.to_dict() == {"r1": 1, "r2": 4}
    assert core.stats == {"bad_signature": 1, "malformed": 1, "not_connected": 1}
    assert [(e.origin, e.seq) for e in _persisted(effects)] == \
        [("r1", 1), ("r2", 1), ("r2", 2), ("r2", 3), ("r2", 4)]
    assert core.peers["r1"].rx == 3  # frames received from it, good or bad
    assert core.peers["r2"].rx == 4
    assert "stranger" not in core.peers


def test_messages_of_an_unknown_type_and_oversized_ones_are_counted(kit: StoreKit) -> None:
    good = _chain(kit.replica("r1"), 2)
    items = [(b"Xnonsense", "r1"), (b"E" + b"\x00" * (config.MAX_MESSAGE_BYTES + 1), "r1"),
             (encode_batch(e.raw for e in good), "r1")]
    core = _core(kit, "r1")
    core.receive_many(items, NOW)
    assert core.stats == {"malformed": 1, "oversized": 1}
    assert core.replica.vv.get("r1") == 2


# --- the node: one drain per loop iteration ---------------------------------------------




class Peers:
    """Registers of the node's store, each with a real authenticated session to it."""

    def __init__(self, node: Node, http: aiohttp.ClientSession) -> None:
        self.node = node
        self.http = http
        self.identities: dict[str, NodeIdentity] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.sessions: list[transport.Session] = []
        self.got: dict[str, list[tuple[float, bytes]]] = {}  # peer -> (when, message)

    async def connect(self, ident: NodeIdentity) -> Replica:
        self.node.identity.trust.add_certificate(ident.certificate)
        s = await transport.dial(self.http, self.node.url, ident, now_ms)
        self.sessions.append(s)
        got = self.got.setdefault(ident.node_id, [])
        self.tasks.append(asyncio.create_task(
            s.run(lambda _peer, data: got.append((time.monotonic(), data)))))
        await wait_until(lambda: self.node.core.is_up(ident.node_id), 5, "session up")
        return Replica(ident.store_id, ident.node_id, ident.role, ident.key)

    async def close(self) -> None:
        for s in self.sessions:
            s.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest_asyncio.fixture
async def live(tmp_path: Path) -> AsyncIterator[tuple[Node, Peers, list[Replica]]]:
    edge = init_store(tmp_path / "edge", "store-1", now_ms=now_ms(), node_id="edge")
    assert edge.store_key is not None
    regs = [enrol_node(tmp_path / f"reg-{i}", edge.store_key, "store-1", "register",
                       now_ms=now_ms(), node_id=f"reg-{i}") for i in (1, 2)]
    _READER[:] = [issue_token(edge, "dashboard", role="read")]  # the live stream's reader
    node = Node(tmp_path / "edge", insecure_plaintext=True,
                http_host="127.0.0.1", http_port=0, discovery=False)
    await node.start()
    async with aiohttp.ClientSession() as http:
        peers = Peers(node, http)
        try:
            replicas = [await peers.connect(ident) for ident in regs]
            yield node, peers, replicas
        finally:
            await peers.close()
            await node.close()


_READER: list[str] = []


def _count_appends(node: Node) -> list[int]:
    """Counts ledger appends (each still goes to the real ledger)."""
    counts: list[int] = []
    ledger = node.durable.ledger
    real = ledger.append

    def counting(envs: Any, **kw: Any) -> Any:
        counts.append(len(envs))
        return real(envs, **kw)

    ledger.append = counting  # type: ignore[method-assign]
    return counts


@pytest.mark.asyncio
async def test_messages_of_one_iteration_become_one_append_and_one_event_per_sku(
        live: tuple[Node, Peers, list[Replica]]) -> None:
    node, _, (r1, r2) = live
    a = _chain(r1, 5, "A", now_ms())
    b = _chain(r2, 3, "B", now_ms())
    appends = _count_appends(node)
    events = node.subscribe()
    rows = node.durable.ledger.count()
    # what two session readers deliver in one loop iteration: one message per envelope
    for env in a:
        node._on_message("reg-1", encode_batch([env.raw]))
    for env in b:
        node._on_message("reg-2", encode_batch([env.raw]))
    await wait_until(lambda: node.durable.ledger.count() == rows + 8, 5, "all durable")
    await wait_until(lambda: events.qsize() >= 2, 5, "live-stream events")
    await asyncio.sleep(0.05)  # nothing else may follow

    assert appends == [8]
    got = [events.get_nowait() for _ in range(events.qsize())]
    assert [(e["sku"], e["origin"], e["seq"], e["on_hand"]) for e in got] == [
        ("A", "reg-1", 5, 10**6 - 4), ("B", "reg-2", 3, 10**6 - 2)]
    assert node.core.received == 8
    assert node.replica.vv.to_dict() == {"reg-1": 5, "reg-2": 3}


@pytest.mark.asyncio
async def test_one_sku_changed_by_two_origins_in_one_batch_names_each_origin(
        live: tuple[Node, Peers, list[Replica]]) -> None:
    """A subscriber that waits for (origin, seq) must see every origin's newest change
    of a SKU, even when two origins' changes to it land in one batch."""
    node, _, (r1, r2) = live
    a = _chain(r1, 3, "A", now_ms())  # receipt + 2 sales by reg-1
    r2.apply(a[0], now_ms())  # reg-2 has heard of the receipt: it may sell A too
    b = [r2.sell("A", 1, txn=f"r2-A-{i}", now_ms=now_ms()).envelope for i in range(2)]
    c = r1.sell("A", 1, txn="r1-A-x", now_ms=now_ms()).envelope
    assert c is not None and all(e is not None for e in b)
    rows = node.durable.ledger.count()
    for env in a:
        node._on_message("reg-1", encode_batch([env.raw]))
    await wait_until(lambda: node.durable.ledger.count() == rows + 3, 5, "reg-1 durable")
    events = node.subscribe()
    for env in [*b, c]:  # both origins change A in one iteration
        assert env is not None
        node._on_message("reg-2" if env.origin == "reg-2" else "reg-1",
                         encode_batch([env.raw]))
    await wait_until(lambda: events.qsize() >= 2, 5, "live-stream events")
    await asyncio.sleep(0.05)
    got = [events.get_nowait() for _ in range(events.qsize())]
    assert [(e["sku"], e["origin"], e["seq"]) for e in got] == [("A", "reg-1", 4),
                                                               ("A", "reg-2", 2)]
    assert got[0]["on_hand"] == got[1]["on_hand"] == 10**6 - 2 - 1 - 2


@pytest.mark.asyncio
async def test_a_forged_envelope_in_a_drain_costs_the_other_peer_nothing(
        live: tuple[Node, Peers, list[Replica]]) -> None:
    node, _, (r1, r2) = live
    a = _chain(r1, 3, "A", now_ms())
    b = _chain(r2, 3, "B", now_ms())
    rows = node.durable.ledger.count()
    node._on_message("reg-1", encode_batch([a[0].raw]))
    node._on_message("reg-2", encode_batch([b[0].raw]))
    node._on_message("reg-1", encode_batch([_tampered(a[1])]))
    node._on_message("reg-2", encode_batch([b[1].raw, b[2].raw]))
    await wait_until(lambda: node.durable.ledger.count() == rows + 4, 5, "good ones durable")
    assert node.core.stats.get("bad_signature") == 1
    assert node.replica.vv.to_dict() == {"reg-1": 1, "reg-2": 3}
    # the forger's next honest message still gets through
    node._on_message("reg-1", encode_batch([a[1].raw, a[2].raw]))
    await wait_until(lambda: node.replica.vv.get("reg-1") == 3, 5, "reg-1 repaired")
    await wait_until(lambda: node.durable.ledger.count() == rows + 6, 5, "all durable")


@pytest.mark.asyncio
async def test_messages_sent_over_real_sessions_are_applied_in_order(
        live: tuple[Node, Peers, list[Replica]]) -> None:
    node, peers, (r1, r2) = live
    a = _chain(r1, 40, "A", now_ms())
    b = _chain(r2, 40, "B", now_ms())
    s1, s2 = peers.sessions
    for x, y in zip(a, b, strict=True):
        s1.send(encode_batch([x.raw]))
        s2.send(encode_batch([y.raw]))
    await wait_until(lambda: node.replica.vv.to_dict() == {"reg-1": 40, "reg-2": 40}, 10,
                     "every envelope applied")
    assert node.core.stats == {}
    assert node.replica.on_hand("A") == node.replica.on_hand("B") == 10**6 - 39


@pytest.mark.asyncio
async def test_summaries_keep_their_period_while_messages_stream_in(
        live: tuple[Node, Peers, list[Replica]]) -> None:
    """The timer loop is no longer woken by every message: the periodic summary (V) to
    each peer must still go out every SYNC_INTERVAL_MS (+-25 %), busy or idle."""
    node, peers, (r1, _) = live
    chain = _chain(r1, 120, "A", now_ms())
    s1 = peers.sessions[0]
    t0 = time.monotonic()
    for env in chain:  # ~2.4 s of pushes at 50/s
        s1.send(encode_batch([env.raw]))
        await asyncio.sleep(0.02)
    await asyncio.sleep(max(0.0, 3 * config.SYNC_INTERVAL_MS / 1000 - (time.monotonic() - t0)))
    assert node.replica.vv.get("reg-1") == 120
    for pid in ("reg-1", "reg-2"):
        times = [t for t, data in peers.got[pid] if data[:1] == b"V" and t >= t0]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(times) >= 2, (pid, times)
        # reg-1 also gets acknowledgements (after a gap, or every SYNC_ACK_EVERY), so only
        # the longest gap is bounded: no summary may be overdue
        assert max(gaps) <= 1.25 * config.SYNC_INTERVAL_MS / 1000 + 0.15, (pid, gaps)


# --- the live stream: queued events leave together ------------------------------------------


async def _sse_events(resp: aiohttp.ClientResponse, n: int) -> list[tuple[str | None, Any]]:
    """The next ``n`` SSE events (name, data); comments and retry lines skipped."""
    out: list[tuple[str | None, Any]] = []
    name: str | None = None
    while len(out) < n:
        line = (await asyncio.wait_for(resp.content.readline(), 5)).decode()
        assert line, f"the stream ended after {len(out)} of {n} events (status {resp.status})"
        if line.startswith("event: "):
            name = line[7:].strip()
        elif line.startswith("data: "):
            out.append((name, orjson.loads(line[6:])))
            name = None
    return out


@pytest.mark.asyncio
async def test_a_drain_reaches_the_live_stream_in_order(
        live: tuple[Node, Peers, list[Replica]]) -> None:
    node, _, (r1, r2) = live
    a = _chain(r1, 4, "A", now_ms())
    b = _chain(r2, 4, "B", now_ms())
    async with aiohttp.ClientSession(base_url=node.url) as http, \
            http.get("/v1/events", headers=bearer(_READER[0])) as resp:
        await asyncio.wait_for(resp.content.readline(), 5)  # subscribed
        for x, y in zip(a, b, strict=True):
            node._on_message("reg-1", encode_batch([x.raw]))
            node._on_message("reg-2", encode_batch([y.raw]))
        got = await _sse_events(resp, 2)
        assert [(e["sku"], e["origin"], e["seq"], e["on_hand"]) for _, e in got] == [
            ("A", "reg-1", 4, 10**6 - 3), ("B", "reg-2", 4, 10**6 - 3)]


@pytest.mark.asyncio
async def test_queued_events_all_arrive_in_order_and_a_shutdown_ends_the_stream(
        live: tuple[Node, Peers, list[Replica]]) -> None:
    node, _, _ = live
    n = 2 * api.SSE_MAX_WRITE_EVENTS + 7  # more than one write's worth
    async with aiohttp.ClientSession(base_url=node.url) as http, \
            http.get("/v1/events", headers=bearer(_READER[0])) as resp:
        await asyncio.wait_for(resp.content.readline(), 5)
        [queue] = list(node._subscribers)
        for i in range(n):  # queued with no await between: the stream finds them waiting
            queue.put_nowait({"sku": f"S{i}", "i": i})
        queue.put_nowait({"type": "shutdown"})
        queue.put_nowait({"sku": "after", "i": -1})  # never sent: the stream has ended
        got = await _sse_events(resp, n + 1)
        assert [e for _, e in got[:n]] == [{"sku": f"S{i}", "i": i} for i in range(n)]
        assert all(name is None for name, _ in got[:n])
        assert got[n] == ("shutdown", {"type": "shutdown"})
        assert await asyncio.wait_for(resp.content.read(), 5) == b"\n"  # then the end
