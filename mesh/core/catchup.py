"""Catch-up from a checkpoint state: a node far behind (a new till) installs the state
of a checkpoint k, verified against the checkpointer's signed ``ck`` envelope, then
fetches only the tail above the frontier F_k (issue 12, docs/architecture.md,
"Catch-up from a checkpoint").

The *checkpoint state* of k is ``Replica.snapshot()`` of a replica that holds exactly
the envelopes within F_k and every checkpoint up to k, folded (``build_state``;
node id ``BASE_NODE``, so it holds no node's idempotency keys). The checkpointer
keeps one, advanced from one checkpoint to the next with the ledger rows between
their frontiers, and names the SHA-256 of its bytes in the ``ck`` op it signs
(``sh``). It serves that blob, with the ``ck`` envelope, in one ``K`` message.

Invariants:
 1. A checkpoint state is installed only if: the ``ck`` envelope verifies (signature,
    certificate) and is the store checkpointer's, the SHA-256 of the blob is the
    ``sh`` it signs, and the blob restores to a replica whose vector is exactly F_k,
    whose newest folded checkpoint is k (cut, frontier, heads, fold hash), whose
    chain heads at F_k are the hashes ``h`` names, whose fold hash is ``fh``, with
    nothing buffered and no mismatch. Nothing of the state is taken from the peer
    that sends it: ``sh`` is signed by the checkpointer, and every envelope above
    F_k is fetched and verified as usual, chained to the heads ``h`` names.
 2. Anything else is refused whole (``bad_checkpoint_state``): nothing is applied, and
    the node goes on with the full fetch.
 3. Pure: no I/O; the ledger is read through the ``read`` callable given.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import replace

from mesh import config
from mesh.core.envelope import Envelope, decode
from mesh.core.replica import Checkpoint, Replica
from mesh.errors import EnvelopeError, Malformed

__all__ = ["BASE_NODE", "advance_state", "checkpoint_of", "decode_state", "encode_state",
           "verify_state"]

#: The node id of a checkpoint state: no node's own (it holds no idempotency keys).
BASE_NODE = "~checkpoint-state"
_LEN = struct.Struct(">I")


def checkpoint_of(env: Envelope, checkpointer: str | None) -> Checkpoint | None:
    """The checkpoint a ``ck`` envelope of the store's checkpointer names, or None."""
    if checkpointer is None or env.origin != checkpointer:
        return None
    for op in env.ops:
        if op.get("t") == "ck":
            return Checkpoint(op["cut"], dict(op["f"]), env.origin, env.seq, dict(op["h"]),
                              op["fh"], op.get("sh", ""))
    return None


def advance_state(state: Replica, ck: Checkpoint,
                  read: Callable[[str, int, int], list[bytes]]) -> bool:
    """Bring ``state`` (a checkpoint state of the checkpoint before ``ck``, or an
    empty one) to the state of ``ck``: apply the rows within its frontier it lacks,
    origin by origin (``read(origin, first, last)``: the ledger's), then take ``ck``
    and fold it. False if the ledger lacks a row or one does not apply (then ``state``
    is unusable)."""
    for origin, top in sorted(ck.frontier.items()):
        while state.vv.get(origin) < top:
            first = state.vv.get(origin) + 1
            raws = read(origin, first, min(top, first + config.LEDGER_PAGE - 1))
            if not raws:
                return False
            try:
                for raw in raws:
                    state.apply(decode(raw), None, check_skew=False)
            except EnvelopeError:  # a ledger row that does not apply: no state
                return False
            if state.vv.get(origin) < first:
                return False
    if any(state.vv.get(o) != q for o, q in ck.frontier.items()) or state.pending_count():
        return False
    state.add_checkpoint(replace(ck, state_hash=""))  # its own hash is not in it
    return state.last_folded is not None and state.last_folded.key() == ck.key()


def encode_state(ck_raw: bytes, blob: bytes) -> bytes:
    """The ``K`` message: the signed ``ck`` envelope, then the checkpoint state."""
    return b"K" + _LEN.pack(len(ck_raw)) + ck_raw + blob


def decode_state(data: bytes) -> tuple[bytes, bytes]:
    if len(data) < 5:
        raise Malformed("checkpoint state message too short")
    (n,) = _LEN.unpack_from(data, 1)
    if n > config.MAX_ENVELOPE_BYTES or len(data) < 5 + n:
        raise Malformed("checkpoint state message: bad envelope length")
    return data[5 : 5 + n], data[5 + n :]


def _same(a: Checkpoint, b: Checkpoint) -> bool:
    return (a.cut, a.frontier, a.origin, a.seq, a.heads, a.fold_hash) == (
        b.cut, b.frontier, b.origin, b.seq, b.heads, b.fold_hash)


def verify_state(env: Envelope, blob: bytes, store_id: str, role: str,
                 checkpointer: str | None) -> tuple[Checkpoint, Replica]:
    """Invariant 1: the checkpoint ``env`` (already signature-verified) names, and the
    replica ``blob`` restores to. Raises ``Malformed`` for anything that does not hold."""
    ck = checkpoint_of(env, checkpointer)
    if ck is None or not ck.state_hash:
        raise Malformed("not a checkpoint of the store's checkpointer naming a state")
    if hashlib.sha256(blob).hexdigest() != ck.state_hash:
        raise Malformed("checkpoint state does not hash to the sh its ck op signs")
    state = Replica(store_id, BASE_NODE, role, checkpointer=checkpointer)
    try:
        state.restore(blob)
    except (ValueError, KeyError, TypeError, IndexError, EnvelopeError) as exc:
        raise Malformed(f"checkpoint state does not restore: {exc}") from None
    folded = state.last_folded
    if folded is None or not _same(folded, ck):
        raise Malformed("checkpoint state is not folded at its checkpoint")
    if state.vv.to_dict() != {o: q for o, q in ck.frontier.items() if q}:
        raise Malformed("checkpoint state holds other envelopes than its frontier")
    if state.pending_count() or _heads_differ(state, ck, ck.frontier.items()):
        raise Malformed("checkpoint state's chain heads differ from its ck op")
    if state.checkpoint_hash(ck).hex() != ck.fold_hash:
        raise Malformed("checkpoint state's fold hash differs from its ck op")
    return ck, state


def _heads_differ(state: Replica, ck: Checkpoint, items: Iterable[tuple[str, int]]) -> bool:
    for origin, seq in items:
        if not seq:
            continue
        held = state.hash_at(origin, seq)
        if held is None or held.hex() != ck.heads.get(origin):
            return True
    return False
