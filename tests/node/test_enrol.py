"""Join tokens: format, the token table, redeeming, the /v1/join route and ``join()``.

HTTP tests run a real ``mesh.node.node.Node`` on 127.0.0.1; the zeroconf tests bind every
zeroconf instance to 127.0.0.1 only (IPv4), with a random store id per test so other
test runs on the machine advertising ``_storemesh._tcp`` cannot interfere.
"""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from mesh.core.identity import NodeKey, TrustStore, issue_certificate
from mesh.errors import CommandError, Malformed
from mesh.net import enrol
from mesh.net.discovery import PROTOCOL_VERSION, SERVICE_TYPE
from mesh.net.enrol import (
    TOKEN_PREFIX,
    JoinRefused,
    JoinToken,
    UntrustedEdge,
    create_token,
    find_edge,
    join,
    list_tokens,
    parse_token,
    redeem,
    revoke_token,
    store_fingerprint,
    token_id,
)
from mesh.net.tls import api_client_context, issue_node_cert, load_tls_files
from mesh.node.node import Node
from mesh.store.datadir import (
    DEFAULT_VALIDITY_MS,
    NodeIdentity,
    enrol_node,
    init_store,
    load_identity,
)

LOOPBACK = "127.0.0.1"
NOW = 1_790_000_000_000
HOUR = 3600 * 1000


def new_store() -> str:
    return f"store-{uuid.uuid4().hex[:8]}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def edge(tmp_path: Path) -> NodeIdentity:
    return init_store(tmp_path / "edge", "store-1", now_ms=NOW)


# --- token format ---------------------------------------------------------------------


@pytest.mark.parametrize("url", [None, "http://192.168.1.20:8470"])
def test_token_round_trip(edge: NodeIdentity, url: str | None) -> None:
    text = create_token(edge, role="register", ttl_ms=HOUR, now_ms=NOW, url=url)
    assert text.startswith(TOKEN_PREFIX) and "=" not in text
    tok = parse_token(text)
    assert tok.store_id == "store-1" and tok.role == "register" and tok.url == url
    assert tok.expires_ms == NOW + HOUR and len(tok.secret) == 32
    assert edge.store_key is not None
    assert tok.store_fingerprint == store_fingerprint(edge.store_key.public_key)
    assert tok.store_fingerprint[:16] == edge.store_key.fingerprint
    assert tok.encode() == text
    # pasted with line breaks and spaces around it, as from a chat window or e-mail
    assert parse_token("  " + text[:30] + "\n" + text[30:] + "\n") == tok
    assert tok.secret.hex() not in repr(tok)


def test_tokens_are_unique(edge: NodeIdentity) -> None:
    texts = {create_token(edge, role="register", ttl_ms=HOUR, now_ms=NOW) for _ in range(5)}
    assert len(texts) == 5


def _b64(doc: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(doc)).rstrip(b"=").decode()


def _good_token() -> str:
    return JoinToken("s", b"k" * 32, "register", NOW, "ab" * 32, "cd" * 32).encode()


@pytest.mark.parametrize(("text", "says"), [
    ("", "empty"),
    ("   \n", "empty"),
    ("hello world", "not a storemesh join token"),
    ("eyJzdG9yZSI6InMifQ", "not a storemesh join token"),
    ("smj3.eyJzdG9yZSI6InMifQ", "upgrade storemesh"),
    # a token of the format before TLS: refused, saying why and what to do
    ("smj1.eyJzdG9yZSI6InMifQ", "older storemesh that joins over plain HTTP"),
    ("smj2.", "truncated"),
    (_good_token()[:-12], "truncated"),
    (_good_token()[:len(TOKEN_PREFIX) + 9], "truncated"),  # base64 length 9 ≡ 1 (mod 4)
    ("smj2.abc!def", "characters"),
    ("smj2." + "A" * 3000, "too long"),
    ("smj2." + _b64([1, 2]), "damaged"),
    ("smj2." + _b64({"store": "s"}), "damaged"),
    ("smj2." + _b64({"store": "s", "secret": "AAAA", "role": "register", "exp": 1,
                     "fp": "ab" * 32, "tls": "cd" * 32}), "not 32 bytes"),
    ("smj2." + _b64({"store": "s", "secret": "A" * 43, "role": "king", "exp": 1,
                     "fp": "ab" * 32, "tls": "cd" * 32}), "role"),
    ("smj2." + _b64({"store": "s", "secret": "A" * 43, "role": "register", "exp": -1,
                     "fp": "ab" * 32, "tls": "cd" * 32}), "expiry"),
    ("smj2." + _b64({"store": "s", "secret": "A" * 43, "role": "register", "exp": 1,
                     "fp": "AB" * 32, "tls": "cd" * 32}), "fingerprint"),
    ("smj2." + _b64({"store": "s", "secret": "A" * 43, "role": "register", "exp": 1,
                     "fp": "ab" * 32, "tls": "cd" * 32, "url": "ftp://x"}), "URL"),
    ("smj2." + _b64({"store": "s", "secret": "A" * 43, "role": "register", "exp": 1,
                     "fp": "ab" * 32, "tls": "xy"}), "TLS certificate pin"),
])
def test_parse_errors_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(Malformed) as exc:
        parse_token(text)
    assert says in exc.value.message


def test_parse_rejects_non_text() -> None:
    with pytest.raises(Malformed):
        parse_token(b"smj2.abc")  # type: ignore[arg-type]


# --- issuing ----------------------------------------------------------------------------


def test_only_the_store_key_holder_may_issue(tmp_path: Path, edge: NodeIdentity) -> None:
    assert edge.store_key is not None
    reg = enrol_node(tmp_path / "reg", edge.store_key, "store-1", "register", now_ms=NOW)
    assert reg.store_key is None
    with pytest.raises(CommandError) as exc:
        create_token(reg, role="register", ttl_ms=HOUR, now_ms=NOW)
    assert "store key" in exc.value.message
    assert not (tmp_path / "reg" / "tokens.json").exists()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"role": "king"}, "role"),
    ({"ttl_ms": 0}, "ttl"),
    ({"ttl_ms": enrol.MAX_TOKEN_TTL_MS + 1}, "ttl"),
    ({"url": "192.168.1.2:8470"}, "url"),
    ({"url": "http://x/" + "a" * 600}, "url"),
])
def test_create_token_checks_arguments(edge: NodeIdentity, kwargs: dict[str, Any],
                                       field: str) -> None:
    args: dict[str, Any] = {"role": "register", "ttl_ms": HOUR, "now_ms": NOW, **kwargs}
    with pytest.raises(CommandError) as exc:
        create_token(edge, **args)
    assert exc.value.field == field


def test_token_table_never_holds_the_secret(edge: NodeIdentity) -> None:
    tok = parse_token(create_token(edge, role="register", ttl_ms=HOUR, now_ms=NOW))
    path = edge.data_dir / "tokens.json"
    raw = path.read_bytes()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for form in (tok.secret.hex(), base64.urlsafe_b64encode(tok.secret).decode().rstrip("=")):
        assert form.encode() not in raw
    table = orjson.loads(raw)
    assert table == {token_id(tok.secret): {"role": "register", "created_ms": NOW,
                                            "expires_ms": NOW + HOUR, "used_by": None,
                                            "used_ms": None}}


def test_old_records_are_pruned_and_the_table_is_bounded(
        edge: NodeIdentity, monkeypatch: pytest.MonkeyPatch) -> None:
    create_token(edge, role="register", ttl_ms=HOUR, now_ms=NOW)
    later = NOW + HOUR + enrol.TOKEN_RETENTION_MS + 1
    create_token(edge, role="register", ttl_ms=HOUR, now_ms=later)
    assert [t.created_ms for t in list_tokens(edge.data_dir)] == [later]
    monkeypatch.setattr(enrol, "MAX_TOKENS", 2)
    create_token(edge, role="register", ttl_ms=HOUR, now_ms=later)
    with pytest.raises(CommandError, match="revoke"):
        create_token(edge, role="register", ttl_ms=HOUR, now_ms=later)


# --- redeeming ----------------------------------------------------------------------------


def _redeem(edge: NodeIdentity, text: str, key: NodeKey | None = None, *,
            now: int = NOW + 1, node_id: str | None = None) -> Any:
    key = key or NodeKey.generate()
    return redeem(edge, secret=parse_token(text).secret, public_key=key.public_key,
                  node_id=node_id, now_ms=now)


def test_redeem_once_then_used(edge: NodeIdentity) -> None:
    text = create_token(edge, role="register", ttl_ms=HOUR, now_ms=NOW)
    key = NodeKey.generate()
    cert = _redeem(edge, text, key, now=NOW + 5)
    assert edge.store_key is not None
    cert.verify(edge.store_key.public_key)
    assert (cert.node_id, cert.role, cert.store_id) == (
        f"register-{key.fingerprint[:8]}", "register", "store-1")
    assert cert.public_key == key.public_key
    assert cert.not_after == NOW + 5 + DEFAULT_VALIDITY_MS
    assert edge.trust.certificate(cert.node_id) == cert
    assert load_identity(edge.data_dir).trust.certificate(cert.node_id) == cert  # saved
    [info] = list_tokens(edge.data_dir)
    assert (info.used_by, info.used_ms, info.state(NOW)) == (cert.node_id, NOW + 5, "used")

    with pytest.raises(JoinRefused) as exc:
        _redeem(edge, text, now=NOW + 10)
    assert exc.value.reason == "used"
    assert "2026-09-21T" in exc.value.message  # when it was used ...
    assert cert.node_id not in exc.value.message  # ... never by whom


def test_expired_token_refused(edge: NodeIdentity) -> None:
    text = create_token(edge, role="register", ttl_ms=HOUR, now_ms=NOW)
    with pytest.raises(JoinRefused) as exc:
        _redeem(edge, text, now=NOW + HOUR + 1)
    assert exc.value.reason == "expired"
    _redeem(edge, text, now=NOW + HOUR)  # the expiry instant itself is still valid


def test_token_of_another_store_is_unknown(tmp_path: Path, edge: NodeIdentity) -> None:
    other = init_store(tmp_path / "other", "store-2", now_ms=NOW)
    text = create_token(other, role="register", ttl_ms=HOUR, now_ms=NOW)
    with pytest.raises(JoinRefused) as exc:
        _redeem(edge, text)
    assert exc.value.reason == "unknown"


def test_node_id_of_another_key_refused_without_spending_the_token(edge: NodeIdentity) -> None:
    text = create_token(edge, role="register", ttl_ms=HOUR, now_ms=NOW)
    with pytest.raises(JoinRefused) as exc:
        _redeem(edge, text, node_id=edge.node_id)
    assert exc.value.reason == "bad_request"
    edge.trust.revoke("till-9")
    with pytest.raises(JoinRefused) as exc:
        _redeem(edge, text, node_id="till-9")
    assert exc.value.reason == "bad_request"
    assert _redeem(edge, text, node_id="till-1").node_id == "till-1"  # still unused


def test_redeem_checks_its_arguments(edge: NodeIdentity) -> None:
    text = create_token(edge, role="register", ttl_ms=HOUR, now_ms=NOW)
    secret = parse_token(text).secret
    with pytest.raises(Malformed):
        redeem(edge, secret=secret, public_key=b"short", node_id=None, now_ms=NOW)
    with pytest.raises(Malformed):
        redeem(edge, secret=secret, public_key=bytes(32), node_id="has space", now_ms=NOW)
    assert list_tokens(edge.data_dir)[0].state(NOW) == "unused"


def test_revoked_token_is_unknown(edge: NodeIdentity) -> None:
    a = create_token(edge, role="register", ttl_ms=HOUR, now_ms=NOW)
    b = create_token(edge, role="register", ttl_ms=HOUR, now_ms=NOW + 1)
    assert revoke_token(edge.data_dir, a).state(NOW) == "unused"
    with pytest.raises(JoinRefused) as exc:
        _redeem(edge, a)
    assert exc.value.reason == "unknown"
    cert = _redeem(edge, b)
    with pytest.raises(CommandError, match=cert.node_id):  # used: revoke the node instead
        revoke_token(edge.data_dir, list_tokens(edge.data_dir)[0].token_id)
    with pytest.raises(CommandError):
        revoke_token(edge.data_dir, "not-a-token")


def test_concurrent_redeem_exactly_one_wins(
        edge: NodeIdentity, monkeypatch: pytest.MonkeyPatch) -> None:
    text = create_token(edge, role="register", ttl_ms=HOUR, now_ms=NOW)
    real_load = enrol._load_tokens

    def slow_load(data_dir: Path) -> dict[str, dict[str, Any]]:
        table = real_load(data_dir)
        time.sleep(0.05)  # widen the read-modify-write window: without the lock both win
        return table

    monkeypatch.setattr(enrol, "_load_tokens", slow_load)
    start = threading.Barrier(2)
    outcomes: list[object] = []

    def attempt() -> None:
        start.wait()
        try:
            outcomes.append(_redeem(edge, text))
        except JoinRefused as e:
            outcomes.append(e.reason)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, outcomes)).count("used") == 1
    assert len([o for o in outcomes if o != "used"]) == 1
    assert len(load_identity(edge.data_dir).trust.certificates()) == 2  # edge + the winner


# --- over HTTP, against a real node ----------------------------------------------------------


@pytest_asyncio.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    init_store(tmp_path / "edge", new_store(), now_ms=now_ms())
    n = Node(tmp_path / "edge", http_host=LOOPBACK, http_port=0, discovery=False)
    await n.start()
    try:
        yield n
    finally:
        await n.close()


def _http(n: Node) -> aiohttp.ClientSession:
    """A client pinned to ``n``'s store CA, as a till would be."""
    assert n.tls is not None
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=api_client_context(n.tls.ca_pem)))


def _token(n: Node, **kw: Any) -> str:
    return create_token(n.identity, role="register", ttl_ms=HOUR, now_ms=n.now_ms(), **kw)


async def _wait_for(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_join_end_to_end(tmp_path: Path, node: Node) -> None:
    ident = await join(tmp_path / "new", _token(node), url=node.url)
    loaded = load_identity(tmp_path / "new")
    assert (loaded.node_id, loaded.store_id, loaded.role) == (
        ident.node_id, node.identity.store_id, "register")
    assert loaded.certificate == ident.certificate and loaded.store_key is None
    ident.certificate.verify(node.identity.trust.store_public_key)
    assert ident.trust.store_public_key == node.identity.trust.store_public_key
    # the store's checkpointer (its first edge) travels with the trust store
    assert loaded.trust.checkpointer == node.identity.node_id
    assert node.identity.trust.certificate(ident.node_id) == ident.certificate
    assert load_identity(node.data_dir).trust.certificate(ident.node_id) == ident.certificate
    assert node.rejected_sessions == {}

    # ... and then it runs as a normal node of the store: the edge accepts its session
    reg = Node(tmp_path / "new", http_host=LOOPBACK, http_port=0, discovery=False,
               peers=[node.url])
    await reg.start()
    try:
        await _wait_for(lambda: ident.node_id in node.sessions, 10, "session to the edge")
    finally:
        await reg.close()


@pytest.mark.asyncio
async def test_join_uses_the_url_in_the_token(tmp_path: Path, node: Node) -> None:
    ident = await join(tmp_path / "new", _token(node, url=node.url), node_id="till-2")
    assert ident.node_id == "till-2"
    assert node.identity.trust.certificate("till-2") == ident.certificate


@pytest.mark.asyncio
async def test_replayed_token_is_refused_and_counted(tmp_path: Path, node: Node) -> None:
    text = _token(node)
    first = await join(tmp_path / "new", text, url=node.url)
    body = {"token": text, "public_key": NodeKey.generate().public_key.hex()}
    async with _http(node) as http, \
            http.post(node.url + enrol.JOIN_PATH, json=body) as resp:
        assert resp.status == 403
        err = (await resp.json())["error"]
    assert (err["reason"], err["field"]) == ("used", "token")
    assert first.node_id not in err["message"]
    assert node.rejected_sessions == {"join_used": 1}
    with pytest.raises(JoinRefused) as exc:
        await join(tmp_path / "new2", text, url=node.url)
    assert exc.value.reason == "used"
    assert node.rejected_sessions == {"join_used": 2}
    assert not (tmp_path / "new2" / "node.json").exists()


@pytest.mark.asyncio
async def test_bad_requests_get_400_naming_the_field(tmp_path: Path, node: Node) -> None:
    text = _token(node)
    pk = NodeKey.generate().public_key.hex()
    cases: list[tuple[bytes, str | None]] = [
        (b"not json", None),
        (b"[1]", None),
        (orjson.dumps({}), "token"),
        (orjson.dumps({"token": text}), "public_key"),
        (orjson.dumps({"token": "smj2.garbage!", "public_key": pk}), "token"),
        (orjson.dumps({"token": 7, "public_key": pk}), "token"),
        (orjson.dumps({"token": text, "public_key": "XYZ"}), "public_key"),
        (orjson.dumps({"token": text, "public_key": pk.upper()}), "public_key"),
        (orjson.dumps({"token": text, "public_key": pk, "node_id": "a b"}), "node_id"),
        (orjson.dumps({"token": text, "public_key": pk, "node_id": 5}), "node_id"),
        (orjson.dumps({"token": text, "public_key": pk, "admin": True}), "admin"),
        (orjson.dumps({"token": text, "public_key": pk, "pad": "x" * 5000}), None),
    ]
    async with _http(node) as http:
        for body, field in cases:
            async with http.post(node.url + enrol.JOIN_PATH, data=body) as resp:
                assert resp.status == 400, body
                err = (await resp.json())["error"]
                assert err["field"] == field, body
                assert err["message"]
    assert node.rejected_sessions == {"join_bad_request": len(cases)}
    await join(tmp_path / "new", text, url=node.url)  # none of that spent the token


@pytest.mark.asyncio
async def test_edge_refuses_a_token_of_another_store(tmp_path: Path, node: Node) -> None:
    other = init_store(tmp_path / "other", new_store(), now_ms=now_ms())
    # The other store's token pins the other edge's TLS certificate: the joiner stops at
    # the TLS handshake with this edge, before the token leaves the machine.
    with pytest.raises(UntrustedEdge, match="pins"):
        await join(tmp_path / "a", create_token(other, role="register", ttl_ms=HOUR,
                                                now_ms=now_ms()), url=node.url)
    assert node.rejected_sessions == {}
    # same store id, another store key: still not this edge's token
    assert node.tls is not None
    forged = JoinToken(node.identity.store_id, b"x" * 32, "register", now_ms() + HOUR,
                       store_fingerprint(NodeKey.generate().public_key),
                       node.tls.fingerprint).encode()
    with pytest.raises(JoinRefused) as exc:
        await join(tmp_path / "b", forged, url=node.url)
    assert exc.value.reason == "wrong_store"
    assert node.rejected_sessions == {"join_wrong_store": 1}


@pytest.mark.asyncio
async def test_node_id_taken_is_refused_over_http(tmp_path: Path, node: Node) -> None:
    with pytest.raises(JoinRefused) as exc:
        await join(tmp_path / "new", _token(node), url=node.url, node_id=node.identity.node_id)
    assert exc.value.reason == "bad_request"
    assert node.rejected_sessions == {"join_bad_request": 1}


@pytest.mark.asyncio
async def test_join_refuses_a_directory_that_holds_a_node(tmp_path: Path, node: Node) -> None:
    with pytest.raises(FileExistsError, match="new, empty directory"):
        await join(node.data_dir, _token(node), url=node.url)


@pytest.mark.asyncio
async def test_join_reports_an_unreachable_edge(tmp_path: Path, node: Node) -> None:
    with pytest.raises(ConnectionError, match="could not reach"):
        await join(tmp_path / "new", _token(node), url="https://127.0.0.1:1", timeout_s=2)
    assert not (tmp_path / "new" / "node.json").exists()


# --- a rogue edge: the client must not be enrolled into another store -------------------------


async def _serve(handler: Callable[[dict[str, Any]], web.Response]) -> tuple[web.AppRunner, str]:
    async def post(request: web.Request) -> web.Response:
        return handler(await request.json())

    app = web.Application()
    app.router.add_post(enrol.JOIN_PATH, post)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, 0).start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


def _answer(cert: Any, trust: TrustStore, tls: dict[str, str]) -> web.Response:
    return web.json_response({"node_id": cert.node_id, "certificate": cert.to_dict(),
                              "trust": trust.to_dict(), "tls": tls})


@pytest.mark.parametrize("rogue", ["own_store", "claims_token_key", "cert_for_other_key",
                                   "cert_for_other_role", "tls_of_other_store",
                                   "tls_for_other_key", "garbage"])
@pytest.mark.asyncio
async def test_client_refuses_an_edge_that_cannot_prove_the_tokens_store(
        tmp_path: Path, rogue: str) -> None:
    genuine = init_store(tmp_path / "genuine", "store-1", now_ms=NOW)  # what the token names
    impostor = init_store(tmp_path / "impostor", "store-1", now_ms=NOW)  # same id, own key
    gkey, ikey = genuine.store_key, impostor.store_key
    assert gkey is not None and ikey is not None
    text = create_token(genuine, role="register", ttl_ms=HOUR, now_ms=NOW)
    gca = (tmp_path / "genuine" / "tls-ca.pem").read_text()

    def tls_for(key: NodeKey, pk: bytes, ca: str = gca) -> dict[str, str]:
        return {"ca": ca, "cert": issue_node_cert(key, store_id="store-1", node_id="r",
                                                  public_key=pk, not_after_ms=NOW + HOUR,
                                                  now_ms=NOW).decode()}

    def handler(req: dict[str, Any]) -> web.Response:
        pk = bytes.fromhex(req["public_key"])
        if rogue in ("tls_of_other_store", "tls_for_other_key"):
            # a genuine-looking enrolment, but a TLS certificate the store did not make
            # for us: another store's CA, or a genuine one for someone else's key
            cert = issue_certificate(gkey, node_id="r", store_id="store-1",
                                     role="register", public_key=pk, not_after=NOW + HOUR)
            trust = TrustStore("store-1", genuine.trust.store_public_key)
            trust.add_certificate(cert)
            tls = tls_for(ikey, pk) if rogue == "tls_of_other_store" else tls_for(
                gkey, NodeKey.generate().public_key)
            return _answer(cert, trust, tls)
        tls = tls_for(gkey, pk)  # right for us: the refusal must come from elsewhere
        if rogue == "own_store":  # enrols us, but into its own store
            cert = issue_certificate(ikey, node_id="r", store_id="store-1",
                                     role="register", public_key=pk, not_after=NOW + HOUR)
            impostor.trust.add_certificate(cert)
            return _answer(cert, impostor.trust, tls)
        if rogue == "claims_token_key":  # genuine store key in the trust store, own signature
            cert = issue_certificate(ikey, node_id="r", store_id="store-1",
                                     role="register", public_key=pk, not_after=NOW + HOUR)
            return _answer(cert, TrustStore("store-1", genuine.trust.store_public_key), tls)
        if rogue == "cert_for_other_key":  # replays a genuine certificate of another node
            return _answer(genuine.certificate, genuine.trust, tls)
        if rogue == "cert_for_other_role":
            cert = issue_certificate(gkey, node_id="r", store_id="store-1",
                                     role="edge", public_key=pk, not_after=NOW + HOUR)
            return _answer(cert, TrustStore("store-1", genuine.trust.store_public_key), tls)
        return web.Response(text="welcome!")

    # Served over plain HTTP on loopback (insecure_plaintext): these are the checks of
    # the answer itself, behind the TLS pin (test_join_refuses_an_edge_with_another_tls
    # _certificate shows the pin stops a rogue edge before the token is even sent).
    runner, url = await _serve(handler)
    try:
        with pytest.raises(UntrustedEdge):
            await join(tmp_path / "new", text, url=url, insecure_plaintext=True)
    finally:
        await runner.cleanup()
    assert not (tmp_path / "new" / "node.json").exists()


# --- zeroconf ------------------------------------------------------------------------------------


async def _advertise(aiozc: AsyncZeroconf, store_id: str, role: str, port: int) -> None:
    name = f"{role}-{uuid.uuid4().hex[:8]}"
    info = AsyncServiceInfo(
        SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=port, server=f"{name}.storemesh.local.",
        parsed_addresses=[LOOPBACK],
        properties={"store": store_id, "node": name, "role": role, "fp": "0" * 16,
                    "proto": PROTOCOL_VERSION})
    await aiozc.async_register_service(info)


@pytest.mark.asyncio
async def test_find_edge_over_zeroconf() -> None:
    store = new_store()  # "s1" in spirit; random so other runs on this host cannot answer
    aiozc = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    try:
        await _advertise(aiozc, store, "register", 4001)  # same store, not an edge
        await _advertise(aiozc, new_store(), "edge", 4002)  # an edge, of another store
        await _advertise(aiozc, store, "edge", 4003)
        assert await find_edge(store, interface=LOOPBACK, timeout_s=10) == "http://127.0.0.1:4003"

        start = time.monotonic()
        with pytest.raises(TimeoutError, match="--url"):
            await find_edge(new_store(), interface=LOOPBACK, timeout_s=0.5)
        assert time.monotonic() - start < 3
    finally:
        await aiozc.async_close()


@pytest.mark.asyncio
async def test_join_finds_the_edge_by_zeroconf(tmp_path: Path) -> None:
    init_store(tmp_path / "edge", new_store(), now_ms=now_ms())
    n = Node(tmp_path / "edge", http_host=LOOPBACK, http_port=0, interface=LOOPBACK)
    await n.start()
    try:
        ident = await join(tmp_path / "new", _token(n), interface=LOOPBACK, timeout_s=10)
        assert n.identity.trust.certificate(ident.node_id) == ident.certificate
    finally:
        await n.close()


@pytest.mark.asyncio
async def test_find_edge_checks_the_interface() -> None:
    with pytest.raises(ValueError, match="IPv4"):
        await find_edge("s", interface="eth0", timeout_s=0.1)


# --- TLS: the token pins the edge's certificate ------------------------------------------------


@pytest.mark.asyncio
async def test_join_over_tls_writes_the_tls_files(tmp_path: Path, node: Node) -> None:
    assert node.url.startswith("https://")
    ident = await join(tmp_path / "new", _token(node), url=node.url)
    files = load_tls_files(tmp_path / "new", ident.key, store_id=ident.store_id,
                           node_id=ident.node_id, store_public_key=ident.trust.store_public_key)
    assert node.tls is not None and files.ca_pem == node.tls.ca_pem
    assert stat.S_IMODE(os.stat(files.key_path).st_mode) == 0o600


@pytest.mark.asyncio
async def test_join_refuses_an_edge_with_another_tls_certificate(
        tmp_path: Path, node: Node) -> None:
    """The token pins the issuing edge's TLS certificate; a server showing any other
    one (a rogue edge, a machine in the middle) is refused before the token is sent."""
    text = _token(node)
    tok = parse_token(text)
    wrong = JoinToken(tok.store_id, tok.secret, tok.role, tok.expires_ms,
                      tok.store_fingerprint, "00" * 32).encode()
    with pytest.raises(UntrustedEdge, match=r"presents TLS certificate .* but the token pins"):
        await join(tmp_path / "new", wrong, url=node.url)
    assert not (tmp_path / "new" / "node.json").exists()
    assert node.rejected_sessions == {}  # the edge never saw the token ...
    await join(tmp_path / "new", text, url=node.url)  # ... which is still unused


@pytest.mark.asyncio
async def test_join_refuses_a_plaintext_edge_url(tmp_path: Path, node: Node) -> None:
    with pytest.raises(ValueError, match="not https://"):
        await join(tmp_path / "new", _token(node), url=node.url.replace("https:", "http:"))
