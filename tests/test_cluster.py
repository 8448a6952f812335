"""Cluster mode: a real Ray head (started with `ray start --head`, dashboard and Jobs API on
127.0.0.1) takes pipelines through `orchestrator submit`, `logs` and `cancel`; the launcher
config validates against Ray's own schema; a stage asking more than any node has fails at once.

The head is a separate cluster from the session's local Ray: this process never connects to
it (only the CLI subprocesses and the job's driver do)."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import still_alive
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import runs
from orchestrator.state import RunState, StageState

REPO = Path(__file__).resolve().parents[1]

FUNCS = '''
import os, time
from pathlib import Path

def produce(ctx, n):
    for i in range(n):
        ctx.log_metrics({"i": float(i)}, step=i)
    print("produce ran on pid", os.getpid(), flush=True)
    (ctx.artifact_dir / "numbers.txt").write_text(" ".join(str(i) for i in range(n)))
    return {"file": f"{ctx.output_uri}/numbers.txt", "n": n}

def total(ctx):
    text = Path(ctx.inputs["produce"]["file"]).read_text()
    return {"sum": sum(int(x) for x in text.split())}

def hang(ctx, pid_file):
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)
    return {}
'''


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head():
    """A real Ray head with the dashboard (Jobs API) on 127.0.0.1, token auth on."""
    gcs, dash, agent, client_port = _free_ports(4)
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM the head would wait up to 30 s for its
    # node to drain (for Serve proxies; this head serves nothing) before it stops.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log = open(Path(temp) / "ray-start.log", "w")
    proc = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client_port}", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=true", f"--temp-dir={temp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 150
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}: {Path(temp, 'ray-start.log').read_text()[-3000:]}")
            r = subprocess.run([sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient as C; "
                                f"C('{address}').list_jobs()"], env=env, capture_output=True, timeout=60)
            if r.returncode == 0:
                break
            if time.time() > deadline:
                raise RuntimeError(f"the Ray Jobs API at {address} did not come up: {r.stderr.decode()[-2000:]}")
            time.sleep(1)
        yield type("Head", (), {"address": address, "env": env})
    finally:
        # The whole `ray start` process group: the head's processes only, never other Rays here.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def project(tmp_path):
    """A working directory to ship: the funcs module, pipelines, absolute storage and MLflow paths."""
    wd = tmp_path / "proj"
    wd.mkdir()
    (wd / "cfuncs.py").write_text(FUNCS)
    db = tmp_path / "mlflow.db"
    store = tmp_path / "store"

    def write(name: str, stages: str) -> str:
        text = (f"name: {name}\nstorage: {store}\ntracking: {{uri: \"sqlite:///{db}\"}}\n"
                "defaults: {retries: 0}\nstages:\n") + textwrap.indent(textwrap.dedent(stages), "  ")
        (wd / f"{name}.yaml").write_text(text)
        return f"{name}.yaml"

    return type("P", (), {"dir": wd, "write": staticmethod(write), "tracking_uri": f"sqlite:///{db}", "tmp": tmp_path})


def _cli(head, cwd, *args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=head.env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_submit_logs_and_mlflow_run(head, project):
    f = project.write("submitted", """
        produce: {kind: python, config: {entrypoint: "cfuncs:produce", params: {n: 5}}}
        total: {kind: python, needs: [produce], config: {entrypoint: "cfuncs:total"}}
    """)
    (project.dir / "artifacts").mkdir()
    (project.dir / "artifacts" / "big.bin").write_bytes(b"x" * 1024)  # excluded: never shipped
    sub = _cli(head, project.dir, "submit", f, "--address", head.address, "--set", "stages.produce.config.params.n=6")
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = re.search(r"Ray job id: (\S+)", sub.stdout).group(1)
    run_id = re.search(r"MLflow run id: ([0-9a-f]{32})", sub.stdout).group(1)

    logs = _cli(head, project.dir, "logs", job_id, "--address", head.address)
    assert logs.returncode == 0, logs.stdout + logs.stderr
    assert f"job {job_id}: SUCCEEDED" in logs.stdout
    # the job's logs read like the terminal (transitions, summary); the stage's own print is kept
    # per stage and attached to its MLflow run (checked below)
    assert "produce ran on pid" not in logs.stdout and re.search(r"^produce\s+SUCCEEDED", logs.stdout, re.M)
    assert run_id in logs.stdout

    rec = runs.load_record(run_id, project.tracking_uri)
    assert rec.state == RunState.SUCCEEDED
    assert rec.stages["total"].outputs == {"sum": 15}  # the --set override travelled: 0+1+...+5
    client = MlflowClient(project.tracking_uri)
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    child = client.get_run(rec.stages["produce"].child_run_id)
    assert [m.value for m in client.get_metric_history(child.info.run_id, "i")] == [0, 1, 2, 3, 4, 5]
    assert child.data.tags["mlflow.parentRunId"] == run_id
    out = Path(client.download_artifacts(child.info.run_id, "logs/output.log", str(project.tmp))).read_text()
    assert "produce ran on pid" in out

    # --no-follow on a finished job prints what it logged and returns
    again = _cli(head, project.dir, "logs", job_id, "--address", head.address, "--no-follow")
    assert again.returncode == 0 and f"job {job_id}: SUCCEEDED" in again.stdout


@pytest.mark.slow
def test_cancel_stops_the_job_and_the_pipeline(head, project):
    pid_file = project.tmp / "hang.pid"
    f = project.write("hanging", f"""
        hang: {{kind: python, config: {{entrypoint: "cfuncs:hang", params: {{pid_file: "{pid_file}"}}}}}}
        after: {{kind: python, needs: [hang], config: {{entrypoint: "cfuncs:total"}}}}
    """)
    sub = _cli(head, project.dir, "submit", f, "--address", head.address)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = re.search(r"Ray job id: (\S+)", sub.stdout).group(1)
    run_id = re.search(r"MLflow run id: ([0-9a-f]{32})", sub.stdout).group(1)
    deadline = time.time() + 120
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.time() < deadline, "the hanging stage never started"
        time.sleep(0.2)
    pid = int(pid_file.read_text())

    out = _cli(head, project.dir, "cancel", job_id, "--address", head.address)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"job {job_id}: STOPPED" in out.stdout
    assert not still_alive(pid), "the stage's process must be killed"
    # the driver got SIGINT and cancelled the pipeline before exiting
    rec = runs.load_record(run_id, project.tracking_uri)
    assert rec.state == RunState.CANCELLED
    assert rec.stages["hang"].state == StageState.CANCELLED and rec.stages["after"].state == StageState.CANCELLED
    assert MlflowClient(project.tracking_uri).get_run(run_id).info.status == "KILLED"


def test_submit_rejects_bad_input_before_reaching_the_cluster(project, tmp_path):
    f = project.write("badinput", """
        a: {kind: python, config: {entrypoint: "cfuncs:produce", params: {n: 1}}, resources: {cpus: -1}}
    """)
    out = subprocess.run([sys.executable, "-m", "orchestrator", "submit", f, "--address", "http://127.0.0.1:9"],
                         cwd=project.dir, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "stages.a.resources.cpus" in out.stderr
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text((project.dir / f).read_text())
    out = subprocess.run([sys.executable, "-m", "orchestrator", "submit", str(outside), "--address", "http://127.0.0.1:9"],
                         cwd=project.dir, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "must be inside the working directory" in out.stderr


# ---------------------------------------------------------------------------------------------
# The cluster launcher config


def test_cluster_yaml_matches_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpus = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    cpus = {n: t for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")}
    assert len(gpus) >= 2 and cpus, "GPU workers for training and serving, CPU workers for data and ranking"
    for name, t in types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert sum(t["max_workers"] for t in types.values()) <= config["max_workers"]
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "genai-orchestrator" in setup
    # a typo in a field name is caught by the schema (it is strict), so the check above has teeth
    bad = {**config, "max_worker": 3}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# ---------------------------------------------------------------------------------------------
# Resources no node can provide


def test_infeasible_resources_fail_at_once_naming_the_field(ray_session, project):
    f = project.write("infeasible", """
        greedy: {kind: python, config: {entrypoint: "cfuncs:produce", params: {n: 1}}, resources: {gpus: 8}}
        after: {kind: python, needs: [greedy], config: {entrypoint: "cfuncs:total"}}
        fine: {kind: python, config: {entrypoint: "cfuncs:produce", params: {n: 3}}}
    """)
    t0 = time.time()
    rec = runs.start_run(runs.prepare(project.dir / f), stream=io.StringIO(), live=False)
    assert time.time() - t0 < 60
    g = rec.stages["greedy"]
    assert rec.state == RunState.FAILED and g.state == StageState.FAILED and g.attempts == 0
    assert "stages.greedy.resources" in g.error and "8 GPU" in g.error and "no node" in g.error
    assert rec.stages["after"].state == StageState.SKIPPED
    assert rec.stages["fine"].state == StageState.SUCCEEDED  # the rest goes on
    child = MlflowClient(project.tracking_uri).get_run(g.child_run_id)
    assert child.info.status == "FAILED" and "stages.greedy.resources" in child.data.tags["error"]
    assert child.data.tags["state"] == "FAILED"
