"""Pure CRDTs for the store mesh: no I/O, no clock reads, no randomness.

* ``VersionVector`` — per origin, the highest contiguous seq held (anti-entropy).
* ``HLC`` with ``pack_hlc``/``unpack_hlc`` — hybrid logical clock; time is passed in.
* ``PNCounter`` — stock on hand, one (P, N) pair per replica, delta mutators.
* ``CausalContext``, ``Dot`` and ``ORSet`` — the add-wins OR-set of reservations.

Every join here is commutative, associative and idempotent; each module lists its
invariants at the top.
"""

from __future__ import annotations

from mesh.core.crdt.hlc import HLC, pack_hlc, unpack_hlc
from mesh.core.crdt.orset import CausalContext, Dot, ORSet
from mesh.core.crdt.pncounter import PNCounter
from mesh.core.crdt.vv import VersionVector

__all__ = [
    "HLC",
    "CausalContext",
    "Dot",
    "ORSet",
    "PNCounter",
    "VersionVector",
    "pack_hlc",
    "unpack_hlc",
]
