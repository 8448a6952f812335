"""Tracking to a real MLflow tracking server over HTTP, and surviving its outage: the server is
stopped mid-run (while a stage logs metrics, and while the next stage's MLflow run must be
created) and restarted on the same port; the run succeeds and no metric is lost."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import runs
from orchestrator.state import RunState, StageState

FUNCS = '''
import time
from pathlib import Path

def talk(ctx, half, go):
    for i in range(5):
        ctx.log_metrics({"m": float(i)}, step=i)
    Path(half).touch()
    deadline = time.time() + 120
    while not Path(go).exists():  # the test stops the tracking server meanwhile
        if time.time() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.05)
    for i in range(5, 10):
        ctx.log_metrics({"m": float(i)}, step=i)
        time.sleep(0.05)
    return {"logged": 10}

def after(ctx):
    ctx.log_metrics({"x": 42.0})
    return {"upstream": ctx.inputs["talk"]["logged"]}
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` as a subprocess (its own process group, so stopping it stops its workers)."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "server-artifacts"), "--workers", "1"]
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not come up: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # as abrupt as a crashed server
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.proc = None
        deadline = time.time() + 30
        while time.time() < deadline:  # really down: connections refused
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
            except OSError:
                return
            time.sleep(0.2)


@pytest.fixture
def server(tmp_path, _empty_mlflow_db):
    import shutil

    shutil.copy(_empty_mlflow_db, tmp_path / "server.db")  # schema made once per session: migrations are slow
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_every_node_logs_to_the_server_and_an_outage_loses_nothing(ray_session, server, tmp_path):
    (tmp_path / "tfuncs.py").write_text(FUNCS)
    half, go = tmp_path / "half", tmp_path / "go"
    path = tmp_path / "served.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: served
        storage: {tmp_path / 'store'}
        tracking: {{uri: "{server.url}"}}
        defaults: {{retries: 0}}
        stages:
          talk: {{kind: python, config: {{entrypoint: "tfuncs:talk", params: {{half: "{half}", go: "{go}"}}}}}}
          after: {{kind: python, needs: [talk], config: {{entrypoint: "tfuncs:after"}}}}
    """))
    result: dict = {}
    stream = io.StringIO()
    t = threading.Thread(target=lambda: result.setdefault(
        "rec", runs.start_run(runs.prepare(path), stream=stream, live=False)), daemon=True)
    t.start()
    deadline = time.time() + 120
    while not half.exists():
        assert time.time() < deadline and t.is_alive(), "the first stage never started"
        time.sleep(0.1)

    server.stop()  # mid-stage: the next five metrics, the stage's end and `after`'s run wait for it
    go.touch()
    time.sleep(6)  # `talk` ends and `after` must be created while the server is down
    assert t.is_alive(), "the run must wait for the tracking server, not fail"
    server.start()
    t.join(180)
    assert not t.is_alive()
    rec = result["rec"]
    assert rec.state == RunState.SUCCEEDED, {n: (s.state, s.error) for n, s in rec.stages.items()}
    assert rec.stages["after"].outputs == {"upstream": 10}

    client = MlflowClient(server.url)
    parent = client.get_run(rec.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["state"] == "SUCCEEDED"
    assert {"dag.png", "spec"} <= {a.path for a in client.list_artifacts(rec.run_id)}
    talk = client.get_run(rec.stages["talk"].child_run_id)
    history = client.get_metric_history(talk.info.run_id, "m")
    assert sorted((m.step, m.value) for m in history) == [(i, float(i)) for i in range(10)]  # nothing lost
    assert talk.info.status == "FINISHED" and talk.data.tags["state"] == StageState.SUCCEEDED.value
    after = client.get_run(rec.stages["after"].child_run_id)
    assert after.data.tags["mlflow.parentRunId"] == rec.run_id and after.info.status == "FINISHED"
    assert after.data.metrics["x"] == 42.0
    # the status command reads the run back through the server too
    out = subprocess.run([sys.executable, "-m", "orchestrator", "status", rec.run_id, "--tracking-uri", server.url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out.stderr


def test_a_call_that_needs_an_answer_waits_for_the_server_then_gives_up(tmp_path):
    from orchestrator.tracking import Tracker

    srv = MlflowServer(tmp_path)  # never started: connections are refused
    tracker = Tracker(srv.url, "nowhere")
    tracker.sync_retry_s = 3.0
    t0 = time.time()
    with pytest.raises(Exception, match="127.0.0.1"):
        tracker.start_pipeline("p", "name: p", {})
    assert 1.0 <= time.time() - t0 < 30  # retried with backoff until sync_retry_s, without MLflow's minutes of retries
