"""Peer sessions over aiohttp WebSockets, with a handshake that proves who is talking.

Handshake (JSON text frames, then binary sync messages):

1. dialer -> listener ``{"t": "hello", "proto", "store", "node", "cert", "nonce"}``
   (a LAN dialer adds ``"codecs": ["z1"]``: the session encodings it can speak)
2. listener -> dialer  the same, plus ``"codec": "z1"`` if it picked one of those,
   plus ``sig`` = listener's node key over
   ``HS_DOMAIN + b"listener" + dialer_nonce + listener_nonce + dialer_id + listener_id``
3. dialer -> listener ``{"t": "auth", "sig"}`` over the same with ``b"dialer"`` and the
   nonces swapped
4. listener -> dialer ``{"t": "ok"}``

Each side checks the other's certificate against the store key (so both belong to the
same store), that it is neither revoked nor expired, that it names the node id claimed,
and the signature over both fresh nonces (so the peer holds that certificate's key
now, and the exchange cannot be replayed).

All of it runs inside mutual TLS 1.3 pinned to the store CA (``mesh.net.tls``): the
listener refuses a session whose TLS client presented no certificate, the dialer
refuses a peer whose TLS certificate names another node than the one it meant, and
both check that the TLS certificate names the node of the hello and holds the key of
its storemesh certificate (invariant 7).

Invariants:
 1. No sync message is read or sent before both sides are authenticated.
 2. Every task belongs to the ``Session`` that started it and is cancelled and awaited
    when the session closes.
 3. Outgoing messages wait in two bounded queues (high before low priority); a peer
    that lets more than ``SESSION_MAX_QUEUE`` messages pile up is disconnected rather
    than allowed to grow our memory (anti-entropy catches it up after reconnecting).
 4. A remote fault (bad handshake, oversized frame, unexpected frame type) closes that
    session with a reason and is counted; it never propagates. Every frame refused
    after the handshake (a text frame, a frame over ``MAX_MESSAGE_BYTES``, an empty
    message, an undecodable WAN message, an origin the WAN codec will not keep) is
    counted under a reason through ``Session.on_refuse`` (the node shows them as
    ``session_<reason>`` in ``storemesh_envelopes_rejected_total``).
 5. Envelope batches waiting in one queue are merged into one message (bounded by
    ``MAX_BATCH_BYTES`` and ``MAX_BATCH_ENVELOPES``); on WAN sessions the writer first
    lingers ``WAN_LINGER_S`` so a burst of sales becomes one message, and every message
    goes through the session's ``WanCodec``.
 6. A ``WanCodec``'s per-origin tables hold at most ``MAX_WAN_ORIGINS`` origins each,
    and the receiving table only origins that hold a certificate here: whatever a peer
    sends, a session's memory does not grow with the origin strings it makes up.
 7. On a TLS link, a session runs only if the TLS peer certificate names the same
    store and node as the hello and carries the public key of the peer's storemesh
    certificate (``tls_identity_mismatch`` otherwise); a listener refuses a TLS client
    without a certificate (``no_client_cert``), a dialer a peer that is not the node it
    meant (``wrong_peer``). On a plain-text link (loopback development only) none of
    this applies.
 8. A LAN session's encoding is negotiated in the hello (``LAN_CODECS``): the dialer
    offers, the listener picks one it speaks or none, and both then encode every
    message after the handshake that way (``WanCodec`` at ``config.LAN_ZLIB_*``), or
    neither does. A peer that predates it offers or picks none: plain messages, as
    before. A listener's pick the dialer did not offer is a ``bad_handshake``; on a
    coded session a message that does not decode closes it (``bad_lan_message``), as
    on WAN sessions (``bad_wan_message``), before any of it reaches the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import struct
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web

from mesh import config
from mesh.core.identity import Certificate, verify_signature
from mesh.core.wancodec import WanCodec, coalesce, enrolled, frames
from mesh.errors import EnvelopeError
from mesh.net.tls import PeerIdentity, client_context, load_tls_files, peer_identity
from mesh.store.datadir import NodeIdentity

__all__ = ["HS_DOMAIN", "LAN_CODECS", "PROTO", "HandshakeError", "Session", "WanCodec", "accept",
           "dial"]

log = logging.getLogger(__name__)

PROTO: Final = 1
HS_DOMAIN: Final = b"storemesh/handshake/v1\n"
#: Session encodings a LAN session may negotiate, preferred first (invariant 8).
#: ``z1``: the WAN codec's format (``mesh.core.wancodec``: elided ``prev``, 64-byte
#: signatures, one deflate stream per direction), at the LAN's level and window.
LAN_CODECS: Final = ("z1",)


class HandshakeError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _transcript(role: bytes, nonce_a: bytes, nonce_b: bytes, a: str, b: str) -> bytes:
    return b"".join([HS_DOMAIN, role, nonce_a, nonce_b, a.encode(), b"\x00", b.encode()])


def _hello(identity: NodeIdentity, nonce: bytes, wan: bool = False) -> dict[str, Any]:
    return {"t": "hello", "proto": PROTO, "store": identity.store_id, "node": identity.node_id,
            "cert": identity.certificate.to_dict(), "nonce": nonce.hex(), "wan": wan}


def _pick_codec(hello: object, ours: tuple[str, ...]) -> str | None:
    """The listener's pick among the encodings a dialer's hello offers (invariant 8)."""
    offered = hello.get("codecs") if isinstance(hello, dict) else None
    if not isinstance(offered, list):
        return None
    return next((c for c in ours if c in offered[:16]), None)


def _check_hello(identity: NodeIdentity, msg: object, now_ms: int) -> tuple[Certificate, bytes]:
    """Validate a peer's hello; returns its certificate and nonce."""
    if not isinstance(msg, dict) or msg.get("t") != "hello":
        raise HandshakeError("bad_handshake", "expected a hello message")
    if msg.get("proto") != PROTO:
        raise HandshakeError("bad_protocol", f"protocol {msg.get('proto')!r}, we speak {PROTO}")
    if msg.get("store") != identity.store_id:
        raise HandshakeError("wrong_store", f"peer belongs to store {msg.get('store')!r}")
    nonce_hex = msg.get("nonce")
    if not isinstance(nonce_hex, str) or len(nonce_hex) != 64:
        raise HandshakeError("bad_handshake", "nonce must be 32 bytes of hex")
    try:
        nonce = bytes.fromhex(nonce_hex)
        cert = Certificate.from_dict(msg.get("cert"))
        if cert.node_id != msg.get("node"):
            raise HandshakeError("bad_handshake", "certificate names another node")
        if cert.node_id == identity.node_id:
            raise HandshakeError("self", "connected to ourselves")
        identity.trust.add_certificate(cert)  # verifies it against the store key
        identity.trust.check(cert.node_id, now_ms)
    except EnvelopeError as exc:
        reason = "unenrolled" if exc.reason in ("bad_signature", "wrong_store") else exc.reason
        raise HandshakeError(reason, exc.message) from None
    except ValueError as exc:
        raise HandshakeError("bad_handshake", str(exc)) from None
    return cert, nonce


async def _recv_json(ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> object:
    msg = await asyncio.wait_for(ws.receive(), config.HANDSHAKE_TIMEOUT_S)
    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
        raise HandshakeError("refused", f"peer closed the connection: {msg.extra or ''}")
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise HandshakeError("bad_handshake", f"expected a text frame, got {msg.type.name}")
    try:
        return orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        raise HandshakeError("bad_handshake", "handshake frame is not JSON") from None


def tcp_bytes(sock: socket.socket | None) -> tuple[int, int] | None:
    """(bytes sent and acknowledged, bytes received) on a TCP socket, from the kernel's
    TCP_INFO (Linux): what really crossed the wire, after compression and framing."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < 136:
        return None
    acked, received = struct.unpack_from("=QQ", info, 120)  # tcpi_bytes_acked/_received
    return int(acked), int(received)


class Session:
    """One authenticated peer connection: a reader and a writer task."""

    def __init__(self, peer_id: str, role: str, ws: web.WebSocketResponse
                 | aiohttp.ClientWebSocketResponse, *, url: str | None, outbound: bool,
                 linger_s: float = 0.0, known: Callable[[str], bool] | None = None,
                 codec: str | None = None) -> None:
        self.linger_s = linger_s
        self.wan = linger_s > 0
        #: The encoding negotiated for a LAN session (invariant 8); None: plain.
        self.lan_codec = None if self.wan else codec
        #: Called with a reason for every frame refused after the handshake (invariant
        #: 4); the node counts them. ``refused`` keeps this session's own counts.
        self.on_refuse: Callable[[str], None] | None = None
        self.refused: dict[str, int] = {}
        self.codec: WanCodec | None = None
        if self.wan:
            self.codec = WanCodec(known, self.refuse)
        elif self.lan_codec is not None:
            self.codec = WanCodec(known, self.refuse, level=config.LAN_ZLIB_LEVEL,
                                  wbits=config.LAN_ZLIB_WBITS,
                                  mem_level=config.LAN_ZLIB_MEM_LEVEL, name="lan")
        self.sock: socket.socket | None = None
        self.last_wire = (0, 0)
        self.peer_id = peer_id
        self.role = role
        self.ws = ws
        self.url = url
        self.outbound = outbound
        self._high: deque[bytes] = deque()
        self._low: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self.done = asyncio.Event()  # set when the session has ended
        self._closing = False
        self.close_reason: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    def send(self, data: bytes, priority: int = 0) -> None:
        if self._closing:
            return
        if len(self._high) + len(self._low) >= config.SESSION_MAX_QUEUE:
            self.close_reason = "slow_peer"
            self._closing = True
            self._wake.set()
            return
        (self._low if priority else self._high).append(data)
        self._wake.set()

    def wire_bytes(self) -> tuple[int, int]:
        """(sent, received) bytes on the wire for this session so far; falls back to
        message bytes where the kernel cannot tell."""
        got = tcp_bytes(self.sock)
        return got if got is not None else (self.bytes_out, self.bytes_in)

    def queued(self) -> int:
        return len(self._high) + len(self._low)

    def refuse(self, reason: str) -> None:
        """Count a frame (or a part of one) the peer sent and we refused."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if self.on_refuse is not None:
            self.on_refuse(reason)

    def close(self, reason: str = "closed") -> None:
        if not self._closing:
            self.close_reason = reason
            self._closing = True
        self._wake.set()

    async def run(self, on_message: Callable[[str, bytes], None]) -> None:
        """Pump messages until either side closes; returns then (tasks awaited)."""
        reader = asyncio.create_task(self._reader(on_message))
        writer = asyncio.create_task(self._writer())
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            for result in await asyncio.gather(reader, writer, return_exceptions=True):
                if isinstance(result, Exception):
                    log.debug("session %s ended: %r", self.peer_id, result)
            self.last_wire = self.wire_bytes()
            with contextlib.suppress(Exception):
                await self.ws.close()
            self.done.set()

    async def _reader(self, on_message: Callable[[str, bytes], None]) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                data = msg.data
                self.bytes_in += len(data)
                if not data:
                    self.refuse("empty_message")  # no sync message is empty: ignore it
                    continue
                if self.codec is not None:
                    try:
                        data = self.codec.decode(data)
                    except (ValueError, zlib.error):
                        self.close_reason = "bad_wan_message" if self.wan else "bad_lan_message"
                        self.refuse(self.close_reason)
                        break  # the compressed stream is unusable now
                on_message(self.peer_id, data)
                if data[:1] == b"C":
                    # Let the node apply these certificates before we decode what
                    # follows (its drain is queued ahead of us): the WAN codec keeps
                    # state only for origins that hold one, and the envelopes right
                    # behind a ``C`` are those of the origins it brings.
                    await asyncio.sleep(0)
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                break
            else:
                self.close_reason = _frame_fault(msg)
                self.refuse(self.close_reason)
                break
        if self.close_reason is None:
            self.close_reason = "peer_closed"

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.linger_s and not self._closing:
                await asyncio.sleep(self.linger_s)  # WAN: gather a batch (invariant 5)
            while self._high or self._low:
                if self._closing:
                    return
                data = coalesce(self._high if self._high else self._low)
                if self.codec is not None:
                    data = self.codec.encode(data)
                self.bytes_out += len(data)
                await self.ws.send_bytes(data)
            if self._closing:
                return


def _frame_fault(msg: aiohttp.WSMessage) -> str:
    """The refusal reason for a frame a session cannot take after the handshake."""
    if msg.type == aiohttp.WSMsgType.TEXT:
        return "text_frame"  # text is for the handshake only (invariant 1)
    if msg.type == aiohttp.WSMsgType.ERROR:
        err = msg.data
        if (isinstance(err, aiohttp.WebSocketError)
                and err.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG):
            return "oversized_frame"  # over max_msg_size = MAX_MESSAGE_BYTES
        return "bad_frame"
    return "unexpected_frame"


#: (kept under their old names: tests and tools import them from here)
_coalesce = coalesce
_frames = frames


def _enrolled(identity: NodeIdentity) -> Callable[[str], bool]:
    """Whether a node id holds a certificate of this store here (the WAN codec keeps
    per-origin state only for those)."""
    trust = identity.trust
    return enrolled(lambda: trust)


async def accept(request: web.Request, identity: NodeIdentity, now_ms: Callable[[], int],
                 on_session: Callable[[Session], Awaitable[None]],
                 on_reject: Callable[[str], None], *, wan: bool = False,
                 codecs: tuple[str, ...] = LAN_CODECS) -> web.StreamResponse:
    """Server side of ``GET /v1/sync``: handshake, then hand the session over. Offers
    per-message deflate to clients that ask for it (WAN peers do). ``codecs``: the LAN
    session encodings we accept, preferred first (``()``: plain only, as before them)."""
    tls_peer: PeerIdentity | None = None
    sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
    if sslobj is not None:  # a TLS listener: a node must present its certificate
        der = sslobj.getpeercert(binary_form=True)
        tls_peer = peer_identity(der) if der else None
        if tls_peer is None:
            on_reject("no_client_cert")
            log.info("refused session from %s: no node certificate in TLS", request.remote)
            return web.json_response(
                {"error": {"field": None, "reason": "no_client_cert",
                           "message": "a sync session needs a TLS client certificate "
                                      "issued by the store"}}, status=403)
    ws = web.WebSocketResponse(max_msg_size=config.MAX_MESSAGE_BYTES,
                               heartbeat=config.HEARTBEAT_S)
    await ws.prepare(request)
    try:
        hello_msg = await _recv_json(ws)
        cert, their_nonce = _check_hello(identity, hello_msg, now_ms())
        _check_binding(tls_peer, cert, identity.store_id)
        wan = wan or (isinstance(hello_msg, dict) and hello_msg.get("wan") is True)
        codec = None if wan else _pick_codec(hello_msg, codecs)
        nonce = os.urandom(32)
        hello = _hello(identity, nonce, wan)
        if codec is not None:
            hello["codec"] = codec
        hello["sig"] = identity.key.sign(
            _transcript(b"listener", their_nonce, nonce, cert.node_id, identity.node_id)).hex()
        await ws.send_str(orjson.dumps(hello).decode())
        auth = await _recv_json(ws)
        if not isinstance(auth, dict) or auth.get("t") != "auth" or not isinstance(
                auth.get("sig"), str):
            raise HandshakeError("bad_handshake", "expected an auth message")
        try:
            sig = bytes.fromhex(auth["sig"])
        except ValueError:
            raise HandshakeError("bad_handshake", "signature is not hex") from None
        if not verify_signature(cert.public_key, sig, _transcript(
                b"dialer", nonce, their_nonce, cert.node_id, identity.node_id)):
            raise HandshakeError("bad_signature", "peer does not hold its certificate's key")
        await ws.send_str('{"t":"ok"}')
    except HandshakeError as exc:
        on_reject(exc.reason)
        log.info("refused session: %s", exc)
        await ws.close(code=4403, message=exc.message[:120].encode())
        return ws
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        on_reject("handshake_timeout")
        await ws.close()
        return ws
    session = Session(cert.node_id, cert.role, ws, url=None, outbound=False,
                      linger_s=config.WAN_LINGER_S if wan else 0.0,
                      known=_enrolled(identity), codec=codec)
    transport_ = request.transport
    session.sock = transport_.get_extra_info("socket") if transport_ is not None else None
    await on_session(session)
    return ws


def _check_binding(tls_peer: PeerIdentity | None, cert: Certificate, store_id: str) -> None:
    """Invariant 7: the TLS certificate and the hello speak for the same node and key."""
    if tls_peer is None:
        return
    if (tls_peer.store_id, tls_peer.node_id, tls_peer.public_key) != (
            store_id, cert.node_id, cert.public_key):
        raise HandshakeError("tls_identity_mismatch",
                             f"TLS certificate of node {tls_peer.node_id!r} but a hello "
                             f"from {cert.node_id!r}")


async def dial(http: aiohttp.ClientSession, url: str, identity: NodeIdentity,
               now_ms: Callable[[], int], *, wan: bool = False,
               ssl_context: ssl.SSLContext | None = None, expect: str | None = None,
               expect_role: str | None = None, server_hostname: str | None = None,
               codecs: tuple[str, ...] = LAN_CODECS) -> Session:
    """Client side: connect to ``url`` (``https://host:port``; ``http://`` only for
    loopback development) and authenticate both ways. ``ssl_context``: mutual TLS
    pinned to the store CA (``mesh.net.tls.client_context``); ``expect``: the node id we
    mean to reach (refused as ``wrong_peer`` if the TLS certificate, or on a plain-text
    link the authenticated hello, names another); ``expect_role``: the role that node
    must be enrolled with (``wrong_peer`` otherwise: a ``--cloud`` URL must reach the
    cloud, not a register that answers there);
    ``server_hostname``: the SNI name (the cloud picks its store's certificate by it).
    Without ``ssl_context`` an https:// dial reads the identity's TLS files (blocking:
    for tools and tests).
    ``wan``: a metered link (to the cloud): WanCodec compression and linger batching.
    ``codecs``: the LAN session encodings we offer, preferred first (``()``: plain
    messages only, as a node that predates them; invariant 8).
    Raises ``HandshakeError`` (refused or forged) or aiohttp/OS errors (unreachable)."""
    tls = url.startswith("https://")
    if tls and ssl_context is None:  # tools and tests; a Node passes its own context
        ssl_context = client_context(load_tls_files(
            identity.data_dir, identity.key, store_id=identity.store_id,
            node_id=identity.node_id, store_public_key=identity.trust.store_public_key))
    extra: dict[str, Any] = {"ssl": ssl_context} if tls else {}
    if tls and server_hostname is not None:
        extra["server_hostname"] = server_hostname
    ws = await http.ws_connect(url.rstrip("/") + "/v1/sync", max_msg_size=config.MAX_MESSAGE_BYTES,
                               heartbeat=config.HEARTBEAT_S, compress=0,
                               timeout=aiohttp.ClientWSTimeout(ws_close=2.0), **extra)
    try:
        tls_peer: PeerIdentity | None = None
        if tls:
            sslobj = ws.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            tls_peer = peer_identity(der) if der else None
            if tls_peer is None or tls_peer.store_id != identity.store_id:
                raise HandshakeError("tls_identity_mismatch",
                                     "the peer's TLS certificate names no node of this store")
            if expect is not None and tls_peer.node_id != expect:
                raise HandshakeError("wrong_peer", f"{url} is node {tls_peer.node_id!r}, "
                                     f"not {expect!r}")
        nonce = os.urandom(32)
        hello = _hello(identity, nonce, wan)
        if codecs and not wan:
            hello["codecs"] = list(codecs)
        await ws.send_str(orjson.dumps(hello).decode())
        reply = await _recv_json(ws)
        cert, their_nonce = _check_hello(identity, reply, now_ms())
        assert isinstance(reply, dict)
        codec = reply.get("codec")
        if codec is not None and (wan or codec not in codecs):
            raise HandshakeError("bad_handshake", f"peer picked encoding {codec!r}, "
                                 f"we offered {list(codecs) if not wan else []}")
        _check_binding(tls_peer, cert, identity.store_id)
        if expect is not None and cert.node_id != expect:
            raise HandshakeError("wrong_peer", f"{url} is node {cert.node_id!r}, not "
                                 f"{expect!r}")
        if expect_role is not None and cert.role != expect_role:
            raise HandshakeError("wrong_peer", f"{url} is node {cert.node_id!r} enrolled "
                                 f"as {cert.role!r}, not {expect_role!r}")
        try:
            sig = bytes.fromhex(str(reply.get("sig", "")))
        except ValueError:
            raise HandshakeError("bad_handshake", "signature is not hex") from None
        if not verify_signature(cert.public_key, sig, _transcript(
                b"listener", nonce, their_nonce, identity.node_id, cert.node_id)):
            raise HandshakeError("bad_signature", "peer does not hold its certificate's key")
        mine = identity.key.sign(
            _transcript(b"dialer", their_nonce, nonce, identity.node_id, cert.node_id))
        await ws.send_str(orjson.dumps({"t": "auth", "sig": mine.hex()}).decode())
        ok = await _recv_json(ws)
        if ok != {"t": "ok"}:
            raise HandshakeError("refused", "peer did not accept our authentication")
    except BaseException:
        await ws.close()
        raise
    session = Session(cert.node_id, cert.role, ws, url=url, outbound=True,
                      linger_s=config.WAN_LINGER_S if wan else 0.0,
                      known=_enrolled(identity), codec=codec)
    session.sock = ws.get_extra_info("socket")
    return session
