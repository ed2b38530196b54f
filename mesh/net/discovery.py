"""Peers of one store find each other on the LAN with mDNS / DNS-SD (python-zeroconf).

Every node advertises one service of type ``_storemesh._tcp.local.`` whose TXT record
says which store, node, role and key fingerprint it is (schema in ``docs/discovery.md``),
and browses for the same type. Advertisements of other stores, other protocol versions
and our own node are ignored; malformed ones are dropped and counted. Discovery only
says *where* a peer claims to be: who it is gets proven later by its enrolment
certificate and signatures, so nothing here is trusted beyond "worth dialling".

Invariants:

1. ``peers()`` holds only nodes whose latest resolved advertisement is well formed,
   names our store and ``PROTOCOL_VERSION``, and is not our own node id.
2. The peer table holds at most ``MAX_PEERS`` nodes and at most ``MAX_PEERS`` resolves
   are in flight, whatever the LAN sends us.
3. ``_name_of`` (node id -> service name) and ``_node_of`` (service name -> node id) are
   inverse maps with the same node ids as the peer table: one node, one live name.
4. ``on_peer`` is called when a node enters the table or its ``PeerInfo`` changes;
   ``on_lost`` once for each node that leaves it. Both run on the event-loop thread,
   one at a time, and never once ``close()`` has begun.
5. Remote input never raises out of a zeroconf callback: it is ignored, counted in
   ``ignored[reason]`` and logged at debug level.
6. Every task has an owner: resolves live in ``_tasks``, the announcement in
   ``_announce``; ``close()`` cancels and awaits them all before closing zeroconf.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Final

import ifaddr
from zeroconf import (
    BadTypeInNameException,
    DNSQuestionType,
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh.config import MAX_ID_LEN

__all__ = [
    "MAX_PEERS",
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Discovery",
    "MalformedAdvertisement",
    "PeerInfo",
    "instance_name",
    "parse_peer",
]

# --- bounds (to move into mesh/config.py) -----------------------------------------
#: Most peers kept in the table (and most resolves in flight). A store has tens of
#: nodes (registers, edge nodes, the cloud); 512 is ten times the largest store we plan
#: for and caps memory when a host on the LAN floods us with advertisements.
MAX_PEERS: Final = 512
#: Longest TXT value accepted, in bytes: the same bound as any identifier.
MAX_TXT_VALUE_BYTES: Final = MAX_ID_LEN
#: Largest whole TXT record accepted. RFC 6763 section 6.2: a TXT record should fit in
#: one packet (1300 bytes); ours is ~120 bytes.
MAX_TXT_BYTES: Final = 1300
#: How long one resolve (SRV, TXT, A) may take, in ms. On a LAN the answers arrive in
#: milliseconds, and usually ride along with the browse answer; 3 s leaves room for
#: zeroconf to ask again after a lost packet (it re-asks after 0.2 s, then 1 s).
RESOLVE_TIMEOUT_MS: Final = 3000
#: TTL of our records in seconds (RFC 6762 suggests 75 min for SRV/TXT/PTR). A node that
#: dies without a goodbye stays in the peers' tables until its records expire, so we
#: use the 2-minute host-record TTL for all of them; refresh queries cost a few packets.
RECORD_TTL_S: Final = 120
#: Longest DNS label (RFC 1035): the bound on our service instance name.
MAX_INSTANCE_BYTES: Final = 63
#: Attempts at a unique service name (each attempt probes for ~1 s) before start() fails.
MAX_NAME_ATTEMPTS: Final = 5
# ------------------------------------------------------------------------------------

SERVICE_TYPE: Final = "_storemesh._tcp.local."
PROTOCOL_VERSION: Final = "1"

#: TXT keys every advertisement must carry, with a non-empty UTF-8 value.
TXT_KEYS: Final = ("store", "node", "role", "fp", "proto")

log = logging.getLogger(__name__)

# Room kept free in the instance name for the "-xxxx" suffix of a renamed duplicate.
_SUFFIX_BYTES = 5
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One peer of our store as its advertisement describes it."""

    node_id: str
    store_id: str
    role: str
    fingerprint: str
    proto: str
    #: An address to dial: an IPv4 dotted quad from the service's A records.
    host: str
    port: int
    #: The node serves TLS (TXT ``tls=1``): dial ``https://``.
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


class MalformedAdvertisement(ValueError):
    """A peer's advertisement we cannot use; ``reason`` is the ``ignored`` counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def instance_name(node_id: str) -> str:
    """The DNS-SD instance name (one label, at most 63 bytes) for a node id.

    A node id made of ``[A-Za-z0-9_-]`` that fits is used as is. Any other id is
    sanitised, shortened and given 8 hex digits of its SHA-256, so two different node
    ids never share a name (a renamed duplicate gets 5 more bytes, still within 63).
    """
    clean = _UNSAFE.sub("-", node_id)
    limit = MAX_INSTANCE_BYTES - _SUFFIX_BYTES
    if clean == node_id and 0 < len(clean) <= limit:
        return clean
    digest = hashlib.sha256(node_id.encode()).hexdigest()[:8]
    return f"{clean[: limit - len(digest) - 1]}-{digest}"


def parse_peer(info: ServiceInfo) -> PeerInfo:
    """Read a resolved advertisement; raise ``MalformedAdvertisement`` if it is unusable.

    Checks shape only (keys present, UTF-8, sizes, port, an IPv4 address); whether the
    peer belongs to our store is the caller's business.
    """
    if len(info.text or b"") > MAX_TXT_BYTES:
        raise MalformedAdvertisement("oversized", f"TXT of {len(info.text)} bytes")
    fields: dict[str, str] = {}
    props = info.properties
    for key in TXT_KEYS:
        raw = props.get(key.encode())
        if not raw:
            raise MalformedAdvertisement("missing_field", key)
        if len(raw) > MAX_TXT_VALUE_BYTES:
            raise MalformedAdvertisement("oversized", f"{key} of {len(raw)} bytes")
        try:
            fields[key] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedAdvertisement("not_utf8", key) from None
    port = info.port
    if port is None or not 0 < port < 65536:
        raise MalformedAdvertisement("bad_port", repr(port))
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses:
        raise MalformedAdvertisement("no_ipv4_address")
    routable = [a for a in addresses if ipaddress.IPv4Address(a) not in _LINK_LOCAL]
    return PeerInfo(
        node_id=fields["node"],
        store_id=fields["store"],
        role=fields["role"],
        fingerprint=fields["fp"],
        proto=fields["proto"],
        host=(routable or addresses)[0],
        port=port,
        tls=props.get(b"tls") == b"1",
    )


def _host_ipv4_addresses() -> list[str]:
    """This host's IPv4 addresses, from every adapter."""
    return [
        ip.ip
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str)
    ]


def _check_field(name: str, value: str) -> None:
    if not value or len(value.encode()) > MAX_TXT_VALUE_BYTES:
        raise ValueError(f"{name} must be 1..{MAX_TXT_VALUE_BYTES} bytes of UTF-8, got {value!r}")


class Discovery:
    """Advertise this node and browse for peers of the same store."""

    def __init__(
        self,
        *,
        store_id: str,
        node_id: str,
        role: str,
        fingerprint: str,
        port: int,
        interface: str | None = None,
        on_peer: Callable[[PeerInfo], None],
        on_lost: Callable[[str], None],
        tls: bool = False,
    ) -> None:
        for field_name, value in (("store_id", store_id), ("node_id", node_id),
                                  ("role", role), ("fingerprint", fingerprint)):
            _check_field(field_name, value)
        if not 0 < port < 65536:
            raise ValueError(f"port must be 1..65535, got {port}")
        if interface is not None:
            try:
                ipaddress.IPv4Address(interface)
            except ValueError:
                raise ValueError(
                    f"interface must be an IPv4 address of this host, got {interface!r}"
                ) from None
        self.store_id = store_id
        self.node_id = node_id
        self.role = role
        self.fingerprint = fingerprint
        self.port = port
        self.interface = interface
        self.tls = tls  # advertised as TXT tls=1: peers dial https://
        self._on_peer = on_peer
        self._on_lost = on_lost
        #: Advertisements ignored, by reason (see docs/discovery.md for the reasons).
        self.ignored: dict[str, int] = {}
        #: Our registered service name once start() returned (may carry a suffix).
        self.service_name: str | None = None
        self._peers: dict[str, PeerInfo] = {}
        self._name_of: dict[str, str] = {}
        self._node_of: dict[str, str] = {}
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._announce: asyncio.Future[object] | None = None
        self._closing = False
        self._closed = asyncio.Event()

    # --- public API ------------------------------------------------------------------

    async def start(self) -> None:
        """Start browsing, then register our service (mDNS probing takes ~1 s)."""
        if self._aiozc is not None or self._closing:
            raise RuntimeError("Discovery.start() may be called once, before close()")
        interfaces, addresses = self._choose_interfaces()
        self._aiozc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        try:
            # QM, not the default QU, for the first questions: a QU answer is unicast to
            # port 5353 of the asking host, and when several mDNS stacks share that port
            # on one host (two nodes on one machine, or avahi next to us) the kernel hands
            # it to just one of them, so the asker would wait ~1 s for the next query.
            self._browser = AsyncServiceBrowser(
                self._aiozc.zeroconf, SERVICE_TYPE,
                handlers=[self._on_service_state_change],
                question_type=DNSQuestionType.QM,
            )
            await self._register(addresses)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Unregister (goodbye packets), stop browsing and close zeroconf. Idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
            owned: list[asyncio.Future[object] | asyncio.Task[None]] = list(self._tasks)
            if self._announce is not None:
                owned.append(self._announce)
            for task in owned:
                task.cancel()
            await asyncio.gather(*owned, return_exceptions=True)
            if self._aiozc is not None:
                await self._aiozc.async_close()
        finally:
            self._closed.set()

    def peers(self) -> dict[str, PeerInfo]:
        """Currently known peers of our store, by node id (a copy)."""
        return dict(self._peers)

    # --- registration ----------------------------------------------------------------

    def _choose_interfaces(self) -> tuple[list[str] | InterfaceChoice, list[str]]:
        host_addresses = _host_ipv4_addresses()
        if self.interface is not None:
            if self.interface not in host_addresses:
                raise ValueError(f"interface {self.interface} is not an address of this host "
                                 f"(it has {', '.join(host_addresses)})")
            return [self.interface], [self.interface]
        outside = [a for a in host_addresses if ipaddress.IPv4Address(a) not in _LOOPBACK]
        return InterfaceChoice.All, outside or ["127.0.0.1"]

    def _txt(self) -> dict[str | bytes, str | bytes | None]:
        txt: dict[str | bytes, str | bytes | None] = {
            "store": self.store_id, "node": self.node_id, "role": self.role,
            "fp": self.fingerprint, "proto": PROTOCOL_VERSION}
        if self.tls:
            txt["tls"] = "1"
        return txt

    async def _register(self, addresses: list[str]) -> None:
        assert self._aiozc is not None
        base = instance_name(self.node_id)
        label = base
        for _attempt in range(MAX_NAME_ATTEMPTS):
            info = AsyncServiceInfo(
                SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", port=self.port,
                properties=self._txt(), server=f"{label}.storemesh.local.",
                host_ttl=RECORD_TTL_S, other_ttl=RECORD_TTL_S, parsed_addresses=addresses,
            )
            try:
                announce = await self._aiozc.async_register_service(info)
            except NonUniqueNameException:
                log.info("mDNS name %r is taken on the LAN; trying another", label)
                label = f"{base}-{secrets.token_hex(2)}"
                continue
            self._announce = asyncio.ensure_future(announce)
            self.service_name = info.name
            return
        raise RuntimeError(f"no unique mDNS name for node {self.node_id!r} after "
                           f"{MAX_NAME_ATTEMPTS} attempts; is another node using this id?")

    # --- browsing (zeroconf callbacks and the resolve tasks they start) ---------------

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if self._closing:
            return
        try:
            if state_change is ServiceStateChange.Removed:
                self._forget(name)
            else:
                self._schedule_resolve(name)
        except Exception:
            log.exception("discovery: handling %s of %r failed", state_change, name)

    def _schedule_resolve(self, name: str) -> None:
        old = self._resolving.pop(name, None)
        if old is not None:
            old.cancel()  # the newest event wins; close() still awaits the old task
        if len(self._resolving) >= MAX_PEERS:
            self._ignore("too_many_resolving", name)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name),
                                                      name=f"discovery resolve {name}")
        self._resolving[name] = task
        self._tasks.add(task)
        task.add_done_callback(partial(self._resolve_done, name))

    def _resolve_done(self, name: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._resolving.get(name) is task:
            del self._resolving[name]
        if not task.cancelled() and task.exception() is not None:
            log.error("discovery: resolve of %r failed", name, exc_info=task.exception())

    async def _resolve(self, name: str) -> None:
        assert self._aiozc is not None
        try:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
        except BadTypeInNameException:
            self._ignore("bad_name", name)
            return
        if not await info.async_request(self._aiozc.zeroconf, RESOLVE_TIMEOUT_MS,
                                        question_type=DNSQuestionType.QM):
            self._ignore("resolve_timeout", name)
            return
        try:
            peer = parse_peer(info)
        except MalformedAdvertisement as e:
            self._ignore(e.reason, name, str(e))
            return
        self._accept(name, peer)

    def _accept(self, name: str, peer: PeerInfo) -> None:
        if self._closing:
            return
        if peer.store_id != self.store_id:
            self._ignore("other_store", name, peer.store_id)
            return
        if peer.proto != PROTOCOL_VERSION:
            self._ignore("other_proto", name, peer.proto)
            return
        if peer.node_id == self.node_id:
            if name != self.service_name:  # a stale record of ours, or a clashing node id
                self._ignore("own_node_id", name)
            return
        previous_node = self._node_of.get(name)
        if previous_node is not None and previous_node != peer.node_id:
            self._drop(name)  # this service now speaks for another node
        known = self._peers.get(peer.node_id)
        if known is None and len(self._peers) >= MAX_PEERS:
            self._ignore("table_full", name, peer.node_id)
            return
        old_name = self._name_of.get(peer.node_id)
        if old_name is not None and old_name != name:
            del self._node_of[old_name]  # the node re-registered under a new name
        self._peers[peer.node_id] = peer
        self._name_of[peer.node_id] = name
        self._node_of[name] = peer.node_id
        if known != peer:
            self._report_peer(peer)

    def _forget(self, name: str) -> None:
        """The service ``name`` is gone: stop resolving it and drop its node."""
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()
        self._drop(name)

    def _drop(self, name: str) -> None:
        node_id = self._node_of.pop(name, None)
        if node_id is None:
            return
        assert self._name_of.get(node_id) == name, "invariant 3: inverse name maps"
        del self._name_of[node_id]
        del self._peers[node_id]
        self._report_lost(node_id)

    # A failing callback is our own bug, but it must not stop discovery: log it loudly.

    def _report_peer(self, peer: PeerInfo) -> None:
        try:
            self._on_peer(peer)
        except Exception:
            log.exception("discovery: on_peer(%r) failed", peer)

    def _report_lost(self, node_id: str) -> None:
        try:
            self._on_lost(node_id)
        except Exception:
            log.exception("discovery: on_lost(%r) failed", node_id)

    def _ignore(self, reason: str, name: str, detail: str = "") -> None:
        self.ignored[reason] = self.ignored.get(reason, 0) + 1
        log.debug("discovery: ignoring %r (%s) %s", name, reason, detail)
