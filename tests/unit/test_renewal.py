"""Certificates renewed by the edge before they expire (mesh.driver invariant 8), in the
simulated store: the same Driver and SyncCore as a real node, over simulated ports.

Before renewal existed, every certificate of a store expired a year after enrolment and
the store stopped: sales after that were refused everywhere as ``expired``.
"""

from __future__ import annotations

import orjson

from mesh.core.identity import issue_revocations
from mesh.core.sync import InstallTls, Send, TrustChanged
from tests.unit.test_sync_review import _sell
from tests.unit.test_sync_trust import _store_with_cloud

HOUR = 3600_000


def test_the_edge_renews_every_certificate_before_it_expires_and_the_store_sells_on() -> None:
    """Certificates valid one hour, three hours of sales: every node (the cloud over the
    WAN included) holds renewed certificates of everyone, its own among them, and not
    one sale is refused as expired. Without renewal every sale after the first hour is
    refused by every other node."""
    w = _store_with_cloud(1, HOUR)
    start = w.start_ms
    sales = 360
    for i in range(sales):
        w.after(i * 30_000, lambda i=i: _sell(w.nodes["r1" if i % 2 else "r2"], f"s{i}"))
    w.run_until(w.now + 3 * HOUR + 60_000)
    for name, node in w.nodes.items():
        assert "expired" not in node.core.stats, (name, node.core.stats)
        for nid in w.nodes:
            cert = node.trust.certificate(nid)
            assert cert is not None and cert.not_after > start + 3 * HOUR, (name, nid)
        assert node.identity.certificate.not_after > start + 3 * HOUR, name
        assert node.replica.on_hand("A") == 1000 - sales, name
    # renewed when a third of the validity is left: about every 40 minutes each
    assert w.nodes["edge"].driver.renewed >= 4 * 4
    assert all(n.driver.renewed == 0 for k, n in w.nodes.items() if k != "edge")


def test_a_revoked_node_is_not_renewed_and_expires() -> None:
    w = _store_with_cloud(2, HOUR)
    edge, r2 = w.nodes["edge"], w.nodes["r2"]
    original = edge.trust.certificate("r2")
    assert original is not None
    crl = issue_revocations(w.store_key, store_id=w.store_id, version=1, revoked={"r2"})
    edge.handle(edge.core.learn_revocations(crl, edge.clock()))
    w.run_until(w.now + 2 * HOUR)
    assert edge.trust.certificate("r2") == original
    assert r2.identity.certificate.not_after == original.not_after
    renewed_r1 = edge.trust.certificate("r1")
    assert renewed_r1 is not None and renewed_r1.not_after > w.start_ms + HOUR


def test_a_node_whose_certificate_expired_refuses_sales_instead_of_acknowledging_them(
) -> None:
    """r2 cut off from the edge for longer than its certificate lives: it cannot be
    renewed, so once it expires its sales are refused at the till (a clear error),
    not acknowledged and then refused by every peer."""
    w = _store_with_cloud(3, HOUR)
    r2 = w.nodes["r2"]
    for other in ("edge", "r1"):
        w.set_link(other, "r2", False)
    w.run_until(HOUR + 60_000)
    refused: list[BaseException] = []
    try:
        _sell(r2, "late")
    except Exception as exc:  # the driver's refusal, raised to the caller
        refused.append(exc)
    assert refused and "certificate expired" in str(refused[0]), refused
    assert r2.replica.on_hand("A") == 1000


def test_a_certificate_message_carries_a_tls_certificate_only_as_bounded_text() -> None:
    w = _store_with_cloud(4, HOUR)
    r1 = w.nodes["r1"]
    core = r1.core
    cert = w.nodes["edge"].trust.certificate("r1")
    assert cert is not None
    good = b"C" + orjson.dumps({"certs": [], "crl": None, "tls": "-----BEGIN CERTIFICATE-----"})
    effects = core.receive(good, "edge", r1.clock())
    assert InstallTls("-----BEGIN CERTIFICATE-----") in effects
    before = core.stats.get("malformed", 0)
    for bad in (7, ["x"], "x" * 9000):
        out = core.receive(b"C" + orjson.dumps({"certs": [], "crl": None, "tls": bad}), "edge",
                           r1.clock())
        assert not any(isinstance(e, InstallTls) for e in out)
    assert core.stats.get("malformed", 0) == before + 3
    # the edge's side: a renewed certificate goes to its node with the TLS text
    edge = w.nodes["edge"]
    out = edge.core.renewed(cert, "PEM")
    assert TrustChanged() in out
    sent = [e for e in out if isinstance(e, Send) and e.peer == "r1"]
    assert sent and orjson.loads(sent[0].data[1:])["tls"] == "PEM"
