"""Runs beside runs, resumes after edits, and a live run read from another terminal: real CLI
processes on the session's Ray (``--address``), a real MLflow store, real files."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from orchestrator import runs
from orchestrator.errors import SpecError
from orchestrator.specdiff import diff
from orchestrator import state as st
from orchestrator.state import RunRecord, RunState, StageRecord, StageState
from workers import storage

FUNCS = '''
import json, os, time
from pathlib import Path


def _wait(pred, what, timeout=240.0):
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def meet(ctx, rendezvous):
    """Two runs' attempts of this stage meet, so the runs overlap for certain. The first to
    arrive (the leader) then keeps training, as it were, until the other run has finished the
    stage and cleaned up after it; then its training state must still be its own."""
    scratch = Path(ctx.scratch_uri)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "owner").write_text(ctx.run_id)
    try:
        os.close(os.open(Path(rendezvous, "leader"), os.O_CREAT | os.O_EXCL))
        leader = True
    except FileExistsError:
        leader = False
    Path(rendezvous, ctx.run_id).touch()
    _wait(lambda: len(os.listdir(rendezvous)) >= 3, "the other run never came")
    if leader:  # a run's state is saved after its cleanup
        _wait(lambda: any(json.loads(p.read_text())["stages"]["meet"]["state"] == "SUCCEEDED"
                          for p in Path(ctx.storage, "_runs").glob("*/state.json")), "the other run never finished")
        assert (scratch / "owner").read_text() == ctx.run_id, "another run used this run's scratch"
    for i in range(8):
        (ctx.artifact_dir / f"part-{i:03d}.bin").write_bytes(os.urandom(1 << 20))
    return {"scratch": ctx.scratch_uri, "leader": leader}


def value(ctx, value):
    return {"value": value}


def gated(ctx, value, gate):
    if not Path(gate).exists():
        raise RuntimeError("gate closed")
    return {"value": value + ctx.inputs["first"]["value"]}


def live(ctx, gate):
    ctx.progress(3, 10, "steps", checkpoint=2)
    ctx.log_metrics({"lr": 0.1, "train_loss": 1.25}, step=3)
    _wait(lambda: Path(gate).exists(), "the gate never opened", timeout=300)
    return {}
'''


@pytest.fixture
def project(tmp_path, ray_session, tracking_uri):
    (tmp_path / "safefuncs.py").write_text(FUNCS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def write(name: str, stages: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\nstorage: {tmp_path / 'store'}\ntracking: {{uri: \"{tracking_uri}\"}}\n"
                        "defaults: {retries: 0}\nstages:\n" + textwrap.indent(textwrap.dedent(stages), "  "))
        return path

    def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)

    if str(tmp_path) not in sys.path:
        sys.path.insert(0, str(tmp_path))
    return type("P", (), {"dir": tmp_path, "tracking": tracking_uri, "write": staticmethod(write),
                          "cli": staticmethod(cli), "env": env,
                          "address": ray_session.get_runtime_context().gcs_address})


def _run_id(text: str) -> str:
    return re.search(r"MLflow run id: (\w+)", text)[1]


# -- two runs of one pipeline at once ----------------------------------------------------------

@pytest.mark.slow  # two CLI processes joining Ray: ~60 s on 2 loaded cores
def test_two_runs_of_one_pipeline_at_once_both_publish(project):
    rendezvous = project.dir / "met"
    rendezvous.mkdir()
    path = project.write("twice", f"""
        meet: {{kind: python, config: {{entrypoint: "safefuncs:meet", params: {{rendezvous: "{rendezvous}"}}}}}}
    """)
    cmd = [sys.executable, "-m", "orchestrator", "run", str(path), "--plain", "--address", project.address]
    procs = []
    for _ in range(2):  # started 1 s apart, as a retry beside a resume would be
        procs.append(subprocess.Popen(cmd, cwd=project.dir, env=project.env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        time.sleep(1)
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        finally:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert "[Errno 2]" not in out, out[-3000:]
    records = [runs.load_record(_run_id(out), project.tracking) for out in outs]
    assert len(os.listdir(rendezvous)) == 3  # both ran the stage, side by side (neither was a cache hit)
    assert sorted(r.stages["meet"].outputs["leader"] for r in records) == [False, True]
    published = []
    for rec in records:
        stage = rec.stages["meet"]
        assert rec.state == RunState.SUCCEEDED and stage.state == StageState.SUCCEEDED, stage.error
        uri = stage.history[-1]["output_uri"]
        assert storage.published(uri) is None
        published.append(uri)
        # training scratch is the run's own
        assert stage.outputs["scratch"] == st.scratch_uri(rec.storage, "twice", "meet", stage.fingerprint, rec.run_id)
    assert published[0] != published[1]
    assert records[0].stages["meet"].outputs["scratch"] != records[1].stages["meet"].outputs["scratch"]
    manifests = list((project.dir / "store").rglob(storage.MANIFEST))
    assert sorted(str(m.parent) for m in manifests) == sorted(published)
    for m in manifests:  # every file every manifest lists is there, whole
        listed = json.loads(m.read_text())["files"]
        assert len(listed) == 8
        for rel, meta in listed.items():
            assert storage.sha256_file(m.parent / rel) == meta["sha256"]
    # no staging copy is left behind, and the cache record names a valid publication
    assert not [p for p in (project.dir / "store").rglob("*") if ".incoming-" in p.name or ".old-" in p.name]
    entry = storage.read_json(st.cache_uri(records[0].storage, records[0].stages["meet"].fingerprint))
    assert entry["output_uri"] in published and storage.published(entry["output_uri"]) is None


def test_cleanup_after_a_success_or_a_hit_spares_a_live_runs_folders(project):
    path = project.write("spare", """
        one: {kind: python, config: {entrypoint: "safefuncs:value", params: {value: 1}}}
    """)
    prep = runs.prepare(path)
    root = runs.resolve_storage(prep.pipeline.storage)
    fp = prep.plan["one"].fingerprint
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    def other_run(run_id: str, pid: int) -> tuple[Path, Path]:
        """A run's state as its driver (``pid``) keeps it, mid-publication and mid-training."""
        rec = RunRecord(run_id=run_id, pipeline="spare", state=RunState.RUNNING, raw_spec={}, source=str(path),
                        storage=root, tracking_uri=project.tracking, experiment="spare",
                        stages={"one": StageRecord(name="one", kind="python", fingerprint=fp, state=StageState.RUNNING)},
                        driver={"pid": pid, "host": socket.gethostname(), "since": time.time()})
        rec.save()
        staging = Path(st.output_uri(root, "spare", "one", fp, st.attempt_name(run_id, 1) + ".incoming-0a1b2c3d"))
        scratch = Path(st.scratch_uri(root, "spare", "one", fp, run_id))
        for folder in (staging, scratch):
            folder.mkdir(parents=True)
            (folder / "half.bin").write_bytes(b"x" * 10)
        return staging, scratch

    live = other_run("b" * 32, os.getpid())  # its driver is alive: this process
    dead = other_run("c" * 32, gone.pid)  # its driver was killed
    first = runs.start_run(prep, stream=io.StringIO(), live=False)
    assert first.stages["one"].state == StageState.SUCCEEDED
    assert all(p.is_dir() for p in live), "a success deleted a live run's staging copy or scratch"
    assert not any(p.exists() for p in dead)  # an abandoned run's folders are cleaned up
    assert not Path(st.scratch_uri(root, "spare", "one", fp, first.run_id)).exists()  # its own scratch too

    shutil.rmtree(live[1])
    live = other_run("d" * 32, os.getpid())
    hit = runs.start_run(runs.prepare(path), stream=io.StringIO(), live=False)
    assert hit.stages["one"].state == StageState.CACHED
    assert all(p.is_dir() for p in live), "a cache hit deleted a live run's staging copy or scratch"


# -- resume after the pipeline file changed ----------------------------------------------------

@pytest.mark.slow  # two failed runs, two refusals and two resumes, one of them a CLI process on Ray
def test_resume_after_an_edit_names_the_keys_and_runs_the_spec_the_flag_names(project):
    gate = project.dir / "gate"
    stages = f"""
        first: {{kind: python, config: {{entrypoint: "safefuncs:value", params: {{value: 1}}}}}}
        second: {{kind: python, needs: [first], config: {{entrypoint: "safefuncs:gated", params: {{value: 10, gate: "{gate}"}}}}}}
    """
    path = project.write("edited", stages)
    failed = [runs.start_run(runs.prepare(path), stream=io.StringIO(), live=False) for _ in range(2)]
    assert [r.state for r in failed] == [RunState.FAILED] * 2
    assert failed[0].stages["first"].outputs == {"value": 1}

    original = path.read_text()
    path.rename(project.dir / "moved.yaml")  # the file gone: said, and --spec recorded still works
    out = project.cli("resume", failed[0].run_id, "--tracking-uri", project.tracking)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"its pipeline file {path} is gone" in out.stderr and "--spec recorded" in out.stderr

    path.write_text(original.replace("value: 10", "value: 20").replace("value: 1}", "value: 5}")
                    .replace('name: edited', 'name: edited\ndescription: "x"'))
    gate.touch()
    t0 = time.perf_counter()
    out = project.cli("resume", failed[0].run_id, "--tracking-uri", project.tracking)
    refused_s = time.perf_counter() - t0
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [ln.strip() for ln in out.stderr.splitlines()]
    assert lines[1:4] == ["stages.first.config.params.value: 1 -> 5", "stages.second.config.params.value: 10 -> 20",
                          'description: (absent) -> "x"'], out.stderr
    assert "--spec recorded" in lines[4] and "--spec current" in lines[4]
    assert runs.load_record(failed[0].run_id, project.tracking).state == RunState.FAILED  # nothing ran

    stream = io.StringIO()
    rec = runs.resume_run(failed[0].run_id, project.tracking, spec="recorded", stream=stream, live=False)
    assert rec.state == RunState.SUCCEEDED
    assert rec.stages["second"].outputs == {"value": 11}  # 10 + 1: the recorded spec
    assert rec.stages["first"].outputs == {"value": 1} and "changed since it ran" not in stream.getvalue()
    assert "stages.second.config.params.value: 10 -> 20" in stream.getvalue()

    edited = path.read_text()
    path.write_text(edited.replace("/store", "/elsewhere"))
    with pytest.raises(SpecError, match=r"storage changed in .*start a new run"):
        runs.resume_run(failed[1].run_id, project.tracking, spec="current", stream=io.StringIO(), live=False)
    path.write_text(edited)
    out = project.cli("resume", failed[1].run_id, "--spec", "current", "--plain", "--address", project.address,
                      "--tracking-uri", project.tracking)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming with the current file" in out.stdout
    changed = next(ln for ln in out.stdout.splitlines() if ln.startswith("stage first: changed since it ran ("))
    assert "params.value" in changed and changed.endswith("running it again"), changed
    rec = runs.load_record(failed[1].run_id, project.tracking)
    assert rec.state == RunState.SUCCEEDED
    assert rec.stages["first"].outputs == {"value": 5} and rec.stages["second"].outputs == {"value": 25}
    assert rec.raw_spec["description"] == "x"
    print(f"resume refused in {refused_s:.2f}s")


def test_spec_diff_names_yaml_paths_and_hides_secrets():
    old = {"name": "p", "stages": {"tok": {"config": {"tokenizer": "a.json", "hf_token": "hf_abcdefghijklmnop",
                                                      "corpus": ["x", "y"]}}},
           "tracking": {"uri": "http://u:pw@host"}}
    new = {"name": "p", "stages": {"tok": {"config": {"tokenizer": "b.json", "hf_token": "hf_zyxwvutsrqponmlk",
                                                      "corpus": ["x", "z"], "key": "sk-abcdefghijklmnopqrs"}}},
           "tracking": {"uri": "http://u:pw2@host"}, "description": "d"}
    assert diff(old, new) == [
        'stages.tok.config.tokenizer: "a.json" -> "b.json"',
        "stages.tok.config.hf_token: *** -> ***",
        'stages.tok.config.corpus[1]: "y" -> "z"',
        'stages.tok.config.key: (absent) -> "***"',
        'tracking.uri: "http://***@host" -> "http://***@host"',
        'description: (absent) -> "d"',
    ]
    assert diff(old, old) == []


# -- a live run, read from another terminal ----------------------------------------------------

def test_status_of_a_live_run_shows_its_progress(project):
    gate = project.dir / "gate"
    path = project.write("watched", f"""
        work: {{kind: python, config: {{entrypoint: "safefuncs:live", params: {{gate: "{gate}"}}}}}}
    """)
    prep = runs.prepare(path)
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("rec", runs.start_run(prep, stream=io.StringIO(), live=False)))
    t.start()
    try:
        state = Path(runs.resolve_storage(prep.pipeline.storage)) / "_runs"
        deadline = time.time() + 120
        while not (recs := [RunRecord.load(str(p)) for p in state.glob("*/state.json")]) or \
                not (recs[0].stages["work"].progress or {}).get("checkpoint"):
            assert time.time() < deadline, "the progress never reached the run state"
            time.sleep(0.2)
        run_id = recs[0].run_id
        t0 = time.perf_counter()
        out = project.cli("status", run_id, "--tracking-uri", project.tracking)
        took = time.perf_counter() - t0
        assert out.returncode == 0, out.stderr
        row = next(ln for ln in out.stdout.splitlines() if "work" in ln and "RUNNING" in ln)
        assert "3/10 steps (30%), train_loss 1.25, checkpoint @ 2" in row, out.stdout
        print(f"`orchestrator status` of a live run answered in {took:.2f}s")
        latest = project.cli("status", "--tracking-uri", project.tracking)  # no RUN_ID: the latest run
        assert latest.returncode == 0 and f"run {run_id}" in latest.stdout, latest.stdout + latest.stderr
    finally:
        gate.touch()
        t.join(120)
    assert result["rec"].state == RunState.SUCCEEDED
