"""Stage kind `finetune`: supervised fine-tuning of a checkpoint on prompt/response records.

Input: a checkpoint folder (``config.json`` + ``model.safetensors`` + ``tokenizer.json``) from an
upstream stage's ``checkpoint`` output or ``config.checkpoint``; records from ``config.data`` (JSONL,
Parquet, ``builtin:stdlib-docstrings``; see ``workers.data.records``). Each record becomes
``prompt + response + EOS`` (the prompt rendered as the server's chat endpoint renders it),
padded to the block; the loss covers response tokens (and the EOS) only. Full fine-tuning, or
LoRA (``lora:``) with the adapters merged into the saved weights. Output: a self-contained
checkpoint whose config.json carries ``chat_template`` and ``prompt_template``.

The loop (DDP, checkpoint/resume, LR schedule) is ``workers.training.loop.fit``; the pieces here that
are not SFT-specific (base checkpoint and data resolution, train/val split, publishing the
checkpoint) are shared with the `reward` kind.
"""

from __future__ import annotations

import copy
import functools
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers import storage
from workers.data import records as sft_data
from workers.training.loop import FaultInjection, FitResult, TrainingConfig, TrainJob, fit

DISTRIBUTED = True


# ----------------------------------------------------------------------------- config


class RecordsConfig(TrainingConfig):
    """Options shared by the kinds that train a checkpoint further on records (finetune, reward)."""

    checkpoint: str | None = Field(None, description="The model to start from: an upstream stage's name "
                                   "(its `checkpoint` output) or a checkpoint folder path/URI; default: "
                                   "the only upstream with a `checkpoint` output.")
    data: str = Field(..., description="Records: a .jsonl/.parquet file, folder, glob or URI, an upstream "
                      "stage's name (its `data` output), or builtin:stdlib-docstrings / "
                      "builtin:stdlib-preferences (demo data from the Python standard library).")
    max_records: int | None = Field(None, ge=1, description="Read at most this many records.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of records held out for evaluation "
                                "(chosen by a hash of the record's file and line, with `seed`).")
    prompt_field: str = Field("prompt", description="The record field holding the prompt.")
    chat_template: str | None = Field(None, description="Jinja chat template (HF convention) for `messages` "
                                      "records and plain prompts; default: the checkpoint's, else "
                                      "workers.data.chat.DEFAULT_CHAT_TEMPLATE. Saved in config.json.")
    prompt_template: str | None = Field(None, description="A format string with {prompt} for plain prompts "
                                        "(e.g. '{prompt}' for raw continuation); default: the prompt as one "
                                        "user message through the chat template. Saved in config.json.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training records (rounded up to "
                                 "whole global batches); alternative to max_steps; default 1.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability while training.")
    warmup_steps: int = Field(10, ge=0, description="Steps of linear warmup from 0 to lr; then cosine "
                              "decay to min_lr at the last step.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate, reached after warmup_steps.")
    min_lr: float = Field(1e-5, ge=0, description="Learning rate at the end of the cosine decay.")
    eval_every: int = Field(50, ge=1, description="Evaluate on the held-out records every this many steps "
                            "(and at the end).")

    @model_validator(mode="after")
    def _check_records(self) -> "RecordsConfig":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(f"max_steps / epochs: got both (max_steps={self.max_steps}, epochs={self.epochs}); "
                             "give at most one of them")
        if self.prompt_template is not None:
            sft_data.check_prompt_template(self.prompt_template)
        return self


class LoraFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1, description="Rank r of the adapters A (r, in) and B (out, r).")
    alpha: float = Field(16.0, gt=0, description="Scale: the update is (alpha / rank) * B @ A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[Literal["c_attn", "c_proj", "c_fc"]] = Field(
        ["c_attn", "c_proj", "c_fc"], min_length=1,
        description="Linear layers to adapt: c_attn (attention qkv), c_proj (attention and MLP outputs), "
                    "c_fc (MLP input).")


class Config(RecordsConfig):
    response_field: str = Field("response", description="The record field holding the response.")
    messages_field: str = Field("messages", description="The record field holding an OpenAI-style messages "
                                "list (used when a record has no prompt_field); the last message, the "
                                "assistant's, is the response.")
    lora: LoraFields | None = Field(None, description="Train LoRA adapters instead of every weight; they are "
                                    "merged into the saved checkpoint.")


# ----------------------------------------------------------------------------- shared helpers


@dataclass
class Base:
    """The checkpoint a stage starts from."""

    uri: str
    config: dict
    """Its config.json."""
    tokenizer_uri: str
    tokenizer: Any
    eos_id: int

    @property
    def block_size(self) -> int:
        return int(self.config["n_positions"])


def open_base(ctx, config: RecordsConfig) -> Base:
    """Resolve and check the starting checkpoint and its tokenizer (names `checkpoint:` on errors)."""
    from tokenizers import Tokenizer

    from workers.data import tokenizer as toks

    upstream: dict = {}
    if config.checkpoint is not None and config.checkpoint in ctx.inputs:
        upstream = ctx.inputs[config.checkpoint]
        if "checkpoint" not in upstream:
            raise ValueError(f"checkpoint: upstream {config.checkpoint!r} has no `checkpoint` output "
                             f"(its outputs: {sorted(upstream)})")
        uri = upstream["checkpoint"]
    elif config.checkpoint is not None:
        uri = config.checkpoint
    else:
        candidates = [name for name, out in ctx.inputs.items() if "checkpoint" in out]
        if len(candidates) != 1:
            raise ValueError(f"checkpoint: stage {ctx.stage!r} has {len(candidates)} upstreams with a `checkpoint` "
                             f"output ({candidates}); set `checkpoint:` to a stage name or a checkpoint folder")
        upstream = ctx.inputs[candidates[0]]
        uri = upstream["checkpoint"]
    if not storage.exists(storage.join(uri, "config.json")):
        raise ValueError(f"checkpoint: got {uri!r}; no config.json there (expected a checkpoint folder with "
                         "config.json, model.safetensors and tokenizer.json)")
    hf = storage.read_json(storage.join(uri, "config.json"))
    tok_uri = storage.join(uri, "tokenizer.json")
    if not storage.exists(tok_uri):
        tok_uri = upstream.get("tokenizer") or tok_uri
        if not storage.exists(tok_uri):
            raise ValueError(f"checkpoint: {uri!r} has no tokenizer.json (and no upstream `tokenizer` output)")
    tokenizer = Tokenizer.from_str(storage.read_bytes(tok_uri).decode())
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        eos = toks.eos_id(tokenizer)
    return Base(uri=uri, config=hf, tokenizer_uri=tok_uri, tokenizer=tokenizer, eos_id=int(eos))


def data_source(ctx, config: RecordsConfig) -> str:
    if config.data in ctx.inputs:
        out = ctx.inputs[config.data]
        if "data" not in out:
            raise ValueError(f"data: upstream {config.data!r} has no `data` output (its outputs: {sorted(out)})")
        return out["data"]
    return config.data


def templates(base: Base, config: RecordsConfig) -> tuple[str, str | None]:
    """(chat_template, prompt_template or None) this stage renders with: config, else the base's."""
    from workers.data.chat import DEFAULT_CHAT_TEMPLATE

    chat = config.chat_template or base.config.get("chat_template") or DEFAULT_CHAT_TEMPLATE
    prompt = config.prompt_template
    if prompt is None and config.chat_template is None:
        prompt = base.config.get("prompt_template")  # inherited with the base's chat template
    return chat, prompt


def template_extra(base: Base, chat: str, prompt: str | None) -> dict:
    """config.json keys written with every checkpoint of the stage."""
    eos_token = base.tokenizer.id_to_token(base.eos_id) or ""
    return {"eos_token_id": base.eos_id, "bos_token_id": base.eos_id, "chat_template": chat,
            "prompt_template": prompt if prompt is not None else sft_data.derive_prompt_template(chat, eos_token)}


def split_records(records: list, config: RecordsConfig) -> tuple[list[int], list[int]]:
    """(train indices, val indices); at least one val record when val_fraction > 0 and there are two."""
    val = [i for i, r in enumerate(records) if sft_data.is_val(r, i, config.seed, config.val_fraction)]
    if config.val_fraction > 0 and not val and len(records) >= 2:
        val = [len(records) - 1]
    held = set(val)
    train = [i for i in range(len(records)) if i not in held]
    if not train:
        raise ValueError(f"data: {len(records)} record(s), none left for training after val_fraction="
                         f"{config.val_fraction}; add records or lower val_fraction")
    return train, val


def data_root(ctx, name: str) -> str:
    """Where a stage writes its encoded rows for the workers to read (survives retries)."""
    root = ctx.scratch_uri or storage.join(str(ctx.artifact_dir), ".train")
    return storage.join(root, f"{name}-data")


def steps_for(config: RecordsConfig, n_train: int, global_rows: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil((config.epochs or 1.0) * n_train / global_rows))


def local_checkpoint(uri: str) -> Path:
    """A local folder with the checkpoint at ``uri`` (downloaded once per process if remote)."""
    if storage.is_local(uri):
        return Path(storage.resolve(uri)[1])
    return storage.download_dir(uri, Path(tempfile.mkdtemp(prefix="base-ckpt-")))


def publish(ctx, result: FitResult, name: str, files: tuple[str, ...], tokenizer_uri: str) -> str:
    """Copy the final checkpoint's ``files`` and the tokenizer into ``<artifact_dir>/<name>``;
    returns its URI under ``ctx.output_uri``."""
    try:
        out = Path(ctx.artifact_dir) / name
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(result.checkpoint_dir / f, out / f)
    finally:
        result.cleanup()
    (out / "tokenizer.json").write_bytes(storage.read_bytes(tokenizer_uri))
    return storage.join(ctx.output_uri, name)


# ----------------------------------------------------------------------------- SFT pieces (picklable)


def load_policy(checkpoint_uri: str, dropout: float = 0.0, lora: dict | None = None):
    """The GPT to fine-tune: the checkpoint's weights, optional dropout, optional LoRA adapters."""
    from dataclasses import replace

    from workers.model.lora import apply_lora
    from workers.model.transformer import GPT, load_pretrained

    model = load_pretrained(local_checkpoint(checkpoint_uri), map_location="cpu")
    if dropout > 0:
        hf = model.hf_config
        rebuilt = GPT(replace(model.config, dropout=dropout))
        rebuilt.load_state_dict(model.state_dict())
        rebuilt.hf_config, model = hf, rebuilt
    if lora:
        apply_lora(model, **lora)
    return model


def _has_lora(model) -> bool:
    from workers.model.lora import LoRALinear
    return any(isinstance(m, LoRALinear) for m in model.modules())


def save_policy(model, directory: Path, *, extra: dict) -> None:
    """HF-layout checkpoint; with LoRA, the adapters merged into the weights."""
    from workers.model.lora import merge_lora
    from workers.model.transformer import save_pretrained

    if _has_lora(model):
        model = merge_lora(copy.deepcopy(model))
    save_pretrained(model, directory, extra=extra)


def sft_batch(rows: dict[str, np.ndarray]):
    """Rows (b, T + 1) of prompt + response + EOS + padding -> idx, targets, loss_mask (b, T).

    targets are -100 past each row's end; loss_mask is 1 where the target is a response token
    (or the EOS), i.e. at positions t >= n_prompt - 1."""
    import torch

    ids = torch.from_numpy(rows["ids"].astype(np.int64))
    T = ids.size(1) - 1
    pos = torch.arange(T).unsqueeze(0)                                         # (1, T)
    lengths = torch.from_numpy(rows["lengths"].astype(np.int64)).unsqueeze(1)  # (b, 1)
    n_prompt = torch.from_numpy(rows["n_prompt"].astype(np.int64)).unsqueeze(1)
    targets = ids[:, 1:].clone()
    targets[pos >= lengths - 1] = -100
    loss_mask = ((pos >= n_prompt - 1) & (pos < lengths - 1)).float()
    return {"idx": ids[:, :-1].contiguous(), "targets": targets, "loss_mask": loss_mask}


def sft_loss(model, batch):
    _, loss = model(batch["idx"], batch["targets"], loss_mask=batch["loss_mask"])
    return loss


def make_example_batches(rank, world, device, *, train_uri: str, val_uri: str | None, config: TrainingConfig,
                         to_batch):
    return sft_data.ExampleBatches(sft_data.load_arrays(train_uri),
                                   sft_data.load_arrays(val_uri) if val_uri else None,
                                   batch_size=config.batch_size, grad_accum=config.grad_accum, rank=rank,
                                   world=world, seed=config.seed, eval_steps=config.eval_steps,
                                   to_batch=to_batch, device=device)


def write_splits(ctx, name: str, arrays: dict[str, np.ndarray], train: list[int], val: list[int]) -> tuple[str, str | None]:
    """Write the train and val rows for the workers; returns their URIs (val None when empty)."""
    root = data_root(ctx, name)
    train_uri = storage.join(root, "train.npz")
    sft_data.save_arrays(train_uri, {k: a[train] for k, a in arrays.items()})
    val_uri = None
    if val:
        val_uri = storage.join(root, "val.npz")
        sft_data.save_arrays(val_uri, {k: a[val] for k, a in arrays.items()})
    return train_uri, val_uri


# ----------------------------------------------------------------------------- the kind


def build_job(ctx, config: Config, fault: FaultInjection | None = None) -> tuple[TrainJob, Base, dict]:
    """The TrainJob for this stage, the base checkpoint, and data statistics."""
    base = open_base(ctx, config)
    chat, prompt_template = templates(base, config)
    tok = base.tokenizer
    eos_token = tok.id_to_token(base.eos_id) or ""
    records = list(sft_data.read_records(data_source(ctx, config), config.max_records))
    if not records:
        raise ValueError(f"data: {config.data!r} holds no records")
    rows, n_prompt, truncated = [], [], 0
    for r in records:
        prompt, response = sft_data.sft_pair(r, prompt_field=config.prompt_field, response_field=config.response_field,
                                             messages_field=config.messages_field, prompt_template=prompt_template,
                                             chat_template=chat, eos_token=eos_token)
        p_ids, r_ids = tok.encode(prompt).ids, tok.encode(response).ids
        ids, kept = sft_data.encode_example(p_ids, r_ids, base.eos_id, base.block_size)
        truncated += len(ids) < len(p_ids) + len(r_ids) + 1
        rows.append(ids)
        n_prompt.append(kept)
    ids, lengths = sft_data.pad_rows(rows, base.block_size + 1, base.eos_id)
    arrays = {"ids": ids, "lengths": lengths, "n_prompt": np.asarray(n_prompt, dtype=np.int32)}
    train, val = split_records(records, config)
    train_uri, val_uri = write_splits(ctx, "finetune", arrays, train, val)

    workers = ctx.resources.workers or 1
    global_rows = config.batch_size * config.grad_accum * workers
    lora = config.lora.model_dump() if config.lora else None
    job = TrainJob(
        name="finetune",
        config=config,
        max_steps=steps_for(config, len(train), global_rows),
        make_model=functools.partial(load_policy, base.uri, config.dropout, lora),
        make_batches=functools.partial(make_example_batches, train_uri=train_uri, val_uri=val_uri, config=config,
                                       to_batch=sft_batch),
        loss_fn=sft_loss,
        save_model=functools.partial(save_policy, extra=template_extra(base, chat, prompt_template)),
        tokens_per_step=global_rows * base.block_size,
        threads_per_worker=max(1, int(ctx.resources.cpus)),
        fault=fault,
    )
    stats = {"train_examples": len(train), "val_examples": len(val), "truncated_examples": truncated}
    return job, base, stats


def run(ctx, config: Config, *, fault: FaultInjection | None = None) -> dict[str, Any]:
    """Fine-tune; ``fault`` is a test hook (never set by the executor)."""
    job, base, stats = build_job(ctx, config, fault)
    ctx.log_metrics(stats)
    result = fit(ctx, job)
    state = result.state
    checkpoint = publish(ctx, result, "checkpoint", ("config.json", "model.safetensors"), base.tokenizer_uri)
    return {
        "checkpoint": checkpoint,
        "tokenizer": storage.join(checkpoint, "tokenizer.json"),
        "final_train_loss": state.get("train_loss"),
        "final_val_loss": state.get("val_loss"),
        "steps": int(state["step"]),
        **stats,
    }
