"""The ``storemesh`` command line.

Commands here are thin: they parse arguments, call into the package and render with
rich. Errors the user can fix exit with status 2 and a one-line message.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from mesh import __version__
from mesh.core.envelope import DOMAIN, body_bytes, decode
from mesh.core.identity import verify_signature
from mesh.errors import EnvelopeError, KeyPermissionError, LedgerError, Malformed
from mesh.store.datadir import DataDirInUse, DataDirLock, init_store, load_identity, lock_data_dir
from mesh.store.ledger import Ledger

__all__ = ["UserError", "main"]

console = Console()
log = logging.getLogger("storemesh")


class UserError(click.ClickException):
    """A mistake the user can fix: one line on stderr, exit status 2, no traceback."""

    exit_code = 2


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _setup_logging(level: str) -> None:
    try:
        logging.basicConfig(level=level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    except ValueError:
        raise UserError(f"--log-level {level!r}: use DEBUG, INFO, WARNING or ERROR") from None


def _sigterm_as_interrupt() -> None:
    """Until the event loop takes over the signals (``_serve``), SIGTERM stops the process
    the way Ctrl-C does (KeyboardInterrupt, caught by the command: exit 0), not by the
    default action (killed, status 143). Nothing is open yet at that point. (The
    ``storemesh`` entry point, ``mesh.__main__.run``, does this before loading; this
    covers ``main`` called another way.)"""
    from mesh.__main__ import _interrupt

    signal.signal(signal.SIGTERM, _interrupt)


def _interrupted_before_start(what: str) -> None:
    log.info("%s: interrupted before start-up; stopped cleanly", what)


async def _serve(what: str, start: Callable[[], Coroutine[Any, Any, None]],
                 close: Callable[[], Awaitable[None]], ready: Callable[[], None]) -> None:
    """Start, serve until SIGINT or SIGTERM, close. The signal handlers are in place
    before ``start`` runs, so a signal at any moment (opening the ledger, joining,
    binding, catching up, serving) cancels what is under way and closes cleanly:
    sessions ended, ledger flushed, lock released; the command then exits 0."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    got: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        if not got:
            got.append(sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        starting = asyncio.create_task(start(), name=f"{what} start")
        stopping = asyncio.create_task(stop.wait(), name="signal")
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("%s: %s during start-up, shutting down", what, got[0])
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            starting.result()  # a failed start raises here (after close, below)
            ready()
            await stopping
            log.info("%s: %s, shutting down", what, got[0])
        stopping.cancel()
    finally:
        await close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("%s: stopped cleanly", what)


def _start_error(exc: BaseException, host: str, port: int) -> UserError | None:
    """The one-line message for a start-up failure the user can fix, if it is one."""
    if isinstance(exc, DataDirInUse | FileNotFoundError | KeyPermissionError | LedgerError
                  | Malformed):
        return UserError(str(exc))
    if isinstance(exc, ValueError):
        return UserError(str(exc))
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return UserError(f"cannot listen on {host}:{port}: the port is already in use "
                             "(another node?): stop it or choose another --http-port")
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            return UserError(f"cannot listen on {host}:{port}: {exc.strerror}")
        return UserError(f"cannot start: {exc}")
    return None


@click.group()
@click.version_option(__version__, prog_name="storemesh")
def main() -> None:
    """storemesh: offline-first, peer-to-peer stock and reservations for retail stores."""


# --- store ------------------------------------------------------------------------------


@main.group()
def store() -> None:
    """Create and inspect stores."""


@store.command("init")
@click.argument("data_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--store", "store_id", required=True, help="Store id, e.g. 'berlin-mitte'.")
@click.option("--node-id", default=None, help="Node id of the edge node (default: derived).")
def store_init(data_dir: Path, store_id: str, node_id: str | None) -> None:
    """Create a store key and the store's first (edge) node in DATA_DIR."""
    try:
        ident = init_store(data_dir, store_id, now_ms=_now_ms(), node_id=node_id)
    except (FileExistsError, ValueError) as exc:
        raise UserError(str(exc)) from None
    console.print(f"store [bold]{ident.store_id}[/] created; edge node [bold]{ident.node_id}[/]"
                  f" in {data_dir} (key fingerprint {ident.key.fingerprint})")


@store.command("ca")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the PEM here (default: print it).")
def store_ca(data_dir: Path, output: Path | None) -> None:
    """Export the store CA certificate (PEM) of DATA_DIR's store, for tills to pin.

    A till (or curl, or 'storemesh status --ca FILE') trusts only this certificate:
    every node's TLS certificate is signed by the store key it holds."""
    from mesh.store.datadir import ensure_tls

    try:
        files = ensure_tls(load_identity(data_dir), now_ms=_now_ms())
    except (FileNotFoundError, ValueError, KeyPermissionError) as exc:
        raise UserError(str(exc)) from None
    if output is None:
        click.echo(files.ca_pem.decode("ascii"), nl=False)
    else:
        output.write_bytes(files.ca_pem)
        console.print(f"store CA of [bold]{files.data_dir}[/] written to {output}")


# --- node -------------------------------------------------------------------------------


@main.command("node")
@click.option("--data", "data_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="The node's data directory.")
@click.option("--http-port", default=8700, show_default=True, help="HTTP/WebSocket port (0: any).")
@click.option("--http-host", default=None,
              help="Address to listen on [default: --interface, else 0.0.0.0].")
@click.option("--interface", default=None,
              help="Interface address for mDNS discovery and listening, e.g. 127.0.0.1.")
@click.option("--peer", "peers", multiple=True,
              help="Static peer URL (repeatable), for links mDNS cannot cross.")
@click.option("--cloud", "cloud_urls", multiple=True,
              help="Cloud peer URL (https://HQ:PORT/stores/STORE): a WAN link, compressed "
                   "and batched; the store dials out, so no inbound access is needed.")
@click.option("--join", "token", default=None, help="One-time join token (first start only).")
@click.option("--node-id", default=None, help="Node id to ask for when joining.")
@click.option("--url", "join_url", default=None,
              help="Edge URL to join through (default: the token's, else mDNS).")
@click.option("--discovery/--no-discovery", default=True, show_default=True,
              help="Find peers by mDNS (--no-discovery: only --peer and --cloud URLs).")
@click.option("--insecure-plaintext", is_flag=True, default=False,
              help="Development only: plain HTTP and ws:// instead of TLS; refused unless "
                   "the node listens on a loopback address. Never saved in config.json.")
@click.option("--cert-validity", "cert_validity_s", type=click.IntRange(min=10),
              default=None, metavar="SECONDS",
              help="On the edge: how long the node certificates it issues (join tokens) "
                   "and renews stay valid (default a year; renewed when a third is left).")
@click.option("--browser-name", "browser_names", multiple=True, metavar="HOST",
              help="A host name browser tills reach this node by (repeatable), besides "
                   "localhost and NODE.local: served the node's P-256 browser certificate "
                   "(trust DATA/browser-ca.pem in the till's browser).")
@click.option("--log-level", default="INFO", show_default=True)
@click.pass_context
def node_cmd(ctx: click.Context, data_dir: Path, http_port: int, http_host: str | None,
             interface: str | None, peers: tuple[str, ...], cloud_urls: tuple[str, ...],
             token: str | None, node_id: str | None, join_url: str | None, discovery: bool,
             insecure_plaintext: bool, cert_validity_s: int | None,
             browser_names: tuple[str, ...], log_level: str) -> None:
    """Run a store node: sync with peers, serve the POS/channel API, until Ctrl-C.

    The network flags (--interface, --http-host, --http-port, --peer, --cloud,
    --discovery) given at a start are saved in DATA/config.json; a later start reads
    them back, and a flag given again replaces the saved value.

    Every link is TLS: peers and the cloud are https:// URLs, sync is mutual TLS pinned
    to the store CA, and the API is served with a certificate signed by the store key
    (export the CA for tills with 'storemesh store ca DIR'). Browsers accept no Ed25519
    certificate: a browser till opens https://localhost:PORT (or NODE.local, or a
    --browser-name) and trusts DATA/browser-ca.pem, the node's own P-256 CA."""
    if token is None and not (data_dir / "node.json").exists():
        raise UserError(f"{data_dir} holds no node: create a store with 'storemesh store init' "
                        "or join one with --join TOKEN")
    given = {"interface": interface, "http_host": http_host, "http_port": http_port,
             "peers": list(peers), "cloud_urls": list(cloud_urls), "discovery": discovery,
             "cert_validity_s": cert_validity_s, "browser_names": list(browser_names)}
    try:
        given = {k: v for k, v in given.items() if _from_command_line(ctx, k)}
        for url in (*peers, *cloud_urls, *((join_url,) if join_url else ())):
            _check_url(url, "--url" if url == join_url else "--peer/--cloud")
        from mesh.net.tls import check_browser_name

        for name in browser_names:
            check_browser_name(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    _sigterm_as_interrupt()
    _setup_logging(log_level)
    try:
        _run_node(data_dir, given, token, node_id, join_url, insecure_plaintext)
    except KeyboardInterrupt:
        _interrupted_before_start("node")


def _from_command_line(ctx: click.Context, param: str) -> bool:
    from click.core import ParameterSource

    return ctx.get_parameter_source(param) in (ParameterSource.COMMANDLINE,
                                              ParameterSource.ENVIRONMENT)


def _check_url(url: str, flag: str) -> None:
    from mesh.store.nodeconfig import check_url

    check_url(url, flag)


def _run_node(data_dir: Path, given: dict[str, Any], token: str | None, node_id: str | None,
              join_url: str | None, insecure_plaintext: bool = False) -> None:
    from mesh.node.node import Node
    from mesh.store.nodeconfig import load_settings, save_settings

    try:
        saved = load_settings(data_dir)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    settings = {**saved, **given}  # precedence: this command line, config.json, defaults
    interface: str | None = settings.get("interface")
    http_host: str = settings.get("http_host") or interface or "0.0.0.0"  # noqa: S104
    http_port: int = settings.get("http_port", 8700)
    peers: list[str] = settings.get("peers", [])
    if insecure_plaintext:
        from mesh.net.tls import is_loopback_host

        if not is_loopback_host(http_host):
            raise UserError(f"--insecure-plaintext serves plain HTTP, so only on a loopback "
                            f"address: listen on 127.0.0.1 (--interface/--http-host), not "
                            f"{http_host}")
    node: Node | None = None
    lock: DataDirLock | None = None

    async def start() -> None:
        nonlocal node, lock
        try:
            lock = lock_data_dir(data_dir)  # before anything writes there (join, ledger)
        except DataDirInUse as exc:
            raise UserError(str(exc)) from None
        except OSError as exc:
            raise UserError(f"cannot use {data_dir}: {exc.strerror or exc}") from None
        if not (data_dir / "node.json").exists():
            assert token is not None
            await _join_node(data_dir, token, join_url or (peers[0] if peers else None),
                             interface, node_id, insecure_plaintext)
        node = Node(data_dir, http_host=http_host, http_port=http_port, interface=interface,
                    peers=peers, wan_peers=settings.get("cloud_urls", []),
                    discovery=settings.get("discovery", True),
                    insecure_plaintext=insecure_plaintext,
                    cert_validity_ms=None if settings.get("cert_validity_s") is None
                    else settings["cert_validity_s"] * 1000,
                    browser_names=settings.get("browser_names", []))
        try:
            await node.start()
        except Exception as exc:
            err = _start_error(exc, http_host, http_port)
            if err is None:
                raise
            raise err from None
        if settings != saved:
            await asyncio.to_thread(save_settings, data_dir, settings)

    def ready() -> None:
        assert node is not None
        print(f"storemesh node {node.identity.node_id} ({node.identity.role}) of store "
              f"{node.identity.store_id} listening on {node.url}", flush=True)

    async def close() -> None:
        if node is not None:
            await node.close()
        if lock is not None:
            lock.release()

    from mesh.node import runtime

    try:
        runtime.loop_kind()
    except ValueError as exc:  # STOREMESH_LOOP: the operator's setting
        raise UserError(str(exc)) from None
    runtime.run(_serve("node", start, close, ready))


async def _join_node(data_dir: Path, token: str, url: str | None, interface: str | None,
                     node_id: str | None, insecure_plaintext: bool = False) -> None:
    from mesh.net.enrol import JoinRefused, UntrustedEdge, join

    try:
        ident = await join(data_dir, token, url=url, interface=interface, node_id=node_id,
                           insecure_plaintext=insecure_plaintext)
    except (JoinRefused, UntrustedEdge, Malformed, FileExistsError, ConnectionError,
            TimeoutError, ValueError) as exc:
        raise UserError(f"join failed: {exc}") from None
    console.print(f"joined store [bold]{ident.store_id}[/] as {ident.node_id}")


@main.group()
def cloud() -> None:
    """The cloud analytics peer: one replica per store, one server."""


@cloud.command("join")
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.argument("token")
@click.option("--url", default=None, help="Edge URL to redeem the token at (else the token's).")
@click.option("--insecure-plaintext", is_flag=True, default=False,
              help="Development only: join an http:// edge on 127.0.0.1.")
@click.option("--database", default=None, metavar="URL",
              help="postgresql://...: register the store in the database's control plane "
                   "(running gateways serve it within seconds) instead of ROOT/STORE.")
def cloud_join_cmd(root: Path, token: str, url: str | None, insecure_plaintext: bool,
                   database: str | None) -> None:
    """Enrol the cloud in a store with a join token made with '--role cloud'."""
    import asyncio

    from mesh.cloud.server import cloud_join
    from mesh.errors import Malformed
    from mesh.net.enrol import JoinRefused, UntrustedEdge

    _check_database(database)
    try:
        data_dir = asyncio.run(cloud_join(root, token, url=url,
                                          insecure_plaintext=insecure_plaintext,
                                          database=database))
    except (JoinRefused, UntrustedEdge, Malformed, FileExistsError, ConnectionError,
            TimeoutError, ValueError, OSError) as exc:
        raise UserError(f"join failed: {exc}") from None
    if database is None:
        console.print(f"cloud enrolled; store data in {data_dir}")
    else:
        console.print(f"cloud enrolled; store [bold]{data_dir.name}[/] registered in the "
                      "database (the gateways serve it within a lease tick)")


def _check_database(database: str | None) -> None:
    if database is None:
        return
    from mesh.store.pgstore import is_pg_dsn

    if not is_pg_dsn(database):
        raise UserError(f"--database takes a postgresql:// URL, not {database!r}")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise UserError("--database needs the PostgreSQL driver: pip install "
                        "'storemesh[postgres]'") from None


@cloud.command("run")
@click.option("--data", "root", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Root directory with one sub-directory per store.")
@click.option("--http-host", default="0.0.0.0", show_default=True)  # noqa: S104
@click.option("--http-port", default=8800, show_default=True)
@click.option("--insecure-plaintext", is_flag=True, default=False,
              help="Development only: plain HTTP, refused unless --http-host is loopback.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="HQ's own certificate (PEM, with its chain) for browsers "
                                 "and tools [default: one from ROOT/hq-ca.pem, made on "
                                 "first start].")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="The key of --tls-cert (PEM).")
@click.option("--database", default=None, metavar="URL",
              help="postgresql://... (or postgresql:///DB?host=/socket/dir): every store's "
                   "ledger, the fleet analytics and the control plane (stores, their "
                   "trust stores, HQ accounts) in PostgreSQL, and this process one of "
                   "many gateways sharing the database [default: SQLite and files in "
                   "--data, one process].")
@click.option("--gateway-id", default=None,
              help="This gateway's name in the lease table [default: gw-HOST-PID].")
@click.option("--lease-ttl", type=click.FloatRange(min=1.0), default=None,
              help="Seconds a store's lease outlives its gateway's last renewal "
                   "[default: 6].")
@click.option("--log-level", default="INFO", show_default=True)
def cloud_run(root: Path, http_host: str, http_port: int, insecure_plaintext: bool,
              tls_cert: Path | None, tls_key: Path | None, database: str | None,
              gateway_id: str | None, lease_ttl: float | None, log_level: str) -> None:
    """Serve every store under ROOT: sync, analytics, dashboard, until Ctrl-C.

    Store nodes reach their store's replica over mutual TLS pinned to their store key
    (they name it by SNI); browsers and tools get an ECDSA certificate: --tls-cert, or
    one signed by the HQ CA in ROOT/hq-ca.pem (trust that file in browsers)."""
    from mesh.cloud.server import CloudNode

    _sigterm_as_interrupt()
    _setup_logging(log_level)

    async def start() -> None:
        if database is not None:  # fleet views in SQL over the shared database
            from mesh.cloud.pganalytics import setup_pg_dashboard

            node.setup_hooks.append(setup_pg_dashboard)
        else:
            from mesh.cloud.dashboard import setup_dashboard

            node.setup_hooks.append(setup_dashboard)  # fleet analytics + the dashboard page
        try:
            await node.start()  # each store's node locks its data dir
        except Exception as exc:
            err = _start_error(exc, http_host, http_port)
            if err is None:
                raise
            raise err from None

    def ready() -> None:
        print(f"storemesh cloud for {len(node.nodes)} store(s) listening on {node.url}",
              flush=True)
        if node.hq is not None and node.hq.ca_path is not None:
            print(f"browsers and tools: trust the HQ CA {node.hq.ca_path} (certificate "
                  f"{node.hq.cert_path})", flush=True)

    from mesh.net.tls import is_loopback_host

    if insecure_plaintext and not is_loopback_host(http_host):
        raise UserError(f"--insecure-plaintext serves plain HTTP, so only on a loopback "
                        f"address (--http-host 127.0.0.1), not {http_host}")
    if (tls_cert is None) != (tls_key is None):
        raise UserError("give --tls-cert and --tls-key together (or neither: the cloud "
                        "makes a certificate from its HQ CA)")
    if database is not None:
        _check_database(database)
    elif gateway_id is not None or lease_ttl is not None:
        raise UserError("--gateway-id and --lease-ttl are for a cloud on --database")
    node = CloudNode(root, http_host=http_host, http_port=http_port,
                     insecure_plaintext=insecure_plaintext, tls_cert=tls_cert,
                     tls_key=tls_key, database=database, gateway_id=gateway_id,
                     lease_ttl_s=lease_ttl)
    try:
        from mesh.node import runtime

        runtime.run(_serve("cloud", start, node.close, ready))
    except KeyboardInterrupt:
        _interrupted_before_start("cloud")


@main.group()
def hq() -> None:
    """HQ accounts of the cloud: who may log in to the dashboard and the fleet API."""


_HQ_ROOT = click.Path(file_okay=False, path_type=Path)
_HQ_DATABASE = click.option(
    "--database", default=None, metavar="URL",
    help="postgresql://...: the accounts of the cloud on this database (its gateways) "
         "instead of ROOT's.")


def _hq_where(root: Path, database: str | None) -> Any:
    """ROOT, or the database's control plane (``mesh.cloud.control``)."""
    if database is None:
        return root
    _check_database(database)
    from mesh.cloud.pgcontrol import PgControl

    return _auth_call(lambda: PgControl(database))


def _read_password(password_file: Path | None, prompt: str = "password") -> str:
    if password_file is not None:
        return password_file.read_text().rstrip("\n")
    return str(click.prompt(prompt, hide_input=True, confirmation_prompt=True))


@hq.command("add")
@click.argument("root", type=_HQ_ROOT)
@click.argument("name")
@click.option("--role", type=click.Choice(["viewer", "admin"]), default="viewer",
              show_default=True, help="viewer: the dashboard and fleet API (read only); "
                                      "admin: the same (room for HQ writes to come).")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Read the password from this file (else a hidden prompt).")
@_HQ_DATABASE
def hq_add(root: Path, name: str, role: str, password_file: Path | None,
           database: str | None) -> None:
    """Create HQ account NAME on the cloud whose data root is ROOT."""
    from mesh.cloud.hq import add_user

    password = _read_password(password_file)
    where = _hq_where(root, database)
    _auth_call(lambda: add_user(where, name, password, role=role))
    console.print(f"HQ account [bold]{name}[/] ({role}) added; a running cloud lets it log "
                  "in within a second")


@hq.command("list")
@click.argument("root", type=_HQ_ROOT)
@_HQ_DATABASE
def hq_list(root: Path, database: str | None) -> None:
    """List the HQ accounts (never their passwords or verifiers)."""
    from mesh.cloud.hq import list_users

    where = _hq_where(root, database)
    rows = _auth_call(lambda: list_users(where))
    t = Table(title=f"HQ accounts of {root}")
    for col in ("account", "role", "state"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["role"], "disabled" if r["disabled"] else "active")
    console.print(t)


@hq.command("disable")
@click.argument("root", type=_HQ_ROOT)
@click.argument("name")
@_HQ_DATABASE
def hq_disable(root: Path, name: str, database: str | None) -> None:
    """Disable NAME: its sessions end and it cannot log in (``enable`` undoes it)."""
    from mesh.cloud.hq import update_user

    where = _hq_where(root, database)
    _auth_call(lambda: update_user(where, name, disabled=True))
    console.print(f"HQ account {name} disabled; its sessions end within a second")


@hq.command("enable")
@click.argument("root", type=_HQ_ROOT)
@click.argument("name")
@_HQ_DATABASE
def hq_enable(root: Path, name: str, database: str | None) -> None:
    """Enable NAME again."""
    from mesh.cloud.hq import update_user

    where = _hq_where(root, database)
    _auth_call(lambda: update_user(where, name, disabled=False))
    console.print(f"HQ account {name} enabled")


@hq.command("set-password")
@click.argument("root", type=_HQ_ROOT)
@click.argument("name")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Read the password from this file (else a hidden prompt).")
@_HQ_DATABASE
def hq_set_password(root: Path, name: str, password_file: Path | None,
                    database: str | None) -> None:
    """Give NAME a new password (ends its sessions and any lockout)."""
    from mesh.cloud.hq import update_user

    password = _read_password(password_file, "new password")
    where = _hq_where(root, database)
    _auth_call(lambda: update_user(where, name, password=password))
    console.print(f"HQ account {name} has a new password; its old sessions end")


@main.group()
def token() -> None:
    """One-time join tokens for new registers."""


@token.command("create")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--role", type=click.Choice(["register", "edge", "cloud"]), default="register",
              show_default=True)
@click.option("--ttl", "ttl_s", default=3600, show_default=True,
              help="Seconds until it expires (at most 7 days).")
@click.option("--url", default=None, help="Edge URL to embed (else the joiner uses mDNS).")
def token_create(data_dir: Path, role: str, ttl_s: int, url: str | None) -> None:
    """Issue a one-time join token from the node in DATA_DIR (it must hold the store key)."""
    from mesh.errors import CommandError
    from mesh.net.enrol import create_token

    try:
        text = create_token(load_identity(data_dir), role=role, ttl_ms=ttl_s * 1000,
                            now_ms=_now_ms(), url=url)
    except (CommandError, FileNotFoundError, KeyPermissionError, Malformed, ValueError) as exc:
        raise UserError(str(exc)) from None
    click.echo(text)


@token.command("list")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def token_list(data_dir: Path) -> None:
    """List the join tokens issued from DATA_DIR (never their secrets)."""
    from mesh.net.enrol import list_tokens

    t = Table(title=f"join tokens of {data_dir}")
    for col in ("id", "role", "state", "expires (UTC)"):
        t.add_column(col)
    now = _now_ms()
    try:
        rows = list_tokens(data_dir)
    except (OSError, ValueError) as exc:
        raise UserError(str(exc)) from None
    for row in rows:
        t.add_row(row.token_id[:16], row.role, row.state(now),
                  time.strftime("%Y-%m-%d %H:%M", time.gmtime(row.expires_ms / 1000)))
    console.print(t)


@token.command("revoke")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("which")
def token_revoke(data_dir: Path, which: str) -> None:
    """Withdraw an unused token (the token itself or its id from 'token list')."""
    from mesh.errors import CommandError
    from mesh.net.enrol import revoke_token

    try:
        revoke_token(data_dir, which)
    except CommandError as exc:
        raise UserError(exc.message) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot revoke in {data_dir}: {exc}") from None
    console.print("token revoked")


# --- API devices and staff -------------------------------------------------------------

_DATA_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def _auth_call(fn: Callable[[], Any]) -> Any:
    from mesh.errors import CommandError

    try:
        return fn()
    except CommandError as exc:
        raise UserError(exc.message) from None
    except (FileNotFoundError, KeyPermissionError, Malformed, OSError, ValueError) as exc:
        raise UserError(str(exc)) from None


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000))


@main.group()
def device() -> None:
    """API credentials for tills, the online channel and integrations."""


@device.command("issue")
@click.argument("data_dir", type=_DATA_DIR)
@click.argument("device_id")
@click.option("--role", type=click.Choice(["pos", "online", "hq", "service", "read"]),
              default="pos", show_default=True,
              help="pos: a till (writes need a staff login); online/hq: one channel's "
                   "reservations; service: a back-office integration; read: reads only.")
@click.option("--allow", "allow", default=None,
              help="Comma-separated commands, narrower than the role's (e.g. 'sale,read').")
@click.option("--node", "nodes", multiple=True,
              help="Node id it may use (repeat; default: every node of the store).")
@click.option("--channel", default=None, help="Channel of an online/hq device (web, hq).")
@click.option("--days", default=365, show_default=True, help="Days until it expires.")
def device_issue(data_dir: Path, device_id: str, role: str, allow: str | None,
                 nodes: tuple[str, ...], channel: str | None, days: int) -> None:
    """Issue a credential for DEVICE_ID from the edge in DATA_DIR; prints it once."""
    from mesh.store.authdir import issue_device_credential

    commands = None if allow is None else frozenset(
        c.strip() for c in allow.split(",") if c.strip())
    text = _auth_call(lambda: issue_device_credential(
        data_dir, device_id=device_id, role=role, now_ms=_now_ms(),
        ttl_ms=days * 86_400_000, commands=commands,
        nodes=frozenset(nodes) if nodes else None, channel=channel))
    click.echo(text)


@device.command("list")
@click.argument("data_dir", type=_DATA_DIR)
def device_list(data_dir: Path) -> None:
    """List the credentials issued from DATA_DIR (never their text)."""
    from mesh.store.authdir import list_devices

    rows = _auth_call(lambda: list_devices(data_dir))
    t = Table(title=f"API devices of {data_dir}")
    for col in ("device", "role", "commands", "nodes", "state", "expires (UTC)"):
        t.add_column(col)
    now = _now_ms()
    for r in rows:
        state = "revoked" if r["revoked"] else ("expired" if now > r["not_after"] else "valid")
        t.add_row(r["device_id"], r["role"], ",".join(r["commands"]),
                  "all" if r["nodes"] is None else ",".join(r["nodes"]), state,
                  _when(r["not_after"]))
    console.print(t)


@device.command("revoke")
@click.argument("data_dir", type=_DATA_DIR)
@click.argument("device_id")
@click.option("--reason", default="revoked by the store owner", show_default=True,
              help="Why (kept on this edge, in revocations.json).")
@click.option("--url", default="https://127.0.0.1:8700", show_default=True,
              help="The running node of DATA_DIR, which passes the revocation on.")
def device_revoke(data_dir: Path, device_id: str, reason: str, url: str) -> None:
    """Revoke DEVICE_ID on every node: the store's next revocation list names it, and
    sync carries that list to every node and the cloud."""
    import asyncio

    from mesh.store.authdir import revoke_device
    from mesh.store.revoke import deliver

    crl, new = _auth_call(lambda: revoke_device(data_dir, device_id, now_ms=_now_ms(),
                                                reason=reason))
    what = "revoked" if new else "was already revoked"
    try:
        ident = load_identity(data_dir)
        asyncio.run(deliver(url, crl, ssl_context=_own_ca_ssl(ident, url)))
    except (ConnectionError, ValueError) as exc:
        console.print(f"device [bold]{device_id}[/] {what} (revocation list v{crl.version}, "
                      f"saved in {data_dir}); not delivered to {url} ({exc}): a running "
                      f"node of {data_dir} picks it up within a second by itself")
        return
    console.print(f"device [bold]{device_id}[/] {what} (revocation list v{crl.version}); "
                  f"the node at {url} refuses it now and passes the list to every node")


def _read_pin(pin_file: Path | None, prompt: str = "PIN") -> str:
    if pin_file is not None:
        return pin_file.read_text().strip()
    return str(click.prompt(prompt, hide_input=True, confirmation_prompt=True))


@main.group()
def staff() -> None:
    """The staff roster: who may log in at a till, with which role."""


@staff.command("add")
@click.argument("data_dir", type=_DATA_DIR)
@click.argument("staff_id")
@click.option("--name", required=True, help="Display name.")
@click.option("--role", type=click.Choice(["cashier", "supervisor", "manager"]),
              default="cashier", show_default=True)
@click.option("--pin-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Read the PIN from this file (else a hidden prompt).")
@click.option("--valid-days", type=int, default=None,
              help="Days a till may go without hearing from the edge before the roster "
                   "expires there (default 7).")
def staff_add(data_dir: Path, staff_id: str, name: str, role: str, pin_file: Path | None,
              valid_days: int | None) -> None:
    """Add STAFF_ID to the roster of the store whose edge is DATA_DIR."""
    from mesh.store.authdir import add_staff

    pin = _read_pin(pin_file)
    roster = _auth_call(lambda: add_staff(
        data_dir, staff_id=staff_id, name=name, role=role, pin=pin, now_ms=_now_ms(),
        validity_ms=None if valid_days is None else valid_days * 86_400_000))
    console.print(f"staff {staff_id} added (roster v{roster.version})")


@staff.command("list")
@click.argument("data_dir", type=_DATA_DIR)
def staff_list(data_dir: Path) -> None:
    """List the roster (never PINs or their verifiers)."""
    from mesh.store.authdir import list_staff

    roster, rows = _auth_call(lambda: list_staff(data_dir))
    title = "no roster yet" if roster is None else (
        f"roster v{roster.version}, valid until {_when(roster.not_after)} UTC")
    t = Table(title=title)
    for col in ("staff", "name", "role", "state"):
        t.add_column(col)
    for e in rows:
        t.add_row(e.staff_id, e.name, e.role, "disabled" if e.disabled else "active")
    console.print(t)


@staff.command("disable")
@click.argument("data_dir", type=_DATA_DIR)
@click.argument("staff_id")
def staff_disable(data_dir: Path, staff_id: str) -> None:
    """Disable STAFF_ID on every node (their sessions stop working too)."""
    from mesh.store.authdir import update_staff

    roster = _auth_call(lambda: update_staff(data_dir, staff_id, now_ms=_now_ms(),
                                             disabled=True))
    console.print(f"staff {staff_id} disabled (roster v{roster.version})")


@staff.command("set-role")
@click.argument("data_dir", type=_DATA_DIR)
@click.argument("staff_id")
@click.argument("role", type=click.Choice(["cashier", "supervisor", "manager"]))
def staff_set_role(data_dir: Path, staff_id: str, role: str) -> None:
    """Give STAFF_ID another role."""
    from mesh.store.authdir import update_staff

    roster = _auth_call(lambda: update_staff(data_dir, staff_id, now_ms=_now_ms(), role=role))
    console.print(f"staff {staff_id} is now a {role} (roster v{roster.version})")


@staff.command("set-pin")
@click.argument("data_dir", type=_DATA_DIR)
@click.argument("staff_id")
@click.option("--pin-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Read the PIN from this file (else a hidden prompt).")
def staff_set_pin(data_dir: Path, staff_id: str, pin_file: Path | None) -> None:
    """Give STAFF_ID a new PIN (also ends a lockout)."""
    from mesh.store.authdir import update_staff

    pin = _read_pin(pin_file, "new PIN")
    roster = _auth_call(lambda: update_staff(data_dir, staff_id, now_ms=_now_ms(), pin=pin))
    console.print(f"staff {staff_id} has a new PIN (roster v{roster.version})")


# --- enrolled nodes ------------------------------------------------------------------------


@main.group()
def nodes() -> None:
    """The store's enrolled nodes: list them, revoke one."""


@nodes.command("list")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per node.")
def nodes_list(data_dir: Path, as_json: bool) -> None:
    """Every node DATA_DIR holds a certificate for: role, status, expiry, key."""
    from mesh.store.revoke import list_nodes

    try:
        ident = load_identity(data_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    rows = list_nodes(ident, _now_ms())
    if as_json:
        import orjson

        for r in rows:
            click.echo(orjson.dumps({
                "node_id": r.node_id, "role": r.role, "status": r.status,
                "fingerprint": r.fingerprint, "not_after_ms": r.not_after,
                "reason": r.reason, "revoked_ms": r.revoked_ms}).decode())
        return
    crl = ident.trust.crl_version
    t = Table(title=f"nodes of store {ident.store_id} known to {data_dir} (revocation list: "
                    f"{'none' if crl < 0 else f'v{crl}'})")
    width = max([4, *(len(r.node_id) for r in rows)])
    t.add_column("node", no_wrap=True, min_width=width)  # full ids, never cut
    for col in ("role", "status", "valid until (UTC)"):
        t.add_column(col, no_wrap=True)
    t.add_column("key", no_wrap=True, min_width=16)
    t.add_column("revoked (UTC): reason")
    colour = {"active": "green", "this node": "bold", "expired": "yellow", "revoked": "red"}
    for r in rows:
        why = ""
        if r.status == "revoked":
            when = "" if r.revoked_ms is None else _utc(r.revoked_ms, "%Y-%m-%d %H:%M")
            why = f"{when}: {r.reason}" if r.reason else when
        t.add_row(r.node_id, r.role, f"[{colour[r.status]}]{r.status}[/]",
                  _utc(r.not_after, "%Y-%m-%d"), r.fingerprint, why)
    console.print(t)


@nodes.command("revoke")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("node_id")
@click.option("--reason", default="revoked by the store owner", show_default=True,
              help="Why (kept on this edge, shown by 'nodes list').")
@click.option("--url", default="https://127.0.0.1:8700", show_default=True,
              help="The running node of DATA_DIR, which passes the revocation on.")
@click.option("--force", is_flag=True,
              help="Revoke a node id DATA_DIR holds no certificate for.")
def nodes_revoke(data_dir: Path, node_id: str, reason: str, url: str, force: bool) -> None:
    """Revoke NODE_ID: every node and the cloud end its sessions and refuse it.

    Run it on the edge node that holds the store key (DATA_DIR has store.key)."""
    import asyncio

    from mesh.errors import CommandError
    from mesh.store.revoke import deliver, revoke_node

    try:
        ident = load_identity(data_dir)
        crl, new = revoke_node(ident, node_id, reason=reason, now_ms=_now_ms(), force=force)
    except (CommandError, FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    what = "revoked" if new else "was already revoked"
    if node_id in crl.upto:  # docs/protocol.md, "Revocation bounds"
        what += f"; the store keeps its envelopes up to seq {crl.upto[node_id]}"
    try:
        held = asyncio.run(deliver(url, crl, ssl_context=_own_ca_ssl(ident, url)))
    except (ConnectionError, ValueError) as exc:
        console.print(f"node [bold]{node_id}[/] {what} (revocation list v{crl.version}, saved "
                      f"in {data_dir}); [yellow]not delivered[/]: {exc}\nThe node of "
                      f"{data_dir} adopts it when it starts; if it is running elsewhere, run "
                      "this again with --url https://HOST:PORT.")
        raise SystemExit(1) from None
    console.print(f"node [bold]{node_id}[/] {what} (revocation list v{crl.version}); the node "
                  f"at {url} holds v{held}, has ended its sessions with {node_id} and passes "
                  "the list to every peer and the cloud")


@main.command("status")
@click.argument("url")
@click.option("--ca", "ca", type=click.Path(exists=True, path_type=Path), default=None,
              help="The CA to pin for an https:// URL: a PEM file ('storemesh store ca'), "
                   "a node's data directory, or (for the cloud) its ROOT (hq-ca.pem).")
def status_cmd(url: str, ca: Path | None) -> None:
    """Show a running node's health, peers with their sync lag, and stock."""
    import urllib.error
    import urllib.request

    import orjson

    if not url.startswith(("http://", "https://")):
        raise UserError(f"{url!r} is not a URL: give https://HOST:PORT (a node) or "
                        "https://HOST:PORT/stores/STORE (a store at the cloud)")
    ctx = _api_ssl(url, ca)

    def get(path: str) -> Any:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=5,  # noqa: S310
                                    context=ctx) as resp:
            return orjson.loads(resp.read())

    try:
        health, peers, stock = get("/v1/health"), get("/v1/peers"), get("/v1/stock")
        exceptions = get("/v1/exceptions")
    except urllib.error.HTTPError as exc:  # it answered: say what is there instead
        exc.close()
        raise UserError(_not_a_node(url, exc.code, get)) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    console.print(f"[bold]{health['node_id']}[/] ({health['role']}) store "
                  f"[bold]{health['store_id']}[/]: {health['status']}, "
                  f"{health['envelopes']} envelopes, up {health['uptime_s']} s")
    t = Table(title="peers")
    for col in ("node", "role", "up", "lag (envelopes)", "last seen (ms ago)"):
        t.add_column(col)
    now = _now_ms()
    for p in peers.get("peers", []):
        seen = "" if p.get("last_seen_ms") is None else str(now - p["last_seen_ms"])
        t.add_row(p["node_id"], str(p.get("role") or ""), "yes" if p["up"] else "[red]no[/]",
                  str(p["lag"]), seen)
    console.print(t)
    t = Table(title="stock")
    for col in ("sku", "on hand", "reserved", "available"):
        t.add_column(col, justify="left" if col == "sku" else "right")
    items = stock.get("stock", []) if isinstance(stock, dict) else stock
    for item in items:
        avail = item["available"]
        t.add_row(item["sku"], str(item["on_hand"]), str(item["reserved"]),
                  f"[red]{avail}[/]" if avail < 0 else str(avail))
    console.print(t)
    exc_list = exceptions.get("exceptions", []) if isinstance(exceptions, dict) else exceptions
    if exc_list:
        t = Table(title="oversell exceptions (same on every node)")
        for col in ("sku", "origin", "seq", "kind", "short"):
            t.add_column(col)
        for e in exc_list:
            t.add_row(e["sku"], e["origin"], str(e["seq"]), e["kind"], str(e["short"]))
        console.print(t)


def _api_ssl(url: str, ca: Path | None) -> Any:
    """The TLS context a CLI client uses for ``url``: pinned to the store CA only."""
    from mesh.net.hqtls import CA_FILE as HQ_CA_FILE
    from mesh.net.tls import CA_FILE, api_client_context

    if not url.startswith("https://"):
        if ca is not None:
            raise UserError(f"--ca is for https:// URLs; {url} is plain HTTP")
        return None
    if ca is None:
        raise UserError(f"{url} is TLS: pin the store CA with --ca FILE (from 'storemesh "
                        "store ca DIR') or --ca DATA_DIR")
    path = ca
    if ca.is_dir():  # a node's data directory, or a cloud's root (its HQ CA)
        path = ca / CA_FILE if (ca / CA_FILE).exists() else ca / HQ_CA_FILE
    try:
        return api_client_context(path.read_bytes())
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise UserError(f"--ca {ca}: not a readable store CA certificate ({exc})") from None


def _own_ca_ssl(ident: Any, url: str) -> Any:
    """The TLS context for talking to ``ident``'s own running node at ``url``: pinned to
    its store CA (None for an http:// URL: a node run with --insecure-plaintext)."""
    from mesh.net.tls import api_client_context
    from mesh.store.datadir import ensure_tls

    if not url.startswith("https://"):
        return None
    try:
        return api_client_context(ensure_tls(ident, now_ms=_now_ms()).ca_pem)
    except (OSError, ValueError) as exc:
        raise UserError(f"no store CA to pin for {url}: {exc}") from None


def _not_a_node(url: str, code: int, get: Callable[[str], Any]) -> str:
    """What to tell a user whose ``status URL`` answered ``code`` for /v1/health: a
    cloud's root URL lists its stores (``/v1/stores``), so name their URLs."""
    import urllib.error

    try:
        listing = get("/v1/stores")
        stores = [s["store_id"] for s in listing["stores"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()
        return (f"{url} answered {code} for /v1/health: it is not a storemesh node (give "
                "https://HOST:PORT of a node, or https://HOST:PORT/stores/STORE at the cloud)")
    base = url.rstrip("/")
    if not stores:
        return f"{url} is a storemesh cloud that serves no store yet ('storemesh cloud join')"
    return (f"{url} is a storemesh cloud serving {len(stores)} store(s), not one node: run "
            f"'storemesh status {base}/stores/{stores[0]}'"
            + (f" (stores: {', '.join(stores)})" if len(stores) > 1 else ""))


@main.command("demo")
@click.option("--dir", "base", default="demo-data", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the nodes keep their data (wiped first).")
@click.option("--duration", type=float, default=None,
              help="Seconds to keep the mesh up after the workload (default: until Ctrl-C).")
def demo_cmd(base: Path, duration: float | None) -> None:
    """Start an edge node and three registers on 127.0.0.1, sell, race, converge."""
    import asyncio

    from mesh.app.demo import prepare, run_demo

    for node_json in sorted(base.glob("**/node.json")) if base.is_dir() else []:
        try:
            with lock_data_dir(node_json.parent):
                pass
        except DataDirInUse as exc:
            raise UserError(f"{exc}; the demo wipes {base} first") from None
    creds = prepare(base)
    raise SystemExit(asyncio.run(run_demo(base, creds, duration)))


# --- ledger -----------------------------------------------------------------------------


@main.group()
def ledger() -> None:
    """Inspect and check a node's durable ledger."""


@dataclass
class _OriginReport:
    envelopes: int = 0
    last_seq: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)
    bad_signatures: int = 0
    broken_links: int = 0
    malformed: int = 0
    #: seqs 1..pruned are not in this ledger: a checkpoint names the head they end in
    pruned: int = 0


@dataclass
class VerifyReport:
    origins: dict[str, _OriginReport] = field(default_factory=dict)
    unknown_origins: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    rows: int = 0
    #: checkpoints (``ck`` ops of the store's checkpointer) whose chain heads were checked
    checkpoints: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


#: Checkpoints whose chain heads ``verify_ledger`` checks against the rows (the newest):
#: ~100 B each per origin in memory; a year of one-a-minute checkpoints is ~0.5 M.
VERIFY_MAX_CHECKPOINTS = 20_000


def _checkpoint_heads(led: Ledger, checkpointer: str | None
                      ) -> tuple[list[tuple[int, dict[str, int], dict[str, str]]],
                                 dict[str, dict[int, list[tuple[int, str]]]]]:
    """The newest ``ck`` ops of the checkpointer in the ledger, as (seq, frontier,
    heads), and per origin, per frontier seq, the (checkpoint seq, head) they name."""
    cks: list[tuple[int, dict[str, int], dict[str, str]]] = []
    if checkpointer is None:
        return cks, {}
    for _, raw in led.scan_origin(checkpointer):
        try:
            env = decode(raw)
        except EnvelopeError:
            continue  # the main pass reports it
        for op in env.ops:
            if op["t"] == "ck":
                # (a ck of a development build before chain heads names none)
                cks.append((env.seq, dict(op["f"]), dict(op.get("h", {}))))
    cks = cks[-VERIFY_MAX_CHECKPOINTS:]
    need: dict[str, dict[int, list[tuple[int, str]]]] = {}
    for ck_seq, f, heads in cks:
        for o, q in f.items():
            if q and o in heads:
                need.setdefault(o, {}).setdefault(q, []).append((ck_seq, heads[o]))
    return cks, need


def verify_ledger(data_dir: Path, max_problems: int = 1000) -> VerifyReport:
    """Check every signature, every seq gap and every hash link of a node's ledger, and
    the checkpoint chain: every chain head a checkpoint names (``ck`` op ``h``) that the
    ledger holds is that row's hash, and a pruned ledger (a register's, whose chains
    start past seq 1) is whole only if its tail of each chain links to the head a
    checkpoint names at the seq just before (docs/architecture.md, "Bounded history")."""
    ident = load_identity(data_dir)
    report = VerifyReport()

    def problem(text: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(text)

    with Ledger(ident.ledger_path) as led:
        cks, need = _checkpoint_heads(led, ident.trust.checkpointer)
        report.checkpoints = len(cks)
        prev_hash: bytes | None = None  # hash of the row before, same origin, no gap
        for origin, seq, raw in led.scan_by_origin():
            report.rows += 1
            fresh = origin not in report.origins
            rep = report.origins.setdefault(origin, _OriginReport())
            if fresh and seq > 1 and _pruned_prefix(origin, seq, raw, cks):
                rep.pruned = rep.last_seq = seq - 1  # proven by a checkpoint's head
                prev_hash = None  # (its link to that head was just checked)
            if seq != rep.last_seq + 1:
                rep.gaps.append((rep.last_seq + 1, seq - 1))
                problem(f"{origin}: seq {rep.last_seq + 1}..{seq - 1} missing")
            linked = prev_hash if seq == rep.last_seq + 1 and seq > 1 else None
            rep.envelopes += 1
            rep.last_seq = seq
            prev_hash = None
            try:
                env = decode(raw)
            except EnvelopeError as exc:
                rep.malformed += 1
                problem(f"{origin} seq {seq}: {exc}")
                continue
            if env.origin != origin or env.seq != seq:
                problem(f"{origin} seq {seq}: row holds {env.origin} seq {env.seq}")
            if linked is not None and env.prev != linked:
                rep.broken_links += 1
                problem(f"{origin} seq {seq}: prev does not match the hash of seq {seq - 1}")
            prev_hash = env.hash
            for ck_seq, head in need.get(origin, {}).get(seq, ()):
                if head != env.hash.hex():
                    problem(f"{origin} seq {seq}: checkpoint {ident.trust.checkpointer} seq "
                            f"{ck_seq} names another hash for it")
            cert = ident.trust.certificate(origin)
            if cert is None:
                report.unknown_origins.add(origin)
                problem(f"{origin} seq {seq}: origin has no certificate here")
                continue
            if not verify_signature(cert.public_key, env.signature, DOMAIN + body_bytes(raw)):
                rep.bad_signatures += 1
                problem(f"{origin} seq {seq}: bad signature")
        for origin, seq, _, _ in led.evidence():
            problem(f"{origin} seq {seq}: equivocation evidence on file")
    return report


def _pruned_prefix(origin: str, first: int, raw: bytes,
                   cks: list[tuple[int, dict[str, int], dict[str, str]]]) -> bool:
    """``origin``'s chain starts at ``first`` here: True if a checkpoint names, at seq
    ``first - 1``, the hash this row links to (its ``prev``): the prefix was pruned
    behind that checkpoint, not lost."""
    try:
        prev = decode(raw).prev
    except EnvelopeError:
        return False
    return prev is not None and any(
        f.get(origin) == first - 1 and heads.get(origin) == prev.hex() for _, f, heads in cks)


@ledger.command("verify")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def ledger_verify(data_dir: Path) -> None:
    """Verify DATA_DIR's ledger end to end: every signature, hash link and seq gap."""
    t0 = time.perf_counter()
    try:
        report = verify_ledger(data_dir)
    except (FileNotFoundError, KeyPermissionError, LedgerError, Malformed, ValueError) as exc:
        raise UserError(str(exc)) from None
    table = Table(title=f"ledger {data_dir}")
    for col in ("origin", "envelopes", "last seq", "pruned", "gaps", "bad sigs",
                "broken links", "malformed"):
        table.add_column(col, justify="left" if col == "origin" else "right")
    for origin in sorted(report.origins):
        r = report.origins[origin]
        table.add_row(origin, str(r.envelopes), str(r.last_seq),
                      f"1..{r.pruned}" if r.pruned else "-", str(len(r.gaps)),
                      str(r.bad_signatures), str(r.broken_links), str(r.malformed))
    console.print(table)
    for text in report.problems:
        console.print(f"[red]problem[/] {text}")
    took = time.perf_counter() - t0
    if report.ok:
        console.print(f"[green]OK[/] {report.rows} envelopes verified, and the chain heads "
                      f"of {report.checkpoints} checkpoints, in {took:.1f} s")
    else:
        console.print(f"[red]FAILED[/] {len(report.problems)} problem(s) in {report.rows} "
                      f"envelopes")
        raise SystemExit(1)


#: Ledger rows one ``ledger show`` examines, newest first, looking for matches of its
#: filters: ~2 s of decoding. Past it the output says how far back it looked.
SHOW_MAX_SCAN = 200_000
_SHOW_WINDOW = 1000  # rows read per query while walking the ledger backwards
_UNITS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _parse_when(text: str, now_ms: int, what: str) -> int:
    """ms since the epoch from '2026-12-02', '2026-12-02T06:30' (UTC unless an offset is
    given), or an age: '90s', '15m', '2h', '3d' ago."""
    from datetime import UTC, datetime

    t = text.strip()
    if t[:-1].isdigit() and t[-1:] in _UNITS_MS:
        return now_ms - int(t[:-1]) * _UNITS_MS[t[-1]]
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise UserError(f"{what} {text!r}: give a UTC time like 2026-12-02T06:30 or an age "
                        "like 15m, 2h, 3d") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _entry(env: Any) -> dict[str, Any]:
    from mesh.core.auth import who

    m = env.meta
    at = env.hlc >> 16
    w = who(m)  # the device and staff the gate authenticated (mesh.http.gate)
    return {"origin": env.origin, "seq": env.seq, "time_ms": at, "time": _utc(at),
            "kind": m.get("kind"), "sku": m.get("sku"), "qty": m.get("qty"),
            "txn": w["txn_id"], "device": w["device_id"], "staff": w["staff_id"],
            "approved_by": w["approved_by"], "reason": m.get("reason")}


@ledger.command("show")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--limit", default=20, show_default=True, help="Newest N matching envelopes.")
@click.option("--sku", default=None, help="Only envelopes that touch this SKU.")
@click.option("--origin", default=None,
              help="Only this node's envelopes (its id, or the start of it).")
@click.option("--since", default=None, help="Not before: UTC time (2026-12-02T06:30) or age (2h).")
@click.option("--until", "until_", default=None, help="Not after: UTC time or age.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per envelope.")
def ledger_show(data_dir: Path, limit: int, sku: str | None, origin: str | None,
                since: str | None, until_: str | None, as_json: bool) -> None:
    """The audit trail: the newest envelopes with who, which device, when and why."""
    import orjson

    if limit < 1:
        raise UserError("--limit must be at least 1")
    now = _now_ms()
    lo = _parse_when(since, now, "--since") if since else None
    hi = _parse_when(until_, now, "--until") if until_ else None
    try:
        ident = load_identity(data_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    rows: list[dict[str, Any]] = []
    scanned = 0
    with Ledger(ident.ledger_path) as led:
        wanted: set[str] | None = None  # origins to show (None: all)
        if origin is not None:
            heads = led.heads()
            wanted = {origin} if origin in heads else {o for o in heads if o.startswith(origin)}
            if not wanted:
                raise UserError(f"no envelopes of a node {origin!r} here; nodes: "
                                f"{', '.join(sorted(heads)) or 'none'}")
        top = led.last_id
        while top > 0 and len(rows) < limit and scanned < SHOW_MAX_SCAN:
            start = max(0, top - _SHOW_WINDOW)
            window = [raw for rid, raw in led.scan(start, page=_SHOW_WINDOW) if rid <= top]
            scanned += len(window)
            for raw in reversed(window):
                entry = _entry(decode(raw))
                if wanted is not None and entry["origin"] not in wanted:
                    continue
                if sku is not None and entry["sku"] != sku:
                    continue
                if (lo is not None and entry["time_ms"] < lo) or (
                        hi is not None and entry["time_ms"] > hi):
                    continue
                rows.append(entry)
                if len(rows) >= limit:
                    break
            top = start
    rows.reverse()  # oldest first, like a log
    if as_json:
        for entry in rows:
            click.echo(orjson.dumps(entry).decode())
        return
    table = Table(title=f"ledger {data_dir} (newest {len(rows)})")
    width = max([len("origin"), *(len(e["origin"]) for e in rows)])
    # full node ids, never cut: two registers may differ only in their last characters
    table.add_column("origin", no_wrap=True, min_width=width)
    for col in ("seq", "time (UTC)", "kind", "sku", "qty", "txn", "device", "staff",
                "reason"):
        table.add_column(col)
    for e in rows:
        staff = str(e["staff"] or "")
        if e["approved_by"]:
            staff += f" (approved by {e['approved_by']})"
        table.add_row(e["origin"], str(e["seq"]), e["time"], str(e["kind"]),
                      str(e["sku"] or ""), "" if e["qty"] is None else str(e["qty"]),
                      str(e["txn"]), str(e["device"] or ""), staff, str(e["reason"] or ""))
    console.print(table)
    if scanned >= SHOW_MAX_SCAN and len(rows) < limit:
        console.print(f"(looked at the newest {scanned} envelopes only)")


def explain_sku(ledger_path: Path, store_id: str, node_id: str, role: str,
                sku: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Why ``sku``'s stock is what it is: replay the ledger (the archive, on an edge or
    the cloud) and list every envelope that changed its on-hand or reserved units,
    with who, which device, when and why, the change and the result; checkpoints are
    listed where they fall. Returns the rows and the final figures."""
    from mesh.core.replica import Replica

    r = Replica(store_id, node_id, role)
    rows: list[dict[str, Any]] = []
    with Ledger(ledger_path) as led:
        for _, raw in led.scan(0):
            env = decode(raw)
            before = (r.on_hand(sku), r.reserved(sku))
            r.apply(env, None, check_skew=False)
            after = (r.on_hand(sku), r.reserved(sku))
            ck = next((op for op in env.ops if op["t"] == "ck"), None)
            if after == before and ck is None and sku not in r.touched_skus(env):
                continue
            entry = _entry(env)
            entry.update(on_hand_change=after[0] - before[0],
                         reserved_change=after[1] - before[1], on_hand=after[0],
                         reserved=after[1], available=after[0] - after[1])
            if ck is not None:
                entry.update(kind="checkpoint", reason=f"frontier of {len(ck['f'])} nodes")
            rows.append(entry)
    exceptions = r.exceptions(sku)
    for e in exceptions:  # mark the oversell losers
        for row in rows:
            if (row["origin"], row["seq"]) == (e.origin, e.seq):
                row["oversold"] = e.short
    return rows, {"on_hand": r.on_hand(sku), "reserved": r.reserved(sku),
                  "available": r.available(sku), "oversold": sum(e.short for e in exceptions)}


@ledger.command("explain")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("sku")
@click.option("--limit", default=50, show_default=True, help="Show the newest N changes.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per change.")
def ledger_explain(data_dir: Path, sku: str, limit: int, as_json: bool) -> None:
    """Why SKU's stock is what it is: every change behind it, with who, which device,
    when and why, from this node's ledger (the full archive on an edge)."""
    import orjson

    try:
        ident = load_identity(data_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from None
    rows, final = explain_sku(ident.ledger_path, ident.store_id, ident.node_id, ident.role,
                              sku)
    if not any(r["kind"] != "checkpoint" for r in rows):
        raise UserError(f"no change of SKU {sku!r} in this ledger")
    shown = rows[-limit:]
    if as_json:
        for entry in shown:
            click.echo(orjson.dumps(entry).decode())
        click.echo(orjson.dumps({"sku": sku, **final}).decode())
        return
    table = Table(title=f"{sku}: {len(rows)} changes"
                  + (f" (newest {len(shown)})" if len(shown) < len(rows) else ""))
    for col in ("time (UTC)", "origin", "seq", "kind", "on hand", "reserved", "after",
                "txn", "device", "staff", "reason"):
        table.add_column(col)
    for e in shown:
        after = f"{e['on_hand']} on hand, {e['available']} available"
        if e.get("oversold"):
            after += f" (oversold {e['oversold']})"
        table.add_row(e["time"], e["origin"], str(e["seq"]), str(e["kind"]),
                      f"{e['on_hand_change']:+d}", f"{e['reserved_change']:+d}", after,
                      str(e["txn"]), str(e["device"] or ""), str(e["staff"] or ""),
                      str(e["reason"] or ""))
    console.print(table)
    console.print(f"{sku}: {final['on_hand']} on hand, {final['reserved']} reserved, "
                  f"{final['available']} available, {final['oversold']} oversold")


def _utc(ms: int, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return time.strftime(fmt, time.gmtime(ms / 1000))


def _add_sim() -> None:
    from mesh.sim.cli import sim

    main.add_command(sim)


_add_sim()


if __name__ == "__main__":  # pragma: no cover
    main()
