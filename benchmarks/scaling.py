"""Benchmark: tokenize and pretrain throughput on a simulated cluster of 1, 2 and 4 raylets.

For each N in --nodes, a fresh ``ray.cluster_utils.Cluster`` is started on this machine: a head
with no CPUs (driver, stage runner, Ray Train controller) and N worker raylets with one logical
CPU each; the stage then runs with N workers of 1 CPU (one per raylet, since each has one CPU).
The reference is the same stage at N=1 in the same run: scaling efficiency =
throughput_N / (N x throughput_1).

- tokenize: ``workers.kinds.tokenize.run`` with a BPE tokenizer trained beforehand (given as a file),
  output on a real S3 endpoint (moto, in this process) so encoder actors may run on any raylet
  (with local output they are pinned to the runner's node). tokens/s = the stage's own
  ``tokens_per_s`` metric (its encode phase: actor start-up, reading, encoding, writing shards).
- pretrain: ``workers.kinds.pretrain.run`` on N Ray Train workers (DDP, gloo), fixed per-worker batch
  (weak scaling: the global batch grows with N). tokens/s = steady state between the end of step
  WARMUP and the end of the second-to-last step (rank 0's per-step metric timestamps).

On a machine with C physical cores, N > C raylets share cores: the figures then measure
overhead under oversubscription, not scaling.

    python -m benchmarks.scaling [--nodes 1 2 4] [--steps 30] [--corpus-mb 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ENV = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0",
       "RAY_USAGE_STATS_ENABLED": "0"}
MODEL = {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 128, "dropout": 0.0}
WARMUP = 5


def start_s3() -> tuple[object, dict]:
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket="bench")
    return server, env


def start_cluster(n: int, tries: int = 3):
    """Head (0 CPU) + n one-CPU raylets. Ray gives a raylet 30 s to register, which an overloaded
    machine can miss: retry with a whole new cluster (a late raylet cannot join a new GCS)."""
    from ray.cluster_utils import Cluster

    for left in reversed(range(tries)):
        cluster = Cluster(initialize_head=False)
        try:
            cluster.add_node(num_cpus=0, include_dashboard=False)
            for _ in range(n):
                cluster.add_node(num_cpus=1)
            return cluster
        except Exception:  # noqa: BLE001 - "The current node timed out during startup"
            cluster.shutdown()
            if not left:
                raise


def make_corpus(folder: Path, megabytes: float) -> Path:
    """JSONL of pseudo-English documents (deterministic)."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = [w for w in open(__file__, encoding="utf-8").read().split() if w.isalpha()] or ["word"]
    folder.mkdir(parents=True, exist_ok=True)
    path, size = folder / "corpus.jsonl", 0
    with path.open("w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            line = json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(50, 400))))}) + "\n"
            f.write(line)
            size += len(line)
    return path


def train_tokenizer(corpus: Path, out: Path) -> Path:
    from workers.data import tokenizer as tk

    texts = (json.loads(line)["text"] for line in corpus.open(encoding="utf-8"))
    tok = tk.train_bpe(texts, 1024, ["<|endoftext|>"], 2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tok.to_str())
    return out / "tokenizer.json"


def bench_tokenize(n: int, corpus: Path, tokenizer: Path, tmp: Path) -> float:
    from workers.kinds import tokenize as T
    from workers.stage import ListSink, Resources, StageContext

    art = tmp / f"tok{n}"
    art.mkdir(parents=True)
    ctx = StageContext(stage=f"tok{n}", run_id="bench", attempt=1, inputs={}, artifact_dir=art,
                       output_uri=f"s3://bench/tok{n}/out", storage="s3://bench", resources=Resources(cpus=1, workers=n),
                       sink=ListSink(), scratch_uri=f"s3://bench/tok{n}/scratch")
    T.run(ctx, T.Config(source=str(corpus), tokenizer={"path": str(tokenizer)}, shard_size_bytes=256 << 10))
    return ctx.sink.metrics("tokens_per_s")[-1]


def bench_pretrain(ray, n: int, dataset: Path, tmp: Path, steps: int) -> float:
    from benchmarks.pretrain import steady_tokens_per_s
    from tests.test_pretrain import collector_sink
    from workers.kinds import pretrain
    from workers.stage import Resources, local_context

    ctx = local_context(tmp / f"pt{n}", "pretrain", resources=Resources(cpus=1, workers=n),
                        inputs={"tok": {"dataset": str(dataset), "tokenizer": str(dataset / "tokenizer.json")}})
    ctx = replace(ctx, sink=collector_sink(ray))
    cfg = pretrain.Config(model=MODEL, batch_size=4, grad_accum=1, max_steps=steps, lr=6e-4, min_lr=6e-5,
                          warmup_steps=5, eval_every=steps, eval_steps=1, checkpoint_every=steps, seed=1)
    pretrain.run(ctx, cfg)
    ends = [e["ts"] for e in ctx.sink.events() if e["type"] == "metrics" and "train_loss" in e["metrics"]]
    return steady_tokens_per_s(ends, cfg.batch_size * n * MODEL["block_size"], WARMUP)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--corpus-mb", type=float, default=4.0)
    args = ap.parse_args()
    os.environ.update(ENV)
    import ray

    from benchmarks.pretrain import make_dataset

    server, s3_env = start_s3()
    tmp = Path(tempfile.mkdtemp(prefix="scaling-"))
    corpus = make_corpus(tmp / "corpus", args.corpus_mb)
    tokenizer = train_tokenizer(corpus, tmp / "tokenizer")
    dataset = make_dataset(tmp / "tokens")
    cores = os.cpu_count()
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.1f}; corpus {args.corpus_mb:g} MB")
    rows = []
    try:
        for n in args.nodes:
            t0 = time.perf_counter()
            cluster = start_cluster(n)
            try:
                ray.init(address=cluster.address, runtime_env={"env_vars": {**ENV, **s3_env}}, log_to_driver=False)
                cluster.wait_for_nodes()
                up = time.perf_counter() - t0
                tok = bench_tokenize(n, corpus, tokenizer, tmp)
                pt = bench_pretrain(ray, n, dataset, tmp, args.steps)
            finally:
                ray.shutdown()
                cluster.shutdown()
            rows.append((n, tok, pt))
            print(f"  {n} raylet(s): cluster up in {up:.0f}s; tokenize {tok:,.0f} tokens/s; pretrain {pt:,.0f} tokens/s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        server.stop()
    base = next((r for r in rows if r[0] == 1), rows[0])
    print("\n| raylets = workers | tokenize tokens/s | efficiency | pretrain tokens/s | efficiency |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n, tok, pt in rows:
        k = n / base[0]
        print(f"| {n} | {tok:,.0f} | {tok / (k * base[1]):.2f} | {pt:,.0f} | {pt / (k * base[2]):.2f} |")
    if max(args.nodes) > (cores or 1):
        print(f"\nnote: {max(args.nodes)} raylets on {cores} cores share cores: beyond {cores} the efficiency measures "
              f"overhead under oversubscription, not scaling.")


if __name__ == "__main__":
    main()
