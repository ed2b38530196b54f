"""The sync core's topology memos, rewritten for speed (docs/simulation.md, "Simulator
speed"), give exactly what the plain definitions give, on random topologies: relay
targets (``_relay_targets_for``, once built from ``_preferred_bridge`` and ``_reaches``
per peer) and the covered check of ``_eligible``."""

from __future__ import annotations

import random

import pytest

from mesh.core.sync import SyncCore, _Peer
from mesh.sim import World


def _reference_relay_targets(core: SyncCore, source: _Peer, origin: str) -> tuple[str, ...]:
    """``_relay_targets_for`` as first written (O(peers²) per call)."""
    bridges = [q for q in core.peers if core._preferred_bridge(q, origin)]
    out = []
    for p in core.peers.values():
        if (p is source or core._reaches(p, origin) or source.id in p.links
                or p.id in source.links):
            continue
        if source.id == origin and any(q in p.links for q in bridges):
            continue
        out.append(p.id)
    return tuple(out)


def _random_core(rng: random.Random, me: str) -> SyncCore:
    """A core whose peers report random sessions (some WAN, some dropped)."""
    w = World(rng.randrange(1 << 30))
    w.add_node(me, "edge")
    core = w.nodes[me].core
    ids = [f"n{i:02d}" for i in range(rng.randint(1, 14))]
    everyone = [*ids, me, "ghost"]  # "ghost": an id no session of ours names
    all_wan = rng.random() < 0.2
    for pid in ids:
        if rng.random() < 0.8:  # some ids are not our peers (only named in links)
            peer = core.peers[pid] = _Peer(pid)
            peer.wan = all_wan or rng.random() < 0.2
            links = frozenset(q for q in everyone if q != pid and rng.random() < 0.5)
            peer.links = links
            peer.reach = links | {pid}
    return core


@pytest.mark.parametrize("seed", range(300))
def test_relay_targets_match_the_plain_definition(seed: int) -> None:
    rng = random.Random(seed)
    me = rng.choice(["a0", "n05", "zz"])  # smaller, between, larger than the peers
    core = _random_core(rng, me)
    if not core.peers:
        return
    origins = [*core.peers, "n99", "ghost"]
    for source in core.peers.values():
        for origin in [source.id, *rng.sample(origins, min(4, len(origins)))]:
            assert (core._relay_targets_for(source, origin)
                    == _reference_relay_targets(core, source, origin)), (source.id, origin)


def _check_relay_memo(core: SyncCore) -> None:
    """Every memoised relay target list is what a fresh computation gives; its bridges
    too, and None (not computed) only where no peer is left to decide for."""
    for (sid, origin), (targets, bridges) in core._relay_targets.items():
        source = core.peers[sid]
        fresh, fresh_bridges = core._relay_targets_with_bridges(source, origin)
        assert targets == fresh, (sid, origin)
        if bridges is None:
            assert fresh_bridges is None, (sid, origin)
        else:
            assert bridges == core._bridges(source, origin), (sid, origin)


def _covered(core: SyncCore, peer_id: str, origin: str) -> bool:
    """The covered check of ``_eligible``, unmemoised."""
    me, peers = core.replica.node_id, core.peers
    links = peers[peer_id].links
    if origin in peers:
        return any(q != me and core._preferred_bridge(q, origin) for q in links)
    return any(q != me and q in peers and origin in peers[q].links for q in links)


def _fill_memos(core: SyncCore, rng: random.Random, now: int) -> None:
    """Fill the memos through the code that fills them (relay, durable, eligible)."""
    origins = [*core.peers, "n99", "ghost"]
    for source in core.peers.values():
        for origin in [source.id, *rng.sample(origins, min(3, len(origins)))]:
            key = (source.id, origin)
            if key not in core._relay_targets:
                core._relay_targets[key] = core._relay_targets_with_bridges(source, origin)
            if origin not in core._unreached:
                core._unreached[origin] = tuple(
                    p.id for p in core.peers.values() if origin not in p.reach)
            core._eligible(source, origin, now)


@pytest.mark.parametrize("seed", range(200))
def test_links_changed_keeps_only_memo_entries_a_full_clear_would_rebuild_alike(
        seed: int) -> None:
    rng = random.Random(seed)
    me = rng.choice(["a0", "n05", "zz"])
    core = _random_core(rng, me)
    if not core.peers:
        return
    now = 1_790_000_000_000
    everyone = [*core.peers, me, "ghost", "n99"]
    for _ in range(12):
        _fill_memos(core, rng, now)
        x = core.peers[rng.choice(list(core.peers))]
        old = x.links
        flip = rng.sample(everyone, rng.randint(1, 3))
        x.links = frozenset(set(old) ^ {q for q in flip if q != x.id})
        x.reach = x.links | {x.id}
        core._links_changed(x, old)
        _check_relay_memo(core)
        for (pid, origin), cov in core._covered.items():
            assert cov == _covered(core, pid, origin), (pid, origin)
        for origin, pids in core._unreached.items():
            assert pids == tuple(p.id for p in core.peers.values() if origin not in p.reach)


def _check_memos(core: SyncCore) -> None:
    _check_relay_memo(core)
    for (pid, origin), cov in core._covered.items():
        assert cov == _covered(core, pid, origin), (pid, origin)
    for origin, pids in core._unreached.items():
        assert pids == tuple(p.id for p in core.peers.values() if origin not in p.reach)


@pytest.mark.parametrize("seed", range(200))
def test_sessions_coming_and_going_keep_the_memos_true(seed: int) -> None:
    """peer_up, peer_down and summaries with other links, in random order: every memo
    entry left equals what the plain definitions give now."""
    rng = random.Random(seed)
    me = rng.choice(["a0", "n05", "zz"])
    core = _random_core(rng, me)
    now = 1_790_000_000_000
    pool = [f"n{i:02d}" for i in range(16)]
    everyone = [*pool, me, "ghost"]
    for _ in range(25):
        if core.peers:
            _fill_memos(core, rng, now)
        op = rng.random()
        if op < 0.35 or not core.peers:
            core.peer_up(rng.choice(pool), now, wan=rng.random() < 0.2)  # new or again
        elif op < 0.55:
            core.peer_down(rng.choice(list(core.peers)), now)
        else:
            x = core.peers[rng.choice(list(core.peers))]
            old = x.links
            flip = {q for q in rng.sample(everyone, rng.randint(1, 3)) if q != x.id}
            x.links = frozenset(set(old) ^ flip)
            x.reach = x.links | {x.id}
            core._links_changed(x, old)
        _check_memos(core)
