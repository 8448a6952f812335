"""The tracking write queue: durable across a killed driver, bounded in memory, and a write that
fails for good never blocks the ones after it (real SQLite MLflow store)."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from orchestrator.spool import Spool
from orchestrator.tracking import Tracker


def test_spool_keeps_order_survives_reopen_and_bounds_memory(tmp_path):
    q = Spool(str(tmp_path), memory_limit=3)
    for i in range(10):
        q.put({"i": i})
    assert len(q) == 10 and len(q._buf) <= 3  # the rest waits on disk
    got = []
    for _ in range(4):
        got.append(q.head()["i"])
        q.pop()
    q.close()  # as if the driver died here: what was sent is not sent again
    with open(tmp_path / "writes.jsonl", "ab") as f:
        f.write(b'{"i": 99')  # a line cut short by the kill
    again = Spool(str(tmp_path), memory_limit=3)
    assert len(again) == 6
    while (entry := again.head()) is not None:
        got.append(entry["i"])
        again.pop()
    assert got == list(range(10))
    assert (tmp_path / "writes.jsonl").stat().st_size == 0  # all sent: the file starts afresh


def test_a_write_that_fails_for_good_is_dropped_and_later_writes_arrive(tmp_path, tracking_uri, caplog):
    tracker = Tracker(tracking_uri, "drops")
    run_id = tracker.start_pipeline("drops", "name: drops", {})
    tracker.spool_to(str(tmp_path / "spool"))
    tracker.log_artifacts(run_id, str(tmp_path / "nothing-here"))  # no files: nothing queued
    tracker._call("log_artifact", run_id, str(tmp_path / "vanished.txt"))  # the file is gone: never retried
    tracker.set_tags("0" * 32, {"a": "b"})  # a run the store does not know: refused (4xx-like)
    tracker.log_metrics(run_id, {"after": 1.0}, 0, time.time())
    t0 = time.time()
    assert tracker.flush(timeout=60)
    assert time.time() - t0 < 30
    tracker.close()
    assert MlflowClient(tracking_uri).get_run(run_id).data.metrics["after"] == 1.0
    assert sum("dropped" in r.message for r in caplog.records) == 2
