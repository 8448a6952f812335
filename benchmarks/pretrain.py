"""Benchmark: a training stage's step (Ray Train, 1 worker) against a plain PyTorch loop.

Both sides run the same ``TrainJob`` (built by the kind's own ``build_job``): the same model and
seed, the same batches (the job's ``BatchSource``), loss, AdamW groups, LR schedule, grad clip,
the same number of torch threads. The plain loop runs them in this process, nanoGPT-style; the
stage runs ``kind.run`` on Ray Train with ``resources: {cpus: T, workers: 1}`` and its events go
through the same ``EventBus`` a pipeline uses. The figure of a run is the **median wall time per
step** over steps ``warmup+1 .. steps-1`` (the last step evaluates and checkpoints): the plain
loop's ``perf_counter`` between step ends; the stage's own ``step_time_s`` metric, which is wall
time between step ends inside the worker (logging, events, seeding, data included), as a user
reads it in MLflow. Ray Train start-up is excluded on the stage's side.

Cases: ``small`` is nanoGPT's CPU shakespeare_char model (4 layers, 4 heads, 128 wide, block 64,
batch 12); ``12m`` is 6 layers, 6 heads, 384 wide (block 64, batch 12; 11.4 M parameters at vocab
2048). ``--kinds finetune reward`` adds a full fine-tune and a reward-model step on ``small``.
Method (``benchmarks.method``): ours and the plain loop interleaved, a warm-up round, then
``--repeats`` rounds; medians, spreads, per-round ratios; load average before/after.

    python -m benchmarks.pretrain                      # both sizes, 2 threads (~4-5 min idle)
    python -m benchmarks.pretrain --threads 1          # the same with 1 thread
    python -m benchmarks.pretrain --kinds finetune reward --sizes small
    python -m benchmarks.pretrain --pipeline           # tokenize -> pretrain from the CLI, MLflow metrics
"""

from __future__ import annotations

import argparse
import glob
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks import method

VOCAB, EOS = 2048, 2047
SIZES = {
    "small": ({"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0}, 100, 10),
    "12m": ({"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 64, "dropout": 0.0}, 12, 3),
}
"""size -> (model, steps, warm-up steps excluded from the median)."""
BATCH = 12
PIPELINE_STEPS = 300
"""--pipeline's run length: the issue's own measurement (300 steps); 100-step runs put Ray's start-up tail
(helper processes still importing) inside the measured steps."""
PIPELINE = Path(__file__).with_name("pretrain_pipeline.yaml")


# ----------------------------------------------------------------------------- the two sides


def plain_loop(job, threads: int, warmup: int) -> float:
    """The job's model, batches, loss and optimizer in a plain loop here; median seconds per step."""
    from workers.training.loop import ADAMW_BETAS, lr_at
    from workers.training.params import adamw

    torch.set_num_threads(threads)
    cfg = job.config
    torch.manual_seed(cfg.seed)
    model = job.make_model()
    opt = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=ADAMW_BETAS, device_type="cpu")  # the loop's own
    batches = job.make_batches(0, 1, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    times, prev = [], time.perf_counter()
    for step in range(job.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, job.max_steps)
        micro = batches.train(step)
        for b in micro:
            loss = job.loss_fn(model, b) / len(micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        now = time.perf_counter()
        times.append(now - prev)
        prev = now
    return statistics.median(times[warmup:-1])


def stage_steps(events: list[dict], warmup: int) -> list[dict]:
    """The per-step training metrics of a stage's events, steps warmup+1 .. last-1."""
    steps = [e["metrics"] for e in events if e["type"] == "metrics" and "step_time_s" in e["metrics"]]
    return steps[warmup:-1]


def stage_run(ray, kind, ctx, config, warmup: int) -> tuple[float, dict]:
    """``kind.run`` on Ray Train, events through a pipeline's EventBus; median step_time_s and
    the median share of each part (data, compute, overhead)."""
    from orchestrator.runner import EventBus, RaySink

    bus = EventBus.remote()
    try:
        kind.run(replace(ctx, sink=RaySink(bus)), config)
        steps = stage_steps(ray.get(bus.drain.remote()), warmup)
    finally:
        ray.kill(bus)
    parts = {k: statistics.median(m[k] for m in steps) for k in ("data_s", "compute_s", "overhead_s")}
    return statistics.median(m["step_time_s"] for m in steps), parts


# ----------------------------------------------------------------------------- the cases


def make_dataset(folder: Path) -> Path:
    from tests.test_pretrain import write_token_dataset

    rng = np.random.default_rng(0)
    docs = lambda n: [rng.integers(0, EOS, size=int(rng.integers(200, 800))).tolist() for _ in range(n)]  # noqa: E731
    return write_token_dataset(folder, {"train": [docs(100) for _ in range(2)], "val": [docs(10)]},
                               vocab_size=VOCAB, eos_id=EOS)


def steady_tokens_per_s(ends: list[float], tokens_per_step: int, warmup: int) -> float:
    """ends[k]: time step k+1 finished (e.g. metric event timestamps). Tokens/s over steps
    warmup+1 .. len(ends)-1 (the last step evaluates and checkpoints). Used by benchmarks/scaling.py."""
    return tokens_per_step * (len(ends) - 1 - warmup) / (ends[-2] - ends[warmup - 1])


def make_base(folder: Path, model: dict) -> Path:
    """A random-init GPT of ``model``'s shape with a char tokenizer, as a pretrain stage leaves it."""
    from workers.data import tokenizer as toks
    from workers.model.transformer import GPT, config_for
    from workers.model.hf import save_pretrained

    tok = toks.train_char([string.printable])
    torch.manual_seed(0)
    eos = toks.eos_id(tok)
    save_pretrained(GPT(config_for(model, tok.get_vocab_size())), folder, extra={"eos_token_id": eos, "bos_token_id": eos})
    toks.save(tok, folder)
    return folder


@dataclass
class Case:
    name: str
    kind: object
    config: object
    inputs: dict
    warmup: int


def make_case(kind_name: str, size: str, tmp: Path) -> Case:
    from workers.data import records

    model, steps, warmup = SIZES[size]
    common = dict(batch_size=BATCH, grad_accum=1, max_steps=steps, warmup_steps=5, eval_every=steps, eval_steps=1,
                  checkpoint_every=steps, seed=1)
    if kind_name == "pretrain":
        from workers.kinds import pretrain as kind

        ds = make_dataset(tmp / "ds")
        return Case(f"pretrain {size}", kind, kind.Config(model=model, **common),
                    {"tok": {"dataset": str(ds), "tokenizer": str(ds / "tokenizer.json")}}, warmup)
    base = make_base(tmp / f"base-{size}" / "checkpoint", model)
    if kind_name == "finetune":
        from workers.kinds import finetune as kind

        data = records.write_jsonl(tmp / "sft.jsonl", records.synthetic_sft(400, seed=1))
        config = kind.Config(data=str(data), val_fraction=0.1, **common)
    elif kind_name == "reward":
        from workers.kinds import reward as kind

        data = records.write_jsonl(tmp / "prefs.jsonl", records.synthetic_preferences(400, seed=2))
        config = kind.Config(data=str(data), val_fraction=0.1, **common)
    else:
        raise SystemExit(f"--kinds: got {kind_name!r}; allowed: pretrain, finetune, reward")
    return Case(f"{kind_name} {size}", kind, config, {"base": {"checkpoint": str(base)}}, warmup)


def bench_case(ray, case: Case, tmp: Path, threads: int, repeats: int) -> dict:
    from workers.stage import Resources, local_context

    counter = iter(range(1000))
    parts: list[dict] = []

    def ctx():
        return local_context(tmp / f"run{next(counter)}", case.kind.__name__.rsplit(".", 1)[-1],
                             inputs=case.inputs, resources=Resources(cpus=threads, workers=1))

    job = case.kind.build_job(ctx(), case.config)
    job = job[0] if isinstance(job, tuple) else job

    def stage() -> float:
        s, p = stage_run(ray, case.kind, ctx(), case.config, case.warmup)
        parts.append(p)
        return s * 1e3

    runs = method.interleave({"plain loop": lambda: plain_loop(job, threads, case.warmup) * 1e3, "stage": stage},
                             repeats=repeats, warmup=1)
    print()
    method.print_table(runs, reference="plain loop", unit="ms/step", lower_is_better=True,
                       title=f"{case.name}: {threads} thread(s), batch {BATCH}, {job.max_steps} steps "
                             f"(median of steps {case.warmup + 1}..{job.max_steps - 1} per run)")
    p = {k: statistics.median(x[k] for x in parts[1:]) * 1e3 for k in parts[0]}
    print(f"stage's step, median parts: data {p['data_s']:.2f} ms, compute {p['compute_s']:.2f} ms, "
          f"overhead {p['overhead_s']:.2f} ms\n")
    return runs


# ----------------------------------------------------------------------------- the CLI pipeline


def pipeline_config(steps: int):
    """The pipeline file's pretrain config (seed aside), for the plain loop on the same dataset."""
    from workers.kinds import pretrain

    return pretrain.Config(model=dict(SIZES["small"][0]), batch_size=BATCH, max_steps=steps, warmup_steps=5,
                           eval_every=steps, eval_steps=1, checkpoint_every=steps, seed=1)


def plain_on_dataset(dataset: str, steps: int, threads: int, warmup: int) -> float:
    """The plain loop on a token dataset, as ``--pipeline``'s reference: ms per step."""
    from workers.kinds import pretrain
    from workers.stage import Resources, local_context

    ctx = local_context(Path(tempfile.mkdtemp(prefix="bench-plain-")), "pretrain", inputs={"tok": {"dataset": dataset}},
                        resources=Resources(cpus=threads, workers=1))
    job, _ = pretrain.build_job(ctx, pipeline_config(steps))
    return plain_loop(job, threads, warmup) * 1e3


def pipeline_rounds(tmp: Path, threads: int, repeats: int, steps: int, warmup: int) -> None:
    """``tokenize -> pretrain`` (small model) run by the CLI, the stage's step_time_s read back from
    MLflow, interleaved with the plain loop on the dataset that tokenize wrote. Each plain loop
    runs in a fresh process, as each CLI run's training worker does: on this machine a process's
    steady step time alone varies by ~10-20% from one process to the next (memory placement), so
    a reference kept in one warm process would compare two different things."""
    from orchestrator.tracking import open_client

    store = f"sqlite:///{tmp}/mlflow.db"
    seeds = iter(range(1, 1000))

    def cli_run() -> float:
        seed = next(seeds)  # a new fingerprint: pretrain reruns, tokenize is cached after round 1
        cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(PIPELINE), "--plain",
               "--set", f"storage={tmp}/artifacts", "--set", f"tracking.uri={store}",
               "--set", f"stages.pretrain.config.seed={seed}", "--set", f"stages.pretrain.config.max_steps={steps}",
               "--set", f"stages.pretrain.config.eval_every={steps}",
               "--set", f"stages.pretrain.config.checkpoint_every={steps}",
               "--set", f"stages.pretrain.resources.cpus={threads}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"--pipeline: {' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-3000:]}")
        client = open_client(store)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="tags.stage = 'pretrain'", order_by=["attributes.start_time DESC"],
                                  max_results=1)
        history = sorted(client.get_metric_history(runs[0].info.run_id, "step_time_s"), key=lambda m: m.step)
        return statistics.median(m.value for m in history[warmup:-1]) * 1e3

    def plain_run() -> float:
        cmd = [sys.executable, "-m", "benchmarks.pretrain", "--plain-on", ds, "--steps", str(steps),
               "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"--pipeline: {' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-3000:]}")
        return float(res.stdout.split()[-1])

    cli_run()  # tokenize once, so that the plain loop can read its dataset
    manifests = glob.glob(f"{tmp}/artifacts/**/manifest.json", recursive=True)
    if not manifests:
        raise SystemExit(f"--pipeline: no token dataset (manifest.json) under {tmp}/artifacts")
    ds = str(Path(manifests[0]).parent)
    runs = method.interleave({"plain loop": plain_run, "pipeline (CLI)": cli_run}, repeats=repeats, warmup=0)
    print()
    method.print_table(runs, reference="plain loop", unit="ms/step", lower_is_better=True,
                       title=f"tokenize -> pretrain from the CLI ({PIPELINE.name}), small model, {threads} thread(s), "
                             f"{steps} steps (median of steps {warmup + 1}..{steps - 1}); stage: step_time_s from "
                             "MLflow; each side a fresh process per round")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--kinds", nargs="+", default=["pretrain"], help="pretrain, finetune, reward")
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--repeats", type=int, default=method.MIN_REPEATS)
    p.add_argument("--steps", type=int, help="override every case's step count")
    p.add_argument("--pipeline", action="store_true", help="run tokenize -> pretrain from the CLI instead "
                   f"({PIPELINE_STEPS} steps unless --steps)")
    p.add_argument("--plain-on", metavar="DATASET", help="(used by --pipeline) print the plain loop's ms/step on a "
                   "token dataset and exit")
    args = p.parse_args()
    if args.plain_on:
        print(f"{plain_on_dataset(args.plain_on, args.steps, args.threads[0], SIZES['small'][2]):.3f}")
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    with method.Load(uses_cpus=max(args.threads)):
        if args.pipeline:
            for t in args.threads:
                pipeline_rounds(tmp / f"pipe{t}", t, args.repeats, args.steps or PIPELINE_STEPS, SIZES["small"][2])
            return
        import ray

        ray.init(num_cpus=max(args.threads), include_dashboard=False, log_to_driver=False)
        for kind in args.kinds:
            for size in args.sizes:
                case = make_case(kind, size, tmp / f"{kind}-{size}")
                if args.steps:
                    case.config = case.config.model_copy(update={"max_steps": args.steps, "eval_every": args.steps,
                                                                 "checkpoint_every": args.steps})
                    case.warmup = min(case.warmup, args.steps // 3)
                for t in args.threads:
                    bench_case(ray, case, tmp / f"{kind}-{size}-t{t}", t, args.repeats)
        ray.shutdown()


if __name__ == "__main__":
    main()
