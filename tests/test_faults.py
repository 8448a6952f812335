"""Node failures on several raylets on one machine (``ray.cluster_utils.Cluster``): a worker node
dies mid-pretraining (the stage resumes on the surviving node from its latest checkpoint, and
MLflow says what failed and from where it resumed), and a node running tokenizer actors dies
mid-way (its units are redone on live actors; the dataset is byte-identical to a clean run's).

Not covered here: the driver dying (``orchestrator resume``: tests/test_pipeline.py), infeasible
resources (tests/test_cluster.py). Rollout actors (``workers/rl/rollout.py``) raise ``ActorDiedError``
to the ``rlhf`` stage, which fails the attempt; the executor's retry resumes from the latest
iteration checkpoint (an iteration is checkpointed only once complete, so a lost iteration is
redone whole) — that path is the stage-retry one tests/test_rlhf.py exercises with its fault hook.

The module builds its own cluster: a head with no CPU (the driver, the stage runners and the Ray
Train controller ask for none and stay there; a head with a busy CPU lets Ray spread them onto the
victim), a one-CPU survivor and one one-CPU victim node per test; actors holding the CPUs of the
other nodes steer the Train worker onto its victim. The kill waits on events, never on time: the
Train worker stops mid-run (``FaultInjection(hang=True)``, given to the pipeline's pretrain stage
by a worker setup hook) once its checkpoint is registered, and the tokenizer's victim dies once
the first units are done.
The session's local Ray is stopped first and restarted at the end (``conftest.start_local_ray``).
Runs take minutes on a loaded 2-core machine (raylet start-up, two Ray Train worker groups).
"""

from __future__ import annotations

import io
import json
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import moto_s3, start_local_ray

pytestmark = pytest.mark.slow

ENV = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
# The Train worker waits at the start of step PAUSE_AT (the step-CKPT_EVERY checkpoint registered)
# until its node is killed: the run resumes from CKPT_EVERY and redoes the steps after it.
MAX_STEPS, CKPT_EVERY, PAUSE_AT = 30, 10, 15


def pause_pretraining(marker: str):
    """A worker setup hook: the pipeline's ``pretrain`` stage runs with a fault hook that stops
    its rank 0 at step PAUSE_AT, once (``marker``), until the test kills the node under it.
    (The executor never passes a fault hook; the stage's runner resolves kinds through
    ``workers.load_kind``, so the hook wraps that in every worker process of the cluster.)"""

    def setup():
        import functools
        import types

        import workers

        load = workers.load_kind

        def load_kind(kind):
            module = load(kind)
            if kind != "pretrain":
                return module
            from workers.training.loop import FaultInjection

            fault = FaultInjection(rank=0, step=PAUSE_AT, marker=marker, hang=True)
            return types.SimpleNamespace(Config=module.Config, run=functools.partial(module.run, fault=fault))

        workers.load_kind = load_kind

    return setup


@pytest.fixture(scope="module")
def s3():
    """A real S3 HTTP endpoint (moto) for the tokenize test: with object-store output, encoder
    actors may run on any node (with local output they are pinned to the runner's node)."""
    with moto_s3("faults") as (env, _client):
        yield env


@pytest.fixture(scope="module")
def pause_marker(tmp_path_factory) -> Path:
    """Written by the paused Train worker (see pause_pretraining)."""
    return tmp_path_factory.mktemp("pause") / "paused"


@pytest.fixture(scope="module")
def cluster(s3, pause_marker):
    """A head with no CPU (so tasks asking for none, like stage runners, stay on it), a one-CPU
    'survivor' and one one-CPU victim node per test, all started up front (raylets start slowly
    on a loaded 2-core machine)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the session's local Ray; restarted below
    c = None
    try:
        for tries_left in (2, 1, 0):
            # Ray gives a raylet 30 s to register; an overloaded machine can miss that. A node that
            # failed to start may still register late, so retry with a whole new cluster (new GCS).
            c = Cluster(initialize_head=False)
            try:
                c.add_node(num_cpus=0, include_dashboard=False)
                nodes = {name: c.add_node(num_cpus=1, resources={name: 1})
                         for name in ("survivor", "victim_train", "victim_tok")}
                break
            except Exception:  # noqa: BLE001 - "The current node timed out during startup"
                c.shutdown()
                if not tries_left:
                    raise
        ray.init(address=c.address, log_to_driver=False,
                 runtime_env={"env_vars": {**ENV, **s3}, "worker_process_setup_hook": pause_pretraining(str(pause_marker))})
        c.wait_for_nodes()
        yield c, nodes
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        start_local_ray()


def hold_cpus(node_ids):
    """One actor holding the CPU of each node: work asking for a CPU goes elsewhere."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    class Blocker:
        def ready(self):
            return ray.get_runtime_context().get_node_id()

    held = [Blocker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in node_ids]
    assert ray.get([b.ready.remote() for b in held], timeout=120) == list(node_ids)
    return held


def wait_for(cond, what: str, timeout: float = 240.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


class Background(threading.Thread):
    """Runs fn() on a thread; join() returns its result or raises its exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            self.error = e

    def join(self, timeout=None):
        super().join(timeout)
        assert not self.is_alive(), f"still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.result


# ----------------------------------------------------------------------------- pretraining


def _write_corpus(folder: Path, files: int = 6, lines: int = 120) -> Path:
    """Small, learnable text (counting sentences): a char tokenizer gives a tiny vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for f in range(files):
        text = "".join(f"{words[(f + i) % 10]} then {words[(f + i + 1) % 10]}.\n" for i in range(lines))
        (folder / f"part-{f}.txt").write_text(text, encoding="utf-8")
    return folder


def registered_checkpoint(store: Path) -> dict | None:
    """The latest checkpoint Ray Train has registered under ``store`` (a folder on storage is not
    enough: a report still in flight when the worker dies is lost)."""
    try:
        for snap in store.rglob("checkpoint_manager_snapshot.json"):
            if latest := json.loads(snap.read_text()).get("latest_checkpoint_result"):
                return latest
    except (OSError, ValueError):
        pass  # being written or rotated: look again
    return None


def test_worker_node_dies_mid_pretraining_and_training_resumes_on_the_survivor(cluster, pause_marker, tmp_path,
                                                                                tracking_uri):
    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator import runs
    from orchestrator.state import RunState, StageState

    c, nodes = cluster
    victim = nodes["victim_train"]
    # Hold every other CPU so the Train worker can only start on the victim; freed before the kill.
    held = hold_cpus([nodes["survivor"].node_id, nodes["victim_tok"].node_id])

    corpus = _write_corpus(tmp_path / "corpus")
    store = tmp_path / "store"
    path = tmp_path / "nodefail.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: nodefail
        storage: {store}
        tracking: {{uri: "{tracking_uri}"}}
        stages:
          tok:
            kind: tokenize
            resources: {{cpus: 0, workers: 1}}
            config: {{source: "{corpus}/*.txt", tokenizer: {{type: char}}, val_fraction: 0.2, seed: 3}}
          pretrain:
            kind: pretrain
            needs: [tok]
            retries: 0
            resources: {{cpus: 1, workers: 1}}
            config:
              model: {{n_layer: 2, n_head: 2, n_embd: 32, block_size: 32, dropout: 0.0}}
              batch_size: 8
              max_steps: {MAX_STEPS}
              checkpoint_every: {CKPT_EVERY}
              eval_every: {MAX_STEPS}
              eval_steps: 1
              warmup_steps: 5
              lr: 0.01
              min_lr: 0.001
              weight_decay: 0.0
              max_failures: 2
    """))
    prep = runs.prepare(path)
    t0 = time.monotonic()
    bg = Background(lambda: runs.start_run(prep, stream=io.StringIO(), live=False))
    try:
        # The worker waits at step PAUSE_AT for as long as its node lives: the kill lands mid-run.
        wait_for(lambda: pause_marker.exists() or bg.error or (not bg.is_alive() and "ended"),
                 f"the Train worker to pause at step {PAUSE_AT}", timeout=300)
    finally:
        for b in held:  # the surviving nodes' CPUs are free for the restarted worker group
            ray.kill(b)
    assert bg.error is None and pause_marker.exists(), f"the run ended before the pause: {bg.error or bg.result}"
    first = wait_for(lambda: registered_checkpoint(store), "the registered checkpoint on storage", timeout=60)
    assert first["metrics"]["step"] == CKPT_EVERY, first
    c.remove_node(victim)
    killed_after = time.monotonic() - t0
    record = bg.join(timeout=300)
    ended_after = time.monotonic() - t0

    pre = record.stages["pretrain"]
    assert record.state == RunState.SUCCEEDED, (record.state, pre.error)
    assert pre.state == StageState.SUCCEEDED and pre.attempts == 1  # recovered inside Ray Train, no stage retry
    assert pre.outputs["steps"] == MAX_STEPS

    client = MlflowClient(tracking_uri)
    run = client.get_run(pre.child_run_id)
    steps = [m.step for m in sorted(client.get_metric_history(pre.child_run_id, "train_loss"),
                                    key=lambda m: (m.timestamp, m.step))]
    # (the logged steps say whether the worker group restarted, should the failure's tags be missing)
    if "train.failures" not in run.data.tags:
        from ray._private.state import actors  # the GCS's table: no dashboard in this cluster
        buses = [(a["Address"]["NodeID"], a["State"]) for a in actors().values() if "EventBus" in a["ActorClassName"]]
        raise AssertionError(f"no worker failure recorded; steps {steps}; tags: {run.data.tags}; event buses (node, state) "
                             f"{buses}; nodes {[(k, v.node_id) for k, v in nodes.items()]}; driver {ray.get_runtime_context().get_node_id()}")
    resumed = int(run.data.tags["resumed_from_step"])
    assert resumed == CKPT_EVERY, (resumed, first)
    assert int(run.data.tags["train.failures"]) >= 1
    assert "rank 0" in run.data.tags["train.last_failure"], run.data.tags["train.last_failure"]
    assert run.data.tags["attempts"] == "1" and run.data.tags["state"] == "SUCCEEDED"
    # Training continued from the checkpoint, not from 0: after the restart the logged steps
    # start right after it and run to the end.
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart:] == list(range(resumed + 1, MAX_STEPS + 1)), (resumed, steps[restart - 3:restart + 3])
    assert steps[:restart] == list(range(1, PAUSE_AT + 1)), steps[:restart]
    print(f"victim removed {killed_after:.1f}s into the run, paused at step {PAUSE_AT}; resumed from step {resumed}; "
          f"the run ended at {ended_after:.1f}s")


# ----------------------------------------------------------------------------- tokenizing


def _tokenize(tmp: Path, name: str, source: str, resources):
    from workers.kinds import tokenize as T
    from workers.stage import ListSink, StageContext

    art = tmp / name / "art"
    art.mkdir(parents=True)
    ctx = StageContext(stage=name, run_id="local", attempt=1, inputs={}, artifact_dir=art,
                       output_uri=f"s3://faults/{name}/out", storage="s3://faults", resources=resources,
                       sink=ListSink(), scratch_uri=f"s3://faults/{name}/scratch")
    cfg = T.Config(source=source, tokenizer={"type": "char"}, shard_size_bytes=1024, val_fraction=0.1, seed=5)
    return ctx, lambda: T.run(ctx, cfg)


def test_node_running_tokenizer_actors_dies_and_its_units_are_redone(cluster, tmp_path):
    import numpy as np

    from workers.stage import Resources

    c, nodes = cluster
    victim = nodes["victim_tok"]
    rows = [json.dumps({"text": f"document {i}: " + " ".join(f"w{(i * 7 + k) % 97}" for k in range(40 + i % 30))})
            for i in range(600)]
    (tmp_path / "docs.jsonl").write_text("\n".join(rows) + "\n")
    source = str(tmp_path / "docs.jsonl")
    two = Resources(cpus=1, workers=2)  # one actor per one-CPU node: one of them on the victim
    if nodes["victim_train"] in c.worker_nodes:  # this test run alone: its CPU would take a third actor
        c.remove_node(nodes["victim_train"])

    ctx, go = _tokenize(tmp_path, "clean", source, two)
    clean = go()
    clean_manifest = json.loads((ctx.artifact_dir / "manifest.json").read_text())
    assert ctx.sink.metrics("actor_failures") == [0]
    n_units = clean_manifest["source"]["units"]
    assert n_units >= 40

    ctx, go = _tokenize(tmp_path, "faulty", source, two)
    bg = Background(go)
    wait_for(lambda: any(e["type"] == "progress" and 4 <= e["done"] < n_units // 2 for e in ctx.sink.events)
             or bg.error, "the first units", every=0.02)
    c.remove_node(victim)
    faulty = bg.join(timeout=300)
    manifest = json.loads((ctx.artifact_dir / "manifest.json").read_text())

    assert ctx.sink.metrics("actor_failures") == [1]
    redone = ctx.sink.metrics("units_redone")[0]
    assert 1 <= redone <= 2  # the units queued on the dead actor (its window), no more
    tags = [e["tags"] for e in ctx.sink.events if e["type"] == "tags"]
    assert any("1 encoder actor(s) died" in t.get("tokenize.recovery", "") for t in tags), tags
    # Nothing dropped or duplicated: the same documents, tokens and shard bytes as the clean run.
    assert faulty == {**clean, "dataset": faulty["dataset"], "manifest": faulty["manifest"], "tokenizer": faulty["tokenizer"]}
    for split in ("train", "val"):
        a, b = clean_manifest["splits"][split], manifest["splits"][split]
        assert (a["documents"], a["tokens"]) == (b["documents"], b["tokens"])
        assert [(s["path"], s["sha256"]) for s in a["shards"]] == [(s["path"], s["sha256"]) for s in b["shards"]]
    assert manifest["documents"] == len(rows)
    import pyarrow.parquet as pq

    ids = np.concatenate([pq.read_table(ctx.artifact_dir / s["path"]).column("doc_id").to_numpy()
                          for split in ("train", "val") for s in manifest["splits"][split]["shards"]])
    assert len(ids) == len(set(ids.tolist())) == len(rows)
