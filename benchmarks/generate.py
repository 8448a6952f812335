"""Decode speed: our `workers.model.sampling.generate` vs `transformers` `generate`, both families.

Same random weights (written with our `save_model`, read back with `AutoModelForCausalLM`, so
GPT-2 sizes run against GPT2LMHeadModel and Llama sizes against LlamaForCausalLM), same prompts,
greedy, fp32, KV cache on every side, same thread count. References: `transformers` with its
default dynamic cache, and with its static cache (`cache_implementation="static"`). The method is
`benchmarks.method`'s: runs interleaved after a warm-up, median tokens/s and min..max, the median
of the per-round ratios, the load average before and after (warning when not idle); plus whether
the greedy tokens are equal to transformers' token for token.

    python benchmarks/generate.py                                   # 4 models, batch 1, 5 repeats
    python benchmarks/generate.py --models small llama-small --repeats 2 --new-tokens 32   # quick check
    python benchmarks/generate.py --clock cpu     # CPU time instead of wall time, for a busy machine
    python benchmarks/generate.py --models medium --anatomy   # + where a decode step's time goes
"""

from __future__ import annotations

import sys
from pathlib import Path

# replace the script dir (benchmarks/tokenize.py would shadow the stdlib) with the repo root
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from benchmarks import method  # noqa: E402
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


def anatomy(ours: GPT, hf, prompts: torch.Tensor, repeats: int, steps: int = 64) -> None:
    """Per-token parts of one decode step at batch 1, interleaved: the model's Linear products alone
    (its own weights and layouts: the weight-streaming floor), our decode step as generate runs it
    (`GPT.step_decoder()`), the same step through the modules (`GPT.forward` on a KV cache), and
    transformers' forward step on its dynamic cache (cropped back after each step, so both attend
    over the same length)."""
    from torch.nn import functional as F

    from workers.model.transformer import KVCache

    lins = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    xs = {m.in_features: torch.randn(1, 1, m.in_features) for m in lins}
    tok = prompts[:1, :1]
    P = prompts.size(1)
    with torch.inference_mode():
        cache = KVCache.empty(ours, 1, P + 1)
        ours(prompts[:1], kv_cache=cache)
        hf_cache = hf(prompts[:1], use_cache=True).past_key_values

    def per_token(step):
        def run() -> float:
            with torch.inference_mode():
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                return (time.perf_counter() - t0) / steps * 1e3
        return run

    def ours_step():
        cache.pos = P
        ours(tok, kv_cache=cache)

    decoder = ours.step_decoder()

    def ours_decode():
        cache.pos = P
        decoder(tok[:, 0], cache)

    def hf_step():
        hf(tok, past_key_values=hf_cache, use_cache=True)
        hf_cache.crop(-1)

    runs = {"Linear products alone": per_token(lambda: [F.linear(xs[m.in_features], m.weight, m.bias) for m in lins]),
            "ours decode step": per_token(ours_decode), "ours forward step (modules)": per_token(ours_step),
            "transformers forward step": per_token(hf_step)}
    mb = sum(m.weight.numel() * m.weight.element_size() for m in lins) / 1e6
    method.print_table(method.interleave(runs, repeats, verbose=False), reference="ours decode step",
                       unit="ms/token", lower_is_better=True,
                       title=f"  anatomy of one decode step ({mb:.1f} MB of Linear weights read per token)")


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
    ap.add_argument("--anatomy", action="store_true",
                    help="also time the parts of one decode step (Linear products alone, forward steps)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    N = args.new_tokens
    print(f"vocab={args.vocab} prompt={args.prompt_len} new_tokens={N} threads={torch.get_num_threads()} "
          f"(both sides: one process) repeats={args.repeats} clock={args.clock} torch={torch.__version__}")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with method.Load(uses_cpus=args.threads):
        for size in args.models:
            ours = make_model(size, args.vocab, args.seed)
            with tempfile.TemporaryDirectory() as d:
                save_model(ours, d)
                hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            print(f"\n{size}: {type(hf).__name__}, {ours.num_params() / 1e6:.2f}M params")
            g = torch.Generator().manual_seed(args.seed)
            if args.anatomy:
                anatomy(ours, hf, torch.randint(0, args.vocab, (1, args.prompt_len), generator=g), args.repeats)
            for B in args.batches:
                prompts = torch.randint(0, args.vocab, (B, args.prompt_len), generator=g)
                outs: dict[str, list[list[int]]] = {}

                def timed(name, run):
                    def tokens_per_s() -> float:
                        t0 = clock()
                        outs[name] = run()
                        return B * N / (clock() - t0)
                    return tokens_per_s

                def hf_generate(**kw):
                    with torch.inference_mode():
                        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                          num_beams=1, max_new_tokens=N, min_new_tokens=N, use_cache=True,
                                          pad_token_id=0, eos_token_id=None, **kw)
                    return out[:, args.prompt_len:].tolist()

                params = SamplingParams(max_tokens=N, temperature=0)
                runs = {"ours": timed("ours", lambda: [c[0].token_ids for c in generate(ours, prompts.tolist(), params)]),
                        "transformers": timed("transformers", hf_generate)}
                if not args.no_static:
                    runs["transformers static"] = timed("transformers static",
                                                        lambda: hf_generate(cache_implementation="static"))
                res = method.interleave(runs, args.repeats, verbose=False)
                method.print_table(res, reference="transformers", unit="tok/s", lower_is_better=False,
                                   title=f"  batch={B}, {N} new tokens")
                for n in runs:
                    if n != "ours":
                        same = sum(a == b for a, b in zip(outs["ours"], outs[n]))
                        print(f"  greedy tokens equal, ours vs {n}: {same}/{B} sequences")
                if "transformers static" in res:
                    q = method.summarize(method.ratios(res, "ours", "transformers static", False))
                    print(f"  ours vs transformers static (median of rounds): {q.median:.3f}x [{q.low:.3f}..{q.high:.3f}]")


if __name__ == "__main__":
    main()
