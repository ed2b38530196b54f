"""How ``storemesh node`` runs on one data directory, kept in ``DIR/config.json``.

A node started once with ``--cloud URL`` or ``--peer URL`` must dial them again after a
restart with only ``--data DIR`` (docs/operations.md). So every start writes the
settings it was given into the data dir, and the next start reads them back.

Precedence, per setting: a flag given on this command line, else the value saved in
``config.json``, else the built-in default. A flag given replaces the saved value (a
repeatable flag, ``--peer`` or ``--cloud``, replaces the whole saved list) and is saved
for the next start once this one is listening. Settings never given are not saved, so
they follow the built-in default.

Invariants:
 1. ``config.json`` is replaced atomically (``mesh.store.datadir.write_atomic``).
 2. A file that does not parse, holds an unknown key or a value of the wrong type is
    refused with a message naming the file and the key: it is never half applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from mesh.store.datadir import write_atomic

__all__ = ["CONFIG_FILE", "check_url", "load_settings", "save_settings"]

CONFIG_FILE: Final = "config.json"

#: setting -> (its type, the flag that sets it)
_KEYS: Final[dict[str, tuple[type, str]]] = {
    "interface": (str, "--interface"),
    "http_host": (str, "--http-host"),
    "http_port": (int, "--http-port"),
    "peers": (list, "--peer"),
    "cloud_urls": (list, "--cloud"),
    "discovery": (bool, "--discovery/--no-discovery"),
    "cert_validity_s": (int, "--cert-validity"),
    "browser_names": (list, "--browser-name"),
}
_KINDS: Final = {str: "a string", int: "an integer", list: "a list of URLs", bool: "true or false"}


def check_url(url: str, flag: str) -> str:
    """``url`` if it is ``http(s)://host[:port][/path]``, else ``ValueError``."""
    problem = ValueError(f"{flag} {url!r} is not a URL like https://HOST:PORT")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number or out of range
    except ValueError:
        raise problem from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise problem
    return url


def load_settings(data_dir: Path) -> dict[str, Any]:
    """The settings saved in ``data_dir`` ({} if none); ``ValueError`` if the file is bad."""
    path = Path(data_dir) / CONFIG_FILE
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}): fix or delete it") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} must hold a JSON object: fix or delete it")
    for key, value in doc.items():
        if key not in _KEYS:
            raise ValueError(f"{path}: unknown setting {key!r} (known: {', '.join(_KEYS)})")
        kind, flag = _KEYS[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if ok and kind is list:
            ok = all(isinstance(v, str) for v in value)
            for v in value if ok else ():
                if key == "browser_names":
                    from mesh.net.tls import check_browser_name

                    try:
                        check_browser_name(v)
                    except ValueError as exc:
                        raise ValueError(f"{path}: {flag}: {exc}") from None
                else:
                    check_url(v, flag)
        if not ok:
            raise ValueError(f"{path}: {key} ({flag}) must be {_KINDS[kind]}, not {value!r}")
    return doc


def save_settings(data_dir: Path, settings: dict[str, Any]) -> None:
    """Write ``settings`` (keys of ``_KEYS`` only) to ``data_dir/config.json`` atomically."""
    unknown = set(settings) - set(_KEYS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    data = orjson.dumps(settings, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    write_atomic(Path(data_dir) / CONFIG_FILE, data + b"\n")
