"""Discovery over real mDNS, restricted to 127.0.0.1 (multicast over loopback).

Every zeroconf instance here is bound to 127.0.0.1 only, IPv4 only: no packet leaves
the machine. Store ids are random per test, so other tests (or other engineers' test
runs) on the same machine that advertise ``_storemesh._tcp`` cannot make these fail.

The parsing and peer-table rules are also unit-tested without a network.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from operator import contains
from pathlib import Path

import pytest
import pytest_asyncio
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from mesh.net import discovery
from mesh.net.discovery import (
    MAX_INSTANCE_BYTES,
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Discovery,
    MalformedAdvertisement,
    PeerInfo,
    instance_name,
    parse_peer,
)

LOOPBACK = "127.0.0.1"
CHILD = Path(__file__).parent.parent.joinpath("discovery_child.py")
#: Generous bounds for a loaded CI machine; measured values are in docs/discovery.md.
FIND_WITHIN_S = 6.0
LOST_WITHIN_S = 3.0


@pytest_asyncio.fixture(autouse=True)
async def nothing_leaks() -> AsyncIterator[None]:
    """After each test: no task left on the loop and no socket or pipe left open."""
    fds = set(os.listdir("/proc/self/fd"))
    yield
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current] == []
    leaked = set(os.listdir("/proc/self/fd")) - fds
    assert not leaked, f"file descriptors left open: {leaked}"


def new_store() -> str:
    return f"store-{uuid.uuid4().hex[:8]}"


def new_tag() -> str:
    return uuid.uuid4().hex[:6]


async def wait_until(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Poll until predicate() holds; return the seconds it took, fail after ``within``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@dataclass
class Node:
    """A Discovery on 127.0.0.1 and everything its callbacks reported."""

    disc: Discovery
    reported: list[PeerInfo] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)


def node(store_id: str, node_id: str, port: int, role: str = "register") -> Node:
    reported: list[PeerInfo] = []
    lost: list[str] = []
    disc = Discovery(store_id=store_id, node_id=node_id, role=role,
                     fingerprint=f"fp-{node_id}", port=port, interface=LOOPBACK,
                     on_peer=reported.append, on_lost=lost.append)
    return Node(disc, reported, lost)


def running(*nodes: Node) -> AbstractAsyncContextManager[None]:
    """Start the nodes concurrently (probing takes ~1 s each); close them all on exit."""
    return running_with(*nodes)


@asynccontextmanager
async def running_with(*nodes: Node | Coroutine[None, None, None]) -> AsyncIterator[None]:
    """Like ``running``, also awaiting the given coroutines (raw registrations) meanwhile."""
    try:
        async with asyncio.TaskGroup() as tg:
            for n in nodes:
                tg.create_task(n.disc.start() if isinstance(n, Node) else n)
        yield
    finally:
        async with asyncio.TaskGroup() as tg:
            for n in nodes:
                if isinstance(n, Node):
                    tg.create_task(n.disc.close())


def raw_info(label: str, port: int = 9, properties: bytes | dict[str, str | bytes] = b"",
             address: str = LOOPBACK) -> AsyncServiceInfo:
    """An advertisement of SERVICE_TYPE built by hand, whatever its TXT says."""
    return AsyncServiceInfo(SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", port=port,
                            properties=properties, server=f"{label}.raw.local.",
                            parsed_addresses=[address])


def txt(store_id: str, node_id: str, **overrides: str | bytes) -> dict[str, str | bytes]:
    fields: dict[str, str | bytes] = {"store": store_id, "node": node_id, "role": "register",
                                      "fp": f"fp-{node_id}", "proto": PROTOCOL_VERSION}
    fields.update(overrides)
    return fields


def sees(n: Node, node_ids: set[str]) -> bool:
    return set(n.disc.peers()) == node_ids


def ignored_at_least(n: Node, reason: str, count: int) -> bool:
    return n.disc.ignored.get(reason, 0) >= count


@asynccontextmanager
async def raw_zeroconf() -> AsyncIterator[AsyncZeroconf]:
    aiozc = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    try:
        yield aiozc
    finally:
        await aiozc.async_close()


async def register_all(aiozc: AsyncZeroconf, *infos: AsyncServiceInfo) -> None:
    async with asyncio.TaskGroup() as tg:
        for info in infos:
            tg.create_task(register(aiozc, info))


async def register(aiozc: AsyncZeroconf, info: AsyncServiceInfo) -> None:
    await (await aiozc.async_register_service(info))


# --- over the network (loopback) -------------------------------------------------------
# Node ids carry the test's random tag too: the service name derives from the node id,
# and a second test run on this machine must not hold the same names.


@pytest.mark.asyncio
async def test_store_members_find_each_other_and_other_stores_are_ignored() -> None:
    store_a, store_b, tag = new_store(), new_store(), new_tag()
    roles = {f"a{i}-{tag}": ("edge" if i == 0 else "register", 8000 + i) for i in range(3)}
    a = [node(store_a, node_id, port, role) for node_id, (role, port) in roles.items()]
    b = node(store_b, f"b0-{tag}", 8100)
    async with running(*a, b):
        for me in a:
            others = set(roles) - {me.disc.node_id}
            await wait_until(partial(sees, me, others), FIND_WITHIN_S,
                             f"{me.disc.node_id} sees {others}")
        # Every node has seen the other store's advertisements (and said nothing of them).
        for n, foreign in ((b, 3), *((me, 1) for me in a)):
            await wait_until(partial(ignored_at_least, n, "other_store", foreign),
                             FIND_WITHIN_S, f"{n.disc.node_id} ignores the other store")
        assert b.disc.peers() == {}
        assert b.reported == []
        for me in a:
            for peer_id, peer in me.disc.peers().items():
                role, port = roles[peer_id]
                assert peer == PeerInfo(node_id=peer_id, store_id=store_a, role=role,
                                        fingerprint=f"fp-{peer_id}", proto=PROTOCOL_VERSION,
                                        host=LOOPBACK, port=port)
                assert peer.url == f"http://{LOOPBACK}:{port}"
            # on_peer was called once per peer (no change since), on_lost never.
            assert sorted(p.node_id for p in me.reported) == sorted(me.disc.peers())
            assert me.lost == []


@pytest.mark.asyncio
async def test_a_node_that_closes_is_reported_lost() -> None:
    store, tag = new_store(), new_tag()
    nodes = [node(store, f"n{i}-{tag}", 8200 + i) for i in range(3)]
    gone = nodes[2].disc.node_id
    async with running(*nodes):
        everyone = {n.disc.node_id for n in nodes}
        for me in nodes:
            await wait_until(partial(sees, me, everyone - {me.disc.node_id}), FIND_WITHIN_S,
                             f"{me.disc.node_id} sees two peers")
        await nodes[2].disc.close()  # goodbye packets
        await wait_until(lambda: all(n.lost == [gone] for n in nodes[:2]),
                         LOST_WITHIN_S, f"the others report {gone} lost")
        for n in nodes[:2]:
            assert set(n.disc.peers()) == {nodes[0].disc.node_id, nodes[1].disc.node_id} - {
                n.disc.node_id}
        await nodes[2].disc.close()  # idempotent


@pytest.mark.asyncio
async def test_malformed_advertisements_are_ignored_and_counted() -> None:
    store, tag = new_store(), new_tag()
    me = node(store, f"watcher-{tag}", 8300)
    good_id = f"good-{tag}"
    bad = [
        raw_info(f"bad-missing-{tag}", properties={"store": store, "node": "x"}),
        raw_info(f"bad-garbage-{tag}", properties=b"\x03abc\xff\x10\x00\x00=\x05"),
        raw_info(f"bad-utf8-{tag}", properties=txt(store, "y", node=b"\xff\xfe\xfd")),
        raw_info(f"bad-oversized-{tag}", properties=txt(store, "z", role="r" * 200)),
        raw_info(f"bad-proto-{tag}", properties=txt(store, "w", proto="999")),
    ]
    good = raw_info(good_id, port=8301, properties=txt(store, good_id))

    def counted() -> bool:
        seen = me.disc.ignored
        return (seen.get("missing_field", 0) >= 2 and seen.get("not_utf8", 0) >= 1
                and seen.get("oversized", 0) >= 1 and seen.get("other_proto", 0) >= 1)

    async with raw_zeroconf() as raw, running_with(me, register_all(raw, *bad, good)):
        await wait_until(lambda: good_id in me.disc.peers(), FIND_WITHIN_S, "good peer seen")
        await wait_until(counted, FIND_WITHIN_S, f"all bad ones counted: {me.disc.ignored}")
        assert [p.node_id for p in me.reported] == [good_id]
        assert me.disc.peers()[good_id].port == 8301
        # Withdrawing them all (goodbyes) reports only the peer we knew.
        await raw.async_unregister_all_services()
        await wait_until(lambda: me.lost == [good_id], LOST_WITHIN_S, "good peer lost")
        await asyncio.sleep(0.2)
        assert me.lost == [good_id]


@pytest.mark.asyncio
async def test_changed_port_is_reported_again() -> None:
    store, tag = new_store(), new_tag()
    me = node(store, f"watcher-{tag}", 8400)
    mover = f"mover-{tag}"
    first = raw_info(mover, port=8401, properties=txt(store, mover))
    async with raw_zeroconf() as raw, running_with(me, register(raw, first)):
        await wait_until(lambda: mover in me.disc.peers(), FIND_WITHIN_S, "mover seen")
        moved = raw_info(mover, port=8402, properties=txt(store, mover))
        await (await raw.async_update_service(moved))
        await wait_until(lambda: me.disc.peers()[mover].port == 8402, FIND_WITHIN_S,
                         "new port seen")
        assert [p.port for p in me.reported] == [8401, 8402]
        assert me.lost == []


@pytest.mark.asyncio
async def test_a_taken_name_gets_a_suffix() -> None:
    store, tag = new_store(), new_tag()
    dup_id = f"dup-{tag}"
    label = instance_name(dup_id)
    async with raw_zeroconf() as raw:
        # Someone else (here: a stranger of another store) already holds our name.
        await register(raw, raw_info(label, properties=txt(new_store(), "stranger")))
        # zeroconf notices a taken name only if the holder's records reach our cache
        # while we probe. On one host the probe's unicast (QU) answer may land in
        # another stack's socket, so it is our browser's QM query that learns the name,
        # and its multicast answer is held back if it went out less than 1 s ago
        # (RFC 6762 section 6), as it just did in the announcements.
        await asyncio.sleep(1.1)
        dup, other = node(store, dup_id, 8500), node(store, f"other-{tag}", 8501)
        async with running(dup, other):
            assert dup.disc.service_name is not None
            assert dup.disc.service_name != f"{label}.{SERVICE_TYPE}"
            assert dup.disc.service_name.startswith(f"{label}-")
            await wait_until(lambda: dup_id in other.disc.peers(), FIND_WITHIN_S,
                             "other sees dup under its new name")
            assert other.disc.peers()[dup_id].port == 8500


@pytest.mark.asyncio
async def test_nodes_in_separate_processes_find_each_other() -> None:
    store, tag = new_store(), new_tag()
    me = node(store, f"parent-{tag}", 8600)
    c1, c2 = f"c1-{tag}", f"c2-{tag}"
    ports = {me.disc.node_id: 8600, c1: 8601, c2: 8602}
    children: dict[str, asyncio.subprocess.Process] = {}
    lines: dict[str, list[str]] = {}
    readers: list[asyncio.Task[None]] = []

    async def read(name: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            lines[name].append(line.decode().strip())

    try:
        for name in (c1, c2):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(CHILD), store, name, str(ports[name]),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            children[name], lines[name] = proc, []
            readers.append(asyncio.create_task(read(name, proc)))
        async with running(me):
            await wait_until(lambda: set(me.disc.peers()) == {c1, c2}, FIND_WITHIN_S,
                             f"parent sees both children; they said {lines}")
            assert me.disc.peers()[c2].port == 8602
            for name, other in ((c1, c2), (c2, c1)):
                for peer in (other, me.disc.node_id):
                    want = f"PEER {peer} {LOOPBACK} {ports[peer]} register fp-{peer}"
                    await wait_until(partial(contains, lines[name], want), FIND_WITHIN_S,
                                     f"{name} reports {want!r}: {lines[name]}")
            # c1 shuts down cleanly: its goodbyes reach the parent and c2.
            stdin = children[c1].stdin
            assert stdin is not None
            stdin.close()
            assert await asyncio.wait_for(children[c1].wait(), 10) == 0
            await wait_until(lambda: me.lost == [c1] and f"LOST {c1}" in lines[c2],
                             LOST_WITHIN_S, f"c1 reported lost: {lines[c2]}")
            assert lines[c1][-1] == "CLOSED"
    finally:
        for proc in children.values():
            if proc.returncode is None:
                assert proc.stdin is not None
                proc.stdin.close()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        await asyncio.gather(*readers, return_exceptions=True)
    assert all(proc.returncode == 0 for proc in children.values())


# --- without a network -------------------------------------------------------------------


def test_instance_names_fit_in_one_label_and_do_not_clash() -> None:
    assert instance_name("r1") == "r1"
    assert instance_name("edge_2-b") == "edge_2-b"
    dirty = ["a.b", "a/b", "a b", "é", "x" * 500, "x" * 500 + "y", "", "r1.local."]
    names = [instance_name(n) for n in dirty]
    assert len(set(names)) == len(dirty)
    for name in names:
        assert name and len(name.encode()) <= MAX_INSTANCE_BYTES - 5  # room for a suffix
        assert all(c.isascii() and (c.isalnum() or c in "-_") for c in name)


def info_with(properties: bytes | dict[str, str | bytes], port: int | None = 7000,
              addresses: list[str] | None = None) -> ServiceInfo:
    return ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=port, properties=properties,
                       parsed_addresses=[LOOPBACK] if addresses is None else addresses)


def test_parse_peer_reads_a_well_formed_advertisement() -> None:
    peer = parse_peer(info_with(txt("s", "n", role="cloud"), addresses=["169.254.1.1",
                                                                      "10.0.0.7"]))
    assert peer == PeerInfo(node_id="n", store_id="s", role="cloud", fingerprint="fp-n",
                            proto=PROTOCOL_VERSION, host="10.0.0.7", port=7000)
    # Only a link-local address: still dialable, so use it.
    assert parse_peer(info_with(txt("s", "n"), addresses=["169.254.1.1"])).host == "169.254.1.1"


@pytest.mark.parametrize(("info", "reason"), [
    (info_with(b""), "missing_field"),
    (info_with(b"\x05store"), "missing_field"),
    (info_with(txt("s", "n", fp="")), "missing_field"),
    *[(info_with({k: v for k, v in txt("s", "n").items() if k != key}), "missing_field")
      for key in discovery.TXT_KEYS],
    (info_with(txt("s", "n", store=b"\xc3\x28")), "not_utf8"),
    (info_with(txt("s", "n", fp="f" * 129)), "oversized"),
    (info_with(txt("s", "n", **{f"k{i}": "v" * 100 for i in range(13)})), "oversized"),
    (info_with(txt("s", "n"), port=None), "bad_port"),
    (info_with(txt("s", "n"), port=0), "bad_port"),
    (info_with(txt("s", "n"), addresses=[]), "no_ipv4_address"),
    (info_with(txt("s", "n"), addresses=["fd00::1"]), "no_ipv4_address"),
])
def test_parse_peer_rejects_malformed_advertisements(info: ServiceInfo, reason: str) -> None:
    with pytest.raises(MalformedAdvertisement) as caught:
        parse_peer(info)
    assert caught.value.reason == reason


def test_constructor_refuses_bad_arguments() -> None:
    def make(**kw: object) -> Discovery:
        args: dict[str, object] = {"store_id": "s", "node_id": "n", "role": "register",
                                   "fingerprint": "f", "port": 7000, "interface": LOOPBACK,
                                   "on_peer": print, "on_lost": print}
        args.update(kw)
        return Discovery(**args)  # type: ignore[arg-type]

    make()
    for bad in ({"port": 0}, {"port": 70000}, {"node_id": ""}, {"store_id": "s" * 129},
                {"interface": "eth0"}, {"interface": "fd00::2"}):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            make(**bad)


@pytest.mark.asyncio
async def test_start_refuses_an_interface_this_host_does_not_have() -> None:
    disc = Discovery(store_id="s", node_id="n", role="register", fingerprint="f", port=7000,
                     interface="203.0.113.7", on_peer=print, on_lost=print)
    with pytest.raises(ValueError, match="not an address of this host"):
        await disc.start()  # refused before any socket is opened
    await disc.close()


def test_peer_table_is_bounded_and_tracks_renames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "MAX_PEERS", 2)
    reported: list[PeerInfo] = []
    lost: list[str] = []
    disc = Discovery(store_id="s", node_id="me", role="register", fingerprint="f",
                     port=7000, interface=LOOPBACK, on_peer=reported.append,
                     on_lost=lost.append)

    def peer(node_id: str, port: int = 1, store: str = "s") -> PeerInfo:
        return PeerInfo(node_id=node_id, store_id=store, role="register", fingerprint="f",
                        proto=PROTOCOL_VERSION, host=LOOPBACK, port=port)

    disc._accept("a.svc", peer("a"))
    disc._accept("b.svc", peer("b"))
    disc._accept("c.svc", peer("c"))  # table full
    disc._accept("x.svc", peer("x", store="other"))
    disc._accept("me.svc", peer("me"))  # our own id under a name that is not ours
    assert set(disc.peers()) == {"a", "b"}
    assert disc.ignored == {"table_full": 1, "other_store": 1, "own_node_id": 1}
    disc._accept("a.svc", peer("a"))  # unchanged: no new report
    disc._accept("a2.svc", peer("a", port=2))  # a re-registered under a new name
    assert [(p.node_id, p.port) for p in reported] == [("a", 1), ("b", 1), ("a", 2)]
    disc._forget("a.svc")  # the old name's goodbye: a is still there
    assert lost == [] and set(disc.peers()) == {"a", "b"}
    disc._accept("b.svc", peer("d"))  # b's service now claims to be d
    assert lost == ["b"] and set(disc.peers()) == {"a", "d"}
    disc._forget("a2.svc")
    disc._forget("b.svc")
    assert lost == ["b", "a", "d"] and disc.peers() == {}
    assert disc._name_of == {} and disc._node_of == {}


def test_without_an_interface_all_are_used_and_host_addresses_advertised() -> None:
    # Only inspects the choice; nothing is bound (tests stay on 127.0.0.1).
    disc = Discovery(store_id="s", node_id="n", role="register", fingerprint="f", port=7000,
                     on_peer=print, on_lost=print)
    interfaces, addresses = disc._choose_interfaces()
    assert interfaces is InterfaceChoice.All
    assert addresses
    assert all(not a.startswith("127.") for a in addresses) or addresses == [LOOPBACK]
    assert Discovery(store_id="s", node_id="n", role="register", fingerprint="f", port=7000,
                     interface=LOOPBACK, on_peer=print, on_lost=print
                     )._choose_interfaces() == ([LOOPBACK], [LOOPBACK])
