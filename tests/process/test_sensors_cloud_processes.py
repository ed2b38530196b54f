"""A cooler alert crosses the WAN, raw readings do not (issue 14, acceptance), with every
part a real process on 127.0.0.1: a ``storemesh node`` edge dialling a ``storemesh
cloud run`` peer (``--cloud``), a sensor gateway posting over HTTPS with its own
credential, the alert in the cloud's API and on its dashboard (headless Chromium), and
the cloud's counters and ledger showing no raw reading."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.core.envelope import decode
from mesh.net.hqtls import ensure_hq_tls, hq_hosts
from tests import meshkit as mk
from tests.process.test_cloud_processes import _free_port, _start_cloud
from tests.process.test_dashboard_e2e import chromium, logged_in_dashboard, open_browser

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
cluster = mk.cluster  # the fixture: every process started is stopped after the test
__all__ = ["chromium", "cluster"]  # the fixtures

#: A shelf-scale reading's value the edge takes: it must not appear at the cloud.
SCALE_GRAMS = 7012.375


async def _call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None,
                token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with http.request(method, url, headers=headers,
                            data=None if body is None else orjson.dumps(body)) as resp:
        return resp.status, orjson.loads(await resp.read())


async def _metric(http: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    async with http.get(url + "/metrics") as resp:
        assert resp.status == 200, resp.status
        text = await resp.text()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _cloud_envelopes(cloud_dir: Path) -> list[Any]:
    """Every envelope in the cloud's ledger (read-only, beside the running process)."""
    conn = sqlite3.connect(f"file:{cloud_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return [decode(raw) for (raw,) in conn.execute("SELECT raw FROM envelopes")]
    finally:
        conn.close()


async def test_cooler_alert_reaches_the_cloud_dashboard_raw_readings_stay_at_the_edge(
        cluster: mk.Cluster, tmp_path: Path, chromium: str) -> None:
    t = mk.tag()
    edge_id = mk.new_store(tmp_path, f"store-{t}", f"edge-{t}")
    sid = edge_id.store_id
    cloud_dir = mk.enrol_direct(tmp_path / "hq", edge_id, f"cloud-{t}", role="cloud").data_dir
    mk.add_hq_user(tmp_path / "hq")
    gateway = mk.issue_token(edge_id, "gw-1", role="sensor")  # the sensor gateway's own
    port = _free_port()
    cloud_url = f"https://127.0.0.1:{port}"
    _start_cloud(cluster, tmp_path / "hq", port)  # `storemesh cloud run`
    # the certificate it serves, which the browser pins (made by _start_cloud: unchanged)
    hq = ensure_hq_tls(tmp_path / "hq", hq_hosts("127.0.0.1"), now_ms=mk.now_ms())
    edge = await cluster.start("edge", edge_id.data_dir, discovery=False,
                               extra=["--cloud", f"{cloud_url}/stores/{sid}"])
    store = f"{cloud_url}/stores/{sid}"
    async with mk.client() as http:
        await mk.until(lambda: mk.get_json(http, store, "/v1/health"), within=30,
                       what="the cloud serves the store")
        await mk.post_ok(http, edge.url, "/v1/receipts",
                         {"sku": "MILK", "qty": 10, "txn_id": "po-1"})
        st, body = await _call(http, "PUT", f"{edge.url}/v1/sensors/scale-MILK", {
            "kind": "weight", "zone": "dairy", "skus": ["MILK"], "unit_grams": 1000,
            "calibrated_ms": mk.now_ms() - 3_600_000, "txn_id": "reg-scale"})
        assert st == 201, body
        # nothing is taken without a credential, nor with a credential of another scope
        rows = [{"device": "cooler-1", "metric": "cooler_temp_c", "value": 6.0 + (i % 3) / 10,
                 "at_ms": mk.now_ms() - 12 * 60_000 + i * 10_000} for i in range(72)]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=mk.TEST_SSL)
                                         ) as anon:
            st, body = await _call(anon, "POST", f"{edge.url}/v1/telemetry", {"readings": rows})
            assert st == 401 and body["error"]["reason"] == "no_token", body
        st, body = await _call(http, "POST", f"{edge.url}/v1/sensors/reconcile",
                               token=gateway)
        assert st == 403 and body["error"]["reason"] == "scope", body
        # the gateway posts a shelf reading and 12 minutes of a cooler above 5 °C, over
        # HTTPS (pinned to the store CA) with its credential
        st, body = await _call(http, "POST", f"{edge.url}/v1/sensors/readings", {
            "readings": [{"id": "g-1", "sensor": "scale-MILK", "value": SCALE_GRAMS,
                          "at_ms": mk.now_ms()}]}, token=gateway)
        assert st == 200 and body["accepted"] == 1, body
        st, body = await _call(http, "POST", f"{edge.url}/v1/telemetry", {"readings": rows},
                               token=gateway)
        assert st == 200 and [a["rule"] for a in body["alerts"]] == ["cooler_warm"], body

        async def alert_at_cloud() -> bool:
            st, body = await _call(http, "GET", f"{store}/v1/telemetry/alerts")
            return st == 200 and [(a["device"], a["rule"]) for a in body["alerts"]] == [
                ("cooler-1", "cooler_warm")]
        await mk.until(alert_at_cloud, within=30, what="the cooler alert at the cloud")

    async with mk.hq_session(cloud_url) as hq_http:
        fleet = await mk.get_json(hq_http, cloud_url, "/v1/fleet/sensors")
        [row] = [r for r in fleet["stores"] if r["store"] == sid]
        assert [(a["device"], a["rule"]) for a in row["alerts"]] == [("cooler-1",
                                                                      "cooler_warm")]
    async with open_browser(chromium, tmp_path / "profile", hq.cert_path) as browser:
        page = await logged_in_dashboard(browser, f"{cloud_url}/")
    assert "cooler-1 cooler_warm" in page.cells[("sensors", sid, "alerts")], page.cells

    # raw readings did not cross the WAN: the cloud took none (its counters), and no
    # envelope in its ledger carries the scale's value or a raw telemetry row
    async with mk.client() as http:
        assert await _metric(http, edge.url, "storemesh_sensor_readings_total",
                             outcome="accepted") == 1
        assert await _metric(http, edge.url, "storemesh_telemetry_readings_total",
                             outcome="accepted") == 72
        for name in ("storemesh_sensor_readings_total", "storemesh_telemetry_readings_total"):
            assert await _metric(http, store, name, outcome="accepted") == 0, name
    envs = _cloud_envelopes(cloud_dir)
    kinds = sorted({e.meta["kind"] for e in envs})
    assert kinds == ["catalog", "receipt", "telemetry"], kinds
    blob = b"".join(e.raw for e in envs)
    assert str(SCALE_GRAMS).encode() not in blob
    tm = [op for e in envs for op in e.ops if op["t"] == "tm"]
    summaries = [s for op in tm for s in op["s"]]
    assert [a["rule"] for op in tm for a in op["a"]] == ["cooler_warm"]
    assert len(summaries) <= 3 and sum(s[3] for s in summaries) <= len(rows), summaries
    tm_bytes = sum(len(e.raw) for e in envs if e.meta["kind"] == "telemetry")
    assert tm_bytes < len(orjson.dumps(rows)) / 5, (tm_bytes, len(orjson.dumps(rows)))
