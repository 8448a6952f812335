"""A data-parallel training loop on Ray Train, shared by the training stage kinds.

A kind describes its job as a ``TrainJob`` (a model factory, a batch-source factory, a loss
function, the options in ``TrainingConfig``) and calls ``fit(ctx, job)``. ``fit`` runs the loop
on ``ctx.resources.workers`` Ray Train workers (gloo on CPU, NCCL + bf16 autocast on GPU), the
model replicated (DDP) or sharded (FSDP2) as ``workers.training.sharding`` decides, checkpoints
through ``ray.train.report`` into ``ctx.scratch_uri`` (so a retried attempt of the stage resumes
too), restarts the worker group from the latest checkpoint when a worker dies, and returns the
final checkpoint's folder (consolidated once into the kind's Hugging Face layout) and state.

Batches are a pure function of the step (see ``BatchSource``): a resumed run needs no data-loader
state, and any number of workers sees the same global batch. Dropout randomness is re-seeded from
``(seed, step, rank)`` at every step for the same reason; a checkpoint therefore holds the
trainable weights and optimizer state, sharded (``torch.distributed.checkpoint``: each rank writes
its own part, any number of workers reads it back), and ``trainer_state.json`` (step, tokens,
seed, step budget, last losses), and nothing else is needed: on the same workers a resumed run
ends bit-identical to one never interrupted (CPU, fp32; tests/test_resume_exact.py), the steps
after the last checkpoint replayed. A run resumes on another number of workers when the global
batch (batch_size x grad_accum x workers) stays the same (the same curve within rounding).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import torch
import torch.distributed as dist
from pydantic import ConfigDict, Field, model_validator

from workers import storage
from workers.cluster import ActorGroup, check_fits, count_of
from workers.config import StrictConfig
from workers.cpu import claim_cpus
from workers.training import sharding
from workers.training.params import OptimizerConfig, adamw

STATE_FILE = "trainer_state.json"
ADAMW_BETAS = (0.9, 0.95)
_PROGRESS_EVERY_S = 0.5


class FsdpConfig(StrictConfig):
    """Options of ``strategy: fsdp`` (see workers.training.sharding)."""

    model_config = ConfigDict(extra="forbid")

    reshard_after_forward: bool = Field(True, description="Free each block's gathered weights after its "
                                        "forward and gather them again for the backward (less memory, one more "
                                        "all-gather per block); false keeps them until the backward.")
    cpu_offload: bool = Field(False, description="Keep parameter shards, gradients and the optimizer step in "
                              "host memory (GPU only: fits larger models, slower steps).")


class ShardingConfig(StrictConfig):
    """How the training workers hold the model (every training kind and the rlhf learner)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="ddp: every worker holds the whole model and optimizer state; fsdp: they are "
        "sharded across the workers (FSDP2, per transformer block); auto: fsdp when the replicated training "
        "state (16 bytes a trainable parameter) exceeds half of one worker's memory. With bf16 precision "
        "fsdp gathers weights in bf16 and reduces gradients in fp32.")
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig, description="Options of the fsdp strategy.")
    activation_checkpointing: bool = Field(False, description="Recompute each transformer block's activations "
                                           "in the backward instead of storing them (less memory, ~1/3 more "
                                           "compute); either strategy.")


class TrainingConfig(OptimizerConfig, ShardingConfig):
    """Options every training kind shares; a kind's ``Config`` subclasses it."""

    batch_size: int = Field(8, ge=1, description="Sequences per worker per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step; "
                            "global batch = batch_size x workers x grad_accum.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train for.")
    min_lr: float = Field(6e-5, ge=0, description="Learning rate at the end of the cosine decay.")
    warmup_steps: int = Field(100, ge=0, description="Steps of linear warmup from 0 to lr; then "
                              "cosine decay to min_lr at the last step.")
    eval_every: int = Field(100, ge=1, description="Evaluate on the validation split every this many steps "
                            "(and at the end).")
    eval_steps: int = Field(10, ge=0, description="Global batches in the fixed validation set; 0 disables eval.")
    checkpoint_every: int = Field(500, ge=1, description="Checkpoint every this many steps (and at the end).")
    compile: bool = Field(False, description="torch.compile the model (slow start, faster steps on GPU).")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts (from the latest checkpoint) "
                              "before the attempt fails.")

    @model_validator(mode="after")
    def _check_lr(self) -> "TrainingConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: got {self.min_lr}; must be <= lr ({self.lr})")
        return self


class BatchSource(Protocol):
    """One rank's share of the data, indexed by step so that resuming needs no iterator state."""

    def train(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's ``grad_accum`` micro-batches of global step ``step``."""

    def val(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the fixed validation set (empty: no eval)."""


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: rank ``rank`` stops at the start of step ``step``, once (``marker`` file),
    after Ray Train has registered every checkpoint reported before it: it exits hard, or with
    ``hang`` it writes the marker (ending with its pid) and waits there, so that a test can kill
    it or its node while the run provably has steps left."""

    rank: int
    step: int
    marker: str
    hang: bool = False


@dataclass
class TrainJob:
    """Everything the per-worker loop needs; pickled into each Ray Train worker."""

    name: str
    config: TrainingConfig
    max_steps: int
    make_model: Callable[[], torch.nn.Module]
    """Builds the freshly initialised model (called after seeding, identically on every rank, and
    once in the driver to receive the final weights for ``save_model``)."""
    make_batches: Callable[[int, int, torch.device], BatchSource]
    """(rank, world, device) -> this rank's BatchSource."""
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    """(model, micro-batch) -> mean loss of the micro-batch (over its ``items_fn`` items)."""
    save_model: Callable[[torch.nn.Module, Path], None]
    """Writes the final weights (and model config) into a folder in the kind's Hugging Face layout;
    called once, in the driver, on a plain model built by make_model."""
    tokens_per_step: int
    """Tokens in one global batch (for tokens/s and the token count)."""
    threads_per_worker: int = 1
    fault: FaultInjection | None = None
    val_metrics: Callable[[torch.nn.Module, dict[str, torch.Tensor]], dict[str, tuple[torch.Tensor, torch.Tensor]]] \
        | None = None
    """(model, validation micro-batch) -> {name: (numerator, denominator)}, summed over the
    validation set and every rank, logged as ``val_<name>`` beside val_loss (e.g. masked-token
    accuracy: correct, chosen)."""
    items_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    """micro-batch -> the number of items its mean loss is over (response tokens, pairs): the
    step's loss is then the mean over all of the step's items, across micro-batches and workers
    (as transformers >= 4.46 with num_items_in_batch), not the mean of micro-batch means. None:
    micro-batches weigh the same."""


@dataclass
class FitResult:
    checkpoint_dir: Path
    """A local folder holding the final checkpoint, its weights written by ``job.save_model``
    (valid until ``cleanup()``)."""
    state: dict[str, Any]
    """The final trainer_state.json."""
    _tmp: str | None = None

    def cleanup(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- schedule, MFU


def lr_at(step: int, cfg: TrainingConfig, max_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at the end."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# Dense peak FLOP/s per GPU: (bf16/fp16 tensor core, tf32). Matched by substring of the device name,
# first match wins (so "H100 PCIe" precedes "H100").
_GPU_PEAKS: list[tuple[str, tuple[float, float]]] = [
    ("H200", (989e12, 494e12)),
    ("H100 PCIe", (756e12, 378e12)),
    ("H100", (989e12, 494e12)),
    ("A100", (312e12, 156e12)),
    ("L40S", (362e12, 183e12)),
    ("L4", (121e12, 60e12)),
    ("A10G", (70e12, 35e12)),
    ("A10", (125e12, 62.5e12)),
    ("V100", (125e12, 15.7e12)),
    ("T4", (65e12, 8.1e12)),
]


def gpu_peak_flops(name: str, precision: str) -> float | None:
    for key, (half, tf32) in _GPU_PEAKS:
        if key in name:
            return half if precision == "bf16" else tf32
    return None


@functools.lru_cache(maxsize=None)
def cpu_peak_flops(threads: int, n: int = 1024, reps: int = 5) -> float:
    """fp32 matmul FLOP/s measured on this process's threads (best of ``reps``; cached)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up the BLAS
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one worker's device for MFU: a table for GPUs, a measurement on CPU."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    return cpu_peak_flops(torch.get_num_threads())


def resolve_precision(device: torch.device, precision: str) -> str:
    """The precision the loop really uses: bf16 needs a GPU."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if precision in ("auto", "bf16") else "fp32"


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizer, state: dict, rank: int) -> None:
    """This rank's shard of the training state into ``directory`` (rank 0 adds the trainer state)."""
    directory.mkdir(parents=True, exist_ok=True)
    sharding.save_state(directory, model, optimizer)
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))


def load_checkpoint(directory: Path, job: TrainJob, model: torch.nn.Module, optimizer) -> dict:
    state = json.loads((directory / STATE_FILE).read_text())
    trained = state.get("tokens_per_step", job.tokens_per_step)
    if trained != job.tokens_per_step:
        raise ValueError(
            f"{job.name}: the checkpoint at step {state['step']} was trained with {trained} tokens per step, "
            f"this run takes {job.tokens_per_step}; keep batch_size x grad_accum x workers (the global batch) "
            "as it was to resume on another number of workers")
    # The rest of the run is a function of these (data order, dropout, the LR schedule): another
    # value would continue another run, and a step beyond the plan would end "done" untrained.
    for key, want in (("seed", job.config.seed), ("max_steps", job.max_steps)):
        if key in state and state[key] != want:
            raise ValueError(f"{job.name}: the checkpoint at step {state['step']} was trained with {key}={state[key]}, "
                             f"this run has {key}={want}; resume with the {key} it was trained with, or start over "
                             "(--no-cache)")
    sharding.load_state(directory, model, optimizer)
    return state


# ----------------------------------------------------------------------------- the worker loop


def _all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _gather(values: list[float], world: int, device) -> torch.Tensor:
    """(world, len(values)): every rank's values, on every rank."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if world == 1:
        return mine.unsqueeze(0).cpu()
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return torch.stack(out).cpu()


def micro_batch_weights(micro: list[dict[str, torch.Tensor]], job: TrainJob, world: int, device) -> list[float]:
    """The weight of each micro-batch's mean loss in this rank's share of the step's loss, such
    that the shares summed over ranks (what DDP/FSDP's averaged gradient, times ``world``, sees)
    are the mean over the step's items: items_i x world / (the step's items on all ranks, all-
    reduced). Without ``items_fn``: 1 / micro-batches."""
    if job.items_fn is None:
        return [1.0 / len(micro)] * len(micro)
    counts = [float(job.items_fn(b)) for b in micro]
    total = float(_all_reduce_sum(torch.tensor([sum(counts)], dtype=torch.float64, device=device), world)[0])
    return [c * world / max(total, 1.0) for c in counts]


def _evaluate(model, batches: BatchSource, job: TrainJob, autocast, world: int, device) -> float | None:
    micro = batches.val()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, items or batches)
    model.eval()
    with torch.no_grad(), autocast:
        for b in micro:
            items = float(job.items_fn(b)) if job.items_fn is not None else 1.0
            total[0] += job.loss_fn(model, b).double() * items
            total[1] += items
    model.train()
    total = _all_reduce_sum(total, world)
    return float(total[0] / total[1]) if total[1] > 0 else None


def _evaluate_metrics(model, batches: BatchSource, job: TrainJob, autocast, world: int, device) -> dict[str, float]:
    """``job.val_metrics`` over the validation set, as ratios of sums across ranks."""
    if job.val_metrics is None:
        return {}
    sums: dict[str, torch.Tensor] = {}
    model.eval()
    with torch.no_grad(), autocast:
        for b in batches.val():
            for name, (num, den) in job.val_metrics(model, b).items():
                t = torch.stack([num.double(), den.double()])
                sums[name] = sums[name] + t if name in sums else t
    model.train()
    names = sorted(sums)  # the same order on every rank
    if not names:
        return {}
    total = _all_reduce_sum(torch.stack([sums[n] for n in names]).to(device), world)
    return {f"val_{n}": float(total[i, 0] / total[i, 1]) for i, n in enumerate(names) if total[i, 1] > 0}


def _train_worker(loop_config: dict) -> None:
    """Ray Train's worker function: the loop, its events batched (one actor call per ~0.5 s,
    not per step: see ``BatchingSink``)."""
    from workers.stage import BatchingSink

    sink = BatchingSink(loop_config["ctx"].sink, every_s=_PROGRESS_EVERY_S)
    try:
        _train(loop_config["job"], replace(loop_config["ctx"], sink=sink))
    finally:
        sink.flush()


def _train(job: TrainJob, ctx: Any) -> None:
    """Runs in every Ray Train worker: resume, train, evaluate, checkpoint."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = job.config
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # "fp32" uses TF32 tensor cores, as peak_flops assumes
        torch.backends.cudnn.allow_tf32 = True
    # Normal priority (Ray starts workers at niceness 15) and the stage's CPUs as torch threads;
    # here, in Ray Train's training thread, because OpenMP's thread count is per thread.
    cpu = claim_cpus(job.threads_per_worker)
    if rank == 0:
        ctx.set_tags({"train.threads_per_worker": str(cpu["threads"]), "train.niceness": str(cpu["niceness"])})
    precision = resolve_precision(device, cfg.precision)
    from workers.model.transformer import autocast_context

    def autocast():
        return autocast_context(device, precision) if device.type == "cuda" else nullcontext()

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = job.make_model()
    placed = sharding.place(model, cfg, world=world, device=device, precision=precision,
                            local_world=tctx.get_local_world_size())
    strategy, train_model = placed.strategy, placed.train_model
    optimizer = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=ADAMW_BETAS,
                      device_type=placed.optimizer_device)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "seed": cfg.seed, "train_loss": None, "val_loss": None,
                             "tokens_per_step": job.tokens_per_step, "max_steps": job.max_steps}
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = load_checkpoint(Path(d), job, model, optimizer)
    start = int(state["step"])
    if rank == 0:
        ctx.set_tags({"train.strategy": strategy})
        if resumed is not None:
            ctx.set_tags({"resumed_from_step": str(start)})
            ctx.log_metrics({"resumed_from_step": start}, step=start)

    if cfg.compile:
        train_model = torch.compile(train_model)
    batches = job.make_batches(rank, world, device)
    flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else None
    peak = peak_flops(device, precision) if rank == 0 and flops_per_token else None
    params = [p for p in model.parameters() if p.requires_grad]
    state_mb = None  # this rank's parameter + optimizer-state shards, once the optimizer has state

    prev_end: float | None = None
    last_progress = -math.inf
    for step in range(start, job.max_steps):
        if job.fault and step == job.fault.step:
            ctx.sink.flush()  # the steps logged so far (by rank 0) reach the driver before the fault
        if job.fault and rank == job.fault.rank and step == job.fault.step and not os.path.exists(job.fault.marker):
            # Let Ray Train register the checkpoints reported so far (its controller polls every
            # few seconds; a report still in flight when a worker dies is lost), then die, or
            # wait for the test to kill this worker or its node.
            ray.train.get_all_reported_checkpoints()
            Path(job.fault.marker).write_text(
                f"rank {rank} {'waits' if job.fault.hang else 'exited'} at step {step}, pid {os.getpid()}\n")
            while job.fault.hang:
                time.sleep(1)
            os._exit(1)
        t0 = time.perf_counter()
        torch.manual_seed(hash((cfg.seed, step, rank)) & 0x7FFF_FFFF)  # dropout: a function of the step
        lr = lr_at(step, cfg, job.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = batches.train(step)
        t_data = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        weights = micro_batch_weights(micro, job, world, device)
        for k, b in enumerate(micro):
            # Gradients are reduced across workers on the last micro-batch only.
            with sharding.gradient_sync(train_model, k == len(micro) - 1):
                with autocast():
                    loss = job.loss_fn(train_model, b) * weights[k]
                loss.backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        grad_norm = sharding.to_local(grad_norm)  # FSDP: the norm of the sharded gradients, reduced
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if state_mb is None:
            state_mb = sharding.local_state_bytes(model, optimizer) / 2**20
        # (loss, peak memory, state) of every rank; syncs the device, so the timing is real
        ranks = _gather([float(loss_sum), sharding.peak_memory_bytes(device) / 2**20, state_mb], world, device)
        train_loss = float(ranks[:, 0].sum()) / world
        t_end = time.perf_counter()
        # step_time_s: wall time from the previous step's end to this one's (so it includes the
        # previous step's logging, evaluation and checkpointing); data_s + compute_s: this step's
        # own work; overhead_s: the rest, what the stage adds to a plain loop.
        dt = t_end - (prev_end if prev_end is not None else t0)
        data_s, compute_s = t_data - t0, t_end - t_data
        prev_end = t_end
        done = step + 1
        state.update(step=done, tokens=int(state["tokens"]) + job.tokens_per_step, train_loss=train_loss)

        if done % cfg.eval_every == 0 or done == job.max_steps:
            val = _evaluate(model, batches, job, autocast(), world, device)
            if val is not None:
                state["val_loss"] = val
            state.update(_evaluate_metrics(model, batches, job, autocast(), world, device))
        if rank == 0:
            tps = job.tokens_per_step / dt
            metrics = {"train_loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                       "tokens_per_s": tps, "step_time_s": dt, "data_s": data_s, "compute_s": compute_s,
                       "overhead_s": max(0.0, dt - data_s - compute_s), "tokens": state["tokens"]}
            if peak:
                metrics["mfu"] = flops_per_token * tps / (peak * world)
            metrics["peak_memory_mb"] = float(ranks[:, 1].max())
            for r in range(world):
                metrics[f"peak_memory_mb_rank{r}"] = float(ranks[r, 1])
                metrics[f"train_state_mb_rank{r}"] = float(ranks[r, 2])
            if done % cfg.eval_every == 0 or done == job.max_steps:
                if state["val_loss"] is not None:
                    metrics["val_loss"] = state["val_loss"]
                metrics.update({k: v for k, v in state.items() if k.startswith("val_") and k != "val_loss"})
            ctx.log_metrics(metrics, step=done)
            if t_end - last_progress >= _PROGRESS_EVERY_S or done == job.max_steps:
                ctx.progress(done, job.max_steps, "steps")  # for the live table: a few per second suffice
                last_progress = t_end
        if done % cfg.checkpoint_every == 0 or done == job.max_steps:
            report = {k: v for k, v in state.items() if isinstance(v, (int, float))}
            # Every rank uploads its own shard; Ray Train merges them into one checkpoint folder.
            with tempfile.TemporaryDirectory(prefix="ckpt-") as d:
                save_checkpoint(Path(d), model, optimizer, state, rank)
                ray.train.report(report, checkpoint=Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"checkpoint-{done:08d}")
            if rank == 0:
                ctx.progress(done, job.max_steps, "steps", checkpoint=done)
            ctx.sink.flush()  # the metrics up to a checkpoint are not lost should the worker die


# ----------------------------------------------------------------------------- the driver


def _recovery_log(ctx):
    """A Ray Train callback (it runs in the Train controller) recording each worker-group failure
    on the stage's run; the group then restarts from the latest checkpoint (``max_failures``)."""
    from ray.train import UserCallback

    class RecoveryLog(UserCallback):
        def __init__(self) -> None:
            self.failures = 0

        def after_exception(self, run_context, worker_exceptions) -> None:
            self.failures += 1
            rank, err = next(iter(sorted(worker_exceptions.items(), key=lambda kv: kv[0])))
            line = next((ln for ln in str(err).splitlines() if ln.strip()), "")
            ctx.log_metrics({"train_failures": self.failures})
            ctx.set_tags({"train.failures": str(self.failures),
                          "train.last_failure": f"rank {rank}: {type(err).__name__}: {line}"[:500]})

    return RecoveryLog()


def _torch_config(workers: int, strategy: str):
    """Ray Train's TorchConfig; on one worker without FSDP, no process group at all: the loop
    needs none there, and gloo's loop thread would wake 100 times a second beside the step."""
    from ray.train.backend import Backend
    from ray.train.torch import TorchConfig

    if workers > 1 or strategy == "fsdp":
        return TorchConfig()

    class OneWorker(TorchConfig):
        @property
        def backend_cls(self):
            return Backend  # its hooks do nothing

    return OneWorker()


def fit(ctx, job: TrainJob) -> FitResult:
    """Train ``job`` on Ray Train with ``ctx.resources``; returns the final checkpoint.

    State lives under ``ctx.scratch_uri/<job.name>``: a retried attempt of the stage (same
    fingerprint, same scratch) resumes from the latest checkpoint there.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's preemption watcher (an actor polling for node drains, which this loop does not
    # act on) would be one more process waking on a training node 100 times a second; off
    # unless the environment asks for it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    res = ctx.resources
    # Ray Train would wait forever for workers a too-small cluster can never place: fail now,
    # naming stages.<stage>.resources.workers and the numbers (pretrain, finetune, reward).
    workers, workers_field = count_of(("resources.workers", res.workers))
    check_fits(ctx.stage, [ActorGroup("Ray Train worker", workers, workers_field, res.cpus, res.gpus, "resources")])
    use_gpu = res.gpus > 0
    per_worker = {"CPU": res.cpus, **({"GPU": res.gpus} if use_gpu else {})}
    root = ctx.scratch_uri or storage.join(str(ctx.artifact_dir), ".train")
    fs, path = storage.resolve(root)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"job": job, "ctx": ctx},
        torch_config=_torch_config(res.workers or 1, job.config.strategy),
        scaling_config=ScalingConfig(num_workers=res.workers or 1, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=job.name, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=job.config.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=[_recovery_log(ctx)]),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {ctx.stage!r}: training finished without a checkpoint under {root!r}")
    tmp = tempfile.mkdtemp(prefix="final-ckpt-")
    local = Path(result.checkpoint.to_directory(os.path.join(tmp, "checkpoint")))
    state = json.loads((local / STATE_FILE).read_text())
    # The one place the whole trained model is assembled: here, from the shards, for the export.
    job.save_model(sharding.consolidate(local, job.make_model()), local)
    return FitResult(checkpoint_dir=local, state=state, _tmp=tmp)
