"""Resume is exact: a training stage killed with SIGKILL at a step between two checkpoints and
resumed ends with the weights of the run never interrupted, bit for bit (CPU, fp32), and logs
the same losses after the resume point.

One harness, parametrised over (kind, strategy): pretrain, finetune, reward (Ray Train, 2
workers) and rlhf's GRPO learner (2 learner actors), each under ddp and fsdp. The step to kill
at and the rank to kill are drawn from a generator seeded by the scenario's name (shown in the
test id). The kill waits on an event, never on time:

- Ray Train kinds: the chosen rank stops at the start of step k (``FaultInjection(hang=True)``,
  once its steps so far are in the metrics stream and the checkpoints before it registered)
  and this test SIGKILLs its process; Ray Train restarts the worker group from the latest
  checkpoint (step 3 * (k // 3), or from scratch), which replays the steps after it.
- GRPO: when the metrics stream reports iteration k (its checkpoint written), this test SIGKILLs
  a learner actor's process before the stage goes on; the stage's attempt fails mid-iteration
  k + 1 (its rollouts done, its update not) and a second attempt with the same scratch resumes.

Each interrupted run is compared with its scenario's uninterrupted run: every logged loss (the
replayed steps' included) equal to the reference's at that step, the steps trained after the
resume equal to the planned steps minus those done, and every tensor of the published
checkpoint equal. Dropout is on (0.1) so that the dropout RNG must follow the step.
"""

from __future__ import annotations

import os
import random
import signal
import string
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from test_pretrain import collector_sink, dataset_inputs, make_dataset
from test_rlhf import REWARD, make_prompts
from workers.stage import ListSink, Resources, local_context
from workers.training.loop import FaultInjection

STEPS, CKPT_EVERY = 8, 3
ITERATIONS = 4
MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
DROPOUT = 0.1
KINDS = ("pretrain", "finetune", "reward", "grpo")
STRATEGIES = ("ddp", "fsdp")


def kill_point(kind: str, strategy: str) -> tuple[int, int]:
    """(k, rank): the seeded choice of where to kill. Ray Train kinds: at the start of step k
    (k steps done), a step that is no checkpoint; GRPO: after iteration k."""
    rng = random.Random(f"{kind}/{strategy}")
    if kind == "grpo":
        return rng.randrange(1, ITERATIONS), rng.randrange(2)
    return rng.choice([s for s in range(1, STEPS) if s % CKPT_EVERY]), rng.randrange(2)


SCENARIOS = [pytest.param(kind, strategy, k, rank,
                          id=f"{kind}-{strategy}-kill@{'iteration' if kind == 'grpo' else 'step'}{k}-rank{rank}")
             for kind in KINDS for strategy in STRATEGIES for k, rank in [kill_point(kind, strategy)]]


# ----------------------------------------------------------------------------- inputs


def make_base(folder: Path, dropout: float = 0.0) -> Path:
    """A random 2-layer, 32-wide GPT (block 32, fp32) with a char tokenizer over printable ASCII."""
    from workers.data import tokenizer as toks
    from workers.model.hf import save_pretrained
    from workers.model.transformer import GPT, config_for

    tok = toks.train_char([string.printable])
    torch.manual_seed(0)
    model = GPT(config_for({**MODEL, "dropout": dropout}, tok.get_vocab_size()))
    eos = toks.eos_id(tok)
    save_pretrained(model, folder, extra={"eos_token_id": eos, "bos_token_id": eos, "prompt_template": "{prompt}"})
    toks.save(tok, folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    from workers.data import records as sft_data

    tmp = tmp_path_factory.mktemp("assets")
    return {
        "dataset": make_dataset(tmp / "ds"),
        "base": make_base(tmp / "base"),
        "sft": sft_data.write_jsonl(tmp / "sft.jsonl", sft_data.synthetic_sft(64, seed=1)),
        "prefs": sft_data.write_jsonl(tmp / "prefs.jsonl", sft_data.synthetic_preferences(64, seed=2)),
    }


def stage(kind: str, strategy: str, assets: dict):
    """(kind module, config, upstream inputs) of a scenario."""
    train = dict(batch_size=2, grad_accum=2, max_steps=STEPS, checkpoint_every=CKPT_EVERY, eval_every=4,
                 eval_steps=1, warmup_steps=2, lr=1e-2, min_lr=1e-3, weight_decay=0.1, strategy=strategy, seed=11)
    if kind == "pretrain":
        from workers.kinds import pretrain as module
        config = module.Config(model={**MODEL, "dropout": DROPOUT}, **train)
        return module, config, dataset_inputs(assets["dataset"])
    upstream = {"base": {"checkpoint": str(assets["base"])}}
    if kind == "finetune":
        from workers.kinds import finetune as module
        config = module.Config(data=assets["sft"], dropout=DROPOUT, val_fraction=0.1, **train)
        return module, config, upstream
    if kind == "reward":
        from workers.kinds import reward as module
        config = module.Config(data=assets["prefs"], dropout=DROPOUT, val_fraction=0.1, **train)
        return module, config, upstream
    from workers.kinds import rlhf as module
    config = module.Config.model_validate(dict(
        policy=str(assets["base"]), reward={"function": REWARD}, prompts={"source": make_prompts(24, 0)},
        eval_prompts=4, algorithm="grpo", iterations=ITERATIONS, prompts_per_iteration=4, samples_per_prompt=4,
        max_tokens=6, lr=3e-3, epochs=2, batch_size=8, beta=0.04, learner_workers=2, strategy=strategy, seed=5))
    return module, config, upstream


def context(tmp: Path, kind: str, inputs: dict, ray):
    if kind == "grpo":
        return local_context(tmp, "rlhf", inputs=inputs, resources=Resources(cpus=0.5, workers=1))
    ctx = local_context(tmp, kind, inputs=inputs, resources=Resources(cpus=1, workers=2))
    return replace(ctx, sink=collector_sink(ray))


def events_of(ctx) -> list[dict]:
    return ctx.sink.events if isinstance(ctx.sink, ListSink) else ctx.sink.events()


def published(outputs: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the stage's published checkpoint folder, by file and name."""
    from safetensors.torch import load_file

    folder = Path(outputs.get("checkpoint") or outputs["reward_model"])
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


# ----------------------------------------------------------------------------- runs


_references: dict[tuple[str, str], tuple[dict, list[dict]]] = {}


def reference(kind: str, strategy: str, assets: dict, ray, tmp: Path) -> tuple[dict, list[dict]]:
    """The scenario's uninterrupted run (computed once): (outputs, events)."""
    key = (kind, strategy)
    if key not in _references:
        module, config, inputs = stage(kind, strategy, assets)
        ctx = context(tmp / f"{kind}-{strategy}-ref", kind, inputs, ray)
        outputs = module.run(ctx, config)
        _references[key] = outputs, events_of(ctx)
    return _references[key]


def wait_for(cond, what: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"process {pid} to die", 30)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def interrupted_train(kind, strategy, k, rank, assets, ray, tmp: Path) -> tuple[dict, list[dict]]:
    """A Ray Train kind whose rank ``rank`` is SIGKILLed at the start of step ``k``; Ray Train
    restarts the group from the latest checkpoint. (outputs, events)."""
    module, config, inputs = stage(kind, strategy, assets)
    ctx = context(tmp / f"{kind}-{strategy}-killed", kind, inputs, ray)
    marker = tmp / f"{kind}-{strategy}.paused"
    fault = FaultInjection(rank=rank, step=k, marker=str(marker), hang=True)
    result: dict = {}

    def go():
        try:
            result["outputs"] = module.run(ctx, config, fault=fault)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            result["error"] = e

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    # the event: step k in the metrics stream, and the rank waiting at step k + 1's start
    wait_for(lambda: "error" in result or (marker.exists() and any(
        e["type"] == "metrics" and e["step"] == k and "train_loss" in e["metrics"] for e in events_of(ctx))),
        f"step {k} in the metrics stream")
    assert "error" not in result, result["error"]
    pid = int(marker.read_text().split("pid ")[1])
    sigkill(pid)
    thread.join(timeout=600)
    assert not thread.is_alive(), "the stage did not end after the kill"
    if "error" in result:
        raise result["error"]
    return result["outputs"], events_of(ctx)


class KillLearnerOn(ListSink):
    """A sink that SIGKILLs a learner actor's process when iteration ``k`` is reported, before
    the stage goes on."""

    def __init__(self, k: int, index: int):
        super().__init__()
        self.k, self.index, self.killed = k, index, None

    def emit(self, event):
        super().emit(event)
        if (self.killed is None and event["type"] == "metrics" and event["step"] == self.k
                and "reward_mean" in event["metrics"]):
            from ray._private.state import actors

            learners = sorted(a["Pid"] for a in actors().values()
                              if a["ActorClassName"] == "Learner" and a["State"] == "ALIVE")
            assert len(learners) == 2, learners
            self.killed = learners[self.index]
            sigkill(self.killed)


def interrupted_grpo(strategy, k, index, assets, ray, tmp: Path) -> tuple[dict, list[dict]]:
    """GRPO whose learner ``index`` (of 2, by pid) is SIGKILLed once iteration ``k`` is reported;
    the failed attempt is followed by a second one on the same scratch. (outputs, both attempts'
    events)."""
    module, config, inputs = stage("grpo", strategy, assets)
    ctx = context(tmp / f"grpo-{strategy}-killed", "grpo", inputs, ray)
    ctx.sink = KillLearnerOn(k, index)
    with pytest.raises(Exception) as failed:
        module.run(ctx, config)
    assert ctx.sink.killed, f"the attempt failed before the kill: {failed.value!r}"
    first = ctx.sink.events
    ctx.sink, ctx.attempt = ListSink(), 2
    outputs = module.run(ctx, config)
    return outputs, first + ctx.sink.events


# ----------------------------------------------------------------------------- the test


def logged(events: list[dict], name: str) -> list[tuple[int, float]]:
    """[(step, value)] of metric ``name`` in logging order."""
    return [(e["step"], e["metrics"][name]) for e in events if e["type"] == "metrics" and name in e["metrics"]]


@pytest.mark.slow
@pytest.mark.parametrize("kind, strategy, k, rank", SCENARIOS)
def test_killed_and_resumed_stage_ends_bit_identical(kind, strategy, k, rank, assets, ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"{kind}-{strategy}")
    ref_outputs, ref_events = reference(kind, strategy, assets, ray_session, tmp)
    if kind == "grpo":
        outputs, events = interrupted_grpo(strategy, k, rank, assets, ray_session, tmp)
        resumed_at, last, metrics, planned = k, ITERATIONS, ("loss", "kl", "reward_mean", "reward_max"), ITERATIONS
        assert [v for _, v in logged(events, "resumed_from_iteration")] == [k]
    else:
        outputs, events = interrupted_train(kind, strategy, k, rank, assets, ray_session, tmp)
        resumed_at, last, metrics, planned = CKPT_EVERY * (k // CKPT_EVERY), STEPS, ("train_loss", "grad_norm", "val_loss"), STEPS
        assert [v for _, v in logged(events, "resumed_from_step")] == ([resumed_at] if resumed_at else [])
        assert [v for _, v in logged(events, "train_failures")] == [1]
    main = metrics[0]
    steps = [s for s, _ in logged(events, main)]
    # k steps (iterations) before the kill; then those after the last checkpoint, each once
    assert steps == list(range(1, k + 1)) + list(range(resumed_at + 1, last + 1)), steps
    assert len(steps) - k == planned - resumed_at
    # every logged value, replayed ones included, equals the uninterrupted run's at that step
    for name in metrics:
        ref = dict(logged(ref_events, name))
        got = logged(events, name)
        assert got and [s for s, _ in got if s not in ref] == [], name
        mismatched = [(s, v, ref[s]) for s, v in got if v != ref[s]]
        assert not mismatched, f"{name}: (step, resumed, uninterrupted) {mismatched}"
    # the published weights, bit for bit
    want, have = published(ref_outputs), published(outputs)
    assert sorted(have) == sorted(want)
    differ = [name for name in want if not torch.equal(have[name], want[name])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ, e.g. {differ[:3]}"
    paths = {"checkpoint", "tokenizer", "reward_model"}
    assert {n: v for n, v in outputs.items() if n not in paths} == {n: v for n, v in ref_outputs.items() if n not in paths}


@pytest.mark.parametrize("recorded, message", [
    ({"seed": 12}, r"trained with seed=12, this run has seed=11; resume with the seed it was trained with"),
    ({"max_steps": 6, "step": 6}, r"checkpoint at step 6 was trained with max_steps=6, this run has max_steps=8"),
], ids=["seed", "max_steps"])
def test_a_checkpoint_of_another_plan_is_refused(recorded, message, assets, tmp_path):
    """A checkpoint recorded with another seed or step budget (a finished shorter run at its last
    step, say) would continue another run, or end "done" without training: refused, by name."""
    import json

    from workers.training.loop import STATE_FILE, load_checkpoint

    module, config, inputs = stage("pretrain", "ddp", assets)
    job, _ = module.build_job(local_context(tmp_path, "pretrain", inputs=inputs, resources=Resources(workers=2)), config)
    (tmp_path / "ck").mkdir()
    state = {"step": 3, "seed": config.seed, "max_steps": STEPS, "tokens_per_step": job.tokens_per_step, **recorded}
    (tmp_path / "ck" / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path / "ck", job, None, None)
