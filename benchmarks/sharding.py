"""Sharding: what FSDP buys over DDP on W workers of this machine (CPU/gloo, or GPUs/NCCL).

1. Largest trainable model under a per-worker memory cap. For a ladder of GPT widths, each
   strategy trains a few steps on W worker processes (torch.distributed, the training loop's own
   ``workers.training.sharding.place``, AdamW, grad clip) and reports each worker's peak memory
   for training: CUDA max allocated on GPU (the cap is also enforced with
   ``set_per_process_memory_fraction``: an OOM counts as "does not fit"), on CPU the peak resident
   set over the process's baseline (taken after one step of a tiny model has loaded the kernels). The largest
   rung whose max-over-workers peak stays under the cap wins. Strategies: ddp, fsdp, and on GPU
   fsdp with CPU offload.
2. Step time, FSDP vs DDP, on a model both fit: both placed in the same W processes, timed
   interleaved after a warm-up round (``benchmarks.method``); median and spread of >= 5 rounds.

The same command on a GPU machine gives GPU figures (one process per GPU, bf16 mixed precision).

    python benchmarks/sharding.py                         # 2 workers, 600 MB cap, 5 repeats
    python benchmarks/sharding.py --cap-mb 150 --max-width 384 --time-width 128 --repeats 2 --steps 1  # quick check
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # repo root instead of benchmarks/ (benchmarks/tokenize.py shadows the stdlib)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks import method  # noqa: E402

VOCAB, BLOCK, BATCH, N_LAYER = 4096, 128, 4, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _options(strategy: str):
    from workers.training.loop import ShardingConfig
    name, _, extra = strategy.partition("+")
    return ShardingConfig(strategy=name, fsdp={"cpu_offload": extra == "offload"})


def _setup(rank: int, world: int, port: int) -> torch.device:
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return device


def _build(width: int, strategy: str, world: int, device):
    from workers.model.transformer import GPT, GPTConfig
    from workers.training import sharding
    from workers.training.loop import ADAMW_BETAS
    from workers.training.params import adamw

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=N_LAYER, n_head=max(1, width // 64),
                          n_embd=width))
    precision = "bf16" if device.type == "cuda" else "fp32"
    placed = sharding.place(model, _options(strategy), world=world, device=device, precision=precision,
                            local_world=world)
    opt = adamw(model, lr=1e-4, weight_decay=0.1, betas=ADAMW_BETAS, device_type=placed.optimizer_device)
    return model, placed.train_model, opt


def _step(model, train_model, opt, rank: int, world: int, device) -> None:
    from workers.model.transformer import autocast_context

    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, VOCAB, (BATCH, BLOCK + 1), generator=g).to(device)
    with autocast_context(device, "bf16" if device.type == "cuda" else "fp32"):
        _, loss = train_model(x[:, :-1], x[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_bytes() -> int:
    """This process's current resident set (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_worker(rank, world, port, width, strategy, cap_mb, out):
    """One (width, strategy) measurement: peak training memory of this worker, or None on OOM."""
    import torch.distributed as dist

    from workers.training import sharding

    device = _setup(rank, world, port)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_mb * 2**20 / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    base = 0
    if device.type == "cpu":
        # Load the kernels and allocator pools on a tiny model first: they are not training memory.
        model, train_model, opt = _build(64, strategy, world, device)
        _step(model, train_model, opt, rank, world, device)
        del model, train_model, opt
        gc.collect()
        base = _resident_bytes()
    peak = None
    try:
        model, train_model, opt = _build(width, strategy, world, device)
        for _ in range(3):
            _step(model, train_model, opt, rank, world, device)
        peak = (sharding.peak_memory_bytes(device) - base) / 2**20
        params = sum(p.numel() for p in model.parameters())
    except torch.OutOfMemoryError:
        params = None
    out.put((rank, peak, params))
    dist.destroy_process_group()


def measure_peak(world: int, width: int, strategy: str, cap_mb: float) -> tuple[float | None, int | None]:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_peak_worker, args=(world, _free_port(), width, strategy, cap_mb, out), nprocs=world,
                       start_method="spawn")
    rows = [out.get() for _ in range(world)]
    if any(peak is None for _, peak, _ in rows):
        return None, None
    return max(peak for _, peak, _ in rows), rows[0][2]


def _timing_worker(rank, world, port, width, warmup, repeats, steps, out):
    import torch.distributed as dist

    from benchmarks import method

    device = _setup(rank, world, port)
    runs = {s: _build(width, s, world, device) for s in ("ddp", "fsdp")}

    def contender(strategy: str):
        model, tm, opt = runs[strategy]

        def run() -> float:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                _step(model, tm, opt, rank, world, device)
            dist.barrier()
            return (time.perf_counter() - t0) / steps * 1e3

        return run

    # every rank runs the same rounds in the same order (the steps are collective)
    times = method.interleave({s: contender(s) for s in runs}, repeats=repeats, warmup=warmup, verbose=rank == 0)
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def measure_step_times(world: int, width: int, warmup: int, repeats: int, steps: int) -> dict[str, list[float]]:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_timing_worker, args=(world, _free_port(), width, warmup, repeats, steps, out), nprocs=world,
                       start_method="spawn")
    return out.get()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cap-mb", type=float, default=600.0, help="Per-worker memory cap for training, MB.")
    ap.add_argument("--min-width", type=int, default=256)
    ap.add_argument("--max-width", type=int, default=1536)
    ap.add_argument("--step-width", type=int, default=128, help="Ladder step of n_embd.")
    ap.add_argument("--time-width", type=int, default=256, help="n_embd of the step-time model (fits both).")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="Warm-up rounds.")
    ap.add_argument("--steps", type=int, default=3, help="Steps per timed repeat.")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < args.workers:
        sys.exit(f"--workers {args.workers}: this machine has {torch.cuda.device_count()} GPU(s); NCCL needs one "
                 "GPU per worker (use --workers 1 to compare ddp with fsdp+offload on one GPU)")
    # glibc otherwise raises its mmap threshold as big blocks are freed and keeps later ones in a
    # fragmented heap: FSDP's per-block gather buffers would then inflate the resident set it measures.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # read by the spawned workers
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, gloo)"
    print(f"machine: {device}, torch {torch.__version__}; {args.workers} workers")
    with method.Load(uses_cpus=0 if cuda else args.workers):
        _run(args, cuda)


def _run(args, cuda: bool) -> None:
    print(f"model: GPT n_layer {N_LAYER}, vocab {VOCAB}, batch {BATCH} x {BLOCK} tokens per worker, "
          f"{'bf16 mixed precision' if cuda else 'fp32'}, AdamW")

    strategies = ["ddp", "fsdp"] + (["fsdp+offload"] if cuda else [])
    print(f"\n1. largest model under {args.cap_mb:g} MB of training memory per worker")
    print(f"{'n_embd':>7} {'params':>12} " + " ".join(f"{s:>14}" for s in strategies) + "   (peak MB per worker)")
    largest: dict[str, tuple[int, int] | None] = {s: None for s in strategies}
    alive = set(strategies)
    for width in range(args.min_width, args.max_width + 1, args.step_width):
        cells, params = [], None
        for s in strategies:
            if s not in alive:
                cells.append(f"{'-':>14}")
                continue
            peak, n = measure_peak(args.workers, width, s, args.cap_mb)
            params = n or params
            fits = peak is not None and peak <= args.cap_mb
            cells.append(f"{'OOM' if peak is None else f'{peak:.0f}':>13}{'' if fits else '!'}")
            if fits:
                largest[s] = (width, n)
            else:
                alive.discard(s)
        print(f"{width:>7} {params or 0:>12,} " + " ".join(cells), flush=True)
        if not alive:
            break
    for s, got in largest.items():
        print(f"  {s:>13}: " + (f"n_embd {got[0]}, {got[1]:,} parameters" if got else "nothing fits"))

    print(f"\n2. step time on n_embd {args.time_width} ({args.workers} workers; rounds of {args.steps} steps, "
          f"{args.warmup} warm-up round(s), {args.repeats} measured, interleaved)")
    times = measure_step_times(args.workers, args.time_width, args.warmup, args.repeats, args.steps)
    method.print_table(times, reference="ddp", unit="ms/step", lower_is_better=True)


if __name__ == "__main__":
    main()
