"""What the kinds that train a checkpoint further on records (`finetune`, `reward`) share.

Their options (``RecordsConfig``), the starting checkpoint (``open_base``: its tokenizer side,
templates and ids; each Ray Train worker loads the weights itself with ``load_trainable``), the
records' train/val split and the rows the workers read, the step budget, and publishing the
final checkpoint in the Hugging Face layout (model files + the base's tokenizer side + the
stage's chat template, so ``AutoTokenizer`` loads it with its template).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from workers import storage
from workers.checkpoints import Checkpoint, cast_model_files, copy_model_files, open_checkpoint
from workers.data import records as sft_data
from workers.training.loop import FitResult, TrainingConfig
from workers.training.params import knob

__all__ = ["RecordsConfig", "open_base", "records_source", "templates", "config_extra", "split_records",
           "write_splits", "steps_for", "make_example_batches", "load_trainable", "with_dropout", "publish"]


class RecordsConfig(TrainingConfig):
    """Options shared by the kinds that train a checkpoint further on records (finetune, reward)."""

    checkpoint: str | None = Field(None, description="The model to start from: an upstream stage's name "
                                   "(its `checkpoint` output) or a checkpoint folder path/URI (ours or a "
                                   "Hugging Face one); default: the only upstream with a `checkpoint` output.")
    data: str = Field(..., description="Records: a .jsonl/.parquet file, folder, glob or URI, an upstream "
                      "stage's name (its `data` output), or builtin:stdlib-docstrings / "
                      "builtin:stdlib-preferences (demo data from the Python standard library).")
    max_records: int | None = Field(None, ge=1, description="Read at most this many records.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of records held out for evaluation "
                                "(chosen by a hash of the record's file and line, with `seed`).")
    prompt_field: str = Field("prompt", description="The record field holding the prompt.")
    chat_template: str | None = Field(None, description="Jinja chat template (HF convention) for `messages` "
                                      "records and plain prompts; default: the checkpoint's, else "
                                      "workers.data.chat.DEFAULT_CHAT_TEMPLATE. Saved as chat_template.jinja.")
    prompt_template: str | None = Field(None, description="A format string with {prompt} for plain prompts "
                                        "(e.g. '{prompt}' for raw continuation); default: the prompt as one "
                                        "user message through the chat template. Saved in config.json.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training records (rounded up to "
                                 "whole global batches); alternative to max_steps; default 1.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability while training.")
    warmup_steps: int = knob(TrainingConfig, "warmup_steps", 10)
    lr: float = knob(TrainingConfig, "lr", 1e-4)
    min_lr: float = knob(TrainingConfig, "min_lr", 1e-5)
    eval_every: int = knob(TrainingConfig, "eval_every", 50)

    @model_validator(mode="after")
    def _check_records(self) -> "RecordsConfig":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError(f"max_steps / epochs: got both (max_steps={self.max_steps}, epochs={self.epochs}); "
                             "give at most one of them")
        if self.prompt_template is not None:
            sft_data.check_prompt_template(self.prompt_template)
        return self


def inputs(config: RecordsConfig) -> list:
    """The stage contract's external inputs of finetune and reward (upstream names are left out)."""
    return [config.checkpoint, config.data]


def open_base(ctx, config: RecordsConfig) -> Checkpoint:
    """The starting checkpoint's tokenizer side and configs (the weights load in the workers)."""
    base = open_checkpoint(ctx.upstream("checkpoint", config.checkpoint, field="checkpoint"), load=None)
    if base.eos_token_id is None:
        raise ValueError(f"checkpoint: {base.uri!r} names no end-of-text token (config.json eos_token_id, "
                         "generation_config.json or tokenizer_config.json eos_token); examples end with one")
    if not base.context:
        raise ValueError(f"checkpoint: {base.uri!r} config.json gives no context length "
                         "(n_positions or max_position_embeddings)")
    return base


def records_source(ctx, config: RecordsConfig) -> str:
    """The records ``data:`` names (an upstream's `data` output, or a path, glob or builtin)."""
    return ctx.upstream("data", config.data, field="data", check_path=False)


def templates(base: Checkpoint, config: RecordsConfig) -> tuple[str, str | None]:
    """(chat_template, prompt_template or None) this stage renders with: config, else the base's."""
    from workers.data.chat import DEFAULT_CHAT_TEMPLATE

    chat = config.chat_template or base.chat_template or DEFAULT_CHAT_TEMPLATE
    prompt = config.prompt_template
    if prompt is None and config.chat_template is None:
        prompt = base.prompt_template  # inherited with the base's chat template
    return chat, prompt


def config_extra(base: Checkpoint, chat: str, prompt: str | None) -> dict:
    """config.json keys written with every checkpoint of the stage (the chat template goes to
    chat_template.jinja when publishing)."""
    return {**base.carried_config(), "eos_token_id": base.eos_token_id,
            "prompt_template": prompt if prompt is not None
            else sft_data.derive_prompt_template(chat, base.eos_token or "")}


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


def write_splits(ctx, name: str, arrays: dict[str, np.ndarray], train: list[int], val: list[int]) -> tuple[str, str | None]:
    """Write the train and val rows for the workers (where retries find them); returns their URIs
    (val None when empty)."""
    root = storage.join(ctx.scratch_uri or storage.join(str(ctx.artifact_dir), ".train"), f"{name}-data")
    train_uri = storage.join(root, "train.npz")
    sft_data.save_arrays(train_uri, {k: a[train] for k, a in arrays.items()})
    val_uri = None
    if val:
        val_uri = storage.join(root, "val.npz")
        sft_data.save_arrays(val_uri, {k: a[val] for k, a in arrays.items()})
    return train_uri, val_uri


def steps_for(config: RecordsConfig, n_train: int, global_rows: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil((config.epochs or 1.0) * n_train / global_rows))


def make_example_batches(rank, world, device, *, train_uri: str, val_uri: str | None, config: TrainingConfig,
                         to_batch):
    return sft_data.ExampleBatches(sft_data.load_arrays(train_uri),
                                   sft_data.load_arrays(val_uri) if val_uri else None,
                                   batch_size=config.batch_size, grad_accum=config.grad_accum, rank=rank,
                                   world=world, seed=config.seed, eval_steps=config.eval_steps,
                                   to_batch=to_batch, device=device)


# ----------------------------------------------------------------------------- in the workers (picklable)


def with_dropout(model, dropout: float):
    """The same weights in a model rebuilt with ``dropout`` (the stored config has none)."""
    from dataclasses import replace

    rebuilt = type(model)(replace(model.config, dropout=dropout))
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt


def load_trainable(checkpoint_uri: str, dropout: float = 0.0, lora: dict | None = None, reward: bool = False):
    """The model a worker trains: the checkpoint's weights in fp32 on CPU (master weights; the loop
    moves them and autocasts on GPU), optional dropout, optional LoRA adapters; ``reward``: a
    reward model (its trained head kept, else a fresh one)."""
    import torch

    from workers.model.lora import apply_lora
    from workers.model.reward_head import RewardModel

    model = open_checkpoint(checkpoint_uri, load="reward" if reward else "lm", device="cpu", dtype=torch.float32).model
    if dropout > 0:
        if isinstance(model, RewardModel):
            trunk = RewardModel.from_gpt(with_dropout(model.gpt, dropout))
            trunk.head.load_state_dict(model.head.state_dict())
            model = trunk
        else:
            model = with_dropout(model, dropout)
    if lora:
        apply_lora(model, **lora)
    return model.train()


def publish(ctx, result: FitResult, name: str, base: Checkpoint, chat_template: str) -> str:
    """The final checkpoint's model files (in the base's stored dtype: trained in fp32), the base's
    tokenizer side and the stage's chat template into ``<artifact_dir>/<name>``; returns its URI
    under ``ctx.output_uri``."""
    out = Path(ctx.artifact_dir) / name
    try:
        copy_model_files(result.checkpoint_dir, out)
    finally:
        result.cleanup()
    if base.stored_dtype:
        cast_model_files(out, base.stored_dtype)
    base.write_tokenizer(out, chat_template=chat_template)
    return storage.join(ctx.output_uri, name)
