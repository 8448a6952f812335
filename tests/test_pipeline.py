"""The executor on a real local Ray with a real MLflow store: overlap, retries, timeouts,
cancel, resume after SIGKILL, caching, and the MLflow run tree."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import still_alive
from mlflow.tracking import MlflowClient

from orchestrator import runs
from orchestrator.state import RunRecord, RunState, StageState

FUNCS = '''
import json, os, time
from pathlib import Path

def _log(ctx, marker_dir):
    # every execution of stage code leaves a line: proves (or disproves) that code ran
    with open(Path(marker_dir) / "calls.log", "a") as f:
        f.write(ctx.stage + "\\n")

def work(ctx, marker_dir, sleep=0.0, value=1, meet=None):
    _log(ctx, marker_dir)
    start = time.time()
    time.sleep(sleep)
    if meet:  # rendezvous: finish only once the peer stage has started too (fails if run one after the other)
        Path(marker_dir, ctx.stage + ".started").touch()
        deadline = time.time() + 120
        while not Path(marker_dir, meet + ".started").exists():
            if time.time() > deadline:
                raise TimeoutError(f"stage {meet} never ran alongside {ctx.stage}")
            time.sleep(0.05)
    ctx.log_metrics({"value": value}, step=0)
    ctx.log_metrics({"value": value + 1}, step=1)
    (ctx.artifact_dir / "out.txt").write_text(str(value))
    return {"value": value, "start": start, "end": time.time(),
            "upstream": sorted(ctx.inputs), "file": f"{ctx.output_uri}/out.txt"}

def flaky(ctx, marker_dir, fail_times=1):
    _log(ctx, marker_dir)
    if ctx.attempt <= fail_times:
        raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}

def hang(ctx, marker_dir, pid_file=None):
    _log(ctx, marker_dir)
    if pid_file:
        Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)
    return {}

def boom(ctx, marker_dir):
    _log(ctx, marker_dir)
    raise ValueError("this stage always fails")

def not_json(ctx, marker_dir):
    return {"obj": object()}
'''


@pytest.fixture
def workspace(tmp_path, ray_session, tracking_uri):
    (tmp_path / "pfuncs.py").write_text(FUNCS)
    (tmp_path / "markers").mkdir()

    def write(name: str, stages: str, defaults: str = "retries: 0\n  retry_backoff_s: 0.1") -> str:
        text = (f"name: {name}\nstorage: {tmp_path / 'artifacts'}\ntracking: {{uri: \"{tracking_uri}\"}}\n"
                f"defaults:\n  {defaults}\nstages:\n") + textwrap.indent(textwrap.dedent(stages), "  ")
        path = tmp_path / f"{name}.yaml"
        # the markers folder is a side channel the stages write to, not an input of theirs
        text = text.replace("params: {marker_dir: MARK", "untracked: [params.marker_dir], params: {marker_dir: MARK")
        path.write_text(text.replace("MARK", str(tmp_path / "markers")))
        return str(path)

    def calls() -> list[str]:
        f = tmp_path / "markers" / "calls.log"
        return f.read_text().split() if f.exists() else []

    return type("W", (), {"write": staticmethod(write), "calls": staticmethod(calls), "path": tmp_path,
                          "tracking_uri": tracking_uri})


def run(path: str, *overrides: str, no_cache: bool = False) -> RunRecord:
    return runs.start_run(runs.prepare(path, list(overrides)), no_cache=no_cache, stream=io.StringIO(), live=False)


DIAMOND = """
a: {kind: python, config: {entrypoint: "pfuncs:work", params: {marker_dir: MARK, value: 1}}}
b: {kind: python, needs: [a], config: {entrypoint: "pfuncs:work", params: {marker_dir: MARK, sleep: 0.5, value: 2, meet: c}}}
c: {kind: python, needs: [a], config: {entrypoint: "pfuncs:work", params: {marker_dir: MARK, sleep: 0.5, value: 3, meet: b}}}
d: {kind: python, needs: [b, c], config: {entrypoint: "pfuncs:work", params: {marker_dir: MARK, value: 4}}}
"""


def test_diamond_runs_middle_in_parallel_then_all_cache_hits(workspace):
    path = workspace.write("diamond", DIAMOND)
    rec = run(path)
    assert rec.state == RunState.SUCCEEDED
    out = {n: s.outputs for n, s in rec.stages.items()}
    # b and c overlapped in time: each started before the other ended
    assert out["b"]["start"] < out["c"]["end"] and out["c"]["start"] < out["b"]["end"]
    assert out["d"]["start"] >= max(out["b"]["end"], out["c"]["end"])
    assert out["d"]["upstream"] == ["b", "c"]
    assert Path(out["a"]["file"]).read_text() == "1"
    assert sorted(workspace.calls()) == ["a", "b", "c", "d"]

    # MLflow run tree, through the client
    client = MlflowClient(workspace.tracking_uri)
    parent = client.get_run(rec.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["orchestrator.role"] == "pipeline"
    arts = {a.path for a in client.list_artifacts(rec.run_id)}
    assert "dag.png" in arts and "spec" in arts
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{rec.run_id}'")
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert set(by_stage) == {"a", "b", "c", "d"}
    b = by_stage["b"]
    assert b.data.tags["state"] == "SUCCEEDED" and b.data.tags["kind"] == "python"
    assert b.data.tags["fingerprint"] == rec.stages["b"].fingerprint and b.data.tags["cache_hit"] == "false"
    assert b.data.params["config.params.sleep"] == "0.5"
    assert [m.value for m in client.get_metric_history(b.info.run_id, "value")] == [2.0, 3.0]

    # unchanged second run: every stage a cache hit, no stage code executed
    rec2 = run(path)
    assert rec2.state == RunState.SUCCEEDED
    assert all(s.state == StageState.CACHED for s in rec2.stages.values())
    assert sorted(workspace.calls()) == ["a", "b", "c", "d"]
    assert rec2.stages["b"].outputs == rec.stages["b"].outputs
    child = client.get_run(rec2.stages["b"].child_run_id)
    assert child.data.tags["cache_hit"] == "true" and child.data.tags["cache_source_run"] == rec.run_id

    # changing one stage's config reruns it and what is downstream only
    for f in workspace.path.glob("markers/*.started"):
        f.unlink()
    rec3 = run(path, "stages.c.config.params.value=30", "stages.c.config.params.meet=null")
    assert {n: s.state for n, s in rec3.stages.items()} == {
        "a": StageState.CACHED, "b": StageState.CACHED, "c": StageState.SUCCEEDED, "d": StageState.SUCCEEDED}
    assert sorted(workspace.calls()) == ["a", "b", "c", "c", "d", "d"]

    # --no-cache forces everything
    rec4 = run(path, "stages.b.config.params.meet=null", "stages.c.config.params.meet=null", no_cache=True)
    assert all(s.state == StageState.SUCCEEDED for s in rec4.stages.values())
    assert len(workspace.calls()) == 10


def test_flaky_stage_passes_on_retry_and_failure_skips_downstream(workspace):
    path = workspace.write("flaky", """
        flaky: {kind: python, retries: 2, config: {entrypoint: "pfuncs:flaky", params: {marker_dir: MARK, fail_times: 1}}}
        bad: {kind: python, retries: 1, config: {entrypoint: "pfuncs:boom", params: {marker_dir: MARK}}}
        after_bad: {kind: python, needs: [bad], config: {entrypoint: "pfuncs:work", params: {marker_dir: MARK}}}
        after_flaky: {kind: python, needs: [flaky], config: {entrypoint: "pfuncs:work", params: {marker_dir: MARK}}}
    """)
    rec = run(path)
    assert rec.state == RunState.FAILED
    s = rec.stages
    assert s["flaky"].state == StageState.SUCCEEDED and s["flaky"].attempts == 2 and s["flaky"].outputs == {"attempt": 2}
    assert s["bad"].state == StageState.FAILED and s["bad"].attempts == 2
    assert "this stage always fails" in s["bad"].error and "ValueError" in s["bad"].traceback
    assert s["after_bad"].state == StageState.SKIPPED
    assert s["after_flaky"].state == StageState.SUCCEEDED  # the others go on
    assert workspace.calls().count("bad") == 2 and "after_bad" not in workspace.calls()
    client = MlflowClient(workspace.tracking_uri)
    bad = client.get_run(s["bad"].child_run_id)
    assert bad.info.status == "FAILED" and "always fails" in bad.data.tags["error"] and bad.data.tags["attempts"] == "2"
    assert "error" in {a.path for a in client.list_artifacts(bad.info.run_id)}
    # the run's exit code is 1 for a failed stage
    assert runs.exit_code(rec) == 1


def test_hanging_stage_is_stopped_by_its_timeout(workspace):
    pid_file = workspace.path / "hang.pid"
    path = workspace.write("hang", f"""
        hang: {{kind: python, timeout_s: 6, retries: 0, config: {{entrypoint: "pfuncs:hang", params: {{marker_dir: MARK, pid_file: "{pid_file}"}}}}}}
    """)
    rec = run(path)
    assert rec.state == RunState.FAILED
    assert "timed out after 6s" in rec.stages["hang"].error
    pid = int(pid_file.read_text())
    assert not still_alive(pid), "the timed-out stage's process must be killed"


def test_non_json_outputs_fail_clearly_without_retry(workspace):
    path = workspace.write("nojson", """
        x: {kind: python, retries: 3, config: {entrypoint: "pfuncs:not_json", params: {marker_dir: MARK}}}
    """)
    rec = run(path)
    assert rec.stages["x"].state == StageState.FAILED and rec.stages["x"].attempts == 1
    assert "output 'obj' is not JSON-serialisable" in rec.stages["x"].error


def _wait_for(pred, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (v := pred()):
            return v
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_cancel_from_another_terminal_kills_running_stage(workspace):
    pid_file = workspace.path / "cancel.pid"
    path = workspace.write("cancelme", f"""
        hang: {{kind: python, config: {{entrypoint: "pfuncs:hang", params: {{marker_dir: MARK, pid_file: "{pid_file}"}}}}}}
        later: {{kind: python, needs: [hang], config: {{entrypoint: "pfuncs:work", params: {{marker_dir: MARK}}}}}}
    """)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rec", run(path)))
    t.start()
    pid = int(_wait_for(lambda: pid_file.exists() and pid_file.read_text()))
    run_id = runs.list_runs(workspace.tracking_uri, 1)[0]["run_id"]
    # `orchestrator cancel RUN_ID`, as another terminal would run it
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "cancel", run_id, "--tracking-uri", workspace.tracking_uri],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "CANCELLED" in proc.stdout
    t.join(60)
    rec = result["rec"]
    assert rec.state == RunState.CANCELLED
    assert rec.stages["hang"].state == StageState.CANCELLED and rec.stages["later"].state == StageState.CANCELLED
    assert not still_alive(pid)
    assert MlflowClient(workspace.tracking_uri).get_run(run_id).info.status == "KILLED"


def test_resume_after_driver_sigkill(workspace):
    gate = workspace.path / "gate"
    path = workspace.write("resumable", f"""
        first: {{kind: python, config: {{entrypoint: "pfuncs:work", params: {{marker_dir: MARK, value: 1}}}}}}
        second: {{kind: python, needs: [first], config: {{entrypoint: "pfuncs:hang", params: {{marker_dir: MARK, pid_file: "{gate}"}}}}}}
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(workspace.path), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", path, "--plain"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: gate.exists(), timeout=180)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started die at once
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    run_id = runs.list_runs(workspace.tracking_uri, 1)[0]["run_id"]
    killed = runs.load_record(run_id, workspace.tracking_uri)
    assert killed.state == RunState.RUNNING and killed.stages["first"].state == StageState.SUCCEEDED
    assert killed.stages["second"].state == StageState.RUNNING

    # the stage now finishes quickly: point it at `work` through the recorded spec
    killed.raw_spec["stages"]["second"]["config"] = {"entrypoint": "pfuncs:work", "untracked": ["params.marker_dir"],
                                                         "params": {"marker_dir": str(workspace.path / "markers"), "value": 2}}
    killed.save()
    rec = runs.resume_run(run_id, workspace.tracking_uri, spec="recorded", stream=io.StringIO(), live=False)
    assert rec.run_id == run_id and rec.state == RunState.SUCCEEDED
    assert rec.stages["second"].outputs["value"] == 2
    assert workspace.calls().count("first") == 1  # done stages are not rerun
    parent = MlflowClient(workspace.tracking_uri).get_run(run_id)
    assert parent.info.status == "FINISHED"
