"""Attacks on the API of a running store: every node a real process on 127.0.0.1, every
link and the API real TLS (issue 11, "Bad input and attacks").

The store is provisioned with the CLI as its owner would: ``storemesh device issue``
(tills bound to their registers), ``storemesh staff add`` (PINs from a file, the
default scrypt cost). Then: unauthenticated and forged writes change nothing; a
cashier cannot adjust or change prices; a stolen till credential writes only as its
own device, only at its own register, and cannot claim another till's keys; wrong
PINs are throttled; and ``storemesh device revoke`` / ``storemesh staff disable`` on
the edge reach every node (the cloud included) within the sync bound.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests import meshkit as mk
from tests.process.test_cloud_processes import _free_port, _start_cloud

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]  # four processes
cluster = mk.cluster  # the fixture: every process started is stopped after the test

#: Seconds for a revocation or a disabled staff member to be refused everywhere: the
#: edge picks the CLI's change up within AUTH_RELOAD_S (1 s) or at once by delivery,
#: then one push per hop; generous for a loaded 2-core machine (as test_revoke_processes).
SPREAD_BOUND_S = 10.0
PINS = {"ann": "482913", "bob": "771205", "max": "930164"}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, check=False)


def _provision(base: Path, edge: Path, r1: str, r2: str) -> dict[str, str]:
    """Device credentials and staff, made with the CLI on the edge's data directory."""
    tokens = {}
    for device, args in (("till-1", ["--node", r1]), ("till-2", ["--node", r2]),
                         ("backoffice", ["--node", edge.name]),
                         ("web", ["--role", "online", "--channel", "web"])):
        role = [] if "--role" in args else ["--role", "pos"]
        done = _cli("device", "issue", str(edge), device, *role, *args, cwd=base)
        assert done.returncode == 0, done.stderr + done.stdout
        tokens[device] = done.stdout.strip().splitlines()[-1]
        assert tokens[device].startswith("smd1."), done.stdout
    for sid, role in (("ann", "cashier"), ("bob", "cashier"), ("max", "manager")):
        pin_file = base / f"{sid}.pin"
        pin_file.write_text(PINS[sid] + "\n")
        done = _cli("staff", "add", str(edge), sid, "--name", sid.title(), "--role", role,
                    "--pin-file", str(pin_file), cwd=base)
        assert done.returncode == 0, done.stderr + done.stdout
    return tokens


async def _call(method: str, url: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request with exactly ``headers`` (no credential added), pinned to the CAs."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=mk.TEST_SSL),
                                     timeout=mk.HTTP_TIMEOUT) as http, \
            http.request(method, url, data=None if body is None else orjson.dumps(body),
                         headers={"Content-Type": "application/json",
                                  **(headers or {})}) as resp:
        return resp.status, orjson.loads(await resp.read())


def _reason(answer: tuple[int, Any]) -> tuple[int, str | None]:
    status, body = answer
    return status, (body.get("error") or {}).get("reason") if isinstance(body, dict) else None


async def _envelopes(http: aiohttp.ClientSession, nodes: list[mk.NodeProc]) -> list[int]:
    return [(await mk.get_json(http, n.url, "/v1/health"))["envelopes"] for n in nodes]


async def _store(cluster: mk.Cluster, tmp_path: Path, *, cloud: bool = False
                 ) -> tuple[list[mk.NodeProc], dict[str, str], str | None, str]:
    t = mk.tag()
    edge_id, r1_id, r2_id = f"edge-{t}", f"reg1-{t}", f"reg2-{t}"
    edge_ident = mk.new_store(tmp_path, f"store-{t}", edge_id)
    for rid in (r1_id, r2_id):
        edge_ident.trust.add_certificate(mk.enrol_direct(tmp_path, edge_ident, rid).certificate)
    edge_ident.save()
    tokens = _provision(tmp_path, edge_ident.data_dir, r1_id, r2_id)
    extra: list[str] = []
    cloud_store = None
    if cloud:
        mk.enrol_direct(tmp_path / "hq", edge_ident, f"cloud-{t}", role="cloud")
        port = _free_port()
        _start_cloud(cluster, tmp_path / "hq", port)
        cloud_store = f"https://127.0.0.1:{port}/stores/{edge_ident.store_id}"
        extra = ["--cloud", cloud_store]
    edge = await cluster.start("edge", edge_ident.data_dir, discovery=False, extra=extra)
    r1 = await cluster.start("r1", tmp_path / r1_id, discovery=False, peers=[edge.url])
    r2 = await cluster.start("r2", tmp_path / r2_id, discovery=False,
                             peers=[edge.url, r1.url])
    return [edge, r1, r2], tokens, cloud_store, str(edge_ident.data_dir)


async def _ready(http: aiohttp.ClientSession, nodes: list[mk.NodeProc]) -> None:
    await mk.wait_mesh(http, nodes, within=30)
    for n in nodes:  # the roster the CLI signed, carried by sync
        await mk.wait_roster(http, n.url, 2)  # (three staff added: versions 0, 1, 2)
    await mk.post_ok(http, nodes[0].url, "/v1/receipts",
                     {"sku": "BIKE", "qty": 50, "txn_id": "po-1"})
    await mk.wait_converged(http, nodes, within=30, expect={"BIKE": 50})


async def test_attacks_on_the_api_change_nothing(cluster: mk.Cluster, tmp_path: Path) -> None:
    nodes, tokens, _, _ = await _store(cluster, tmp_path)
    edge, r1, r2 = nodes
    async with mk.client() as http:
        await _ready(http, nodes)
        before = await _envelopes(http, nodes)
        bearer = mk.bearer

        # 1. no credential, a made-up one, a forged signature: 401, at every node
        forged = tokens["till-1"][:-6] + ("AAAAAA" if tokens["till-1"][-6:] != "AAAAAA"
                                          else "BBBBBB")
        for n in nodes:
            for headers, reason in (({}, "no_token"), (bearer("smd1.e30.AAAA"), "bad_token"),
                                    (bearer(forged), "bad_token")):
                for path, body in (("/v1/sales", {"sku": "BIKE", "qty": 1, "txn_id": "x"}),
                                   ("/v1/adjustments", {"sku": "BIKE", "delta": -50,
                                                        "reason": "shrink", "txn_id": "x"})):
                    got = _reason(await _call("POST", n.url + path, body, headers))
                    assert got == (401, reason), (n.name, path, got)
            status, _ = await _call("GET", n.url + "/v1/audit")
            assert status == 401

        # 2. a cashier at a till may sell, not adjust stock nor change prices
        ann = await mk.login(http, r1.url, tokens["till-1"], "ann", PINS["ann"])
        assert (await _call("POST", r1.url + "/v1/sales",
                            {"sku": "BIKE", "qty": 1, "txn_id": "k-1"}, ann))[0] == 201
        back = await mk.login(http, edge.url, tokens["backoffice"], "bob", PINS["bob"])
        for url, who in ((r1.url, ann), (edge.url, back)):
            got = _reason(await _call("POST", url + "/v1/adjustments",
                                      {"sku": "BIKE", "delta": -5, "reason": "shrink",
                                       "txn_id": "adj-1"}, who))
            assert got == (403, "role"), got
        got = _reason(await _call("PUT", edge.url + "/v1/catalog/BIKE",
                                  {"txn_id": "p-1", "price_cents": 1}, back))
        assert got == (403, "role"), got
        # ... and may not name someone else as the one who did it
        status, body = await _call("POST", r1.url + "/v1/sales",
                                   {"sku": "BIKE", "qty": 1, "txn_id": "k-2",
                                    "staff_id": "max"}, ann)
        assert (status, body["error"]["field"]) == (403, "staff_id")

        # 3. a stolen till credential: only its own register, only as its own device
        got = _reason(await _call("POST", r2.url + "/v1/session",
                                  {"staff_id": "ann", "pin": PINS["ann"]},
                                  bearer(tokens["till-1"])))
        assert got == (403, "wrong_node"), got
        stolen_session = {**bearer(tokens["till-2"]), "X-Staff-Session": ann["X-Staff-Session"]}
        got = _reason(await _call("POST", r2.url + "/v1/sales",
                                  {"sku": "BIKE", "qty": 1, "txn_id": "k-3"}, stolen_session))
        assert got == (401, "bad_session"), got  # a session is bound to node and device
        # till-1's key "k-1" cannot block till-2's sale under the same key
        bob2 = await mk.login(http, r2.url, tokens["till-2"], "bob", PINS["bob"])
        status, sale = await _call("POST", r2.url + "/v1/sales",
                                   {"sku": "BIKE", "qty": 1, "txn_id": "k-1"}, bob2)
        assert status == 201 and not sale["duplicate"], sale

        # 4. wrong PINs: a few free, then delays (429 even for the right PIN)
        tries = [_reason(await _call("POST", r2.url + "/v1/session",
                                     {"staff_id": "bob", "pin": "000000"},
                                     bearer(tokens["till-2"]))) for _ in range(5)]
        assert tries[:4] == [(401, "bad_pin")] * 4 and tries[4] == (429, "pin_throttled"), tries
        got = _reason(await _call("POST", r2.url + "/v1/session",
                                  {"staff_id": "bob", "pin": PINS["bob"]},
                                  bearer(tokens["till-2"])))
        assert got == (429, "pin_throttled"), got

        # nothing was written by any refused request (every node holds the receipt and
        # the two sales, nothing else), and each refusal was counted
        await mk.wait_converged(http, nodes, within=30, expect={"BIKE": 48})
        assert await _envelopes(http, nodes) == [b + 2 for b in before]
        audit = await mk.get_json(http, edge.url, "/v1/audit?limit=50")
        sales = {(e["origin"], e["txn_id"]): (e["device_id"], e["staff_id"])
                 for e in audit["entries"] if e["kind"] == "sale"}
        assert sales == {(r1.node_id, "k-1"): ("till-1", "ann"),
                         (r2.node_id, "k-1"): ("till-2", "bob")}, sales
        fams = await mk.metric_families(http, r2.url)
        counts = {s.labels["reason"]: s.value for s in fams["storemesh_api_auth_refusals"].samples
                  if s.name.endswith("_total")}
        assert counts["no_token"] == 3 and counts["bad_token"] == 4, counts
        assert counts["wrong_node"] == 1 and counts["bad_session"] == 1, counts
        assert counts["bad_pin"] == 4 and counts["pin_throttled"] == 2, counts


async def test_revocation_and_disabled_staff_reach_every_node_within_the_bound(
        cluster: mk.Cluster, tmp_path: Path) -> None:
    nodes, tokens, cloud_store, edge_dir = await _store(cluster, tmp_path, cloud=True)
    edge, r1, r2 = nodes
    assert cloud_store is not None
    async with mk.client() as http:
        await _ready(http, nodes)
        await mk.until(lambda: _at_cloud(http, cloud_store), within=30,
                       what="the receipt at the cloud")
        ann1 = await mk.login(http, r1.url, tokens["till-1"], "ann", PINS["ann"])
        ann2 = await mk.login(http, r2.url, tokens["till-2"], "ann", PINS["ann"])
        web = mk.bearer(tokens["web"])
        sale = {"sku": "BIKE", "qty": 1}
        assert (await _call("POST", r1.url + "/v1/sales", {**sale, "txn_id": "a"},
                            ann1))[0] == 201
        assert (await _call("POST", cloud_store + "/v1/reservations",
                            {**sale, "txn_id": "w-1", "channel": "web"}, web))[0] == 201

        t0 = time.monotonic()
        for args in (("device", "revoke", edge_dir, "till-1", "--url", edge.url,
                      "--reason", "register 1 stolen"),
                     ("device", "revoke", edge_dir, "web", "--url", edge.url),
                     ("staff", "disable", edge_dir, "ann")):
            done = _cli(*args, cwd=tmp_path)
            assert done.returncode == 0, done.stderr + done.stdout
        issued = time.monotonic() - t0
        n = iter(range(10**6))

        async def refused_everywhere() -> bool:
            got = [
                _reason(await _call("POST", r1.url + "/v1/sales",
                                    {**sale, "txn_id": f"r1-{next(n)}"}, ann1)),
                _reason(await _call("POST", r2.url + "/v1/sales",
                                    {**sale, "txn_id": f"r2-{next(n)}"}, ann2)),
                _reason(await _call("POST", cloud_store + "/v1/reservations",
                                    {**sale, "txn_id": f"w-{next(n)}", "channel": "web"},
                                    web))]
            return got == [(401, "revoked"), (401, "staff_disabled"), (401, "revoked")]
        took, _ = await mk.until(refused_everywhere, within=SPREAD_BOUND_S, interval=0.05,
                                 what="till-1 and web revoked, ann disabled, everywhere")
        print(f"\nrevocation + disable: CLI {issued:.2f} s, refused everywhere "
              f"{took:.2f} s after the CLI returned")
        # the other devices and staff go on working; bob logs in where ann did
        bob = await mk.login(http, r2.url, tokens["till-2"], "bob", PINS["bob"])
        assert (await _call("POST", r2.url + "/v1/sales", {**sale, "txn_id": "b"},
                            bob))[0] == 201
        assert (await mk.get_json(http, edge.url, "/v1/health"))["crl_version"] == 2
        listed = _cli("device", "list", edge_dir, cwd=tmp_path)
        assert "revoked" in listed.stdout and "till-2" in listed.stdout, listed.stdout


async def _at_cloud(http: aiohttp.ClientSession, store: str) -> bool:
    async with http.get(store + "/v1/stock/BIKE") as resp:
        return resp.status == 200 and (await resp.json())["on_hand"] == 50
