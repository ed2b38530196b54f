"""The operator's CLI (issue 10 items 23 and 24): ``store init`` refuses bad ids,
``status`` on a cloud's root URL says what is there, ``ledger show`` shows full node ids
and filters, ``nodes list`` / ``nodes revoke`` on a stopped edge, and
``POST /v1/revocations`` on a running node."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from mesh.app.cli import main as cli
from mesh.core.identity import NodeKey, issue_revocations
from mesh.core.replica import Replica
from mesh.durable import DurableReplica
from mesh.store.datadir import NodeIdentity, enrol_node, init_store, load_identity
from tests.conftest import NOW, ingest

# --- store init ---------------------------------------------------------------------------


def _said(res: Any) -> str:
    """The CLI's output with rich's line wrapping undone (it wraps at 80 columns, so
    where a phrase breaks depends on the length of the tmp path before it)."""
    return " ".join(res.output.split())


@pytest.mark.parametrize("args", [
    ["--store", "bad store/id"],
    ["--store", "../x"],
    ["--store", ""],
    ["--store", "ok-store", "--node-id", "edge 1"],
    ["--store", "x" * 129],
])
def test_store_init_refuses_bad_ids_in_one_line(tmp_path: Path, args: list[str]) -> None:
    res = CliRunner().invoke(cli, ["store", "init", str(tmp_path / "d"), *args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.output.count("\n") == 1, res.output
    assert "A-Z a-z 0-9" in res.output
    assert not (tmp_path / "d" / "node.json").exists()


def test_store_init_accepts_a_good_id(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["store", "init", str(tmp_path / "d"), "--store",
                                   "berlin-mitte_2.0", "--node-id", "edge-1"])
    assert res.exit_code == 0, res.output


# --- status -------------------------------------------------------------------------------


@pytest.fixture
def fake_cloud() -> Iterator[str]:
    """An HTTP server that answers like a cloud's root: 404 for /v1/health, a store list
    at /v1/stores."""
    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/v1/stores":
                body = orjson.dumps({"stores": [{"store_id": "berlin"}, {"store_id": "oslo"}]})
                self.send_response(200)
            else:
                body = b'{"error": "not found"}'
                self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass
    srv = HTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_status_on_a_cloud_root_names_the_store_urls(fake_cloud: str) -> None:
    res = CliRunner().invoke(cli, ["status", fake_cloud])
    assert res.exit_code == 2, res.output
    assert "cannot reach" not in res.output
    assert "storemesh cloud serving 2 store(s)" in _said(res)
    assert f"storemesh status {fake_cloud}/stores/berlin" in _said(res)


def test_status_on_a_404_that_is_no_cloud(fake_cloud: str) -> None:
    res = CliRunner().invoke(cli, ["status", fake_cloud + "/elsewhere"])
    assert res.exit_code == 2, res.output
    assert "answered 404" in _said(res) and "not a storemesh node" in _said(res)


def test_status_on_nothing_says_cannot_reach(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = CliRunner().invoke(cli, ["status", f"http://127.0.0.1:{port}"])
    assert res.exit_code == 2 and "cannot reach" in _said(res), res.output


# --- ledger show --------------------------------------------------------------------------

LONG = "register-store-berlin-mitte-checkout-lane-000"


@pytest.fixture
def two_registers(tmp_path: Path) -> NodeIdentity:
    """An edge whose ledger holds a receipt and sales of two registers whose ids differ
    only in their last character; sales of r1 on SKU A, of r2 on SKU B, an hour apart."""
    ident = init_store(tmp_path / "edge", "store-1", now_ms=NOW, node_id="edge")
    assert ident.store_key is not None
    regs = {}
    for n in ("1", "2"):
        reg = enrol_node(tmp_path / n, ident.store_key, "store-1", "register", now_ms=NOW,
                         node_id=LONG + n)
        ident.trust.add_certificate(reg.certificate)
        regs[n] = Replica("store-1", LONG + n, "register", reg.key)
    ident.save()
    dr = DurableReplica.open(ident.data_dir)
    for sku in ("A", "B"):
        dr.execute(lambda r, sku=sku: r.receive(sku, 10, txn=f"rcv-{sku}", now_ms=NOW))[1]\
            .result()
    for rid in range(1, 3):
        raw = dr.ledger.read_origin("edge", rid, rid)[0]
        from mesh.core.envelope import decode

        for reg in regs.values():
            reg.apply(decode(raw), NOW)
    for i, (n, sku, at) in enumerate([("1", "A", NOW), ("2", "B", NOW + 3_600_000),
                                      ("1", "A", NOW + 7_200_000)]):
        env = regs[n].sell(sku, 1, txn=f"s{i}", now_ms=at).envelope
        assert env is not None
        fut = ingest(dr, env.raw, at)[1]
        assert fut is not None
        fut.result()
    dr.close()
    return ident


def _show(ident: NodeIdentity, *args: str) -> list[dict[str, object]]:
    res = CliRunner().invoke(cli, ["ledger", "show", str(ident.data_dir), "--json", *args])
    assert res.exit_code == 0, res.output
    return [orjson.loads(line) for line in res.output.splitlines()]


def test_ledger_show_prints_full_node_ids(two_registers: NodeIdentity) -> None:
    res = CliRunner().invoke(cli, ["ledger", "show", str(two_registers.data_dir)])
    assert res.exit_code == 0, res.output
    assert LONG + "1" in res.output and LONG + "2" in res.output, res.output


def test_ledger_show_filters_and_json(two_registers: NodeIdentity) -> None:
    every = _show(two_registers)
    assert [e["txn"] for e in every] == ["rcv-A", "rcv-B", "s0", "s1", "s2"]
    assert every[2]["origin"] == LONG + "1" and every[2]["sku"] == "A" and every[2]["qty"] == -1
    assert [e["txn"] for e in _show(two_registers, "--sku", "B")] == ["rcv-B", "s1"]
    assert [e["txn"] for e in _show(two_registers, "--origin", LONG + "2")] == ["s1"]
    assert [e["txn"] for e in _show(two_registers, "--origin", "register-")] == [
        "s0", "s1", "s2"]
    since = _iso(NOW + 1_800_000)
    assert [e["txn"] for e in _show(two_registers, "--since", since)] == ["s1", "s2"]
    until = _iso(NOW + 3_600_000)
    assert [e["txn"] for e in _show(two_registers, "--since", since, "--until", until)] == [
        "s1"]
    assert [e["txn"] for e in _show(two_registers, "--limit", "2")] == ["s1", "s2"]
    assert [e["txn"] for e in _show(two_registers, "--sku", "A", "--limit", "1")] == ["s2"]


def test_ledger_show_refuses_bad_filters(two_registers: NodeIdentity) -> None:
    for args in (["--since", "yesterday"], ["--origin", "nobody"], ["--limit", "0"]):
        res = CliRunner().invoke(cli, ["ledger", "show", str(two_registers.data_dir), *args])
        assert res.exit_code == 2, (args, res.output)
        assert "Traceback" not in res.output


def _iso(ms: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000))


# --- nodes list / revoke (edge not running) -------------------------------------------------


def test_nodes_revoke_on_a_stopped_edge_takes_effect_at_its_next_start(
        two_registers: NodeIdentity) -> None:
    d = str(two_registers.data_dir)
    runner = CliRunner()
    res = runner.invoke(cli, ["nodes", "revoke", d, LONG + "2", "--reason", "lost",
                              "--url", "http://127.0.0.1:9"])
    assert res.exit_code == 1 and "not delivered" in _said(res), res.output
    # the running node would overwrite node.json from memory: revocations.json holds it too
    (two_registers.data_dir / "node.json").write_bytes(
        (two_registers.data_dir / "node.json").read_bytes())
    ident = load_identity(two_registers.data_dir)
    assert ident.trust.is_revoked(LONG + "2") and ident.trust.crl_version == 1
    listed = runner.invoke(cli, ["nodes", "list", d, "--json"])
    rows = {r["node_id"]: r for r in map(orjson.loads, listed.output.splitlines())}
    assert rows[LONG + "2"]["status"] == "revoked" and rows[LONG + "2"]["reason"] == "lost"
    assert rows[LONG + "1"]["status"] == "active" and rows["edge"]["status"] == "this node"
    # a second revoke adds to the list (v2 names both); the same one again changes nothing
    assert runner.invoke(cli, ["nodes", "revoke", d, LONG + "1", "--url",
                               "http://127.0.0.1:9"]).exit_code == 1
    ident = load_identity(two_registers.data_dir)
    assert ident.trust.crl is not None and ident.trust.crl.version == 2
    assert ident.trust.crl.revoked == {LONG + "1", LONG + "2"}
    again = runner.invoke(cli, ["nodes", "revoke", d, LONG + "1", "--url",
                                "http://127.0.0.1:9"])
    assert "was already revoked" in again.output
    assert load_identity(two_registers.data_dir).trust.crl_version == 2


def test_nodes_revoke_bounds_each_node_by_the_edges_ledger_and_keeps_the_bound(
        two_registers: NodeIdentity) -> None:
    """The list names, per revoked node, the last seq the store keeps: the highest in
    the edge's ledger when it is revoked (r1 sold twice, r2 once), carried unchanged
    into every later version (mesh.store.revoke invariant 4)."""
    from mesh.store.revoke import revoke_node

    ident = load_identity(two_registers.data_dir)
    crl, _ = revoke_node(ident, LONG + "2", reason="lost", now_ms=NOW)
    assert crl.upto == {LONG + "2": 1}
    crl, _ = revoke_node(ident, LONG + "1", reason="stolen", now_ms=NOW)
    assert crl.version == 2 and crl.upto == {LONG + "1": 2, LONG + "2": 1}
    held = load_identity(two_registers.data_dir).trust
    assert held.revocation_bounds == {LONG + "1": 2, LONG + "2": 1}
    records = orjson.loads((two_registers.data_dir / "revocations.json").read_bytes())
    assert records["records"][LONG + "1"]["upto"] == 2


def test_nodes_revoke_refuses_what_it_cannot_do(two_registers: NodeIdentity,
                                                tmp_path: Path) -> None:
    d = str(two_registers.data_dir)
    runner = CliRunner()
    for args, says in ((["typo-node"], "holds no certificate"), (["edge"], "cannot revoke itself"),
                       (["bad id", "--force"], "not valid")):
        res = runner.invoke(cli, ["nodes", "revoke", d, *args])
        assert res.exit_code == 2 and says in _said(res), (args, res.output)
    # a register's directory holds no store key
    res = runner.invoke(cli, ["nodes", "revoke", str(tmp_path / "1"), "edge"])
    assert res.exit_code == 2 and "holds no store key" in _said(res), res.output
    assert load_identity(two_registers.data_dir).trust.crl_version == -1


def test_a_forged_revocations_file_is_refused_at_load(two_registers: NodeIdentity) -> None:
    forged = issue_revocations(NodeKey.from_bytes(b"\x02" * 32), store_id="store-1",
                               version=5, revoked={LONG + "1"})
    (two_registers.data_dir / "revocations.json").write_bytes(
        orjson.dumps({"crl": forged.to_dict(), "records": {}}))
    with pytest.raises(ValueError, match="not signed by the store key"):
        load_identity(two_registers.data_dir)


# --- ledger explain (issue 12) --------------------------------------------------------------


def test_ledger_explain_lists_the_changes_behind_a_sku(two_registers: NodeIdentity) -> None:
    res = CliRunner().invoke(cli, ["ledger", "explain", str(two_registers.data_dir), "A",
                                   "--json"])
    assert res.exit_code == 0, res.output
    lines = [orjson.loads(line) for line in res.output.splitlines()]
    changes, final = lines[:-1], lines[-1]
    assert [(c["kind"], c["on_hand_change"], c["on_hand"]) for c in changes] == [
        ("receipt", 10, 10), ("sale", -1, 9), ("sale", -1, 8)]
    assert [c["origin"] for c in changes] == ["edge", LONG + "1", LONG + "1"]
    assert all(c["time"] and c["txn"] for c in changes)
    assert final == {"sku": "A", "on_hand": 8, "reserved": 0, "available": 8, "oversold": 0}
    table = CliRunner().invoke(cli, ["ledger", "explain", str(two_registers.data_dir), "A"])
    assert table.exit_code == 0 and "8 on hand" in table.output, table.output
    missing = CliRunner().invoke(cli, ["ledger", "explain", str(two_registers.data_dir), "Z"])
    assert missing.exit_code != 0 and "no change" in missing.output
