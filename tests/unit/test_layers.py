"""The layer folders mean something: each layer imports only the layers below it
(docs/architecture.md, "Layers"). Checked on module-level imports, outside functions and
``TYPE_CHECKING`` blocks, as python-zeroconf's test_circular_imports checks its modules;
an import inside a function is the documented way for a lower layer to reach a higher
one lazily (``DurableReplica.open`` opening the real ledger, for one)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MESH = ROOT / "mesh"

#: Every module may import these (the package root, the bounds, the two kinds of error).
BASE = {"mesh", "config", "errors", "__main__"}
_BELOW_NODE = {"core", "store", "net", "http", "driver", "durable", "ports"}
#: What each layer (a folder, or a module at the top of mesh/) may import.
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "ports": {"core"},
    "durable": {"core", "ports"},
    "driver": {"core", "ports", "durable"},
    "store": {"core", "store"},
    "net": {"core", "store", "net"},
    "http": {"core", "store", "http", "durable", "ports"},
    "node": _BELOW_NODE | {"node"},
    "cloud": _BELOW_NODE | {"node", "cloud"},
    "sim": {"core", "driver", "durable", "ports", "sim"},
    "testing": _BELOW_NODE | {"node", "testing"},  # fleet.py: edges as real Nodes
    "app": _BELOW_NODE | {"node", "cloud", "sim", "testing", "app"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(MESH)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def top_level_imports(path: Path) -> list[tuple[str, list[str]]]:
    """What a file imports at module level, outside functions and ``TYPE_CHECKING``
    blocks: ``(module, [names])`` per import (``import a.b`` -> ``("a.b", [])``,
    ``from a import x, y`` -> ``("a", ["x", "y"])``); relative imports left out."""
    out: list[tuple[str, list[str]]] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.extend((alias.name, []) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.append((node.module, [alias.name for alias in node.names]))
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
    visit(ast.parse(path.read_text()).body)
    return out


def _mesh_imports(path: Path) -> set[str]:
    """The layers a file imports at module level (``mesh.X…`` -> X)."""
    found: set[str] = set()
    for module, names in top_level_imports(path):
        parts = module.split(".")
        if parts[0] != "mesh":
            continue
        if len(parts) > 1:
            found.add(parts[1])
        elif not names:
            found.add("mesh")
        else:  # from mesh import config / from mesh import x
            found.update(name if (MESH / name).is_dir() or (MESH / f"{name}.py").exists()
                         else "mesh" for name in names)
    return found


def test_every_module_has_a_layer() -> None:
    layers = {_layer(p) for p in MESH.rglob("*.py")} - BASE - {"__init__"}
    assert layers <= set(ALLOWED), f"modules outside every layer: {layers - set(ALLOWED)}"


def test_layers_import_only_what_is_below_them() -> None:
    offenders: dict[str, list[str]] = {}
    for path in sorted(MESH.rglob("*.py")):
        layer = _layer(path)
        if layer in BASE or layer == "__init__":
            continue
        bad = _mesh_imports(path) - ALLOWED[layer] - BASE
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"imports against the layer rule: {offenders}"


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from mesh.node.node import Node\nif True:\n    import mesh.http.api\n")
    assert _mesh_imports(probe) == {"node", "http"}
    assert _mesh_imports(probe) - ALLOWED["core"] - BASE
