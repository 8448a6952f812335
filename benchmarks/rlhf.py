"""RLHF iteration anatomy: the `rlhf` kind (GRPO, a verifiable reward) with 1 and 2 rollout actors.

Reports rollout tokens/s, iteration time, and the share of an iteration spent in generation,
ranking, the learner's update, weight sync (object store) and checkpointing, from the kind's own
per-iteration metrics (first iteration left out: actor warm-up). Reference in the same run: the
same sampling (`workers.model.sampling.generate`, same batch, 1 thread) in the driver process, without
Ray; the ratio says what the actor hop costs (1 actor) or gains (2 actors).

    python benchmarks/rlhf.py                      # n_layer 2, n_embd 64, 16 prompts x 8 samples x 24 tokens
    python benchmarks/rlhf.py --iterations 6 --max-tokens 48
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # repo root instead of benchmarks/ (benchmarks/tokenize.py shadows the stdlib)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

CHARS = "abcdefgh"


def fraction_a(prompt: str, completion: str) -> float:
    return completion.count("a") / len(completion) if completion else 0.0


def make_policy(folder: Path, n_layer: int, n_embd: int) -> Path:
    from workers.data import tokenizer as toks
    from workers.model.transformer import GPT, GPTConfig
    from workers.model.hf import save_pretrained

    tok = toks.train_char([CHARS])
    toks.save(tok, folder)
    torch.manual_seed(0)
    eos = tok.token_to_id(toks.EOS_TOKEN)
    save_pretrained(GPT(GPTConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=n_layer, n_head=2,
                                  n_embd=n_embd)), folder, extra={"eos_token_id": eos})
    return folder


def prompts(n: int) -> list[str]:
    r = random.Random(0)
    return ["".join(r.choice(CHARS[1:]) for _ in range(r.randint(4, 10))) for _ in range(n)]


def plain_tokens_per_s(ck: Path, ps: list[str], k: int, max_tokens: int, reps: int = 3) -> float:
    """The reference: generate in this process, 1 thread, no Ray."""
    from workers.checkpoints import open_checkpoint
    from workers.model.sampling import SamplingParams, generate
    from workers.rl.rollout import encode_prompt

    torch.set_num_threads(1)
    pol = open_checkpoint(str(ck), device="cpu")
    ids = [encode_prompt(pol, p, max_tokens) for p in ps]
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        out = generate(pol.model, ids, SamplingParams(n=k, max_tokens=max_tokens, logprobs=True),
                       eos_token_id=pol.eos_token_id, decode=pol.tokenizer.decode)
        dt = time.perf_counter() - t0
        best = max(best, sum(len(c.token_ids) for cs in out for c in cs) / dt)
    return best


def run_kind(ck: Path, workers: int, args) -> dict[str, float]:
    from workers.kinds import rlhf
    from workers.stage import local_context

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-rlhf-{workers}-"))
    ctx = local_context(tmp)
    cfg = rlhf.Config.model_validate(dict(
        policy=str(ck), reward={"function": "benchmarks.rlhf:fraction_a"},
        prompts={"source": prompts(64)}, eval_prompts=0, algorithm="grpo", iterations=args.iterations,
        prompts_per_iteration=args.prompts, samples_per_prompt=args.k, max_tokens=args.max_tokens,
        lr=1e-3, rollout_workers=workers))
    rlhf.run(ctx, cfg)
    m = {name: ctx.sink.metrics(name)[1:] for name in (
        "rollout_tokens_per_s", "iteration_s", "time_generation_s", "time_ranking_s", "time_update_s",
        "time_sync_s", "time_checkpoint_s")}
    return {name: statistics.median(v) for name, v in m.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    args = ap.parse_args()

    import os

    import ray
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ck = make_policy(Path(tempfile.mkdtemp(prefix="bench-policy-")), args.n_layer, args.n_embd)
    plain = plain_tokens_per_s(ck, prompts(args.prompts), args.k, args.max_tokens)
    print(f"model n_layer={args.n_layer} n_embd={args.n_embd}; {args.prompts} prompts x {args.k} samples x "
          f"<= {args.max_tokens} tokens; {args.iterations} iterations (first left out)")
    print(f"reference (in-process generate, 1 thread): {plain:,.0f} tokens/s")
    print("| rollout actors | rollout tokens/s | vs reference | iteration s | generation | ranking | update "
          "| weight sync | checkpoint |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for workers in (1, 2):
        r = run_kind(ck, workers, args)
        it = r["iteration_s"]
        share = {k: 100 * r[f"time_{k}_s"] / it for k in ("generation", "ranking", "update", "sync", "checkpoint")}
        print(f"| {workers} | {r['rollout_tokens_per_s']:,.0f} | {r['rollout_tokens_per_s'] / plain:.2f}x | {it:.2f} | "
              + " | ".join(f"{share[k]:.0f}%" for k in ("generation", "ranking", "update", "sync", "checkpoint")) + " |")


if __name__ == "__main__":
    main()
