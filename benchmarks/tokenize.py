"""Benchmark: the ``tokenize`` stage (1 and 2 Ray workers) vs ``tokenizers`` in one process.

Corpus: ``builtin:python-stdlib`` (the running Python's standard library, ~12 MB of .py files
without tests). Tokenizer: a byte-level BPE (vocab 4096) trained once beforehand and given to
every contender as a file, so training time is excluded everywhere.

Contenders (each prints tokens/s; token ids are checked equal to the stage's output):

- ``stage w=N``: ``workers.kinds.tokenize.run`` end to end with N encoder actors of 1 CPU each: actor
  start-up, reading files, encoding, writing Parquet shards, manifest. (``encode phase`` excludes
  tokenizer loading/saving and corpus planning only.)
- ``encode_batch 1 thread``: ``Tokenizer.encode_batch`` in one process with
  ``TOKENIZERS_PARALLELISM=false`` (one core) -- the fair single-process reference.
- ``encode_batch N threads``: the same with the Rust thread pool on (``RAYON_NUM_THREADS=N``):
  ``tokenizers`` parallelises a batch itself, across the cores of one machine.
- ``encode_batch_fast 1 thread``: the call the stage's actors use (no offsets computed).

The references time only the encode call on texts already in memory (reading excluded, which
favours them); the stage's time includes everything.

    python benchmarks/tokenize.py [--max-bytes 50000000] [--unit-bytes 1000000]
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


def reference(tok_path: str, max_bytes: int, fast: bool, out_ids: str | None) -> None:
    """Runs in a fresh process so the tokenizers thread pool honours the env it was given."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_path)
    docs = _docs(max_bytes)
    texts = [t for _, t in docs]
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    t0 = time.perf_counter()
    encs = encode(texts, add_special_tokens=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(e.ids) for e in encs) + len(encs)  # + one EOS per document, as the stage counts
    if out_ids:
        Path(out_ids).write_text(json.dumps({str(d): e.ids for (d, _), e in zip(docs, encs)}))
    print(json.dumps({"seconds": dt, "tokens": tokens, "documents": len(docs)}))


def _run_reference(tok_path: str, max_bytes: int, threads: int, fast: bool, out_ids: str | None = None) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true" if threads > 1 else "false", RAYON_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--reference", tok_path, "--max-bytes", str(max_bytes)]
    cmd += ["--fast"] if fast else []
    cmd += ["--ids", out_ids] if out_ids else []
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-bytes", type=int, default=50_000_000)
    ap.add_argument("--unit-bytes", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reference")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--ids")
    args = ap.parse_args()
    if args.reference:
        return reference(args.reference, args.max_bytes, args.fast, args.ids)

    import pyarrow.parquet as pq
    import ray

    from workers.kinds import tokenize as T
    from workers.data import tokenizer as tk
    from workers.data.corpus import iter_texts, plan_units, expand, BUILTIN_STDLIB
    from workers.stage import Resources, local_context

    ncpu = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    tok = tk.train_bpe(iter_texts(plan_units(expand(BUILTIN_STDLIB), 1 << 40), max_bytes=2_000_000), 4096)
    tok_path = str(tk.save(tok, tmp / "tok"))
    ray.init(num_cpus=ncpu, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    rows = []
    stage_ids = None
    for w in args.workers:
        ctx = local_context(tmp / f"w{w}", resources=Resources(cpus=1, workers=w))
        cfg = T.Config(source=BUILTIN_STDLIB, max_bytes=args.max_bytes, tokenizer={"path": tok_path},
                       shard_size_bytes=args.unit_bytes, val_fraction=0.05)
        t0 = time.perf_counter()
        out = T.run(ctx, cfg)
        dt = time.perf_counter() - t0
        tokens = out["train_tokens"] + out["val_tokens"]
        enc_s = ctx.sink.metrics("encode_s")[-1]
        rows.append((f"stage w={w} (end to end)", dt, tokens))
        rows.append((f"stage w={w} (encode phase)", enc_s, tokens))
        if stage_ids is None:
            manifest = json.loads((ctx.artifact_dir / "manifest.json").read_text())
            stage_ids = {}
            for split in ("train", "val"):
                for s in manifest["splits"][split]["shards"]:
                    t = pq.read_table(ctx.artifact_dir / s["path"])
                    stage_ids.update(zip(t.column("doc_id").to_pylist(), t.column("ids").to_pylist()))
    ray.shutdown()

    ids_file = str(tmp / "ref_ids.json")
    ref1 = _run_reference(tok_path, args.max_bytes, 1, fast=False, out_ids=ids_file)
    ref_ids = json.loads(Path(ids_file).read_text())
    mismatched = sum(1 for d, ids in ref_ids.items() if stage_ids.get(int(d), [])[:-1] != ids)
    refs = [("encode_batch 1 thread", ref1),
            (f"encode_batch {ncpu} threads", _run_reference(tok_path, args.max_bytes, ncpu, fast=False)),
            ("encode_batch_fast 1 thread", _run_reference(tok_path, args.max_bytes, 1, fast=True))]
    for name, r in refs:
        rows.append((name, r["seconds"], r["tokens"]))

    base = ref1["tokens"] / ref1["seconds"]
    print(f"corpus: python-stdlib, {ref1['documents']} documents, {ref1['tokens']:,} tokens (cap {args.max_bytes:,} B), "
          f"BPE vocab 4096, units of {args.unit_bytes:,} B, {ncpu} CPUs, load avg {os.getloadavg()[0]:.1f}")
    print(f"ids equal to encode_batch: {len(ref_ids) - mismatched}/{len(ref_ids)} documents "
          f"({'OK' if mismatched == 0 and len(stage_ids) == len(ref_ids) else 'MISMATCH'})")
    print(f"{'contender':34} {'seconds':>8} {'tokens/s':>12} {'vs encode_batch 1 thread':>26}")
    for name, s, n in rows:
        print(f"{name:34} {s:8.2f} {n / s:12,.0f} {n / s / base:25.2f}x")
    if mismatched or len(stage_ids) != len(ref_ids):
        sys.exit(1)


if __name__ == "__main__":
    main()
