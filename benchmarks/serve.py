"""Serving benchmark: the metrics vLLM's ``benchmark_serving.py`` reports, at several concurrencies.

For each concurrency level, a bounded number of streamed ``/v1/completions`` requests is sent
with at most that many in flight; per request we time the first token (TTFT), the mean time per
later output token (TPOT) and the end-to-end latency, and overall the output tokens/s and
requests/s. The reference is the same server at concurrency 1 (one request at a time): the
ratio of output tokens/s at the highest concurrency to that shows what batching buys. When it
starts its own server, the in-process static batch (``workers.model.sampling.generate`` on all the
highest level's prompts at once) is printed as a ceiling.

    python -m benchmarks.serve                      # starts a server on 127.0.0.1 (small random model)
    python -m benchmarks.serve --base-url http://127.0.0.1:8000 --model NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:
    # Run as a file, this folder would be on the path of every Ray worker too, and its siblings
    # (tokenize.py...) shadow stdlib modules there: re-run as `python -m benchmarks.serve`.
    os.chdir(_ROOT)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.serve", *sys.argv[1:]])

import httpx  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog while a small model learns to serve requests".split()


def _prompt(i: int, words: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _one(client: httpx.AsyncClient, url: str, model: str | None, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    e2e = time.perf_counter() - t0
    ttft = e2e if ttft is None else ttft
    return {"ok": True, "ttft": ttft, "e2e": e2e, "tokens": tokens,
            "tpot": (e2e - ttft) / (tokens - 1) if tokens > 1 else 0.0}


async def run_level(url: str, model: str | None, concurrency: int, requests: int, max_tokens: int,
                    prompt_words: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def task(i):
            async with sem:
                return await _one(client, url, model, _prompt(i, prompt_words), max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    toks = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency, "requests": len(ok), "failed": len(results) - len(ok), "wall_s": wall,
        "out_tok_s": toks / wall, "req_s": len(ok) / wall,
        "ttft_p50_ms": 1e3 * _pct([r["ttft"] for r in ok], 0.5), "ttft_p99_ms": 1e3 * _pct([r["ttft"] for r in ok], 0.99),
        "tpot_p50_ms": 1e3 * _pct([r["tpot"] for r in ok], 0.5), "tpot_p99_ms": 1e3 * _pct([r["tpot"] for r in ok], 0.99),
        "e2e_p50_ms": 1e3 * _pct([r["e2e"] for r in ok], 0.5), "e2e_p99_ms": 1e3 * _pct([r["e2e"] for r in ok], 0.99),
    }


def _start_server(size: str, max_batch_size: int, port: int) -> tuple[str, str, Path]:
    import ray
    import torch

    from workers.data import tokenizer as toks
    from workers.model.transformer import GPT, config_for, save_pretrained
    from workers.kinds.serve import serve_checkpoint

    torch.manual_seed(0)
    ckpt = Path(tempfile.mkdtemp(prefix="bench-serve-")) / f"random-{size}"
    tok = toks.train_char([" ".join(WORDS) + ".,!?0123456789\n"])
    save_pretrained(GPT(config_for(size, tok.get_vocab_size())), ckpt, extra={"eos_token_id": toks.eos_id(tok)})
    toks.save(tok, ckpt)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    url = serve_checkpoint(str(ckpt), port=port, max_batch_size=max_batch_size, max_queue=4 * max_batch_size,
                           blocking=False)
    return url, ckpt.name, ckpt


def _static_batch(ckpt: Path, prompts: list[str], max_tokens: int) -> float:
    """Output tokens/s of one in-process ``generate`` call over all prompts (no HTTP, no arrivals)."""
    import torch

    from workers.data import tokenizer as toks
    from workers.model.transformer import load_pretrained
    from workers.model.sampling import SamplingParams, generate

    torch.set_num_threads(1)  # as the replica (one CPU)
    model = load_pretrained(ckpt).eval()
    tok = toks.load(ckpt / "tokenizer.json")
    ids = [tok.encode(p).ids for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0)
    t0 = time.perf_counter()
    out = generate(model, ids, params, decode=tok.decode)
    return sum(len(c[0].token_ids) for c in out) / (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", help="a running server (default: start one on 127.0.0.1)")
    ap.add_argument("--model", help="model id (default: the server's)")
    ap.add_argument("--size", default="small", help="model size when starting a server (workers.model.transformer.SIZES)")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-level", type=int, default=0, help="default: max(8, 2 x concurrency)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=8)
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    ckpt = None
    if args.base_url:
        url, model = args.base_url.rstrip("/"), args.model
    else:
        url, model, ckpt = _start_server(args.size, max(levels), args.port)
    print(f"server {url}  model {model}  max_tokens {args.max_tokens}  prompt ~{args.prompt_words} words")
    asyncio.run(run_level(url, model, 2, 4, 8, args.prompt_words))  # warm-up

    rows = []
    for c in levels:
        n = args.requests_per_level or max(8, 2 * c)
        rows.append(asyncio.run(run_level(url, model, c, n, args.max_tokens, args.prompt_words)))
    cols = [("concurrency", "{:>5d}"), ("requests", "{:>5d}"), ("failed", "{:>3d}"), ("out_tok_s", "{:>9.1f}"),
            ("req_s", "{:>7.2f}"), ("ttft_p50_ms", "{:>8.1f}"), ("ttft_p99_ms", "{:>8.1f}"),
            ("tpot_p50_ms", "{:>8.1f}"), ("tpot_p99_ms", "{:>8.1f}"), ("e2e_p50_ms", "{:>8.0f}"),
            ("e2e_p99_ms", "{:>8.0f}")]
    print(" | ".join(name for name, _ in cols))
    for r in rows:
        print(" | ".join(fmt.format(r[name]).rjust(len(name)) for name, fmt in cols))
    base = rows[0]["out_tok_s"]
    top = rows[-1]
    print(f"output tokens/s at concurrency {top['concurrency']} vs {rows[0]['concurrency']}: "
          f"{top['out_tok_s'] / base:.2f}x (target >= 4x)")
    if ckpt is not None:
        n = args.requests_per_level or max(8, 2 * max(levels))
        static = _static_batch(ckpt, [_prompt(i, args.prompt_words) for i in range(max(levels))], args.max_tokens)
        print(f"in-process static batch of {max(levels)} (workers.model.sampling.generate): {static:.1f} tok/s; "
              f"server at concurrency {top['concurrency']} reaches {top['out_tok_s'] / static:.2f}x of it")
        from workers.kinds.serve import shutdown

        shutdown()


if __name__ == "__main__":
    main()
