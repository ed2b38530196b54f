"""The edge's recent-event store (``mesh.store.sensorstore`` invariant 1): bounded on
disk by ``RECENT_KEPT + RECENT_SLACK`` per kind, cut only once per ``RECENT_SLACK``
rows, and ``load`` gives exactly the newest ``RECENT_KEPT``. A real SQLite file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mesh.store.sensorstore import RECENT_KEPT, RECENT_SLACK, SENSOR_DB, SensorStore

NOW = 1_700_000_000_000


def _rows_on_disk(path: Path, kind: str) -> int:
    conn = sqlite3.connect(path / SENSOR_DB)
    try:
        (n,) = conn.execute("SELECT count(*) FROM recent WHERE kind = ?", (kind,)).fetchone()
        return int(n)
    finally:
        conn.close()


def test_recent_rows_are_cut_back_once_per_slack_not_per_batch(tmp_path: Path) -> None:
    store = SensorStore(tmp_path)
    total = RECENT_KEPT + 3 * RECENT_SLACK + 17
    seen_max = 0
    batch = 50
    for start in range(0, total, batch):
        rows = [("sale", f"k{i}", "A", NOW + i, -1)
                for i in range(start, min(total, start + batch))]
        rows.append(("moved", "A", "A", NOW + start, 0))  # a second kind, upserted
        store.add_recent(rows).result()
        n = _rows_on_disk(tmp_path, "sale")
        seen_max = max(seen_max, n)
        assert n <= RECENT_KEPT + RECENT_SLACK + batch, (start, n)
    # it was not cut on every batch: it grew past RECENT_KEPT between cuts
    assert seen_max > RECENT_KEPT + RECENT_SLACK // 2
    assert _rows_on_disk(tmp_path, "moved") == 1
    store.close()

    store = SensorStore(tmp_path)
    _, recent = store.load(NOW)
    store.close()
    sales = [key for kind, key, *_ in recent if kind == "sale"]
    assert sales == [f"k{i}" for i in range(total - RECENT_KEPT, total)]  # the newest, in order
    assert _rows_on_disk(tmp_path, "sale") == RECENT_KEPT  # load cut the slack too


def test_the_count_towards_a_cut_is_kept_across_batches(tmp_path: Path) -> None:
    store = SensorStore(tmp_path)
    store.add_recent([("sale", f"k{i}", "A", NOW + i, -1)
                      for i in range(RECENT_KEPT + RECENT_SLACK)]).result()
    assert _rows_on_disk(tmp_path, "sale") == RECENT_KEPT  # one big batch: cut at once
    for i in range(RECENT_SLACK - 1):  # one short of the next cut
        store.add_recent([("sale", f"m{i}", "A", NOW + 10**6 + i, -1)]).result()
    assert _rows_on_disk(tmp_path, "sale") == RECENT_KEPT + RECENT_SLACK - 1
    store.add_recent([("sale", "last", "A", NOW + 10**9, -1)]).result()
    assert _rows_on_disk(tmp_path, "sale") == RECENT_KEPT
    store.close()
