"""The `pretrain` kind on real Ray Train: equal loss curves for 1 and 2 workers, loss well below
the data's unigram entropy, a self-contained checkpoint, a retried attempt of a finished run
trains no further step.

Two Ray Train fits (1 worker; 2 workers) are shared by the tests through a module-scoped
fixture: each fit costs seconds of Ray Train startup on 2 cores. A worker killed mid-run and
the resume from its checkpoint: tests/test_resume_exact.py (every training kind).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from workers.kinds import pretrain
from workers.stage import Resources, local_context
from workers.training.loop import TrainingConfig, lr_at
from workers.data.tokens import TokenBatches, TokenDataset, shards_for_rank, unigram_entropy

VOCAB, EOS = 64, 63
MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0}
STEPS, CKPT_EVERY = 60, 20


# ----------------------------------------------------------------------------- helpers


def write_token_dataset(folder: Path, splits: dict[str, list[list[list[int]]]], vocab_size: int = VOCAB,
                        eos_id: int = EOS) -> Path:
    """A token dataset as the tokenize stage writes it; ``splits[name]`` is a list of shards,
    each a list of documents (token id lists)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"vocab_size": vocab_size, "dtype": "uint16", "eos_id": eos_id,
                "tokenizer": {"path": "tokenizer.json"}, "splits": {}}
    for split, shards in splits.items():
        entries, doc_id = [], 0
        for k, docs in enumerate(shards):
            rel = f"{split}/shard-{k:05d}.parquet"
            (folder / split).mkdir(exist_ok=True)
            table = pa.table({"ids": pa.array(docs, type=pa.list_(pa.uint16())),
                              "doc_id": pa.array(range(doc_id, doc_id + len(docs)), type=pa.int64())})
            pq.write_table(table, folder / rel)
            doc_id += len(docs)
            entries.append({"path": rel, "documents": len(docs), "tokens": sum(map(len, docs)), "sha256": ""})
        manifest["splits"][split] = {"documents": doc_id, "tokens": sum(e["tokens"] for e in entries), "shards": entries}
    from tokenizers import Tokenizer, models
    vocab = {f"t{i}": i for i in range(vocab_size)}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def learnable_docs(rng: np.random.Generator, n_docs: int) -> list[list[int]]:
    """Documents following next = (5 * prev + 3) mod 63 from a random start: uniform unigrams
    (~ln 63 nats) but nearly deterministic given the previous token."""
    docs = []
    for _ in range(n_docs):
        t, doc = int(rng.integers(0, 63)), []
        for _ in range(int(rng.integers(60, 140))):
            doc.append(t)
            t = (5 * t + 3) % 63
        docs.append(doc)
    return docs


def make_dataset(folder: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_token_dataset(folder, {
        "train": [learnable_docs(rng, 30) for _ in range(4)],
        "val": [learnable_docs(rng, 10)],
    })


def dataset_inputs(ds: Path) -> dict:
    return {"tok": {"dataset": str(ds), "tokenizer": str(ds / "tokenizer.json"), "vocab_size": VOCAB, "eos_id": EOS}}


class ActorSink:
    """Events from every process (driver, Train workers) into one Ray actor."""

    def __init__(self, handle):
        self.handle = handle

    def emit(self, event):
        import ray
        ray.get(self.handle.emit.remote(event))

    def events(self):
        import ray
        return ray.get(self.handle.events.remote())


def collector_sink(ray):
    # Train workers cannot import this test module: ship ActorSink by value.
    import sys

    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @ray.remote(num_cpus=0)
    class Collector:
        def __init__(self):
            self._events = []

        def emit(self, event):
            self._events.append(event)

        def events(self):
            return self._events

    return ActorSink(Collector.remote())


def metric_steps(events, name):
    """[(step, value)] of metric ``name`` in logging order."""
    return [(e["step"], e["metrics"][name]) for e in events if e["type"] == "metrics" and name in e["metrics"]]


def base_config(**overrides) -> pretrain.Config:
    cfg = dict(model=MODEL, batch_size=4, grad_accum=2, max_steps=STEPS, lr=1e-2, min_lr=1e-3, warmup_steps=5,
               weight_decay=0.0, eval_every=CKPT_EVERY, eval_steps=2, checkpoint_every=CKPT_EVERY, seed=7)
    cfg.update(overrides)
    return pretrain.Config(**cfg)


# ----------------------------------------------------------------------------- no Ray needed


@pytest.mark.parametrize("overrides, match", [
    ({"max_tokens": 1000}, "max_steps / max_tokens: got both"),
    ({"max_steps": None}, "max_steps / max_tokens: got neither"),
    ({"min_lr": 1.0}, r"min_lr: got 1.0; must be <= lr"),
    ({"precision": "fp8"}, "precision"),
    ({"learning_rate": 0.1}, "learning_rate"),
    ({"model": {"n_layers": 2}}, "n_layers"),
])
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ValidationError, match=match):
        base_config(**overrides)


def test_bad_upstream_and_model_are_named(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    ctx = local_context(tmp_path, "pretrain", inputs=dataset_inputs(ds))
    with pytest.raises(ValueError, match=r"data: got 'nope'; neither an upstream"):
        pretrain.build_job(ctx, base_config(data="nope"))
    with pytest.raises(ValueError, match=r"unknown size 'huge'"):
        pretrain.build_job(ctx, base_config(model="huge"))
    none = local_context(tmp_path, "p2", inputs={})
    with pytest.raises(ValueError, match=r"0 upstreams with a `dataset` output"):
        pretrain.build_job(none, base_config())


def test_max_tokens_rounds_up_to_whole_global_batches(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    ctx = local_context(tmp_path, "pretrain", inputs=dataset_inputs(ds), resources=Resources(workers=2))
    job, _ = pretrain.build_job(ctx, base_config(max_steps=None, max_tokens=10_000))
    assert job.tokens_per_step == 4 * 2 * 2 * 32
    assert job.max_steps == math.ceil(10_000 / 512)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainingConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_ranks_split_the_global_batch_and_their_shards(tmp_path):
    ds = TokenDataset.open(str(make_dataset(tmp_path / "ds")))
    assert shards_for_rank(4, 1, 2) == [1, 3] and shards_for_rank(3, 1, 2) == [0, 1, 2]
    one = TokenBatches(ds, block_size=32, batch_size=4, grad_accum=2, rank=0, world=1, seed=3, eval_steps=1)
    two = [TokenBatches(ds, block_size=32, batch_size=4, grad_accum=1, rank=r, world=2, seed=3, eval_steps=1) for r in (0, 1)]
    assert sorted(two[1].train_streams) == [1, 3]
    for step in (0, 5):
        rows_one = np.concatenate([b["idx"].numpy() for b in one.train(step)])
        rows_two = [two[r].train(step)[0]["idx"].numpy() for r in (0, 1)]
        np.testing.assert_array_equal(rows_one[0::2], rows_two[0])
        np.testing.assert_array_equal(rows_one[1::2], rows_two[1])
        b = one.train(step)[0]
        np.testing.assert_array_equal(b["idx"][:, 1:].numpy(), b["targets"][:, :-1].numpy())
    assert not np.array_equal(one.train(0)[0]["idx"].numpy(), one.train(1)[0]["idx"].numpy())
    # EOS ends every document of the stream
    stream = ds.load_stream("train", 0)
    assert (stream == EOS).sum() == 30 and stream[-1] == EOS


# ----------------------------------------------------------------------------- on Ray Train


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """Two fits on the same data, seed and global batch: 1 worker (batch 4 x accum 2), and
    2 workers (batch 4 x accum 1)."""
    ray = ray_session
    tmp = tmp_path_factory.mktemp("pretrain")
    ds = make_dataset(tmp / "ds")
    out = {"dataset": ds}
    for name, workers, accum in (("one", 1, 2), ("two", 2, 1)):
        ctx = local_context(tmp / name, "pretrain", inputs=dataset_inputs(ds), resources=Resources(cpus=1, workers=workers))
        ctx = replace(ctx, sink=collector_sink(ray))
        outputs = pretrain.run(ctx, base_config(grad_accum=accum))
        out[name] = (ctx, outputs, ctx.sink.events())
    return out


@pytest.mark.slow
def test_two_workers_follow_one_worker_loss_curve(runs):
    one = [v for _, v in metric_steps(runs["one"][2], "train_loss")]
    two = [v for _, v in metric_steps(runs["two"][2], "train_loss")]
    np.testing.assert_allclose(two[:5], one[:5], rtol=1e-4)


@pytest.mark.slow
def test_loss_falls_well_below_unigram_entropy(runs):
    entropy = unigram_entropy(TokenDataset.open(str(runs["dataset"])))
    assert entropy > 4.0
    for name in ("one", "two"):
        outputs = runs[name][1]
        assert outputs["final_train_loss"] < 0.4 * entropy, (name, outputs, entropy)
        assert outputs["final_val_loss"] < 0.4 * entropy, (name, outputs, entropy)


@pytest.mark.slow
def test_rank0_logs_training_metrics_and_progress(runs):
    events = runs["one"][2]
    last = [e for e in events if e["type"] == "metrics" and "train_loss" in e["metrics"]][-1]["metrics"]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "val_loss"} <= set(last)
    assert last["tokens_per_s"] > 0 and 0 < last["mfu"] < 1
    # Where a step's wall time goes: its data, its compute, and what the stage adds around them.
    for m in [e["metrics"] for e in events if e["type"] == "metrics" and "train_loss" in e["metrics"]][1:]:
        assert m["data_s"] > 0 and m["compute_s"] > 0 and m["overhead_s"] >= 0
        assert m["data_s"] + m["compute_s"] + m["overhead_s"] == pytest.approx(m["step_time_s"], rel=1e-6)
    # The worker took its CPUs back from Ray's niceness 15 (as root; otherwise it says what it got).
    tags = {k: v for e in events if e["type"] == "tags" for k, v in e["tags"].items()}
    assert tags["train.threads_per_worker"] == "1"
    assert tags["train.niceness"] == ("0" if os.geteuid() == 0 else str(int(tags["train.niceness"])))
    assert len(metric_steps(events, "val_loss")) == STEPS // CKPT_EVERY
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["done"] == STEPS and progress[-1]["total"] == STEPS and progress[-1]["unit"] == "steps"
    # each checkpoint is announced (the run state's "last checkpoint step" for `orchestrator status`)
    assert [e["checkpoint"] for e in progress if e.get("checkpoint") is not None] == [20, 40, 60]


@pytest.mark.slow
def test_final_checkpoint_is_self_contained(runs):
    import torch

    from workers.model.hf import load_pretrained

    ctx, outputs, _ = runs["one"]
    folder = Path(outputs["checkpoint"])
    assert folder == ctx.artifact_dir / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                        "tokenizer_config.json"]
    assert outputs["tokenizer"] == str(folder / "tokenizer.json")
    model = load_pretrained(folder)
    ds = TokenDataset.open(str(runs["dataset"]))
    batch = TokenBatches(ds, block_size=32, batch_size=8, grad_accum=1, rank=0, world=1, seed=7, eval_steps=2).val()[0]
    with torch.no_grad():
        _, loss = model(batch["idx"], batch["targets"])
    assert float(loss) == pytest.approx(outputs["final_val_loss"], rel=0.2)


@pytest.mark.slow
def test_retried_attempt_resumes_from_scratch_checkpoints(runs):
    """A second attempt of the same stage (same scratch_uri) finds the finished run's final
    checkpoint and trains no further step."""
    ctx, first, events = runs["one"]
    seen = len(events)
    again = pretrain.run(ctx, base_config(grad_accum=2))
    assert again == first
    new = ctx.sink.events()[seen:]
    assert metric_steps(new, "train_loss") == []
    assert [v for _, v in metric_steps(new, "resumed_from_step")] == [STEPS]


def test_llama_family_size_trains_from_scratch_and_saves_as_llama(tmp_path):
    """The kind's own pieces (no Ray): a Llama-family named size builds, learns, and is written
    in the layout `transformers` loads as LlamaForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM

    ds = make_dataset(tmp_path / "ds")
    ctx = local_context(tmp_path, "pretrain", inputs=dataset_inputs(ds))
    job, _ = pretrain.build_job(ctx, base_config(model={"size": "llama-tiny", "block_size": 32, "n_kv_head": 1}))
    torch.manual_seed(0)
    model = job.make_model()
    assert (model.config.position, model.config.n_kv_head) == ("rope", 1)
    from workers.training.params import adamw

    opt = adamw(model, lr=1e-2, weight_decay=0.0)
    batch = job.make_batches(0, 1, torch.device("cpu")).train(0)[0]
    losses = []
    for _ in range(15):
        loss = pretrain.lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    job.save_model(model.eval(), tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(hf(batch["idx"]).logits, model(batch["idx"])[0], atol=1e-4, rtol=0)
