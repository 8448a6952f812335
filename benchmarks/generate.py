"""Decode speed: our `workers.model.sampling.generate` vs `transformers.GPT2LMHeadModel.generate`.

Same random-init weights (exported with our save_pretrained, loaded with from_pretrained),
same prompts, greedy, KV cache in both, same thread count. Prints tokens/s, the ratio, and
whether the greedy outputs match token for token.

    python benchmarks/generate.py                      # small, batch 1 and 8
    python benchmarks/generate.py --size medium --new-tokens 64
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

from workers.model.transformer import GPT, config_for, save_pretrained  # noqa: E402
from workers.model.sampling import SamplingParams, generate  # noqa: E402


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


def timed_pair(fa, fb, repeats: int):
    """Alternate a and b so background load hits both alike; report each one's best time
    (the least disturbed run) and its output."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for f, ts in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            out = f()
            ts.append(time.perf_counter() - t0)
            if f is fa:
                out_a = out
            else:
                out_b = out
    return min(ta), out_a, min(tb), out_b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    ours = make_model(args.size, args.vocab, args.seed)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d)
        hf = GPT2LMHeadModel.from_pretrained(d).eval()

    N = args.new_tokens
    print(f"model={args.size} vocab={args.vocab} params={ours.num_params() / 1e6:.2f}M "
          f"prompt={args.prompt_len} new_tokens={N} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}")
    g = torch.Generator().manual_seed(args.seed)
    for B in args.batches:
        prompts = torch.randint(0, args.vocab, (B, args.prompt_len), generator=g)
        params = SamplingParams(max_tokens=N, temperature=0)

        def run_ours():
            return generate(ours, prompts.tolist(), params)

        def run_hf():
            with torch.inference_mode():
                return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                   num_beams=1, max_new_tokens=N, min_new_tokens=N, use_cache=True,
                                   pad_token_id=0, eos_token_id=None)

        t_ours, out_ours, t_hf, out_hf = timed_pair(run_ours, run_hf, args.repeats)
        ours_ids = [c[0].token_ids for c in out_ours]
        hf_ids = out_hf[:, args.prompt_len:].tolist()
        same = sum(a == b for a, b in zip(ours_ids, hf_ids))
        tps_ours, tps_hf = B * N / t_ours, B * N / t_hf
        print(f"batch={B}: ours {tps_ours:8.1f} tok/s | transformers {tps_hf:8.1f} tok/s | "
              f"ratio {tps_ours / tps_hf:.2f}x | greedy outputs match: {same}/{B} sequences")


if __name__ == "__main__":
    main()
