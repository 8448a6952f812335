"""`strategy: fsdp` on real Ray Train workers (gloo, 2 CPU workers): the same loss curves as DDP
for pretrain, finetune (full and LoRA) and reward; half of DDP's parameter + optimizer state per
worker; a run killed on 2 workers resumes on 1 and on 4 with the uninterrupted curve (a Llama-family
model); the final checkpoints load in `transformers` (Llama and GPT-2).

The DDP reference is computed in this process, exactly as DDP does it: the gradient of the mean
of the ranks' losses, each rank's loss the mean over its micro-batches (tests/test_pretrain.py
shows real DDP fits on 1 and 2 workers agree). Five Ray Train fits, shared through fixtures.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.training.params import adamw

from test_finetune import make_base, sft_config
from test_pretrain import base_config, collector_sink, dataset_inputs, make_dataset, metric_steps
from test_reward import reward_config
from workers.data import records as sft_data
from workers.kinds import finetune, pretrain, reward
from workers.stage import Resources, local_context
from workers.training import sharding
from workers.training.loop import ADAMW_BETAS, FaultInjection, lr_at

STEPS, CKPT, FAIL_AT = 12, 4, 6
LLAMA = {"size": "llama-tiny", "block_size": 32}
FT_STEPS = 6


# ----------------------------------------------------------------------------- the DDP reference


def ddp_reference(job, world: int) -> tuple[list[float], int]:
    """(train_loss per step, per-rank parameter + optimizer-state bytes) of DDP on ``world``
    ranks, stepped in this process."""
    cfg = job.config
    torch.manual_seed(cfg.seed)
    model = job.make_model()
    optimizer = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=ADAMW_BETAS)
    params = [p for p in model.parameters() if p.requires_grad]
    ranks = [job.make_batches(r, world, torch.device("cpu")) for r in range(world)]
    losses = []
    for step in range(job.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, job.max_steps)
        total = 0.0
        micros = [batches.train(step) for batches in ranks]
        # the step's loss: the mean over all of its items (response tokens, pairs) when the job
        # counts them, across micro-batches and ranks; else micro-batches weigh the same
        items = [[float(job.items_fn(b)) if job.items_fn else 1.0 for b in micro] for micro in micros]
        all_items = sum(map(sum, items))
        for micro, counts in zip(micros, items):
            for b, n in zip(micro, counts):
                loss = job.loss_fn(model, b) * (n / all_items)
                loss.backward()
                total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, sharding.local_state_bytes(model, optimizer)


def curve(events) -> list[float]:
    return [v for _, v in metric_steps(events, "train_loss")]


def state_mb(events, world: int) -> list[float]:
    last = [e["metrics"] for e in events if e["type"] == "metrics" and "train_loss" in e["metrics"]][-1]
    return [last[f"train_state_mb_rank{r}"] for r in range(world)]


# ----------------------------------------------------------------------------- no Ray needed


def test_auto_shards_only_what_would_not_fit():
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 100))  # 20,200 params
    need = sharding.training_state_bytes(model)
    assert need == 16 * 20_200
    assert sharding.choose_strategy("auto", model, 2, memory_bytes=10 * need) == "ddp"
    assert sharding.choose_strategy("auto", model, 2, memory_bytes=need) == "fsdp"
    assert sharding.choose_strategy("auto", model, 1, memory_bytes=need) == "ddp"  # nothing to shard across
    assert sharding.choose_strategy("ddp", model, 2, memory_bytes=1) == "ddp"
    model[0].requires_grad_(False)  # frozen weights need no gradient nor optimizer state
    assert sharding.training_state_bytes(model) == 4 * 10_100 + 16 * 10_100


def test_strategy_errors_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="strategy"):
        base_config(strategy="zero3")
    with pytest.raises(ValidationError, match="reshard"):
        base_config(fsdp={"reshard": False})


def test_resuming_with_another_global_batch_is_refused(tmp_path):
    """The data order is a function of the step and the global batch: another global batch
    would silently train on other data from the checkpoint on."""
    import json

    from workers.training.loop import STATE_FILE, load_checkpoint

    ds = make_dataset(tmp_path / "ds")
    ctx = local_context(tmp_path, "pretrain", inputs=dataset_inputs(ds), resources=Resources(workers=4))
    job, _ = pretrain.build_job(ctx, base_config(batch_size=4, grad_accum=1))
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / STATE_FILE).write_text(json.dumps({"step": 4, "tokens_per_step": job.tokens_per_step // 2}))
    assert job.tokens_per_step == 4 * 4 * 32
    with pytest.raises(ValueError, match=r"trained with 256 tokens per step, this run takes 512; keep batch_size x "
                                         r"grad_accum x workers"):
        load_checkpoint(tmp_path / "ck", job, None, None)


# ----------------------------------------------------------------------------- pretrain on Ray Train


def _pretrain_ctx(tmp: Path, name: str, ds: Path, ray, workers: int, cpus: float = 1):
    ctx = local_context(tmp / name, "pretrain", inputs=dataset_inputs(ds), resources=Resources(cpus=cpus, workers=workers))
    return replace(ctx, sink=collector_sink(ray))


@pytest.fixture(scope="module")
def pretrain_runs(ray_session, tmp_path_factory):
    """FSDP on 2 workers (batch 4) killed at the start of step FAIL_AT with no restarts allowed;
    copies of its scratch resumed on 1 worker (batch 4 x accum 2) and on 4 (batch 2): the same
    global batch of 8 throughout."""
    ray = ray_session
    tmp = tmp_path_factory.mktemp("sharded-pretrain")
    ds = make_dataset(tmp / "ds")
    common = dict(model=LLAMA, max_steps=STEPS, checkpoint_every=CKPT, eval_every=CKPT, strategy="fsdp")
    ctx2 = _pretrain_ctx(tmp, "two", ds, ray, 2)
    cfg2 = base_config(grad_accum=1, max_failures=0, **common)
    with pytest.raises(Exception):
        pretrain.run(ctx2, cfg2, fault=FaultInjection(rank=1, step=FAIL_AT, marker=str(tmp / "killed")))
    out = {"two": ctx2.sink.events(), "killed": (tmp / "killed").exists()}
    for name, workers, batch, accum, cpus in (("one", 1, 4, 2, 1), ("four", 4, 2, 1, 0.5)):
        shutil.copytree(tmp / "two", tmp / name)
        ctx = _pretrain_ctx(tmp, name, ds, ray, workers, cpus)
        out[name] = (ctx, pretrain.run(ctx, base_config(batch_size=batch, grad_accum=accum, **common)), ctx.sink.events())
    ref_ctx = local_context(tmp / "ref", "pretrain", inputs=dataset_inputs(ds), resources=Resources(workers=2))
    job, _ = pretrain.build_job(ref_ctx, base_config(grad_accum=1, **common))
    out["ref"] = ddp_reference(job, 2)
    return out


@pytest.mark.slow
def test_fsdp_pretrain_follows_ddp_and_holds_half_the_state(pretrain_runs):
    ref, ddp_bytes = pretrain_runs["ref"]
    two = pretrain_runs["two"]
    assert pretrain_runs["killed"], "the fault hook never fired"
    assert [s for s, _ in metric_steps(two, "train_loss")] == list(range(1, FAIL_AT + 1))
    np.testing.assert_allclose(curve(two), ref[:FAIL_AT], rtol=1e-4)
    ddp_mb = ddp_bytes / 2**20
    for mb in state_mb(two, 2):
        assert mb == pytest.approx(ddp_mb / 2, rel=0.05), (mb, ddp_mb)
    for name in ("peak_memory_mb", "peak_memory_mb_rank0", "peak_memory_mb_rank1"):
        assert all(v > 0 for _, v in metric_steps(two, name)), name


@pytest.mark.slow
@pytest.mark.parametrize("name, workers", [("one", 1), ("four", 4)])
def test_killed_on_two_workers_resumes_on_another_number(pretrain_runs, name, workers):
    ref, ddp_bytes = pretrain_runs["ref"]
    ctx, outputs, events = pretrain_runs[name]
    steps = [s for s, _ in metric_steps(events, "train_loss")]
    assert steps == list(range(CKPT + 1, STEPS + 1)), "did not resume from the last checkpoint before the kill"
    assert [v for _, v in metric_steps(events, "resumed_from_step")] == [CKPT]
    np.testing.assert_allclose(curve(events), ref[CKPT:], rtol=2e-3)
    assert outputs["steps"] == STEPS
    for mb in state_mb(events, workers):
        assert mb == pytest.approx(ddp_bytes / 2**20 / workers, rel=0.1)


def assert_loads_in_transformers(folder: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM

    from workers.model.hf import load_pretrained

    names = {p.name for p in folder.iterdir()}  # one consolidated weights file, no DCP shards
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names and not any(".distcp" in n for n in names)
    ours = load_pretrained(folder).eval()
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == family
    x = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_resumed_fsdp_llama_loads_in_transformers(pretrain_runs):
    assert_loads_in_transformers(Path(pretrain_runs["four"][1]["checkpoint"]), "LlamaForCausalLM")


# ----------------------------------------------------------------------------- finetune, reward


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "checkpoint")


def _fit_vs_reference(kind, ctx, cfg):
    """(fit's train_loss curve, its per-rank state MB, the DDP reference curve, DDP's state MB,
    the stage's outputs)."""
    job = kind.build_job(ctx, cfg)[0]
    ref, ref_bytes = ddp_reference(job, ctx.resources.workers)
    outputs = kind.run(ctx, cfg)
    events = ctx.sink.events()
    return curve(events), state_mb(events, ctx.resources.workers), ref, ref_bytes / 2**20, outputs


@pytest.fixture(scope="module")
def sft_runs(ray_session, base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded-finetune")
    data = sft_data.write_jsonl(tmp / "sft.jsonl", sft_data.synthetic_sft(120, seed=1))
    out = {}
    # full fine-tuning also exercises activation checkpointing and keeping gathered weights
    for name, extra in (("full", {"activation_checkpointing": True, "fsdp": {"reshard_after_forward": False}}),
                        ("lora", {"lora": {"rank": 4, "alpha": 8}})):
        ctx = local_context(tmp / name, "finetune", inputs={"pre": {"checkpoint": str(base)}},
                            resources=Resources(cpus=1, workers=2))
        ctx = replace(ctx, sink=collector_sink(ray_session))
        cfg = sft_config(data=data, batch_size=4, max_steps=FT_STEPS, checkpoint_every=FT_STEPS, eval_every=FT_STEPS,
                         lr=3e-3, strategy="fsdp", **extra)
        out[name] = _fit_vs_reference(finetune, ctx, cfg)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "lora"])
def test_fsdp_finetune_follows_ddp_with_half_the_state(sft_runs, name):
    fit_curve, mbs, ref, ref_mb, outputs = sft_runs[name]
    np.testing.assert_allclose(fit_curve, ref, rtol=1e-3)
    assert ref[-1] < ref[0]
    for mb in mbs:
        assert mb == pytest.approx(ref_mb / 2, rel=0.05), (mb, ref_mb)
    assert_loads_in_transformers(Path(outputs["checkpoint"]), "GPT2LMHeadModel")


@pytest.mark.slow
def test_fsdp_reward_follows_ddp_with_half_the_state(ray_session, base, tmp_path):
    data = sft_data.write_jsonl(tmp_path / "prefs.jsonl", sft_data.synthetic_preferences(120, seed=2))
    ctx = local_context(tmp_path, "reward", inputs={"sft": {"checkpoint": str(base)}},
                        resources=Resources(cpus=1, workers=2))
    ctx = replace(ctx, sink=collector_sink(ray_session))
    cfg = reward_config(data=data, batch_size=4, max_steps=FT_STEPS, checkpoint_every=FT_STEPS,
                        eval_every=FT_STEPS, strategy="fsdp")
    fit_curve, mbs, ref, ref_mb, _ = _fit_vs_reference(reward, ctx, cfg)
    np.testing.assert_allclose(fit_curve, ref, rtol=1e-3)
    for mb in mbs:
        assert mb == pytest.approx(ref_mb / 2, rel=0.05), (mb, ref_mb)


# ----------------------------------------------------------------------------- rlhf learner group


@pytest.mark.slow
def test_rlhf_two_worker_learner_follows_one_worker_learner(ray_session, tmp_path):
    """GRPO with the learner on 1 worker and on 2 (FSDP, reference sharded too): the same
    rollouts, losses and KL, iteration by iteration."""
    from test_rlhf import config as rlhf_config, make_policy

    from workers.kinds import rlhf

    policy = make_policy(tmp_path / "policy")
    runs = {}
    for n in (1, 2):
        ctx = local_context(tmp_path / f"learners{n}", "rlhf", resources=Resources(cpus=0.5))
        cfg = rlhf_config(policy, "grpo", iterations=3, eval_prompts=0, epochs=1, batch_size=16,
                          learner_workers=n, strategy="fsdp" if n == 2 else "ddp")
        out = rlhf.run(ctx, cfg)
        runs[n] = ctx, out
    (one, out1), (two, out2) = runs[1], runs[2]
    tags = [e["tags"] for e in two.sink.events if e["type"] == "tags" and "learner.strategy" in e["tags"]]
    assert tags == [{"learner.strategy": "fsdp"}]
    assert all(abs(v) > 1e-4 for v in one.sink.metrics("loss")), one.sink.metrics("loss")
    np.testing.assert_allclose(two.sink.metrics("reward_mean"), one.sink.metrics("reward_mean"), rtol=1e-6)
    np.testing.assert_allclose(two.sink.metrics("loss"), one.sink.metrics("loss"), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(two.sink.metrics("kl"), one.sink.metrics("kl"), rtol=1e-3, atol=1e-6)
    assert out2["kl"] == pytest.approx(out1["kl"], rel=1e-3, abs=1e-6)
    assert two.sink.metrics("learner_peak_memory_mb_rank1") and two.sink.metrics("learner_peak_memory_mb_rank0")
    from workers.model.hf import load_pretrained
    a, b = load_pretrained(Path(out1["checkpoint"])), load_pretrained(Path(out2["checkpoint"]))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, atol=1e-4, rtol=1e-3)
