"""Decode speed: our `workers.model.sampling.generate` vs `transformers` `generate`, both families.

Same random weights (written with our `save_model`, read back with `AutoModelForCausalLM`, so
GPT-2 sizes run against GPT2LMHeadModel and Llama sizes against LlamaForCausalLM), same prompts,
greedy, fp32, KV cache on every side, same thread count. References: `transformers` with its
default dynamic cache, and with its static cache (`cache_implementation="static"`). Runs are
interleaved (ours, dynamic, static, ours, ...) after a warm-up; prints the median tokens/s, the
spread (min-max), the ratio of medians, whether greedy tokens match, and the load average before
and after, with a warning when the machine is not idle.

    python benchmarks/generate.py                                   # 4 models, batch 1, 5 repeats
    python benchmarks/generate.py --models small llama-small --repeats 2 --new-tokens 32   # quick check
    python benchmarks/generate.py --clock cpu     # CPU time instead of wall time, for a busy machine
"""

from __future__ import annotations

import sys
from pathlib import Path

# replace the script dir (benchmarks/tokenize.py would shadow the stdlib) with the repo root
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from workers.model.hf import save_model  # noqa: E402
from workers.model.sampling import SamplingParams, generate  # noqa: E402
from workers.model.transformer import GPT, config_for  # noqa: E402


def make_model(size: str, vocab: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    m = GPT(config_for(size, vocab_size=vocab))
    # Larger matrix weights than the training init so greedy outputs vary (a default-init model
    # repeats one token, which would make the "outputs match" check meaningless).
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "wte" not in name and "wpe" not in name:
                p.normal_(0.0, 0.3 / (m.config.n_embd / 64) ** 0.5)
    return m.eval()


def interleaved(runs: dict, repeats: int, clock=time.perf_counter) -> dict[str, tuple[list[float], object]]:
    """Each function once as warm-up, then `repeats` rounds in rotating order so background load
    hits all alike. Returns name -> (seconds per run, last output)."""
    for f in runs.values():
        f()
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, object] = {}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = clock()
            outs[n] = runs[n]()
            times[n].append(clock() - t0)
    return {n: (times[n], outs[n]) for n in names}


def load_line(tag: str) -> float:
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    warn = f"  WARNING: not idle (load {load:.1f} on {cores} cores); figures are contention" if load > 0.5 else ""
    print(f"load average {tag}: {load:.2f}{warn}", flush=True)
    return load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["small", "llama-small", "medium", "llama-medium"],
                    help="size names from workers.model.transformer.SIZES")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time (the figure to record); cpu: this process's CPU time, steadier "
                         "than wall time on a shared machine (single-threaded runs only)")
    ap.add_argument("--no-static", action="store_true", help="skip the transformers static-cache reference")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    N = args.new_tokens
    print(f"vocab={args.vocab} prompt={args.prompt_len} new_tokens={N} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} clock={args.clock} torch={torch.__version__}")
    before = load_line("before")
    for size in args.models:
        ours = make_model(size, args.vocab, args.seed)
        with tempfile.TemporaryDirectory() as d:
            save_model(ours, d)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        print(f"\n{size}: {type(hf).__name__}, {ours.num_params() / 1e6:.2f}M params")
        g = torch.Generator().manual_seed(args.seed)
        for B in args.batches:
            prompts = torch.randint(0, args.vocab, (B, args.prompt_len), generator=g)
            params = SamplingParams(max_tokens=N, temperature=0)

            def hf_generate(**kw):
                with torch.inference_mode():
                    return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                       num_beams=1, max_new_tokens=N, min_new_tokens=N, use_cache=True,
                                       pad_token_id=0, eos_token_id=None, **kw)

            runs = {"ours": lambda: generate(ours, prompts.tolist(), params),
                    "transformers": hf_generate}
            if not args.no_static:
                runs["transformers static"] = lambda: hf_generate(cache_implementation="static")
            res = interleaved(runs, args.repeats, time.process_time if args.clock == "cpu" else time.perf_counter)
            ours_ids = [c[0].token_ids for c in res["ours"][1]]
            med = {n: B * N / statistics.median(ts) for n, (ts, _) in res.items()}
            for n, (ts, out) in res.items():
                tps = sorted(B * N / t for t in ts)
                line = f"  batch={B} {n:>20}: {med[n]:8.1f} tok/s median (spread {tps[0]:.1f}-{tps[-1]:.1f})"
                if n != "ours":
                    same = sum(a == b for a, b in zip(ours_ids, out[:, args.prompt_len:].tolist()))
                    line += f" | ours/this {med['ours'] / med[n]:.2f}x | greedy tokens match {same}/{B}"
                print(line, flush=True)
    after = load_line("after")
    if max(before, after) > 0.5:
        print("WARNING: the machine was busy; rerun on an idle machine for figures worth recording")


if __name__ == "__main__":
    main()
