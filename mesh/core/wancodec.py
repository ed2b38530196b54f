"""The session codec: pure bytes in, bytes out (no I/O), used by the real transport
(``mesh.net.transport.Session``) on every WAN session and on every LAN session that
negotiated it (``"codecs": ["z1"]`` in the hello, docs/protocol.md), and by the
simulator's WAN links, both ways. A LAN session runs it at a cheaper deflate level and
a smaller window (``config.LAN_ZLIB_*``); the wire format is the same. With it the
rest of what a session does to bytes, shared by both the same way: the merge of queued
envelope batches (``coalesce``), the enrolment check of the receiving table
(``enrolled``) and the linger before a WAN write (``config.WAN_LINGER_S``).

Invariants:
 1. ``decode(encode(m)) == m`` for every message, in stream order, per direction.
 2. Anything a peer sends that cannot be decoded raises ``ValueError`` (or
    ``zlib.error``); the caller closes the session, since the stream state is unknown.
 3. A decoded message never exceeds ``MAX_MESSAGE_BYTES`` (no inflation bomb).
 4. Per-origin tables hold at most ``MAX_WAN_ORIGINS`` origins each, and the receiving
    table only origins ``known`` accepts (transport invariant 6); the last hash of at
    most ``MAX_WAN_STRAY_ORIGINS`` origins it did not accept is kept aside, so their
    next frame can be restored once their certificate has come.
 5. A message is decoded whole or not at all: ``decode`` returns every frame of it or
    raises (a message cut short, or holding a frame cut short, is refused), so no part
    of a batch reaches the sync core on its own.
"""

from __future__ import annotations

import binascii
import hashlib
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from mesh import config

if TYPE_CHECKING:
    from mesh.core.identity import TrustStore

__all__ = ["WanCodec", "coalesce", "enrolled", "frames"]

_PREV = b'"prev":"'
_ELIDED = b'"prev":"="'
_SIG_TAIL = 130  # 128 hex chars + '"}' at the end of every raw envelope
_F_PREV, _F_SIG = 1, 2
#: How every message's deflate data ends: the empty stored block of Z_SYNC_FLUSH.
_FLUSH = b"\x00\x00\xff\xff"


class WanCodec:
    """Per-session WAN encoding (both directions of one session).

    ``E`` batches become ``P`` batches: a frame's ``prev`` hash is dropped when it is
    the hash of the previous envelope of the same origin carried on this session
    (the receiver recomputes it), and the signature travels as 64 raw bytes instead of
    128 hex characters. Then every message is compressed with zlib level 9 in one
    stream per direction (like permessage-deflate with context takeover, but at the
    best level). Both need the ordered, reliable WebSocket stream; after any decode
    error the session must be closed, since the stream state is then unknown.
    """

    def __init__(self, known: Callable[[str], bool] | None = None,
                 on_refuse: Callable[[str], None] | None = None, *, level: int = 9,
                 wbits: int = 15, mem_level: int = 9, name: str = "wan") -> None:
        # The receiver inflates with the largest window (-15), so a sender may pick any
        # level and window: the format does not depend on them.
        self._tx = zlib.compressobj(level, zlib.DEFLATED, -wbits, mem_level)
        #: Prefix of the refusal reasons (``wan_unenrolled_origin``, ``lan_...``).
        self.name = name
        self._rx = zlib.decompressobj(-15)
        self._tx_last: dict[bytes, bytes] = {}
        self._rx_last: dict[bytes, bytes] = {}
        #: The last hash of origins we did not keep (no certificate yet), a few of the
        #: latest only: the sender keeps eliding their ``prev``, so once the
        #: certificate arrives (the ``C`` just ahead, or a moment later) their next
        #: frame can still be restored instead of closing the session.
        self._rx_stray: OrderedDict[bytes, bytes] = OrderedDict()
        #: Whether an origin holds a certificate here; only those enter ``_rx_last``
        #: (invariant 6). None: any origin (tests of the codec alone).
        self._known = known
        self._on_refuse = on_refuse

    def _refuse(self, reason: str) -> None:
        if self._on_refuse is not None:
            self._on_refuse(reason)

    def _keeps(self, origin: bytes) -> bool:
        """Whether a received frame's origin may enter (or stay in) ``_rx_last``."""
        if origin in self._rx_last:
            return True
        if self._known is not None and not self._known(origin.decode("utf-8", "replace")):
            self._refuse(f"{self.name}_unenrolled_origin")
            return False
        if len(self._rx_last) >= config.MAX_WAN_ORIGINS:
            self._refuse(f"{self.name}_origin_table_full")
            return False
        return True

    def encode(self, msg: bytes) -> bytes:
        if msg[:1] == b"E":
            msg = self._pack(msg)
        return b"Z" + self._tx.compress(msg) + self._tx.flush(zlib.Z_SYNC_FLUSH)

    def decode(self, data: bytes) -> bytes:
        if data[:1] != b"Z":
            raise ValueError("expected a compressed session message")
        if not data.endswith(_FLUSH):
            # Every message ends with its sync flush (``encode``), and only there: one
            # cut short would inflate to a prefix of its frames (invariant 5).
            raise ValueError("session message does not end with its flush")
        msg = self._rx.decompress(data[1:], config.MAX_MESSAGE_BYTES + 1)
        if self._rx.unconsumed_tail or len(msg) > config.MAX_MESSAGE_BYTES:
            raise ValueError("session message inflates beyond the message bound")
        if not msg:
            raise ValueError("empty session message")
        return self._unpack(msg) if msg[:1] == b"P" else msg

    def _pack(self, data: bytes) -> bytes:
        out = [b"P"]
        pos, end = 1, len(data)
        while pos + 4 <= end:
            n = int.from_bytes(data[pos : pos + 4], "big")
            raw = data[pos + 4 : pos + 4 + n]
            pos += 4 + n
            origin = _origin_of(raw)
            flags, packed = 0, raw
            at = packed.find(_PREV)
            last = self._tx_last.get(origin)
            if at >= 0 and last is not None and packed[at + 8 : at + 72] == last:
                packed = packed[:at] + _ELIDED + packed[at + 73:]
                flags |= _F_PREV
            sig = _raw_sig(packed)
            if sig is not None:
                packed = packed[:-_SIG_TAIL] + sig
                flags |= _F_SIG
            if origin in self._tx_last or len(self._tx_last) < config.MAX_WAN_ORIGINS:
                # kept as hex: what the next frame's ``prev`` is compared with
                self._tx_last[origin] = hashlib.sha256(raw).hexdigest().encode()
            out.append((len(packed) + 1).to_bytes(4, "big"))
            out.append(bytes((flags,)))
            out.append(packed)
        return b"".join(out)

    def _unpack(self, data: bytes) -> bytes:
        out = [b"E"]
        pos, end = 1, len(data)
        while pos < end:
            if pos + 5 > end:
                raise ValueError("truncated frame header")
            n = int.from_bytes(data[pos : pos + 4], "big")
            if n > config.MAX_ENVELOPE_BYTES or pos + 4 + n > end or n < 1:
                raise ValueError("bad frame length")
            flags = data[pos + 4]
            raw = data[pos + 5 : pos + 4 + n]
            pos += 4 + n
            if flags & _F_SIG:
                if len(raw) < 64:
                    raise ValueError("frame too short for its signature")
                raw = raw[:-64] + raw[-64:].hex().encode() + b'"}'
            origin = _origin_of(raw)
            keep = self._keeps(origin)
            if flags & _F_PREV:
                last = self._rx_last.get(origin) or self._rx_stray.get(origin)
                at = raw.find(_ELIDED)
                if last is None or at < 0:
                    if not keep:
                        continue  # an origin we did not keep: its prev cannot be restored
                    raise ValueError("elided prev with nothing to restore it from")
                raw = raw[:at] + _PREV + last.hex().encode() + b'"' + raw[at + len(_ELIDED):]
            digest = hashlib.sha256(raw).digest()
            if keep:
                self._rx_last[origin] = digest
                if self._rx_stray:
                    self._rx_stray.pop(origin, None)
            else:
                stray = self._rx_stray
                stray[origin] = digest
                stray.move_to_end(origin)
                if len(stray) > config.MAX_WAN_STRAY_ORIGINS:
                    stray.popitem(last=False)
            out.append(len(raw).to_bytes(4, "big"))
            out.append(raw)
        return b"".join(out)


def _raw_sig(packed: bytes) -> bytes | None:
    """The 64 signature bytes if ``packed`` ends in 128 lowercase hex chars + ``"}``
    (what the receiver restores exactly), else None (the frame goes as it is)."""
    if not packed.endswith(b'"}') or len(packed) < _SIG_TAIL:
        return None
    sighex = packed[-_SIG_TAIL:-2]
    try:
        sig = binascii.a2b_hex(sighex)
    except (binascii.Error, ValueError):
        return None
    return sig if binascii.b2a_hex(sig) == sighex else None


def _origin_of(raw: bytes) -> bytes:
    at = raw.find(b'"origin":"')
    return raw[at + 10 : raw.find(b'"', at + 10)] if at >= 0 else b""


def enrolled(trust: Callable[[], TrustStore]) -> Callable[[str], bool]:
    """Whether a node id holds a certificate of this store in the trust store
    ``trust()`` returns (the WAN codec keeps per-origin state only for those)."""

    def known(origin: str) -> bool:
        return trust().certificate(origin) is not None

    return known


def frames(data: bytes) -> int:
    """Number of envelopes in an ``E`` message (walks the length prefixes)."""
    n, pos, end = 0, 1, len(data)
    while pos + 4 <= end:
        pos += 4 + int.from_bytes(data[pos : pos + 4], "big")
        n += 1
    return n


def coalesce(queue: deque[bytes]) -> bytes:
    """Pop the next message; merge the ``E`` messages right behind it into it (bounded
    by ``MAX_BATCH_BYTES`` and ``MAX_BATCH_ENVELOPES``)."""
    data = queue.popleft()
    if data[:1] != b"E" or not queue or queue[0][:1] != b"E":
        return data
    parts, size, count = [data], len(data), frames(data)
    while queue and queue[0][:1] == b"E":
        nxt = queue[0]
        n = frames(nxt)
        if (size + len(nxt) > config.MAX_BATCH_BYTES
                or count + n > config.MAX_BATCH_ENVELOPES):
            break
        parts.append(queue.popleft())
        size += len(nxt) - 1
        count += n
    return b"E" + b"".join(p[1:] for p in parts)
