"""The core and the simulator (with its simulated ports) are pure: imported in a fresh
interpreter they pull in no asyncio, aiohttp, sqlite3 or zeroconf, and none of their
modules imports socket or time (python-zeroconf's test_circular_imports pattern). The
signature-check memory is an object (``TrustStore.verifier``), not process state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.unit.test_layers import top_level_imports

ROOT = Path(__file__).resolve().parents[2]

#: The pure set: every module of the core (found on disk, so a new one is checked too),
#: the ports, the driver and its durability layer, and the simulator over its ports.
PURE = (*sorted("mesh.core." + ".".join(p.relative_to(ROOT / "mesh" / "core")
                                        .with_suffix("").parts).removesuffix(".__init__")
                for p in (ROOT / "mesh" / "core").rglob("*.py")
                if p.name != "__init__.py" or p.parent != ROOT / "mesh" / "core"),
        "mesh.core", "mesh.ports", "mesh.driver", "mesh.durable",
        "mesh.sim", "mesh.sim.world", "mesh.sim.ports", "mesh.sim.runner",
        "mesh.sim.faults", "mesh.sim.checker", "mesh.sim.workload", "mesh.sim.byzantine",
        "mesh.sim.scenario", "mesh.testing.contracts")
#: Never loaded by importing the pure modules (socket is: pycrdt imports anyio, which
#: imports it; so socket is checked by the import scan below instead).
NOT_LOADED = ("asyncio", "aiohttp", "sqlite3", "_sqlite3", "zeroconf")
#: Never imported at module level by a mesh module reached from the pure ones.
NOT_IMPORTED = ("asyncio", "aiohttp", "socket", "sqlite3", "time", "zeroconf")

_PROBE = """
import json, sys
before = set(sys.modules)
for name in {pure!r}:
    __import__(name)
new = sorted(set(sys.modules) - before)
print(json.dumps(new))
"""


def _loaded() -> list[str]:
    out = subprocess.run(  # our own interpreter, a fixed script
        [sys.executable, "-c", _PROBE.format(pure=PURE)], cwd=ROOT, check=True,
        capture_output=True, text=True, timeout=120)
    return list(json.loads(out.stdout))


def _top_imports(path: Path) -> set[str]:
    """Top-level modules a file imports outside functions and TYPE_CHECKING blocks."""
    return {module.split(".")[0] for module, _ in top_level_imports(path)}


def test_pure_modules_load_no_io_runtime() -> None:
    loaded = _loaded()
    bad = [m for m in loaded if m.split(".")[0] in NOT_LOADED]
    assert not bad, f"importing the core and the simulator loaded {bad}"


def test_no_pure_module_imports_socket_or_time() -> None:
    mesh_modules = [m for m in _loaded() if m == "mesh" or m.startswith("mesh.")]
    offenders = {}
    for name in mesh_modules:
        rel = Path(*name.split("."))
        path = ROOT / (str(rel) + ".py")
        if not path.exists():
            path = ROOT / rel / "__init__.py"
        bad = _top_imports(path) & set(NOT_IMPORTED)
        if bad:
            offenders[name] = sorted(bad)
    assert not offenders, f"modules of the pure set import I/O or clocks: {offenders}"


def test_signature_memory_is_per_trust_store() -> None:
    import mesh.core.identity as identity
    from mesh.core.identity import NodeKey, TrustStore

    assert not hasattr(identity, "_verified") and not hasattr(identity, "_pubkey_cache")
    key = NodeKey.generate()
    a = TrustStore("s", NodeKey.generate().public_key)
    b = TrustStore("s", a.store_public_key)
    sig = key.sign(b"x")
    assert identity.verify_signature(key.public_key, sig, b"x", a.verifier)
    assert a.verifier._ok and not b.verifier._ok
