"""storemesh: a CRDT-based peer-to-peer store mesh (stock, reservations, catalog).

The pure core is importable without any I/O dependency being started:
``from mesh import Replica, PNCounter, ORSet``. The runtime lives in ``mesh.node.node``
(one store node), ``mesh.cloud.server`` (the cloud peer) and ``mesh.sim`` (simulation).
"""

from __future__ import annotations

from mesh.core.crdt import HLC, ORSet, PNCounter, VersionVector
from mesh.core.envelope import Envelope, decode, seal, verify, verify_chain
from mesh.core.replica import CommandResult, OversellException, Replica
from mesh.core.sync import SyncCore
from mesh.errors import CommandError, EnvelopeError

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
