"""The lifecycle as a newcomer meets it: pipelines/quickstart.yaml (shrunk with --set overrides
so it fits the test budget) runs every stage, serves the aligned model to an OpenAI client, shows
up in MLflow (runs, curves, DAG picture, registry aliases, dataset lineage), and a second run
is all cache hits until serve. Then the MLflow UI is opened in headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from orchestrator import runs
from orchestrator.state import RunState, StageState

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO / "test-artifacts"))

TINY = [
    "ray.num_cpus=null",
    "stages.tokenize.config.max_bytes=300000",
    "stages.tokenize.config.tokenizer.vocab_size=512",
    "stages.tokenize.config.shard_size_bytes=150000",
    "stages.tokenize.config.val_fraction=0.25",
    "stages.pretrain.config.model=tiny",
    "stages.pretrain.config.batch_size=16",
    "stages.pretrain.config.max_steps=12",
    "stages.pretrain.config.eval_every=6",
    "stages.pretrain.config.checkpoint_every=6",
    "stages.finetune.config.max_records=120",
    "stages.finetune.config.max_steps=6",
    "stages.reward.config.max_records=120",
    "stages.reward.config.max_steps=6",
    "stages.rlhf.config.iterations=2",
    "stages.rlhf.config.prompts_per_iteration=4",
    "stages.rlhf.config.samples_per_prompt=2",
    "stages.rlhf.config.max_tokens=8",
    "stages.rlhf.config.eval_prompts=4",
    "stages.rlhf.config.prompts.limit=24",
    "stages.evaluate.config.max_documents=8",
    "stages.evaluate.config.prompts.limit=4",
    "stages.evaluate.config.samples_per_prompt=1",
    "stages.evaluate.config.max_tokens=8",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def quickstart(ray_session, tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    shutil.copy(REPO / "pipelines" / "quickstart.yaml", work / "quickstart.yaml")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    port = _free_port()
    overrides = TINY + [f"storage={work / 'artifacts'}", f"tracking.uri={uri}", f"stages.serve.config.port={port}"]
    prep = runs.prepare(work / "quickstart.yaml", overrides)
    first = runs.start_run(prep, stream=io.StringIO(), live=False)
    second = runs.start_run(runs.prepare(work / "quickstart.yaml", overrides), stream=io.StringIO(), live=False)
    yield {"first": first, "second": second, "uri": uri, "port": port, "work": work}
    from workers.kinds import serve as serving

    serving.shutdown()


def test_every_stage_runs_and_reward_trains_alongside_finetune(quickstart):
    rec = quickstart["first"]
    assert rec.state == RunState.SUCCEEDED, {n: (s.state, s.error) for n, s in rec.stages.items()}
    assert all(s.state == StageState.SUCCEEDED for s in rec.stages.values())
    ft, rw = rec.stages["finetune"].history[-1], rec.stages["reward"].history[-1]
    assert ft["started"] < rw["ended"] and rw["started"] < ft["ended"], "independent branches must overlap"
    ev = rec.stages["evaluate"].outputs
    assert 0.0 <= ev["win_rate"] <= 1.0 and ev["perplexity"] > 1.0
    # the honest verdict: independent checks for all three models, and the judge named
    for prefix in ("", "baseline_", "pretrain_"):
        assert 0.0 <= ev[f"{prefix}check_python_syntax"] <= 1.0 and 0.0 <= ev[f"{prefix}check_degeneracy"] <= 1.0
    assert ev["win_rate_judge"] == "the reward the model was trained against"
    assert list(ev["comparison"]) == ["pretrain", "finetune (baseline)", "rlhf (evaluated)"]


def test_second_run_is_all_cache_hits_until_serve(quickstart):
    rec = quickstart["second"]
    states = {n: s.state for n, s in rec.stages.items()}
    assert states.pop("serve") == StageState.SUCCEEDED
    assert set(states.values()) == {StageState.CACHED}


def test_aligned_model_answers_openai_requests(quickstart):
    from openai import OpenAI

    endpoint = quickstart["second"].stages["serve"].outputs["endpoint"]
    assert endpoint.startswith("http://127.0.0.1:")
    client = OpenAI(base_url=f"{endpoint}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["quickstart"]
    out = client.completions.create(model="quickstart", prompt="def add(a, b):", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model="quickstart", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.role == "assistant"


def test_mlflow_shows_runs_curves_registry_and_lineage(quickstart):
    rec, client = quickstart["first"], MlflowClient(quickstart["uri"])
    parent = client.get_run(rec.run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{rec.run_id}'")
    assert {r.data.tags["stage"] for r in children} == set(rec.stages)
    assert "dag.png" in {a.path for a in client.list_artifacts(rec.run_id)}
    pre = rec.stages["pretrain"].child_run_id
    assert len(client.get_metric_history(pre, "train_loss")) >= 2  # a loss curve, not a point
    assert len(client.get_metric_history(rec.stages["rlhf"].child_run_id, "reward_mean")) >= 2
    for alias, stage in (("pretrained", "pretrain"), ("sft", "finetune"), ("aligned", "rlhf")):
        mv = client.get_model_version_by_alias("quickstart", alias)
        assert mv.run_id == rec.stages[stage].child_run_id
    tok_inputs = client.get_run(rec.stages["tokenize"].child_run_id).inputs.dataset_inputs
    assert [d.dataset.name for d in tok_inputs] == ["corpus"]
    pre_inputs = client.get_run(pre).inputs.dataset_inputs
    assert [d.dataset.name for d in pre_inputs] == ["tokenize-tokens"]


@pytest.fixture(scope="module")
def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, capture_output=True, timeout=900)
        exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("the browser test needs Debian's chromium (apt-get install chromium) and could not install it")
    return exe


def _browse(exe: str, url: str, shot: Path, profile: Path) -> str:
    """Open ``url`` in headless Chromium: save a screenshot to ``shot`` and return the DOM (one
    browser start for both)."""
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=20000",
            "--dump-dom", f"--screenshot={shot}", url]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
    return proc.stdout


def test_mlflow_ui_in_a_browser(quickstart, chromium, tmp_path):
    rec, uri = quickstart["first"], quickstart["uri"]
    port = _free_port()
    # no job-execution workers (a dozen processes importing MLflow): the UI needs none
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                           "--port", str(port), "--workers", "1"], cwd=quickstart["work"],
                          env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        exp = MlflowClient(uri).get_run(rec.run_id).info.experiment_id
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for shot in ("mlflow-runs.png", "mlflow-dag.png"):  # no earlier run's pictures
            (SCREENSHOTS / shot).unlink(missing_ok=True)
        dom = _browse(chromium, f"{base}/#/experiments/{exp}/runs", SCREENSHOTS / "mlflow-runs.png", tmp_path / "p1")
        assert "quickstart" in dom, "the pipeline run is listed"
        dom = _browse(chromium, f"{base}/#/experiments/{exp}/runs/{rec.run_id}/artifacts/dag.png",
                      SCREENSHOTS / "mlflow-dag.png", tmp_path / "p2")
        assert "dag.png" in dom
        for shot in ("mlflow-runs.png", "mlflow-dag.png"):
            assert (SCREENSHOTS / shot).stat().st_size > 10_000
        # the stage runs, nested under the pipeline run, as the UI's own API serves them
        body = httpx.post(f"{base}/ajax-api/2.0/mlflow/runs/search", timeout=30,
                          json={"experiment_ids": [exp], "max_results": 100}).json()
        names = {r["info"]["run_name"] for r in body["runs"]}
        assert set(rec.stages) | {"quickstart"} <= names
        png = httpx.get(f"{base}/get-artifact", params={"path": "dag.png", "run_uuid": rec.run_id}, timeout=30)
        assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        ui.terminate()
        ui.wait(30)
