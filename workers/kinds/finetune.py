"""Stage kind `finetune`: supervised fine-tuning of a checkpoint on prompt/response records.

Input: a checkpoint (``workers.checkpoints``: ours or a Hugging Face folder, GPT-2 or the Llama
family, local or a storage URI) from an upstream stage's ``checkpoint`` output or
``config.checkpoint``; records from ``config.data`` (JSONL, Parquet, ``builtin:stdlib-docstrings``;
see ``workers.data.records``). Each record becomes ``prompt + response + EOS`` (the prompt
rendered as the server's chat endpoint renders it), padded to the context; the loss covers
response tokens (and the EOS) only. Full fine-tuning, or LoRA (``lora:``, targets named as the
family's Hugging Face Linear layers). Output: a self-contained checkpoint in the Hugging Face
layout (its chat template in chat_template.jinja, ``prompt_template`` in config.json), the LoRA
adapters merged into it; with ``lora.save`` adapter or both, a PEFT adapter folder (``adapter``
output, with the tokenizer side) for the base named by ``base_checkpoint``.

The loop (DDP, checkpoint/resume, LR schedule) is ``workers.training.loop.fit``; what this kind
shares with `reward` (base checkpoint, records, split, publishing) is ``workers.training.supervised``.
"""

from __future__ import annotations

import copy
import functools
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, Field, field_validator

from workers import storage
from workers.checkpoints import Checkpoint
from workers.config import StrictConfig
from workers.data import records as sft_data
from workers.training.loop import FaultInjection, TrainJob, fit
from workers.training.supervised import inputs  # noqa: F401 - the stage contract's external inputs
from workers.training.supervised import (RecordsConfig, config_extra, load_trainable, make_example_batches,
                                         open_base, publish, records_source, split_records, steps_for, templates,
                                         write_splits)

DISTRIBUTED = True
ADAPTER = "adapter"
"""The PEFT adapter folder's name, in the training checkpoint and in the stage's artifacts."""


# ----------------------------------------------------------------------------- config


class LoraFields(StrictConfig):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1, description="Rank r of the adapters A (r, in) and B (out, r).")
    alpha: float = Field(16.0, gt=0, description="Scale: the update is (alpha / rank) * B @ A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | None = Field(
        None, min_length=1,
        description="Linear layers to adapt, by their Hugging Face names (matched as PEFT does: the name or "
                    "a dotted suffix of it). GPT-2: c_attn (attention qkv), c_proj (attention and MLP outputs; "
                    "attn.c_proj or mlp.c_proj for one), c_fc (MLP input). Llama, Mistral, Qwen2: q_proj, "
                    "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj. Default: all of the family's.")
    save: Literal["merged", "adapter", "both"] = Field(
        "merged", description="What the stage writes: merged (the adapters folded into the weights: the "
                              "`checkpoint` output), adapter (a PEFT adapter folder: the `adapter` output, with "
                              "`base_checkpoint` naming its base; no `checkpoint`), or both.")

    @field_validator("target_modules")
    @classmethod
    def _known_names(cls, v: list[str] | None) -> list[str] | None:
        from workers.model.lora import check_target_modules
        check_target_modules(v)  # the family's own names are checked once the checkpoint is known
        return v


class Config(RecordsConfig):
    response_field: str = Field("response", description="The record field holding the response.")
    messages_field: str = Field("messages", description="The record field holding an OpenAI-style messages "
                                "list (used when a record has no prompt_field); the last message, the "
                                "assistant's, is the response.")
    lora: LoraFields | None = Field(None, description="Train LoRA adapters instead of every weight; saved merged "
                                    "into the checkpoint, as a PEFT adapter, or both (`lora.save`).")


# ----------------------------------------------------------------------------- SFT pieces (picklable)


def _has_lora(model) -> bool:
    from workers.model.lora import LoRALinear
    return any(isinstance(m, LoRALinear) for m in model.modules())


def save_policy(model, directory: Path, *, extra: dict, save: str = "merged", base_model: str | None = None) -> None:
    """HF-layout checkpoint; with LoRA, the adapters merged into the weights (``save`` merged or
    both) and/or a PEFT adapter folder for ``base_model`` in ``directory/adapter`` (adapter or both)."""
    from workers.model.hf import save_model
    from workers.model.lora import merge_lora, save_peft_adapter

    if not _has_lora(model):
        save_model(model, directory, extra=extra)
        return
    if save in ("adapter", "both"):
        save_peft_adapter(model, Path(directory) / ADAPTER, base_model=base_model)
    if save in ("merged", "both"):
        save_model(merge_lora(copy.deepcopy(model)), directory, extra=extra)


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


def sft_items(batch) -> torch.Tensor:
    """The response tokens ``sft_loss`` averages over (the step's loss is their mean)."""
    return ((batch["targets"] != -100).float() * batch["loss_mask"]).sum()


# ----------------------------------------------------------------------------- the kind


def build_job(ctx, config: Config, fault: FaultInjection | None = None) -> tuple[TrainJob, Checkpoint, str, dict]:
    """The TrainJob for this stage, the base checkpoint, the chat template, and data statistics."""
    base = open_base(ctx, config)
    chat, prompt_template = templates(base, config)
    tok, eos_id, block = base.tokenizer, base.eos_token_id, base.context
    records = list(sft_data.read_records(records_source(ctx, config), config.max_records))
    if not records:
        raise ValueError(f"data: {config.data!r} holds no records")
    rows, n_prompt, truncated = [], [], 0
    for r in records:
        prompt, response = sft_data.sft_pair(r, prompt_field=config.prompt_field, response_field=config.response_field,
                                             messages_field=config.messages_field, prompt_template=prompt_template,
                                             chat_template=chat, eos_token=base.eos_token or "")
        p_ids, r_ids = tok.encode(prompt).ids, tok.encode(response, add_special_tokens=False).ids
        ids, kept = sft_data.encode_example(p_ids, r_ids, eos_id, block)
        truncated += len(ids) < len(p_ids) + len(r_ids) + 1
        rows.append(ids)
        n_prompt.append(kept)
    width = max(len(r) for r in rows)  # padded to the longest example, not the (maybe huge) context
    ids, lengths = sft_data.pad_rows(rows, width, eos_id)
    arrays = {"ids": ids, "lengths": lengths, "n_prompt": np.asarray(n_prompt, dtype=np.int32)}
    train, val = split_records(records, config)
    train_uri, val_uri = write_splits(ctx, "finetune", arrays, train, val)

    workers = ctx.resources.workers or 1
    global_rows = config.batch_size * config.grad_accum * workers
    lora = None
    if config.lora:
        from workers.model.lora import check_target_modules
        check_target_modules(config.lora.target_modules, base.config.get("model_type", "gpt2"))
        lora = config.lora.model_dump(exclude={"save"})
    job = TrainJob(
        name="finetune",
        config=config,
        max_steps=steps_for(config, len(train), global_rows),
        make_model=functools.partial(load_trainable, base.uri, config.dropout, lora),
        make_batches=functools.partial(make_example_batches, train_uri=train_uri, val_uri=val_uri, config=config,
                                       to_batch=sft_batch),
        loss_fn=sft_loss,
        items_fn=sft_items,
        save_model=functools.partial(save_policy, extra=config_extra(base, chat, prompt_template),
                                     save=config.lora.save if config.lora else "merged", base_model=base.uri),
        tokens_per_step=global_rows * (width - 1),
        threads_per_worker=max(1, int(ctx.resources.cpus)),
        fault=fault,
    )
    stats = {"train_examples": len(train), "val_examples": len(val), "truncated_examples": truncated}
    return job, base, chat, stats


def publish_outputs(ctx, result, base: Checkpoint, chat: str, save: str) -> dict[str, Any]:
    """The trained model into the stage's artifacts: the merged ``checkpoint`` (save merged or
    both) and/or the PEFT ``adapter`` folder with its tokenizer side and ``base_checkpoint``."""
    outputs: dict[str, Any] = {}
    if save != "merged":
        adapter = Path(ctx.artifact_dir) / ADAPTER
        shutil.copytree(Path(result.checkpoint_dir) / ADAPTER, adapter, dirs_exist_ok=True)
        base.write_tokenizer(adapter, chat_template=chat)  # as PEFT folders carry it
        outputs.update(adapter=storage.join(ctx.output_uri, ADAPTER), base_checkpoint=base.uri)
    if save == "adapter":
        result.cleanup()
    else:
        checkpoint = publish(ctx, result, "checkpoint", base, chat)
        outputs.update(checkpoint=checkpoint, tokenizer=storage.join(checkpoint, "tokenizer.json"))
    return outputs


def run(ctx, config: Config, *, fault: FaultInjection | None = None) -> dict[str, Any]:
    """Fine-tune; ``fault`` is a test hook (never set by the executor)."""
    job, base, chat, stats = build_job(ctx, config, fault)
    ctx.log_metrics(stats)
    result = fit(ctx, job)
    state = result.state
    return {
        **publish_outputs(ctx, result, base, chat, config.lora.save if config.lora else "merged"),
        "final_train_loss": state.get("train_loss"),
        "final_val_loss": state.get("val_loss"),
        "steps": int(state["step"]),
        **stats,
    }
