"""Tracking to a real MLflow tracking server over HTTP, and surviving its outage: the server
becomes unreachable mid-run (while a stage logs metrics, and while the next stage's MLflow run
must be created) and comes back; the run succeeds and no metric is lost."""

from __future__ import annotations

import contextlib
import io
import json
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
        # no job-execution workers (a dozen processes importing MLflow at start): tracking needs none
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
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


@pytest.fixture(scope="module")
def server(tmp_path_factory, _empty_mlflow_db):
    """One MLflow server for the module (a server start takes many seconds on a busy machine);
    each test has its own experiment. A test that stops it starts it again on the same port."""
    import shutil

    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(_empty_mlflow_db, root / "server.db")  # schema made once per session: migrations are slow
    srv = MlflowServer(root)
    srv.start()
    yield srv
    srv.stop()


def _run_state(store: Path) -> str | None:
    """The run's state as the driver last wrote it (written atomically; None before it exists)."""
    files = list(store.glob("_runs/*/state.json"))
    return json.loads(files[0].read_text())["state"] if files else None


@pytest.mark.slow
def test_every_node_logs_to_the_server_and_an_outage_loses_nothing(ray_session, server, outage, tmp_path, capsys):
    (tmp_path / "tfuncs.py").write_text(FUNCS)
    half, go = tmp_path / "half", tmp_path / "go"
    path = tmp_path / "served.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: served
        storage: {tmp_path / 'store'}
        tracking: {{uri: "{outage.url}"}}
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

    outage.down()  # mid-stage: the next five metrics, the stage's end and `after`'s run wait for it
    go.touch()
    # `talk` ends and `after` (its MLflow run not yet created) runs while the server is down
    deadline = time.time() + 120
    while _run_state(tmp_path / "store") != "SUCCEEDED":
        assert time.time() < deadline and t.is_alive(), "the run never got past its stages"
        time.sleep(0.1)
    t.join(2)  # no event marks "still waiting": it has not ended 2 s after its stages did
    assert t.is_alive(), "the run must wait for the tracking server, not fail nor drop its writes"
    outage.up()
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
    # the status command reads the run back through the server too (in this process: the CLI's
    # own start-up is tested elsewhere)
    from orchestrator.cli import main

    assert main(["status", rec.run_id, "--tracking-uri", server.url]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out


def test_a_call_that_needs_an_answer_waits_for_the_server_then_gives_up(tmp_path):
    from orchestrator.tracking import Tracker

    srv = MlflowServer(tmp_path)  # never started: connections are refused
    tracker = Tracker(srv.url, "nowhere")
    tracker.sync_retry_s = 3.0
    t0 = time.time()
    with pytest.raises(Exception, match="127.0.0.1"):
        tracker.start_pipeline("p", "name: p", {})
    assert 1.0 <= time.time() - t0 < 30  # retried with backoff until sync_retry_s, without MLflow's minutes of retries


OUTAGE_FUNCS = '''
import time
from pathlib import Path

def _wait(path):
    deadline = time.time() + 300
    while not Path(path).exists():
        if time.time() > deadline:
            raise TimeoutError(path)
        time.sleep(0.05)

def talk(ctx, d):
    if Path(d, "resumed").exists():  # the rerun after resume logs nothing: counts stay exact
        return {"logged": 0}
    for i in range(5):
        ctx.log_metrics({"m": float(i)}, step=i)
    Path(d, "half").touch()
    _wait(Path(d, "go"))  # the test stops the tracking server meanwhile
    for i in range(5, 10):
        ctx.log_metrics({"m": float(i)}, step=i)
    if Path(d, "hang-talk").exists():
        time.sleep(600)
    return {"logged": 10}

def later(ctx, d):
    if Path(d, "resumed").exists():
        return {}
    ctx.log_metrics({"x": 1.0}, step=0)
    ctx.log_metrics({"x": 2.0}, step=1)
    Path(d, "started").touch()
    time.sleep(600)
'''


class Outage:
    """A TCP relay in front of a running MLflow server that can refuse connections at will: an
    outage of the tracking server as clients see it (connections refused, open ones cut),
    without the minute a server restart takes on a busy machine."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._conns: list[socket.socket] = []
        self._lsock: socket.socket | None = None
        self.up()

    def up(self) -> None:
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", self.port))
        lsock.listen(64)
        self._lsock = lsock
        threading.Thread(target=self._accept, args=(lsock,), daemon=True).start()

    def down(self) -> None:
        lsock, self._lsock = self._lsock, None
        if lsock is not None:
            with contextlib.suppress(OSError):
                lsock.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the relay's thread
            lsock.close()
        for c in list(self._conns):
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self._conns.clear()

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                client, _ = lsock.accept()
            except OSError:
                return
            if self._lsock is not lsock:  # accepted as the outage began: refuse it
                client.close()
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def outage(server):
    """The module's MLflow server behind a relay."""
    relay = Outage(server.port)
    yield relay
    relay.down()


def _outage_pipeline(tmp_path: Path, url: str) -> Path:
    (tmp_path / "ofuncs.py").write_text(OUTAGE_FUNCS)
    path = tmp_path / "outage.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: outage-{tmp_path.name.replace("_", "-").lower()}
        storage: {tmp_path / 'store'}
        tracking: {{uri: "{url}"}}
        defaults: {{retries: 0}}
        stages:
          talk: {{kind: python, config: {{entrypoint: "ofuncs:talk", untracked: [params.d], params: {{d: "{tmp_path}"}}}}}}
          later: {{kind: python, needs: [talk], config: {{entrypoint: "ofuncs:later", untracked: [params.d], params: {{d: "{tmp_path}"}}}}}}
    """))
    return path


def _driver(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / f"driver-{args[0]}.log"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args, "--plain"], env=env, cwd=tmp_path,
                            stdout=open(out, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, out


def _until(cond, what: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0):
    deadline = time.time() + timeout
    while not (value := cond()):
        assert proc.poll() is None, f"driver exited while waiting for {what}: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}: {log.read_text()[-3000:]}"
        time.sleep(0.1)
    return value


def _run_id(log: Path) -> str | None:
    import re

    m = re.search(r"MLflow run id: (\w+)", log.read_text())
    return m[1] if m else None


def _spooled(tmp_path: Path, run_id: str, needle: str) -> bool:
    spool = tmp_path / "store" / "_runs" / run_id / "spool" / "writes.jsonl"
    return spool.exists() and needle in spool.read_text()


def _run_into_outage(tmp_path: Path, outage: Outage) -> tuple[subprocess.Popen, Path, str]:
    """A driver whose first stage logged half its metrics when the tracking server goes down."""
    driver, log = _driver(tmp_path, "run", str(_outage_pipeline(tmp_path, outage.url)))
    try:
        _until(lambda: (tmp_path / "half").exists(), "the first stage", driver, log)
        run_id = _until(lambda: _run_id(log), "the run id", driver, log)
    except BaseException:
        os.killpg(driver.pid, signal.SIGKILL)
        raise
    outage.down()
    (tmp_path / "go").touch()
    return driver, log, run_id


def _resume_and_count(tmp_path: Path, server: "Outage", run_id: str, *, cli: bool) -> dict:
    server.up()
    (tmp_path / "resumed").touch()
    if cli:  # as a user types it
        out = subprocess.run([sys.executable, "-m", "orchestrator", "resume", run_id, "--tracking-uri", server.url,
                              "--plain"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    else:  # in this process, on the session's Ray: one Ray start-up fewer
        runs.resume_run(run_id, server.url, stream=io.StringIO(), live=False)
    rec = runs.load_record(run_id, server.url)
    assert rec.state == RunState.SUCCEEDED
    client = MlflowClient(server.url)
    counts = {}
    for stage, key in (("talk", "m"), ("later", "x")):
        rid = rec.stages[stage].child_run_id
        assert not rid.startswith("pending-"), "placeholders give way to the real run ids"
        counts[stage] = sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
    return counts


@pytest.mark.slow
def test_outage_then_ctrl_c_exits_in_seconds_and_resume_sends_every_metric(outage, tmp_path):
    """The server goes down mid-run: the next stage's MLflow run cannot be created, yet the stage
    starts (creating runs never holds up scheduling); Ctrl-C then exits within seconds with the
    state saved, and `resume`, the server back, sends every metric logged before."""
    driver, log, run_id = _run_into_outage(tmp_path, outage)
    try:
        _until(lambda: (tmp_path / "started").exists(), "`later` to start while the server is down", driver, log, 120)
        _until(lambda: _spooled(tmp_path, run_id, '"x",2.0'), "later's metrics spooled", driver, log, 60)
        t0 = time.monotonic()
        driver.send_signal(signal.SIGINT)
        driver.wait(60)
        elapsed = time.monotonic() - t0
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert elapsed < 20, f"Ctrl-C took {elapsed:.1f}s: {log.read_text()[-2000:]}"
    state = json.loads((tmp_path / "store" / "_runs" / run_id / "state.json").read_text())
    assert state["state"] == "CANCELLED" and state["stages"]["later"]["state"] == "CANCELLED"

    counts = _resume_and_count(tmp_path, outage, run_id, cli=True)
    assert counts["talk"] == [(i, float(i)) for i in range(10)]  # each exactly once
    assert counts["later"] == [(0, 1.0), (1, 2.0)]


@pytest.mark.slow
def test_sigkilled_driver_with_metrics_queued_loses_none_after_resume(ray_session, outage, tmp_path):
    (tmp_path / "hang-talk").touch()
    driver, log, run_id = _run_into_outage(tmp_path, outage)
    try:
        _until(lambda: _spooled(tmp_path, run_id, '"m",9.0'), "the last metrics spooled", driver, log, 60)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and its Ray, metrics still queued
        driver.wait(30)
    (tmp_path / "hang-talk").unlink()
    counts = _resume_and_count(tmp_path, outage, run_id, cli=False)
    assert counts["talk"] == [(i, float(i)) for i in range(10)]
