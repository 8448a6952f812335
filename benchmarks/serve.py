"""Serving benchmark: the server over HTTP vs the same requests through the engine in-process.

For each concurrency level, ``--requests`` streamed ``/v1/completions`` requests are sent with
at most that many in flight (closed loop, as vLLM's ``benchmark_serving.py --max-concurrency``).
Per request: time to first token (TTFT), mean time per later output token (TPOT) and end-to-end
latency; overall: output tokens/s. The reference does the same work with no HTTP at all: the
same prompts, sampling parameters and concurrency submitted straight to a
``workers.serving.engine.Engine`` in this process (one torch thread, as the one-CPU replica).
This process is the load generator (aiohttp, as ``benchmark_serving``: on a 2-core machine its
own CPU time competes with the server's); the server runs in its own Ray Serve replica (and proxy).

Each row also gives the CPU time per 1000 output tokens of each process that did the work (from
/proc): the replica, the Serve proxy and this client for the server; this process for the engine.

Server and engine runs alternate, ``--runs`` times after a warm-up; figures are the median over
runs (with min-max of tokens/s); the server/engine ratio (and the verdict line) is the median of
the per-round ratios, each round's pair having run back to back. The load average is printed
before and after.

    python -m benchmarks.serve                      # small random model, concurrency 1,8,32, 5 runs
    python -m benchmarks.serve --concurrency 32 --runs 5 --requests 96
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
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

import aiohttp  # noqa: E402  (the client of vLLM's benchmark_serving; Ray Serve's own dependency)

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


def _summary(results: list[dict], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r["ok"]]
    toks = sum(r["tokens"] for r in ok)
    out = {"concurrency": concurrency, "requests": len(ok), "failed": len(results) - len(ok),
           "out_tok_s": toks / wall, "wall_s": wall}
    for m in ("ttft", "tpot", "e2e"):
        for q in (50, 99):
            out[f"{m}_p{q}_ms"] = 1e3 * _pct([r[m] for r in ok], q / 100)
    return out


def _timing(t0: float, ttft: float | None, tokens: int) -> dict:
    e2e = time.perf_counter() - t0
    ttft = e2e if ttft is None else ttft
    return {"ok": True, "ttft": ttft, "e2e": e2e, "tokens": tokens,
            "tpot": (e2e - ttft) / (tokens - 1) if tokens > 1 else 0.0}


# ----------------------------------------------------------------------------- over HTTP


async def _one(session, url: str, model: str | None, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with session.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            await r.read()
            return {"ok": False, "status": r.status}
        async for line in r.content:  # as benchmark_serving: one SSE line at a time
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return _timing(t0, ttft, tokens)


async def _server_level(url: str, model: str | None, concurrency: int, prompts: list[str], max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def task(p):
            async with sem:
                return await _one(session, url, model, p, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(task(p) for p in prompts))
        wall = time.perf_counter() - t0
    return _summary(results, wall, concurrency)


def server_level(url, model, concurrency, prompts, max_tokens, pids: dict[str, int]) -> dict:
    before = {k: _cpu_s(p) for k, p in pids.items()}, time.process_time()
    out = asyncio.run(_server_level(url, model, concurrency, prompts, max_tokens))
    tokens = out["out_tok_s"] * out["wall_s"] / 1000
    for k, p in pids.items():
        out[f"{k}_cpu_ms"] = 1e3 * (_cpu_s(p) - before[0][k]) / tokens
    out["client_cpu_ms"] = 1e3 * (time.process_time() - before[1]) / tokens
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_pids() -> dict[str, int]:
    """The Serve replica's and proxy's processes of the Ray this process started (the workers
    of its raylet, a child of ours); empty where /proc cannot tell."""
    def children(ppid: int) -> list[tuple[int, str]]:
        out = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == ppid:
                    out.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
            except (OSError, ValueError):
                pass
        return out

    pids = {}
    for raylet, cmd in children(os.getpid()):
        if "raylet" in cmd:
            for pid, c in children(raylet):
                if "ServeReplica" in c:
                    pids["replica"] = pid
                elif "ProxyActor" in c:
                    pids["proxy"] = pid
    return pids


# ----------------------------------------------------------------------------- in-process engine


def engine_level(engine, tokenizer, concurrency: int, prompts: list[str], max_tokens: int) -> dict:
    """The same requests, at the same concurrency, submitted straight to ``engine``."""
    cpu0 = time.process_time()
    out = _engine_level(engine, tokenizer, concurrency, prompts, max_tokens)
    out["engine_cpu_ms"] = 1e3 * (time.process_time() - cpu0) / (out["out_tok_s"] * out["wall_s"] / 1000)
    return out


def _engine_level(engine, tokenizer, concurrency: int, prompts: list[str], max_tokens: int) -> dict:
    from workers.model.sampling import SamplingParams
    from workers.serving.engine import Done, GenerationRequest, Step

    finished: queue.Queue = queue.Queue()
    results: list[dict] = []

    def submit(i: int) -> None:
        t0 = time.perf_counter()
        state = {"ttft": None, "tokens": 0}

        def emit(events):
            for ev in events:
                if isinstance(ev, Step):
                    if state["ttft"] is None:
                        state["ttft"] = time.perf_counter() - t0
                    state["tokens"] += len(ev.deltas)
                elif isinstance(ev, Done):
                    finished.put(_timing(t0, state["ttft"], state["tokens"]))

        params = SamplingParams(max_tokens=max_tokens, temperature=1.0)
        engine.submit([GenerationRequest(tokenizer.encode(prompts[i]).ids, params, emit=emit, ignore_eos=True)])

    t0 = time.perf_counter()
    nxt = 0
    while nxt < min(concurrency, len(prompts)):
        submit(nxt)
        nxt += 1
    while len(results) < len(prompts):
        results.append(finished.get())
        if nxt < len(prompts):
            submit(nxt)
            nxt += 1
    return _summary(results, time.perf_counter() - t0, concurrency)


# ----------------------------------------------------------------------------- setup


def _checkpoint(size: str) -> Path:
    import torch

    from workers.data import tokenizer as toks
    from workers.model.transformer import GPT, config_for
    from workers.model.hf import save_pretrained

    torch.manual_seed(0)
    ckpt = Path(tempfile.mkdtemp(prefix="bench-serve-")) / f"random-{size}"
    tok = toks.train_char([" ".join(WORDS) + ".,!?0123456789\n"])
    save_pretrained(GPT(config_for(size, tok.get_vocab_size())), ckpt, extra={"eos_token_id": toks.eos_id(tok)})
    toks.save(tok, ckpt)
    return ckpt


def _start_server(ckpt: Path, max_batch_size: int, port: int, stream_interval_s: float) -> str:
    import ray

    from workers.serving.app import serve_checkpoint

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
             _system_config={"worker_niceness": 0})  # as serve_checkpoint and the orchestrator start Ray
    return serve_checkpoint(str(ckpt), port=port, max_batch_size=max_batch_size, max_queue=4 * max_batch_size,
                            blocking=False, stream_interval_s=stream_interval_s)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="model size (workers.model.transformer.SIZES)")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=0, help="requests per level and run (default: max(8, 2 x c))")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--stream-interval-ms", type=float, default=None,
                    help="the server's least time between two chunks of a stream (default: its own)")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    import torch

    from workers.data import tokenizer as toks
    from workers.model.hf import load_pretrained
    from workers.serving.app import shutdown
    from workers.serving.engine import Engine

    load_before = os.getloadavg()
    ckpt = _checkpoint(args.size)
    from workers.serving.app import STREAM_INTERVAL_S

    interval = STREAM_INTERVAL_S if args.stream_interval_ms is None else args.stream_interval_ms / 1000
    url = _start_server(ckpt, max(levels), args.port, interval)
    torch.set_num_threads(1)  # as the one-CPU replica
    tok = toks.load(ckpt / "tokenizer.json")
    engine = Engine(load_pretrained(ckpt).eval(), tok, eos_token_id=toks.eos_id(tok), max_batch_size=max(levels),
                    max_queue=4 * max(levels), device="cpu").start()
    model = ckpt.name
    print(f"server {url}  model {model} ({args.size})  max_tokens {args.max_tokens}  prompt ~{args.prompt_words} "
          f"words  runs {args.runs}  stream interval {1000 * interval:g} ms  load average before {load_before[0]:.1f}")
    if load_before[0] > 0.5:
        print(f"WARNING: the machine is not idle (load {load_before[0]:.1f}); figures are indicative only")

    # warm-up both
    warm = [_prompt(i, args.prompt_words) for i in range(4)]
    pids = _server_pids()
    server_level(url, model, 2, warm, 8, pids)
    engine_level(engine, tok, 2, warm, 8)

    cols = [("where", "{:>6s}"), ("concurrency", "{:>5d}"), ("out_tok_s", "{:>9.1f}"), ("ttft_p50_ms", "{:>8.1f}"),
            ("ttft_p99_ms", "{:>8.1f}"), ("tpot_p50_ms", "{:>8.2f}"), ("tpot_p99_ms", "{:>8.2f}"),
            ("e2e_p50_ms", "{:>8.0f}"), ("e2e_p99_ms", "{:>8.0f}"), ("failed", "{:>3d}")]
    print(" | ".join(name for name, _ in cols) + " | tok/s min-max | CPU ms per 1000 output tokens, by process")
    ratios = {}
    for c in levels:
        n = args.requests or max(8, 2 * c)
        prompts = [_prompt(i, args.prompt_words) for i in range(n)]
        runs: dict[str, list[dict]] = {"server": [], "engine": []}
        for _ in range(args.runs):  # interleaved: the machine's load drifts
            runs["server"].append(server_level(url, model, c, prompts, args.max_tokens, pids))
            runs["engine"].append(engine_level(engine, tok, c, prompts, args.max_tokens))
        for where, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "concurrency"}
            med.update(where=where, concurrency=c, failed=int(sum(r["failed"] for r in rs)))
            tps = [r["out_tok_s"] for r in rs]
            cpu = "  ".join(f"{k[:-7]} {med[k]:.2f}" for k in med if k.endswith("_cpu_ms"))
            print(" | ".join(fmt.format(med[name]).rjust(len(name)) for name, fmt in cols)
                  + f" | {min(tps):.0f}-{max(tps):.0f} | {cpu}")
        ratios[c] = [s["out_tok_s"] / e["out_tok_s"] for s, e in zip(runs["server"], runs["engine"])]
    for c, rs in ratios.items():
        print(f"server / in-process engine, output tokens/s at concurrency {c}: {statistics.median(rs):.2f}x "
              f"(median of {len(rs)} per-round ratios: {' '.join(f'{r:.2f}' for r in rs)})")
    top = max(levels)
    verdict = statistics.median(ratios[top])
    print(f"VERDICT: at concurrency {top} the server reaches {verdict:.2f}x the in-process engine's tokens/s "
          f"(median of the per-round ratios; target >= 0.6x at 32): {'met' if verdict >= 0.6 else 'NOT met'}")
    print(f"load average after {os.getloadavg()[0]:.1f}")
    engine.stop()
    shutdown()


if __name__ == "__main__":
    main()
