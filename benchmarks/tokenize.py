"""Benchmark: the ``tokenize`` stage with N one-CPU workers vs ``encode_batch_fast`` with N threads.

Corpus: ``builtin:python-stdlib`` (the running Python's standard library, ~12 MB of .py files
without tests). Tokenizer: a byte-level BPE (vocab 4096) trained once beforehand and given to
every contender as a file, so training time is excluded everywhere.

Contenders, per N in ``--workers``:

- ``stage w=N end to end``: ``workers.kinds.tokenize.run`` with N encoder actors of 1 CPU each,
  wall time of the call: corpus planning, actor start-up, reading files, encoding, writing
  Parquet shards, manifest. The same runs' metrics split it: ``start-up`` (``startup_s``: pool
  created -> every actor up with the tokenizer loaded; printed in seconds), ``encode phase``
  (``encode_s``: every actor ready -> last unit's result; reading, encoding, writing, dispatch,
  the tail; start-up excluded) and ``inside units`` (``encode_busy_s`` / N: only the actors'
  time in their units), so encode phase minus inside units is dispatch and the last unit's tail.
- ``encode_batch_fast N thr``: the call the stage's actors make, in a fresh process with
  ``RAYON_NUM_THREADS=N`` (``TOKENIZERS_PARALLELISM=false`` for N = 1), on the texts already in
  memory: only the call is timed (reading and writing are excluded on its side, included on ours).

Method (``benchmarks.method``): stage and reference interleaved, one warm-up round, then
``--repeats`` rounds; tokens/s medians, spreads and per-round ratios; load average before/after.
The stage's token ids are checked equal to the reference's for every document.

    python benchmarks/tokenize.py [--workers 1 2] [--repeats 5] [--max-bytes 50000000] [--unit-bytes 1000000]
"""

from __future__ import annotations

import sys

# This file is named like the stdlib's `tokenize`: take its folder off the import path first.
sys.path[:] = [p for p in sys.path if p not in ("", __file__.rsplit("/", 1)[0] if "/" in __file__ else ".")]

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _docs(max_bytes: int):
    from workers.data import corpus

    units = corpus.plan_units(corpus.expand(corpus.BUILTIN_STDLIB), 1 << 40)
    out, total = [], 0
    for unit in units:
        for d, text in corpus.read_unit(unit):
            n = len(text.encode())
            if total + n > max_bytes:
                return out
            total += n
            out.append((d, text))
    return out


def reference(tok_path: str, max_bytes: int, out_ids: str | None) -> None:
    """Runs in a fresh process so that the tokenizers thread pool honours the env it was given."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_path)
    docs = _docs(max_bytes)
    texts = [t for _, t in docs]
    t0 = time.perf_counter()
    encs = tok.encode_batch_fast(texts, add_special_tokens=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(e) for e in encs) + len(encs)  # + one EOS per document, as the stage counts
    if out_ids:
        Path(out_ids).write_text(json.dumps({str(d): e.ids for (d, _), e in zip(docs, encs)}))
    print(json.dumps({"seconds": dt, "tokens": tokens, "documents": len(docs)}))


def run_reference(tok_path: str, max_bytes: int, threads: int, out_ids: str | None = None) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true" if threads > 1 else "false", RAYON_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--reference", tok_path, "--max-bytes", str(max_bytes)]
    cmd += ["--ids", out_ids] if out_ids else []
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def stage_ids(artifact_dir: Path) -> dict[int, list[int]]:
    import pyarrow.parquet as pq

    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    out: dict[int, list[int]] = {}
    for split in ("train", "val"):
        for s in manifest["splits"][split]["shards"]:
            t = pq.read_table(artifact_dir / s["path"])
            out.update(zip(t.column("doc_id").to_pylist(), t.column("ids").to_pylist()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-bytes", type=int, default=50_000_000)
    ap.add_argument("--unit-bytes", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--reference")
    ap.add_argument("--ids")
    args = ap.parse_args()
    if args.reference:
        return reference(args.reference, args.max_bytes, args.ids)

    import ray

    from benchmarks import method
    from workers.data import tokenizer as tk
    from workers.data.corpus import BUILTIN_STDLIB, expand, iter_texts, plan_units
    from workers.kinds import tokenize as T
    from workers.stage import Resources, local_context

    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    tok = tk.train_bpe(iter_texts(plan_units(expand(BUILTIN_STDLIB), 1 << 40), max_bytes=2_000_000), 4096)
    tok_path = str(tk.save(tok, tmp / "tok"))
    ncpu = os.cpu_count() or 1
    ray.init(address="local", num_cpus=max(ncpu, max(args.workers)), include_dashboard=False, log_to_driver=False)
    counter = iter(range(10_000))
    first: dict[int, Path] = {}
    encode_phase: dict[int, list[float]] = {w: [] for w in args.workers}
    in_units: dict[int, list[float]] = {w: [] for w in args.workers}  # time inside encode_unit only
    startup: dict[int, list[float]] = {w: [] for w in args.workers}  # seconds
    tokens_of: dict[str, int] = {}

    def stage(w: int):
        def once() -> float:
            ctx = local_context(tmp / f"w{w}-{next(counter)}", resources=Resources(cpus=1, workers=w))
            cfg = T.Config(source=BUILTIN_STDLIB, max_bytes=args.max_bytes, tokenizer={"path": tok_path},
                           shard_size_bytes=args.unit_bytes, val_fraction=0.05)
            t0 = time.perf_counter()
            out = T.run(ctx, cfg)
            dt = time.perf_counter() - t0
            tokens = tokens_of["stage"] = out["train_tokens"] + out["val_tokens"]
            encode_phase[w].append(tokens / ctx.sink.metrics("encode_s")[-1])
            in_units[w].append(tokens / (ctx.sink.metrics("encode_busy_s")[-1] / w))
            startup[w].append(ctx.sink.metrics("startup_s")[-1])
            first.setdefault(w, ctx.artifact_dir)
            return tokens / dt
        return once

    def ref(n: int):
        def once() -> float:
            r = run_reference(tok_path, args.max_bytes, n)
            tokens_of["reference"] = r["tokens"]
            return r["tokens"] / r["seconds"]
        return once

    with method.Load(uses_cpus=max(args.workers)):
        for w in args.workers:
            name, ref_name = f"stage w={w} end to end", f"encode_batch_fast {w} thr"
            runs = method.interleave({ref_name: ref(w), name: stage(w)}, repeats=args.repeats, warmup=1)
            runs[f"stage w={w} encode phase"] = encode_phase[w][1:]  # the warm-up round left out
            runs[f"stage w={w} inside units"] = in_units[w][1:]
            print()
            method.print_table(runs, reference=ref_name, unit="tokens/s", lower_is_better=False,
                               title=f"tokenize, {w} worker(s) of 1 CPU vs encode_batch_fast with {w} Rayon thread(s)")
            s = method.summarize(startup[w][1:])
            print(f"stage w={w} start-up (pool created -> actors loaded, in end to end, not in encode phase): "
                  f"{s.median:.3f} s [{s.low:.3f}..{s.high:.3f}]")
            print()
    ray.shutdown()

    ids_file = str(tmp / "ref_ids.json")
    r = run_reference(tok_path, args.max_bytes, 1, out_ids=ids_file)
    ref_ids = json.loads(Path(ids_file).read_text())
    ours = stage_ids(first[args.workers[0]])
    mismatched = sum(1 for d, ids in ref_ids.items() if ours.get(int(d), [])[:-1] != ids)
    print(f"corpus: python-stdlib, {r['documents']} documents, {r['tokens']:,} tokens (cap {args.max_bytes:,} B), "
          f"BPE vocab 4096, units of {args.unit_bytes:,} B; stage counted {tokens_of['stage']:,} tokens")
    ok = mismatched == 0 and len(ours) == len(ref_ids)
    print(f"ids equal to encode_batch_fast: {len(ref_ids) - mismatched}/{len(ref_ids)} documents ({'OK' if ok else 'MISMATCH'})")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
