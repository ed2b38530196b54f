"""The simulated WAN is the real cloud link's byte path (issue 9 deliverable 4): the
receiver's enrolment check, bandwidth charged for wire bytes, the WAN linger and the
merge of queued batches, decode in stream order (mesh.sim.world invariant 7)."""

from __future__ import annotations

from mesh import config
from mesh.core.sync import encode_batch
from mesh.sim.world import LinkModel, World


def _frame(origin: str, seq: int) -> bytes:
    return (b'{"body":{"hlc":1,"meta":{},"ops":[],"origin":"' + origin.encode()
            + b'","prev":null,"seq":' + str(seq).encode() + b'},"sig":"'
            + b"ab" * 64 + b'"}')


def _wan(bandwidth: float | None = None, **kw: float) -> World:
    w = World(1)
    w.add_node("edge", "edge")
    w.add_node("cloud", "cloud")
    model = LinkModel(latency_ms=20.0, jitter_ms=0.0, kind="wan", bandwidth=bandwidth, **kw)
    w.connect("edge", "cloud", model, LinkModel(latency_ms=20.0, jitter_ms=0.0, kind="wan",
                                                bandwidth=bandwidth))
    w.run_until(5_000)
    return w


def test_the_cloud_end_refuses_frames_of_unenrolled_origins() -> None:
    w = _wan()
    w.send("edge", "cloud", encode_batch([_frame("ghost", 1), _frame("ghost", 2)]))
    w.run_until(6_000)
    cloud = w.nodes["cloud"]
    assert cloud.session_refused.get("wan_unenrolled_origin") == 2
    assert cloud.core.stats.get("bad_signature", 0) + sum(cloud.core.stats.values()) > 0


def test_wan_bandwidth_is_charged_for_wire_bytes() -> None:
    w = _wan(bandwidth=5.0)  # 5 bytes/ms: 40 kbit/s
    link = w.links[("edge", "cloud")]
    w.run_until(60_000)
    batch = encode_batch([_frame("edge", i) for i in range(1, 200)])
    wire0, t0 = link.wire_bytes, w.now
    w.send("edge", "cloud", batch)
    w.run_until(t0 + config.WAN_LINGER_S * 1000 + 1)
    busy = link.busy_until - (t0 + config.WAN_LINGER_S * 1000)
    wire = link.wire_bytes - wire0
    assert wire < len(batch) / 4  # the codec squeezes these frames well
    assert abs(busy - wire / 5.0) < 1.0, (busy, wire / 5.0, len(batch) / 5.0)


def test_wan_writes_linger_and_merge_queued_batches() -> None:
    w = _wan()
    link = w.links[("edge", "cloud")]
    m0 = link.messages
    t0 = w.now
    for i in range(1, 11):
        w.send("edge", "cloud", encode_batch([_frame("edge", i)]))
    w.run_until(t0 + config.WAN_LINGER_S * 1000 - 1)
    assert link.messages == m0, "a WAN write went out before the linger"
    w.run_until(t0 + config.WAN_LINGER_S * 1000 + 1)
    assert link.messages == m0 + 1, "ten queued batches should leave as one message"


def test_wan_messages_decode_in_stream_order_under_reordering() -> None:
    w = _wan(reorder=0.5, reorder_ms=200.0)
    link = w.links[("edge", "cloud")]
    got: list[bytes] = []
    cloud = w.nodes["cloud"]
    real = cloud.driver.message

    def spy(peer: str, data: bytes) -> None:
        got.append(data)
        real(peer, data)
    cloud.driver.message = spy  # type: ignore[method-assign]
    t0 = w.now
    for i in range(40):
        w.at(t0 + i * 100, lambda i=i: w.send("edge", "cloud", b"V" + str(i).encode()))
    w.run_until(t0 + 10_000)
    mine = [int(d[1:]) for d in got if d[:1] == b"V" and d[1:].isdigit()]
    assert mine == list(range(40))  # a TCP stream: nothing overtakes
    assert not w.dropped_sessions.get("bad_wan_message")
    assert link.lost == 0
