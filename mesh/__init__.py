"""storemesh: a CRDT-based peer-to-peer store mesh (stock, reservations, catalog).

The pure core is importable without any I/O dependency being started:
``from mesh import Replica, PNCounter, ORSet``. The runtime lives in ``mesh.node``
(one store node), ``mesh.cloud`` (the cloud peer) and ``mesh.sim`` (simulation).
"""

from __future__ import annotations

from mesh.crdt import HLC, ORSet, PNCounter, VersionVector
from mesh.envelope import Envelope, decode, seal, verify, verify_chain
from mesh.errors import CommandError, EnvelopeError
from mesh.replica import CommandResult, OversellException, Replica
from mesh.sync import SyncCore

__version__ = "0.1.0"

__all__ = [
    "HLC",
    "CommandError",
    "CommandResult",
    "Envelope",
    "EnvelopeError",
    "ORSet",
    "OversellException",
    "PNCounter",
    "Replica",
    "SyncCore",
    "VersionVector",
    "__version__",
    "decode",
    "seal",
    "verify",
    "verify_chain",
]
