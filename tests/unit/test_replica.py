"""Replica behaviour: local commands, apply in any order, oversell exceptions, idempotency."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.core.envelope import Envelope, verify
from mesh.core.replica import Replica
from mesh.errors import (
    BrokenChain,
    CommandError,
    Equivocation,
    Malformed,
    SeqGap,
    UnknownSku,
    WrongStore,
)
from tests.conftest import NOW, StoreKit


def _deliver(kit: StoreKit, envs: list[Envelope], to: Replica) -> None:
    for env in envs:
        if env.origin != to.node_id:
            to.apply(verify(env.raw, kit.trust, NOW), NOW)


def test_sale_propagates_and_counts(kit: StoreKit) -> None:
    edge, r1 = kit.replica("edge"), kit.replica("r1")
    e1 = edge.receive("SKU-1", 10, txn="rcv-1", now_ms=NOW, staff="ann").envelope
    assert e1 is not None
    _deliver(kit, [e1], r1)
    sale = r1.sell("SKU-1", 3, txn="pos-1", now_ms=NOW + 5, staff="bob").envelope
    assert sale is not None
    assert sale.meta == {"kind": "sale", "txn": "pos-1", "staff": "bob", "sku": "SKU-1",
                         "qty": -3}
    _deliver(kit, [sale], edge)
    for rep in (edge, r1):
        assert (rep.on_hand("SKU-1"), rep.reserved("SKU-1"), rep.available("SKU-1")) == (7, 0, 7)
    assert edge.state_digest() == r1.state_digest()
    assert edge.hlc.last >= sale.hlc  # the receiver's clock moved past what it saw


def test_bad_commands_are_refused_and_change_nothing(kit: StoreKit) -> None:
    r1 = kit.replica("r1")
    r1.receive("SKU-1", 5, txn="rcv", now_ms=NOW)
    before = r1.state_digest()
    cases = [
        (lambda: r1.sell("SKU-1", -1, txn="a", now_ms=NOW), "qty"),
        (lambda: r1.sell("SKU-1", 0, txn="a", now_ms=NOW), "qty"),
        (lambda: r1.sell("SKU-1", 1.5, txn="a", now_ms=NOW), "qty"),  # type: ignore[arg-type]
        (lambda: r1.sell("SKU-1", True, txn="a", now_ms=NOW), "qty"),
        (lambda: r1.sell("SKU-1", 10**9, txn="a", now_ms=NOW), "qty"),
        (lambda: r1.sell("NOPE", 1, txn="a", now_ms=NOW), "sku"),
        (lambda: r1.sell("", 1, txn="a", now_ms=NOW), "sku"),
        (lambda: r1.sell("SKU-1", 1, txn="", now_ms=NOW), "txn_id"),
        (lambda: r1.sell("SKU-1", 1, txn="x" * 500, now_ms=NOW), "txn_id"),
        (lambda: r1.adjust("SKU-1", 0, reason="count", txn="a", now_ms=NOW), "delta"),
        (lambda: r1.adjust("SKU-1", -1, reason="", txn="a", now_ms=NOW), "reason"),
        (lambda: r1.reserve("SKU-1", 6, txn="a", now_ms=NOW, channel="web"), "qty"),
        (lambda: r1.release("r1:nope", txn="a", now_ms=NOW), "reservation_id"),
        (lambda: r1.fulfil("r1:nope", txn="a", now_ms=NOW), "reservation_id"),
        (lambda: r1.update_catalog(b"x", txn="a", now_ms=NOW), "role"),
        (lambda: r1.sell("SKU-1", 9, txn="a", now_ms=NOW, strict=True), "qty"),
    ]
    for call, fieldname in cases:
        with pytest.raises(CommandError) as info:
            call()
        assert info.value.field == fieldname, info.value
    with pytest.raises(UnknownSku):
        r1.reserve("NOPE", 1, txn="b", now_ms=NOW, channel="web")
    assert r1.state_digest() == before
    assert r1.vv.get("r1") == 1


def test_same_txn_twice_has_one_effect(kit: StoreKit) -> None:
    r1 = kit.replica("r1")
    r1.receive("SKU-1", 5, txn="rcv", now_ms=NOW)
    first = r1.sell("SKU-1", 2, txn="pos-7", now_ms=NOW + 1, staff="bob")
    again = r1.sell("SKU-1", 2, txn="pos-7", now_ms=NOW + 2, staff="bob")
    assert first.envelope is not None and not first.duplicate
    assert again.envelope is None and again.duplicate and again.seq == first.seq
    assert r1.on_hand("SKU-1") == 3
    with pytest.raises(CommandError, match="different operation"):
        r1.sell("SKU-1", 1, txn="pos-7", now_ms=NOW + 3, staff="bob")
    # Reservations are idempotent too, and give back the same reservation id.
    a = r1.reserve("SKU-1", 1, txn="web-1", now_ms=NOW, channel="web", order="o-1")
    b = r1.reserve("SKU-1", 1, txn="web-1", now_ms=NOW, channel="web", order="o-1")
    assert b.duplicate and a.reservation_id == b.reservation_id and r1.reserved("SKU-1") == 1


def test_idempotency_survives_snapshot(kit: StoreKit) -> None:
    r1 = kit.replica("r1")
    r1.receive("SKU-1", 5, txn="rcv", now_ms=NOW)
    r1.sell("SKU-1", 1, txn="pos-1", now_ms=NOW)
    copy = kit.replica("r1")
    copy.restore(r1.snapshot())
    assert copy.state_digest() == r1.state_digest()
    assert copy.sell("SKU-1", 1, txn="pos-1", now_ms=NOW).duplicate
    nxt = copy.sell("SKU-1", 1, txn="pos-2", now_ms=NOW).envelope
    assert nxt is not None and nxt.seq == 3 and nxt.prev == r1.head("r1")


def test_reserve_release_fulfil(kit: StoreKit) -> None:
    edge, r1 = kit.replica("edge"), kit.replica("r1")
    envs = [edge.receive("SKU-1", 5, txn="rcv", now_ms=NOW).envelope]
    res = edge.reserve("SKU-1", 2, txn="web-1", now_ms=NOW + 1, channel="web", order="o-1",
                       expires=NOW + 3_600_000)
    envs.append(res.envelope)
    assert res.reservation_id == "edge:web-1"
    assert (edge.on_hand("SKU-1"), edge.reserved("SKU-1"), edge.available("SKU-1")) == (5, 2, 3)
    _deliver(kit, envs, r1)  # type: ignore[arg-type]
    assert r1.available("SKU-1") == 3
    # A register fulfils the pick-up: reservation gone and stock down, in ONE envelope.
    ful = r1.fulfil("edge:web-1", txn="pickup-1", now_ms=NOW + 2, staff="bob").envelope
    assert ful is not None and {op["t"] for op in ful.ops} == {"rs", "pn"}
    _deliver(kit, [ful], edge)
    for rep in (edge, r1):
        assert (rep.on_hand("SKU-1"), rep.reserved("SKU-1"), rep.available("SKU-1")) == (3, 0, 3)
    # Release of another reservation gives the units back.
    res2 = edge.reserve("SKU-1", 3, txn="web-2", now_ms=NOW + 3, channel="web")
    assert edge.available("SKU-1") == 0
    rel = edge.release(res2.reservation_id or "", txn="cancel-2", now_ms=NOW + 4,
                       reason="customer")
    assert rel.envelope is not None and edge.available("SKU-1") == 3
    _deliver(kit, [res2.envelope, rel.envelope], r1)  # type: ignore[list-item]
    assert r1.state_digest() == edge.state_digest()


def test_expire_releases_due_reservations(kit: StoreKit) -> None:
    edge = kit.replica("edge")
    edge.receive("SKU-1", 5, txn="rcv", now_ms=NOW)
    edge.reserve("SKU-1", 2, txn="w1", now_ms=NOW, channel="web", expires=NOW + 1000)
    edge.reserve("SKU-1", 1, txn="w2", now_ms=NOW, channel="web", expires=NOW + 5000)
    assert edge.expire(now_ms=NOW + 500, txn="exp-0") is None
    done = edge.expire(now_ms=NOW + 1000, txn="exp-1")
    assert done is not None and done.envelope is not None
    assert edge.reserved("SKU-1") == 1 and [r.id for r in edge.active_reservations()] == ["edge:w2"]


def test_concurrent_fulfil_and_release_take_stock_once(kit: StoreKit) -> None:
    edge, r1 = kit.replica("edge"), kit.replica("r1")
    base = [edge.receive("SKU-1", 5, txn="rcv", now_ms=NOW).envelope,
            edge.reserve("SKU-1", 2, txn="w", now_ms=NOW, channel="web").envelope]
    _deliver(kit, base, r1)  # type: ignore[arg-type]
    ful = r1.fulfil("edge:w", txn="f", now_ms=NOW + 1).envelope
    rel = edge.release("edge:w", txn="c", now_ms=NOW + 1).envelope
    _deliver(kit, [rel], r1)  # type: ignore[list-item]
    _deliver(kit, [ful], edge)  # type: ignore[list-item]
    for rep in (edge, r1):
        assert (rep.on_hand("SKU-1"), rep.reserved("SKU-1")) == (3, 0)
    assert edge.state_digest() == r1.state_digest()


def test_out_of_order_and_duplicates_converge(kit: StoreKit) -> None:
    r1, edge = kit.replica("r1"), kit.replica("edge")
    envs = [r1.receive("SKU-1", 50, txn="rcv", now_ms=NOW).envelope]
    envs += [r1.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW + i).envelope for i in range(30)]
    shuffled = list(envs) * 2
    random.Random(7).shuffle(shuffled)
    for env in shuffled:
        edge.apply(verify(env.raw, kit.trust, NOW), NOW)  # type: ignore[union-attr]
    assert edge.pending_count() == 0
    assert edge.state_digest() == r1.state_digest()
    assert edge.on_hand("SKU-1") == 20


def test_apply_refusals_change_nothing(kit: StoreKit) -> None:
    r1, edge = kit.replica("r1"), kit.replica("edge")
    e1 = r1.receive("SKU-1", 5, txn="rcv", now_ms=NOW).envelope
    e2 = r1.sell("SKU-1", 1, txn="s1", now_ms=NOW).envelope
    assert e1 is not None and e2 is not None
    edge.apply(e1, NOW)
    edge.apply(e2, NOW)
    before = edge.state_digest()
    # Equivocation: r1's key signs a different seq 2 (a faulty or cloned register).
    fork = kit.replica("r1")
    fork.apply(e1, NOW)
    twin = fork.sell("SKU-1", 4, txn="other", now_ms=NOW).envelope
    assert twin is not None and twin.seq == 2 and twin.hash != e2.hash
    with pytest.raises(Equivocation) as info:
        edge.apply(twin, NOW)
    assert (info.value.origin, info.value.seq) == ("r1", 2)
    assert {info.value.first, info.value.second} == {e2.hash, twin.raw} or info.value.second \
        == twin.raw
    assert edge.evidence and edge.state_digest() == before
    # A continuation of the fork (seq 3 whose prev is the twin) breaks the chain.
    e3_fork = fork.sell("SKU-1", 1, txn="s3", now_ms=NOW).envelope
    assert e3_fork is not None
    with pytest.raises(BrokenChain):
        edge.apply(e3_fork, NOW)
    # Another store's envelope.
    other = StoreKit(store_id="store-2")
    other.enrol("r1")
    foreign = other.replica("r1").receive("SKU-1", 1, txn="x", now_ms=NOW).envelope
    assert foreign is not None
    with pytest.raises(WrongStore):
        edge.apply(foreign, NOW)
    assert edge.state_digest() == before


def test_seq_far_in_future_is_refused(kit: StoreKit, monkeypatch: pytest.MonkeyPatch) -> None:
    import mesh.config

    monkeypatch.setattr(mesh.config, "MAX_PENDING_PER_ORIGIN", 4)
    r1, edge = kit.replica("r1"), kit.replica("edge")
    envs = [r1.receive("SKU-1", 9, txn="rcv", now_ms=NOW).envelope]
    envs += [r1.sell("SKU-1", 1, txn=f"s{i}", now_ms=NOW).envelope for i in range(6)]
    before = edge.state_digest()
    with pytest.raises(SeqGap):
        edge.apply(envs[6], NOW)  # seq 7 while edge holds nothing: beyond the buffer
    assert edge.apply(envs[2], NOW) == []  # seq 3: buffered
    assert edge.pending_count() == 1 and edge.state_digest() == before


def test_counter_going_backwards_is_malformed(kit: StoreKit) -> None:
    # A lying origin (valid key) signs a counter entry lower than its previous one.
    from mesh.core.envelope import seal

    r1, edge = kit.replica("r1"), kit.replica("edge")
    e1 = r1.receive("SKU-1", 5, txn="rcv", now_ms=NOW).envelope
    assert e1 is not None
    edge.apply(e1, NOW)
    lie = seal(kit.keys["r1"], store="store-1", origin="r1", seq=2, prev=e1.hash, hlc=e1.hlc + 1,
               ops=[{"t": "pn", "sku": "SKU-1", "r": "r1", "p": 2, "n": 0}],
               meta={"kind": "adjust", "txn": "lie", "reason": "x"})
    before = edge.state_digest()
    with pytest.raises(Malformed, match="backwards"):
        edge.apply(lie, NOW)
    assert edge.state_digest() == before and edge.vv.get("r1") == 1


# --- oversell: the same exception list everywhere --------------------------------------

_sale_plan = st.lists(
    st.tuples(st.sampled_from(["r1", "r2", "edge"]), st.sampled_from(["A", "B"]),
              st.integers(1, 3), st.integers(0, 50)),
    min_size=1, max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(plan=_sale_plan, stock=st.integers(0, 8), seed=st.integers(0, 2**32 - 1))
def test_oversell_exceptions_identical_in_any_order(plan: list[tuple[str, str, int, int]],
                                                   stock: int, seed: int) -> None:
    kit = StoreKit()
    kit.enrol("edge", "edge")
    kit.enrol("r1")
    kit.enrol("r2")
    origins = {n: kit.replica(n) for n in ("edge", "r1", "r2")}
    envs = [origins["edge"].receive(s, stock or 1, txn=f"rcv-{s}", now_ms=NOW).envelope
            for s in ("A", "B")]
    for rep in origins.values():
        if rep.node_id != "edge":
            _deliver(kit, envs, rep)  # type: ignore[arg-type]
    # Registers sell concurrently (offline from each other): nobody sees the others' sales.
    for i, (node, sku, qty, dt) in enumerate(plan):
        env = origins[node].sell(sku, qty, txn=f"t{i}", now_ms=NOW + dt).envelope
        envs.append(env)
    rng = random.Random(seed)
    finals = []
    for _ in range(3):
        order = list(envs)
        rng.shuffle(order)
        viewer = kit.replica("r2") if rng.random() < 0.5 else Replica("store-1", "cloud", "cloud")
        for env in order:
            viewer.apply(verify(env.raw, kit.trust, NOW), NOW)  # type: ignore[union-attr]
        finals.append(viewer)
    lists = [[e.to_dict() for e in f.exceptions()] for f in finals]
    assert lists[0] == lists[1] == lists[2]
    for sku in ("A", "B"):
        available = finals[0].available(sku)
        short = sum(e.short for e in finals[0].exceptions(sku))
        # receipts happen-before every sale, so the shortfall is exactly the overshoot
        assert short == max(0, -available)
        assert all(e.kind == "sale" for e in finals[0].exceptions(sku))


def test_last_unit_race_loser_is_the_later_sale(kit: StoreKit) -> None:
    edge, r1, r2 = kit.replica("edge"), kit.replica("r1"), kit.replica("r2")
    rcv = edge.receive("LAST", 1, txn="rcv", now_ms=NOW).envelope
    _deliver(kit, [rcv], r1)  # type: ignore[list-item]
    _deliver(kit, [rcv], r2)  # type: ignore[list-item]
    a = r1.sell("LAST", 1, txn="a", now_ms=NOW + 10).envelope
    b = r2.sell("LAST", 1, txn="b", now_ms=NOW + 20).envelope
    for rep, envs in ((edge, [b, a]), (r1, [b]), (r2, [a])):
        _deliver(kit, envs, rep)  # type: ignore[arg-type]
    for rep in (edge, r1, r2):
        exc = rep.exceptions()
        assert [(e.origin, e.seq, e.short) for e in exc] == [("r2", 1, 1)]
        assert rep.available("LAST") == -1


# --- exceptions with reservations: a function of the envelope set, not arrival order ------

_res_plan = st.lists(
    st.tuples(st.sampled_from(["reserve", "fulfil", "release", "sale"]),
              st.sampled_from(["edge", "r1", "cloud"]), st.integers(0, 40)),
    min_size=1, max_size=20,
)


@settings(max_examples=80, deadline=None)
@given(plan=_res_plan, stock=st.integers(0, 3), seed=st.integers(0, 2**32 - 1))
def test_exceptions_with_reservations_identical_in_any_order(
        plan: list[tuple[str, str, int]], stock: int, seed: int) -> None:
    """Reservations made, fulfilled and released concurrently at three nodes that see
    each other's envelopes only partly (random subsets delivered as they go): every
    replica that ends up holding all envelopes derives the same exception list and
    availability, whatever order they arrived in (the swarm found orders that did not)."""
    kit = StoreKit()
    for n, role in (("edge", "edge"), ("r1", "register"), ("cloud", "cloud")):
        kit.enrol(n, role)
    nodes = {n: kit.replica(n) for n in ("edge", "r1", "cloud")}
    rng = random.Random(seed)
    envs = [nodes["edge"].receive("A", stock + 1, txn="rcv", now_ms=NOW).envelope]
    for rep in nodes.values():
        if rep.node_id != "edge":
            _deliver(kit, envs, rep)  # type: ignore[arg-type]
    for i, (kind, node, dt) in enumerate(plan):
        rep = nodes[node]
        now = NOW + 10 * i + dt
        try:
            if kind == "reserve":
                res = rep.reserve("A", 1, txn=f"t{i}", now_ms=now, channel="web")
            elif kind == "sale":
                res = rep.sell("A", 1, txn=f"t{i}", now_ms=now)
            else:
                active = rep.active_reservations("A")
                if not active:
                    continue
                rid = rng.choice(active).id
                res = (rep.fulfil(rid, txn=f"t{i}", now_ms=now) if kind == "fulfil"
                       else rep.release(rid, txn=f"t{i}", now_ms=now))
        except CommandError:
            continue
        assert res.envelope is not None
        envs.append(res.envelope)
        for other in nodes.values():  # partial, random gossip as the day goes on
            if other is not rep and rng.random() < 0.5:
                for env in envs:
                    if env.origin != other.node_id and env.seq > other.vv.get(env.origin):
                        other.apply(env, NOW)
    views = []
    for _ in range(3):
        order = list(envs)
        rng.shuffle(order)
        viewer = Replica("store-1", "viewer", "register")
        for env in order:
            viewer.apply(verify(env.raw, kit.trust, NOW), NOW)  # type: ignore[union-attr]
        views.append(viewer)
    first = views[0]
    for v in views[1:]:
        assert v.state_digest() == first.state_digest()
        assert v.exceptions() == first.exceptions()
    assert first.reserved("A") == sum(r.qty for r in first.active_reservations("A"))


def test_fulfil_arriving_before_its_reservation_gives_the_same_exceptions(
        kit: StoreKit) -> None:
    """Regression (found by the simulation swarm): the edge's fulfilment reaches a
    replica before the cloud's reservation it fulfils (slow WAN)."""
    edge, cloud, r1 = kit.replica("edge"), kit.replica("cloud"), kit.replica("r1")
    rcv = edge.receive("A", 1, txn="r", now_ms=NOW).envelope
    _deliver(kit, [rcv], cloud)  # type: ignore[list-item]
    _deliver(kit, [rcv], r1)  # type: ignore[list-item]
    res = cloud.reserve("A", 1, txn="o1", now_ms=NOW + 10, channel="web")
    _deliver(kit, [res.envelope], edge)  # type: ignore[list-item]
    _deliver(kit, [res.envelope], r1)  # type: ignore[list-item]
    sale = r1.sell("A", 1, txn="s", now_ms=NOW + 15).envelope
    ful = edge.fulfil(res.reservation_id or "", txn="f", now_ms=NOW + 20).envelope
    x, y = Replica("store-1", "x", "register"), Replica("store-1", "y", "register")
    for e in (rcv, res.envelope, sale, ful):
        x.apply(e, NOW)  # type: ignore[arg-type]
    for e in (rcv, sale, ful, res.envelope):
        y.apply(e, NOW)  # type: ignore[arg-type]
    assert x.available("A") == y.available("A") == -1
    assert x.exceptions() == y.exceptions()
    assert [(e.origin, e.kind, e.short) for e in x.exceptions()] == [("edge", "fulfil", 1)] \
        or [(e.origin, e.kind) for e in x.exceptions()] == [("r1", "sale")]


def test_a_far_future_stamp_is_applied_but_not_adopted_live_or_on_rebuild(kit: StoreKit) -> None:
    """Issue 10 item 16: r1's clock is a day ahead. Its sale is accepted everywhere (the
    receiver's wall clock decides nothing), but the edge's HLC does not follow it, live
    or when it rebuilds from its ledger (``now_ms=None``, as recovery does); a stamp
    within MAX_HLC_ADOPT_AHEAD_MS still is adopted (causality)."""
    from mesh import config

    day = 24 * 3600 * 1000
    edge, r1, r2 = kit.replica("edge"), kit.replica("r1"), kit.replica("r2")
    rcv = edge.receive("SKU-1", 10, txn="rcv-1", now_ms=NOW).envelope
    assert rcv is not None
    _deliver(kit, [rcv], r1)
    _deliver(kit, [rcv], r2)
    far = r1.sell("SKU-1", 1, txn="pos-1", now_ms=NOW + day).envelope
    near = r2.sell("SKU-1", 1, txn="pos-2",
                   now_ms=NOW + config.MAX_HLC_ADOPT_AHEAD_MS // 2).envelope
    assert far is not None and near is not None
    _deliver(kit, [far], edge)
    assert edge.on_hand("SKU-1") == 9 and edge.hlc_not_adopted == 1
    assert edge.hlc.last < far.hlc and (edge.hlc.last >> 16) < NOW + day // 2
    _deliver(kit, [near], edge)
    assert edge.hlc.last > near.hlc  # within the bound: adopted

    rebuilt = kit.replica("edge")
    for env in (rcv, far, near):
        rebuilt.apply(verify(env.raw, kit.trust, NOW), None)
    assert rebuilt.on_hand("SKU-1") == 8
    assert (rebuilt.hlc.last >> 16) < NOW + day // 2
    assert rebuilt.hlc.last >= near.hlc
