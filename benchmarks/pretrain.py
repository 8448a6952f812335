"""Benchmark: the `pretrain` stage (Ray Train, 1 worker) against a plain PyTorch loop.

Same model (workers.model.transformer.GPT, same seed), same batches (workers.data.tokens.TokenBatches), same
optimizer and LR schedule, same number of steps, same thread count. Startup is excluded:
steady-state tokens/s is measured over the wall-clock time between the end of step WARMUP and
the end of step STEPS - 1 (the stage: timestamps of rank 0's per-step metric events, which
include everything its loop does per step; the plain loop: time.perf_counter at the same points).
The last step is left out on both sides (the stage evaluates and checkpoints there).

    python -m benchmarks.pretrain [--steps 30] [--warmup 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256, "dropout": 0.0}
VOCAB, EOS, BATCH = 2048, 2047, 8


def make_dataset(folder: Path) -> Path:
    from tests.test_pretrain import write_token_dataset

    rng = np.random.default_rng(0)
    docs = lambda n: [rng.integers(0, EOS, size=int(rng.integers(200, 800))).tolist() for _ in range(n)]  # noqa: E731
    return write_token_dataset(folder, {"train": [docs(100) for _ in range(2)], "val": [docs(10)]},
                               vocab_size=VOCAB, eos_id=EOS)


def config(steps: int):
    from workers.kinds.pretrain import Config

    return Config(model=MODEL, batch_size=BATCH, grad_accum=1, max_steps=steps, lr=6e-4, min_lr=6e-5,
                  warmup_steps=5, eval_every=steps, eval_steps=1, checkpoint_every=steps, seed=1)


def steady_tokens_per_s(ends: list[float], tokens_per_step: int, warmup: int) -> float:
    """ends[k]: time step k+1 finished. Tokens/s over steps warmup+1 .. len(ends)-1."""
    span = ends[-2] - ends[warmup - 1]
    return tokens_per_step * (len(ends) - 1 - warmup) / span


def plain_loop(ds: Path, steps: int, threads: int) -> list[float]:
    """nanoGPT-style loop on the same model, data, optimizer and schedule; returns step end times."""
    from workers.model.transformer import GPT, config_for
    from workers.data.tokens import TokenBatches, TokenDataset
    from workers.training.loop import lr_at
    from workers.training.params import adamw

    torch.set_num_threads(threads)
    cfg = config(steps)
    dataset = TokenDataset.open(str(ds))
    torch.manual_seed(cfg.seed)
    model = GPT(config_for(MODEL, dataset.vocab_size))
    opt = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)  # the loop's own optimizer
    batches = TokenBatches(dataset, block_size=MODEL["block_size"], batch_size=BATCH, grad_accum=1,
                           rank=0, world=1, seed=cfg.seed)
    ends = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, steps)
        for b in batches.train(step):
            _, loss = model(b["idx"], b["targets"])
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        ends.append(time.perf_counter())
    return ends


def stage_run(ray, ds: Path, tmp: Path, steps: int, threads: int) -> tuple[list[float], dict, list[dict]]:
    from tests.test_pretrain import collector_sink
    from workers.kinds import pretrain
    from workers.stage import Resources, local_context

    ctx = local_context(tmp, "pretrain", resources=Resources(cpus=threads, workers=1),
                        inputs={"tok": {"dataset": str(ds), "tokenizer": str(ds / "tokenizer.json")}})
    ctx = replace(ctx, sink=collector_sink(ray))
    outputs = pretrain.run(ctx, config(steps))
    metrics = [e for e in ctx.sink.events() if e["type"] == "metrics" and "train_loss" in e["metrics"]]
    return [e["ts"] for e in metrics], outputs, metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import ray

    from workers.model.transformer import GPT, config_for
    from workers.training.loop import cpu_peak_flops

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
    tmp = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    ds = make_dataset(tmp / "ds")
    tokens_per_step = BATCH * MODEL["block_size"]
    fpt = GPT(config_for(MODEL, VOCAB)).flops_per_token()
    torch.set_num_threads(args.threads)
    peak = cpu_peak_flops(args.threads)

    results = {"plain": [], "stage": []}
    for name in ("plain", "stage", "plain", "stage"):  # interleaved: the machine's load drifts
        if name == "plain":
            ends = plain_loop(ds, args.steps, args.threads)
        else:
            ends, outputs, metrics = stage_run(ray, ds, tmp / f"stage{len(results['stage'])}", args.steps, args.threads)
            logged = float(np.median([m["metrics"]["tokens_per_s"] for m in metrics[args.warmup:-1]]))
            print(f"  stage: logged median tokens/s {logged:,.0f}, final loss {outputs['final_train_loss']:.3f}")
        tps = steady_tokens_per_s(ends, tokens_per_step, args.warmup)
        results[name].append(tps)
        print(f"  {name}: {tps:,.0f} tokens/s, MFU {fpt * tps / peak:.1%}")
    plain, stage = max(results["plain"]), max(results["stage"])
    print(f"model {MODEL} vocab {VOCAB}, batch {BATCH}x{MODEL['block_size']} tokens, {args.steps} steps "
          f"(steady state: steps {args.warmup + 1}..{args.steps - 1}), {args.threads} threads, "
          f"CPU peak {peak / 1e9:.1f} GFLOP/s (measured matmul)")
    print(f"plain PyTorch loop : {plain:,.0f} tokens/s  MFU {fpt * plain / peak:.1%}  (best of {len(results['plain'])})")
    print(f"pretrain stage     : {stage:,.0f} tokens/s  MFU {fpt * stage / peak:.1%}  (best of {len(results['stage'])})")
    print(f"ratio stage / plain: {stage / plain:.3f}")


if __name__ == "__main__":
    main()
