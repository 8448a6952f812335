"""Stage kind `pretrain`: train a GPT from scratch on a token dataset, on Ray Train workers.

Two objectives: next-token prediction (`clm`, decoders) and masked language modelling (`mlm`,
encoders of the BERT family: BERT's masking recipe from ``workers.data.mlm``, the loss on the
chosen positions only, masked-token accuracy logged as ``val_masked_accuracy`` beside
``val_loss``). An `mlm` model follows its tokenizer's layout: a WordPiece tokenizer gives a BERT
checkpoint, a RoBERTa-style BPE a RoBERTa one (positions offset by padding_idx + 1, one token type).

Input: a token dataset from an upstream `tokenize` stage (``config.data`` names it, or the only
upstream with a ``dataset`` output). Output: a self-contained checkpoint folder
(``config.json`` + ``model.safetensors`` + ``tokenizer.json``) under ``<output_uri>/checkpoint``.
The loop itself (DDP, checkpoint/resume, LR schedule, MFU) is ``workers.training.loop``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from workers import storage
from workers.config import StrictConfig
from workers.training.loop import FaultInjection, TrainingConfig, TrainJob, fit

DISTRIBUTED = True


class ModelFields(StrictConfig):
    """An explicit model shape; ``size`` (optional) names a base size the other fields override."""

    model_config = ConfigDict(extra="forbid")

    size: str | None = Field(None, description="Base size from workers.model.transformer.SIZES: GPT-2 family (tiny, "
                             "small, medium, gpt2-124m, ...), Llama family (llama-tiny, llama-small, llama-medium, "
                             "smollm-135m, llama-3.2-1b) or BERT family encoders for objective mlm (bert-tiny, "
                             "bert-mini, bert-base).")
    n_layer: int | None = Field(None, ge=1, description="Transformer blocks.")
    n_head: int | None = Field(None, ge=1, description="Attention heads per block.")
    n_embd: int | None = Field(None, ge=1, description="Embedding width (divisible by n_head).")
    block_size: int | None = Field(None, ge=1, description="Context length in tokens.")
    dropout: float | None = Field(None, ge=0, lt=1, description="Dropout probability (0 for pretraining).")
    n_kv_head: int | None = Field(None, ge=1, description="Key/value heads (divides n_head): fewer than n_head is "
                                  "grouped-query attention, 1 multi-query. Default n_head.")
    intermediate_size: int | None = Field(None, ge=1, description="MLP hidden width; default 4 * n_embd.")
    rope_theta: float | None = Field(None, gt=0, description="RoPE base (Llama-family sizes only).")
    tie_embeddings: bool | None = Field(None, description="Share the token embedding with the output layer.")


class Config(TrainingConfig):
    model: str | ModelFields = Field("small", description="A size name (tiny, small, medium, gpt2-124m, ..., "
                                     "llama-tiny, llama-small, ...) or explicit fields over a `size`.")
    data: str | None = Field(None, description="The token dataset to train on: an upstream stage (its `dataset` "
                             "output) or a dataset folder path/URI; default: the only upstream with a `dataset` output.")
    max_tokens: int | None = Field(None, ge=1, description="Train until this many tokens have been seen "
                                   "(rounded up to whole global batches); alternative to max_steps.")
    objective: Literal["clm", "mlm"] = Field("clm", description="`clm`: next-token prediction (a decoder); `mlm`: "
                                             "masked language modelling (an encoder: a bert-* size; the dataset's "
                                             "tokenizer of type wordpiece or bpe-roberta).")
    mask_prob: float = Field(0.15, gt=0, lt=1, description="objective mlm: share of (non-special) tokens chosen; "
                             "each chosen token becomes the mask token 80% of the time, a random token 10%, "
                             "itself 10%.")
    whole_word_masking: bool = Field(False, description="objective mlm: choose whole words (all their pieces) "
                                     "rather than single pieces.")

    @model_validator(mode="after")
    def _one_budget(self) -> "Config":
        if (self.max_steps is None) == (self.max_tokens is None):
            got = "both" if self.max_steps is not None else "neither"
            raise ValueError(f"max_steps / max_tokens: got {got} (max_steps={self.max_steps}, "
                             f"max_tokens={self.max_tokens}); give exactly one of them")
        return self


def model_spec(config: Config) -> str | dict:
    if isinstance(config.model, str):
        return config.model
    return config.model.model_dump(exclude_none=True)


# Module-level (picklable) pieces of the TrainJob.

def _make_model(gpt_config):
    from workers.model.transformer import GPT
    return GPT(gpt_config)


def _make_batches(rank, world, device, *, dataset_uri, config: Config, block_size: int):
    from workers.data.tokens import TokenBatches, TokenDataset
    return TokenBatches(TokenDataset.open(dataset_uri), block_size=block_size, batch_size=config.batch_size,
                        grad_accum=config.grad_accum, rank=rank, world=world, seed=config.seed,
                        eval_steps=config.eval_steps, device=device)


def lm_loss(model, batch):
    """Next-token loss, or masked-LM loss (targets are -100 except at the chosen positions)."""
    _, loss = model(batch["idx"], batch["targets"])
    return loss


def _make_mlm_batches(rank, world, device, *, dataset_uri, config: Config, block_size: int, specials):
    from workers.data.mlm import MLMBatches
    from workers.data.tokens import TokenDataset
    return MLMBatches(TokenDataset.open(dataset_uri), specials=specials, mask_prob=config.mask_prob,
                      block_size=block_size, batch_size=config.batch_size, grad_accum=config.grad_accum,
                      rank=rank, world=world, seed=config.seed, eval_steps=config.eval_steps, device=device)


def mlm_metrics(model, batch):
    from workers.data.mlm import masked_accuracy
    logits, _ = model(batch["idx"])
    return {"masked_accuracy": masked_accuracy(logits, batch["targets"])}


def _mlm_setup(config: Config, gpt_config, dataset):
    """(model config in its tokenizer's layout, MLMSpecials, config.json extras) for objective mlm."""
    from dataclasses import replace

    from tokenizers import Tokenizer

    from workers.data import tokenizer as tk
    from workers.data.mlm import MLMSpecials

    if gpt_config.causal:
        raise ValueError(f"objective: mlm needs an encoder; model {model_spec(config)!r} is a decoder (use "
                         "bert-tiny, bert-mini or bert-base)")
    uri = dataset.tokenizer_uri or storage.join(dataset.uri, "tokenizer.json")
    tok = Tokenizer.from_str(storage.read_bytes(uri).decode())
    specials = MLMSpecials.from_tokenizer(tok, dataset.vocab_size, config.whole_word_masking)
    roles = tk.encoder_specials(tok)
    extra = {"pad_token_id": specials.pad_id}
    if "bos_token" in roles:  # RoBERTa: learned positions start after padding_idx, one token type
        offset = specials.pad_id + 1
        gpt_config = replace(gpt_config, position_offset=offset, block_size=gpt_config.block_size + offset,
                             token_types=1)
        extra.update(bos_token_id=tok.token_to_id(roles["bos_token"]), eos_token_id=tok.token_to_id(roles["eos_token"]))
    return gpt_config, specials, extra


def _save_model(model, directory, *, extra: dict):
    from workers.model.hf import save_model
    save_model(model, directory, extra=extra)


def build_job(ctx, config: Config, fault: FaultInjection | None = None) -> tuple[TrainJob, "TokenDataset"]:
    """The TrainJob for this stage and the token dataset it trains on."""
    from workers.model.transformer import config_for
    from workers.data.tokens import TokenDataset

    dataset = TokenDataset.open(ctx.upstream("dataset", config.data, field="data"))
    try:
        gpt_config = config_for(model_spec(config), dataset.vocab_size)
    except ValueError as e:
        raise ValueError(f"{e} (config.model: {model_spec(config)!r})") from None
    eos = dataset.eos_id
    extra = {"eos_token_id": eos, "bos_token_id": eos}
    block_size = gpt_config.block_size
    if config.objective == "mlm":
        gpt_config, specials, extra = _mlm_setup(config, gpt_config, dataset)
        block_size = gpt_config.block_size - gpt_config.position_offset
        make_batches = functools.partial(_make_mlm_batches, dataset_uri=dataset.uri, config=config,
                                         block_size=block_size, specials=specials)
    elif not gpt_config.causal:
        raise ValueError(f"objective: clm (next-token prediction) needs a decoder; model {model_spec(config)!r} is "
                         "an encoder: set objective: mlm")
    else:
        make_batches = functools.partial(_make_batches, dataset_uri=dataset.uri, config=config, block_size=block_size)
    workers = ctx.resources.workers or 1
    tokens_per_step = config.batch_size * config.grad_accum * workers * block_size
    max_steps = config.max_steps or math.ceil(config.max_tokens / tokens_per_step)
    job = TrainJob(
        name="pretrain",
        config=config,
        max_steps=max_steps,
        make_model=functools.partial(_make_model, gpt_config),
        make_batches=make_batches,
        loss_fn=lm_loss,
        save_model=functools.partial(_save_model, extra=extra),
        tokens_per_step=tokens_per_step,
        threads_per_worker=max(1, int(ctx.resources.cpus)),
        fault=fault,
        val_metrics=mlm_metrics if config.objective == "mlm" else None,
    )
    return job, dataset


def run(ctx, config: Config, *, fault: FaultInjection | None = None) -> dict[str, Any]:
    """Pretrain; ``fault`` is a test hook (never set by the executor)."""
    from workers.checkpoints import copy_model_files, write_tokenizer_files

    job, dataset = build_job(ctx, config, fault)
    tokenizer = dataset.tokenizer_uri or storage.join(dataset.uri, "tokenizer.json")
    if not storage.exists(tokenizer):  # checked first: the checkpoint must be servable
        raise FileNotFoundError(f"data: the dataset's tokenizer {tokenizer!r} not found")
    tok_config_uri = tokenizer.rsplit("/", 1)[0] + "/tokenizer_config.json"  # written beside it by `tokenize`
    result = fit(ctx, job)
    out = Path(ctx.artifact_dir) / "checkpoint"
    try:
        copy_model_files(result.checkpoint_dir, out)
    finally:
        result.cleanup()
    write_tokenizer_files(out, storage.read_bytes(tokenizer).decode(),
                          tokenizer_config=storage.read_json(tok_config_uri) if storage.exists(tok_config_uri) else None)
    checkpoint_uri = storage.join(ctx.output_uri, "checkpoint")
    state = result.state
    return {
        "checkpoint": checkpoint_uri,
        "tokenizer": storage.join(checkpoint_uri, "tokenizer.json"),
        "final_train_loss": state.get("train_loss"),
        "final_val_loss": state.get("val_loss"),
        "steps": int(state["step"]),
        "tokens": int(state["tokens"]),
    }
