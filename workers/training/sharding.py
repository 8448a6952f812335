"""How a training worker holds its model: replicated (DDP) or sharded (FSDP2), and its sharded
checkpoints.

``ddp`` keeps the whole model, its gradients and both AdamW moments on every worker (16 bytes a
parameter in fp32). ``fsdp`` applies ``torch.distributed.fsdp.fully_shard`` to every transformer
block and then to the root, so each of ``W`` workers holds 1/W of the parameters, gradients and
optimizer state and gathers one block's weights at a time for its forward and backward. ``auto``
picks FSDP when the replicated training state would not fit comfortably (half) in one worker's
memory.

Checkpoints are ``torch.distributed.checkpoint`` (DCP) folders: every rank writes its own shard
(``__<rank>_0.distcp``; rank 0 adds ``.metadata``), nobody gathers the model, and DCP reshards on
load, so a run saved by 2 workers resumes on 1 or 4, under either strategy. Frozen parameters
(a LoRA base) are not saved: they come back from the base checkpoint. ``consolidate`` turns the
final one into an ordinary model, once, in the driver, for the Hugging Face layout.

The knobs live in ``ShardingConfig`` (``strategy``, ``activation_checkpointing``, ``fsdp``), which
``TrainingConfig`` and the rlhf config extend; the loop and the rlhf learner call ``place``.
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

STATE_KEYS = ("model", "optim")
_AUTO_FRACTION = 0.5
"""auto: shard when the replicated training state exceeds this fraction of a worker's memory
(the rest is left for activations, the framework and the data)."""


# ----------------------------------------------------------------------------- choosing


def training_state_bytes(model: nn.Module) -> int:
    """Replicated fp32 training state: weights of every parameter, plus a gradient and two AdamW
    moments for each trainable one (16 bytes a trainable parameter, 4 a frozen one)."""
    total = 0
    for p in model.parameters():
        total += p.numel() * (16 if p.requires_grad else 4)
    return total


def worker_memory_bytes(device: torch.device, local_world: int) -> int:
    """The memory one worker may use: its GPU's, or this node's RAM split between its workers."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // max(1, local_world)


def choose_strategy(strategy: str, model: nn.Module, world: int, memory_bytes: int) -> str:
    """``ddp`` or ``fsdp`` for a ``strategy`` of auto/ddp/fsdp. ``memory_bytes`` must be the same
    on every rank (the loop passes the group's minimum), or the ranks would disagree."""
    if strategy != "auto":
        return strategy
    if world == 1:
        return "ddp"  # nothing to shard across
    return "fsdp" if training_state_bytes(model) > _AUTO_FRACTION * memory_bytes else "ddp"


# ----------------------------------------------------------------------------- wrapping


@dataclass
class Placement:
    """A model made ready for training on this worker."""

    strategy: str
    """ddp or fsdp."""
    train_model: nn.Module
    """What to call forward/backward on: the DDP wrapper, or the (in-place) sharded model."""
    optimizer_device: str
    """Where the optimizer steps: cpu when FSDP offloads, else the worker's device type."""
    offload: bool


def place(model: nn.Module, options, *, world: int, device: torch.device, precision: str,
          local_world: int) -> Placement:
    """Choose the strategy (the same on every rank) and apply it, with activation checkpointing;
    ``options`` is a ``ShardingConfig``. Collective when ``world > 1``. Under FSDP the shards
    move to the device and the whole model never does."""
    import torch.distributed as dist

    memory = torch.tensor([worker_memory_bytes(device, local_world)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(memory, op=dist.ReduceOp.MIN)
    strategy = choose_strategy(options.strategy, model, world, int(memory))
    if options.activation_checkpointing:
        checkpoint_activations(model)
    offload = strategy == "fsdp" and options.fsdp.cpu_offload and device.type == "cuda"
    if strategy == "fsdp":
        train_model = shard(model, world=world, device=device, precision=precision,
                            reshard_after_forward=options.fsdp.reshard_after_forward, cpu_offload=offload)
    else:
        train_model = replicate(model.to(device), device, world)
    return Placement(strategy, train_model, "cpu" if offload else device.type, offload)


def place_frozen(model: nn.Module, placement: Placement, *, world: int, device: torch.device,
                 precision: str) -> nn.Module:
    """A frozen companion (a reference policy) held the way the trained model is: sharded (and
    offloaded) under FSDP, a plain copy on the device under DDP."""
    for p in model.parameters():
        p.requires_grad_(False)
    if placement.strategy == "fsdp":
        return shard(model, world=world, device=device, precision=precision, reshard_after_forward=True,
                     cpu_offload=placement.offload)
    return model.to(device)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the elements of the model's ``nn.ModuleList``s (GPT ``transformer.h``,
    a Llama's ``layers``), the units FSDP shards and activation checkpointing recomputes."""
    return [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each block's activations in the backward instead of keeping them (less memory,
    about one more forward of compute). Parameter names are unchanged (checkpoints stay compatible)."""
    from torch.utils.checkpoint import checkpoint

    for block in transformer_blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def shard(model: nn.Module, *, world: int, device: torch.device, precision: str, reshard_after_forward: bool,
          cpu_offload: bool) -> nn.Module:
    """``fully_shard`` every block, then the root (embeddings, final norm, heads), in place.

    bf16 precision on GPU: parameters gathered in bf16, gradients reduced in fp32 (FSDP's mixed
    precision); fp32 otherwise. ``cpu_offload`` (GPU only) keeps the shards and the optimizer
    step on the host."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    _contiguous_parameters(model)
    mesh = init_device_mesh(device.type, (world,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if precision == "bf16" else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy() if cpu_offload and device.type == "cuda" else OffloadPolicy()
    kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    for block in transformer_blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root's parameters are used last in the forward, first in the backward: keep them.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def _contiguous_parameters(model: nn.Module) -> None:
    """FSDP2 shards contiguous parameters only: a weight kept as a transposed view (the GPT's
    decode-friendly layout, ``tie_weights``) becomes a plain copy, same values, ties kept."""
    copies: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in copies and p.is_contiguous():
                continue
            if id(p) not in copies:
                copies[id(p)] = nn.Parameter(p.detach().contiguous(), requires_grad=p.requires_grad)
            setattr(mod, name, copies[id(p)])


def replicate(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """DDP (or the bare model on one worker)."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextmanager
def gradient_sync(train_model: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce gradients in this backward (the last micro-batch) or only accumulate them."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP

    target = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    if isinstance(target, FSDPModule):
        target.set_requires_gradient_sync(sync)
        yield
    elif isinstance(target, DDP) and not sync:
        with target.no_sync():
            yield
    else:
        with nullcontext():
            yield


def to_local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (e.g. a sharded gradient norm); other tensors unchanged."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


# ----------------------------------------------------------------------------- memory


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters and optimizer state this rank holds (its shards under FSDP)."""
    from torch.distributed.tensor import DTensor

    def nbytes(t) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = {id(p): p for p in model.parameters()}  # tied weights once
    total = sum(nbytes(p) for p in params.values())
    for state in optimizer.state.values():
        total += sum(nbytes(v) for v in state.values())
    return total


def peak_memory_bytes(device: torch.device) -> int:
    """This worker's peak memory so far: CUDA max allocated on GPU, peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------- checkpoints


def _options(model: nn.Module, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen, **kw)


@contextmanager
def _dcp_options() -> Iterator[dict]:
    """DCP's keyword for this worker: one worker trains without a process group
    (loop._torch_config), and DCP then reads and writes as a single process (and says so in a
    warning each time, which is expected here)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield {}
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        yield {"no_dist": True}


def save_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the trainable weights and optimizer state into
    ``directory`` (a folder of its own; Ray Train merges the ranks' folders). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options(model))
    with _dcp_options() as kw:
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory), **kw)


def load_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint written by ``save_state`` at any number of workers, either strategy,
    into this rank's (sharded or replicated) model and optimizer. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = _options(model)
    msd, osd = get_state_dict(model, optimizer, options=options)
    state = {"model": msd, "optim": osd}
    with _dcp_options() as kw:
        dcp.load(state, checkpoint_id=str(directory), **kw)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)


def consolidate(directory: Path, model: nn.Module) -> nn.Module:
    """Load the weights of a ``save_state`` checkpoint into a plain, unsharded ``model`` (built
    as the workers built theirs) in this one process, for the final Hugging Face export."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    options = _options(model)
    state = {"model": get_model_state_dict(model, options=options)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    set_model_state_dict(model, state["model"], options=options)
    return model
