"""Stage kind `reward`: train a reward model on ranked pairs, on Ray Train workers.

Input: a checkpoint (the trunk; usually the SFT policy) and ``(prompt, chosen, rejected)``
records, optionally with a ``margin`` (JSONL, Parquet, ``builtin:stdlib-preferences``; see
``workers.data.records``). Each side is scored as ``prompt + response + EOS`` (the prompt rendered as
in `finetune`); the loss is Bradley-Terry, ``-logsigmoid(r_chosen - r_rejected - margin)``.
After training, the held-out pairwise accuracy (fraction of pairs with r_chosen > r_rejected)
is measured on the final model. Output: ``<output_uri>/reward_model`` (see
``workers.model.reward_head``: HF-layout trunk + ``reward_head.safetensors`` + the tokenizer side).
The trunk is any checkpoint ``workers.checkpoints`` opens (a reward model's head is kept).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from workers import storage
from workers.checkpoints import Checkpoint
from workers.data import records as sft_data
from workers.training.loop import FaultInjection, TrainJob, fit
from workers.training.params import knob
from workers.training.supervised import inputs  # noqa: F401 - the stage contract's external inputs
from workers.training.supervised import (RecordsConfig, config_extra, load_trainable, make_example_batches, open_base,
                                         publish, records_source, split_records, steps_for, templates, write_splits)

DISTRIBUTED = True


class Config(RecordsConfig):
    chosen_field: str = Field("chosen", description="The record field holding the preferred response.")
    rejected_field: str = Field("rejected", description="The record field holding the dispreferred response.")
    margin_field: str | None = Field("margin", description="The record field holding an optional margin "
                                     "(r_chosen must beat r_rejected by it); records without it use 0; "
                                     "null ignores margins.")
    lr: float = knob(RecordsConfig, "lr", 5e-5)
    min_lr: float = knob(RecordsConfig, "min_lr", 5e-6)


# ----------------------------------------------------------------------------- picklable pieces


def save_reward(model, directory, *, extra: dict) -> None:
    from workers.model.reward_head import save_reward_model
    save_reward_model(model, directory, extra=extra)


def pair_batch(rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rows of chosen/rejected ids (b, T) + lengths + margin -> tensors with attention masks."""
    out = {}
    for side in ("chosen", "rejected"):
        ids = torch.from_numpy(rows[side].astype(np.int64))
        lengths = torch.from_numpy(rows[f"{side}_len"].astype(np.int64)).unsqueeze(1)
        out[side] = ids
        out[f"{side}_mask"] = (torch.arange(ids.size(1)).unsqueeze(0) < lengths).long()
    out["margin"] = torch.from_numpy(rows["margin"].astype(np.float32))
    return out


def bt_loss_from_rewards(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None):
    """Bradley-Terry: mean of -log sigmoid(r_chosen - r_rejected - margin)."""
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff).mean()


def bt_loss(model, batch):
    """One forward over chosen and rejected rows together (2b, T) -> Bradley-Terry loss."""
    idx = torch.cat([batch["chosen"], batch["rejected"]])
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    r = model(idx, mask)                                           # (2b,)
    r_chosen, r_rejected = r.chunk(2)
    return bt_loss_from_rewards(r_chosen, r_rejected, batch["margin"])


@torch.no_grad()
def pair_items(batch) -> int:
    """The pairs ``bt_loss`` averages over (the step's loss is their mean)."""
    return batch["margin"].numel()


def pairwise_accuracy(model, arrays: dict[str, np.ndarray], batch_size: int = 32, device="cpu") -> float:
    """Fraction of pairs whose chosen response scores strictly higher than the rejected one."""
    model.eval().to(device)
    wins, n = 0, len(arrays["margin"])
    for k in range(0, n, batch_size):
        b = pair_batch({name: a[k:k + batch_size] for name, a in arrays.items()})
        rc = model.score(b["chosen"].to(device), b["chosen_mask"].to(device))
        rr = model.score(b["rejected"].to(device), b["rejected_mask"].to(device))
        wins += int((rc > rr).sum())
    return wins / max(1, n)


# ----------------------------------------------------------------------------- the kind


def encode_pairs(base: Checkpoint, config: Config, chat: str, prompt_template: str | None,
                 records: list) -> dict[str, np.ndarray]:
    tok, eos_id = base.tokenizer, base.eos_token_id
    eos_token = base.eos_token or ""
    T = base.context
    sides: dict[str, list[list[int]]] = {"chosen": [], "rejected": []}
    margins = []
    for r in records:
        prompt, chosen, rejected, margin = sft_data.preference(
            r, prompt_field=config.prompt_field, chosen_field=config.chosen_field,
            rejected_field=config.rejected_field, margin_field=config.margin_field)
        p_ids = tok.encode(sft_data.format_prompt(prompt, prompt_template=prompt_template, chat_template=chat,
                                                  eos_token=eos_token)).ids
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            # rows of at most T tokens: nothing is shifted for a reward model
            r_ids = tok.encode(text, add_special_tokens=False).ids
            sides[side].append(sft_data.encode_example(p_ids, r_ids, eos_id, T - 1)[0])
        margins.append(margin)
    arrays: dict[str, np.ndarray] = {"margin": np.asarray(margins, dtype=np.float32)}
    width = max(len(r) for rows in sides.values() for r in rows)  # the longest row, not the (maybe huge) context
    for side, rows in sides.items():
        arrays[side], arrays[f"{side}_len"] = sft_data.pad_rows(rows, width, eos_id)
    return arrays


def build_job(ctx, config: Config, fault: FaultInjection | None = None
              ) -> tuple[TrainJob, Checkpoint, str, dict, dict]:
    """The TrainJob, the base checkpoint, the chat template, the held-out rows (for accuracy) and
    data statistics."""
    base = open_base(ctx, config)
    chat, prompt_template = templates(base, config)
    records = list(sft_data.read_records(records_source(ctx, config), config.max_records))
    if not records:
        raise ValueError(f"data: {config.data!r} holds no records")
    arrays = encode_pairs(base, config, chat, prompt_template, records)
    train, val = split_records(records, config)
    train_uri, val_uri = write_splits(ctx, "reward", arrays, train, val)
    workers = ctx.resources.workers or 1
    global_rows = config.batch_size * config.grad_accum * workers
    job = TrainJob(
        name="reward",
        config=config,
        max_steps=steps_for(config, len(train), global_rows),
        make_model=functools.partial(load_trainable, base.uri, config.dropout, None, True),
        make_batches=functools.partial(make_example_batches, train_uri=train_uri, val_uri=val_uri, config=config,
                                       to_batch=pair_batch),
        loss_fn=bt_loss,
        items_fn=pair_items,
        save_model=functools.partial(save_reward, extra=config_extra(base, chat, prompt_template)),
        tokens_per_step=2 * global_rows * arrays["chosen"].shape[1],
        threads_per_worker=max(1, int(ctx.resources.cpus)),
        fault=fault,
    )
    held_out = {k: a[val] for k, a in arrays.items()}
    # pairs that truncation to the block made identical teach nothing: worth seeing in the metrics
    same = (arrays["chosen"] == arrays["rejected"]).all(1) & (arrays["chosen_len"] == arrays["rejected_len"])
    return job, base, chat, held_out, {"train_pairs": len(train), "val_pairs": len(val), "identical_pairs": int(same.sum())}


def run(ctx, config: Config, *, fault: FaultInjection | None = None) -> dict[str, Any]:
    """Train the reward model; ``fault`` is a test hook (never set by the executor)."""
    from workers.checkpoints import open_checkpoint

    job, base, chat, held_out, stats = build_job(ctx, config, fault)
    ctx.log_metrics(stats)
    result = fit(ctx, job)
    state = result.state
    uri = publish(ctx, result, "reward_model", base, chat)
    accuracy = None
    if stats["val_pairs"]:
        model = open_checkpoint(ctx.artifact_dir / "reward_model", load="reward").model
        accuracy = pairwise_accuracy(model, held_out, device=next(model.parameters()).device)
        ctx.log_metrics({"val_accuracy": accuracy}, step=int(state["step"]))
    return {
        "reward_model": uri,
        "tokenizer": storage.join(uri, "tokenizer.json"),
        "accuracy": accuracy,
        "final_train_loss": state.get("train_loss"),
        "final_val_loss": state.get("val_loss"),
        "steps": int(state["step"]),
        **stats,
    }
