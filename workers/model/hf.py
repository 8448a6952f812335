"""Hugging Face layout in and out: config.json + safetensors (single or sharded) <-> `GPT`.

Conversion lives here, apart from the model (it imports the model, never the other way): a
config translation and a weight-name map per family (`gpt2`, `llama`, `mistral`, `qwen2`;
the masked-LM encoders `bert`, `roberta` as BertForMaskedLM / RobertaForMaskedLM). Our module names are the same for every family
(fused `c_attn` = q|k|v, fused `c_fc` = gate|up for SwiGLU); the map says which Hugging Face
tensors concatenate (dim 0) into each of ours, and which are stored transposed (GPT-2's Conv1D).

Loading reads each tensor once from memory-mapped safetensors into a model built on the meta
device (`load_state_dict(assign=True)`): no random init, no second copy, weights stay in their
stored dtype unless `dtype` is given. A bf16 checkpoint of P parameters holds about 2P bytes.
Writing produces what `AutoModelForCausalLM.from_pretrained` loads (config.json with
architectures/model_type/torch_dtype, model.safetensors, or shards + model.safetensors.index.json).
Tokenizer files, chat templates and generation_config.json are written elsewhere
(workers.checkpoints); this module owns weights + config only. Only safetensors: never unpickles.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from workers.model.transformer import GPT, GPTConfig

__all__ = ["load_model", "save_model", "read_model_config", "read_config", "MODEL_TYPES",
           "ENCODER_TYPES", "DEFAULT_MAX_SHARD_BYTES", "atomic_write", "save_pretrained", "load_pretrained",
           "block_linears", "expected_shapes", "normalized_name", "ignored_weight", "SAFETENSORS_DTYPES"]

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size ("5GB")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
SAFETENSORS_DTYPES = _SAFETENSORS_DTYPES


# ----------------------------------------------------------------------------- config.json

def read_config(folder) -> dict:
    """The checkpoint's config.json as a dict (model fields plus any extra keys)."""
    from workers.model.hf_check import read_json_object

    path = Path(folder) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(folder)!r}: no config.json")
    return read_json_object(path, f"checkpoint {str(folder)!r}")


def _gpt2_config(hf: dict, where: str) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{where}: activation_function {act!r} is not supported; supported: "
                         "gelu_new, gelu_pytorch_tanh")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported; supported: false")
    if hf.get("scale_attn_weights") is False:
        raise ValueError(f"{where}: scale_attn_weights=false is not supported; supported: true")
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner"),
                     norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                     tie_embeddings=hf.get("tie_word_embeddings", True))


def _rope(hf: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from transformers 5 `rope_parameters` or the older
    top-level `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **params}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ("linear", "llama3"):
        raise ValueError(f"{where}: rope_scaling type {kind!r} is not supported; supported: "
                         "default, linear, llama3")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor {scaling['partial_rotary_factor']!r} is not "
                         "supported; supported: 1.0")
    scaling.pop("type", None)
    return float(theta), {**scaling, "rope_type": kind}


def _llama_config(hf: dict, where: str) -> GPTConfig:
    model_type = hf["model_type"]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported; supported: silu")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported; supported: false")
    window = None
    if model_type == "qwen2":
        layer_types = hf.get("layer_types") or []
        if hf.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise ValueError(f"{where}: use_sliding_window=true (per-layer sliding window) is not "
                             "supported; supported: false")
    elif model_type == "mistral":
        window = hf.get("sliding_window")
        if window is not None and window >= hf.get("max_position_embeddings", 0):
            window = None  # never reached: plain causal attention
    theta, scaling = _rope(hf, where)
    heads = hf["num_attention_heads"]
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=hf["hidden_size"],
        n_kv_head=hf.get("num_key_value_heads") or heads,
        head_size=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu", position="rope", rope_theta=theta, rope_scaling=scaling, bias=False,
        qkv_bias=model_type == "qwen2", tie_embeddings=hf.get("tie_word_embeddings", False),
        sliding_window=window)


def _bert_config(hf: dict, where: str) -> GPTConfig:
    """BERT and RoBERTa: post-LN encoders; RoBERTa's positions start at pad_token_id + 1."""
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported; supported: gelu")
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"{where}: position_embedding_type {kind!r} is not supported; supported: absolute")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported; supported: false (an encoder)")
    if hf.get("tie_word_embeddings", True) is False:  # its decoder bias then parts from the head's own
        raise ValueError(f"{where}: tie_word_embeddings=false is not supported for an encoder; supported: true")
    offset = 0
    if hf["model_type"] == "roberta":
        pad = hf.get("pad_token_id")
        if not isinstance(pad, int) or pad < 0:
            raise ValueError(f"{where}: RoBERTa needs a pad_token_id (its positions start at "
                             f"pad_token_id + 1); got {pad!r}")
        offset = pad + 1
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], norm_eps=hf.get("layer_norm_eps", 1e-12),
        mlp="gelu_exact", causal=False, norm_position="post", token_types=hf.get("type_vocab_size", 2),
        position_offset=offset, head="mlm")


_CONFIG_READERS: dict[str, Callable[[dict, str], GPTConfig]] = {
    "gpt2": _gpt2_config, "llama": _llama_config, "mistral": _llama_config, "qwen2": _llama_config,
    "bert": _bert_config, "roberta": _bert_config,
}
MODEL_TYPES = tuple(_CONFIG_READERS)
ENCODER_TYPES = ("bert", "roberta")


def read_model_config(folder) -> GPTConfig:
    """Our GPTConfig for a transformers folder (or one we wrote), without touching the weights.

    Unsupported model_type or options raise ValueError naming them and listing what is supported;
    config.json is first checked against its family's required keys, types and size limits
    (``workers.model.hf_check``), so nothing is sized from a bad value.
    """
    from workers.model.hf_check import CheckpointError, check_config

    hf = read_config(folder)
    where = f"checkpoint {str(folder)!r}"
    check_config(hf, where)
    model_type = hf.get("model_type", "gpt2")
    if model_type not in _CONFIG_READERS:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(MODEL_TYPES)}")
    try:
        return _CONFIG_READERS[model_type](hf, where)
    except (TypeError, ValueError) as e:  # GPTConfig's own checks (divisibility ...) name our field
        if str(e).startswith(where):
            raise
        raise CheckpointError(f"{where}: config.json: {str(e).removeprefix('model.')}") from None


def _family(cfg: GPTConfig, hint: str | None) -> str:
    """The Hugging Face model_type that holds this config, or a ValueError saying why none does."""
    if not cfg.causal:
        encoder = ("learned", "layernorm", "post", "gelu_exact", "mlm", True)
        if ((cfg.position, cfg.norm, cfg.norm_position, cfg.mlp, cfg.head, cfg.bias) != encoder
                or cfg.n_kv_head != cfg.n_head or cfg.head_size * cfg.n_head != cfg.n_embd
                or cfg.qkv_bias != cfg.bias or cfg.token_types < 1 or not cfg.tie_embeddings):
            raise ValueError("save_model: a BERT/RoBERTa layout (causal=false) needs position=learned, "
                             "norm=layernorm, norm_position=post, mlp=gelu_exact, head=mlm, bias=true, "
                             "n_kv_head == n_head, head_size * n_head == n_embd, token_types >= 1 and "
                             "tie_embeddings=true")
        return "roberta" if cfg.position_offset else "bert"
    if (cfg.norm_position, cfg.head, cfg.token_types, cfg.position_offset) != ("pre", "lm", 0, 0):
        raise ValueError("save_model: a decoder (causal=true) needs norm_position=pre, head=lm, "
                         "token_types=0 and position_offset=0")
    if (cfg.position, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu"):
        if cfg.n_kv_head != cfg.n_head or cfg.head_size * cfg.n_head != cfg.n_embd or cfg.qkv_bias != cfg.bias:
            raise ValueError("save_model: a GPT-2 layout needs n_kv_head == n_head, head_size * n_head == "
                             "n_embd and qkv_bias == bias")
        return "gpt2"
    if (cfg.position, cfg.norm, cfg.mlp, cfg.bias) == ("rope", "rmsnorm", "swiglu", False):
        if cfg.qkv_bias:
            if cfg.sliding_window is not None or cfg.head_size * cfg.n_head != cfg.n_embd:
                raise ValueError("save_model: a Qwen2 layout (qkv_bias) needs no sliding_window and "
                                 "head_size * n_head == n_embd")
            return "qwen2"
        if cfg.sliding_window is not None or hint == "mistral":
            return "mistral"
        return "llama"
    raise ValueError(f"save_model: no Hugging Face layout for position={cfg.position!r}, norm={cfg.norm!r}, "
                     f"mlp={cfg.mlp!r}, bias={cfg.bias!r}; supported: learned+layernorm+gelu (gpt2) or "
                     "rope+rmsnorm+swiglu without bias (llama, mistral; qwen2 with qkv_bias)")


_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}


def _hf_config(cfg: GPTConfig, model_type: str, dtype: torch.dtype) -> dict:
    name = str(dtype).removeprefix("torch.")
    out = {"model_type": model_type, "architectures": [_ARCHITECTURES[model_type]],
           "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
           "torch_dtype": name, "dtype": name, "initializer_range": 0.02}
    if model_type in ENCODER_TYPES:
        out.update({
            "max_position_embeddings": cfg.block_size, "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "hidden_act": "gelu", "layer_norm_eps": cfg.norm_eps,
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
            "type_vocab_size": cfg.token_types, "position_embedding_type": "absolute",
            "is_decoder": False, "add_cross_attention": False})
        if model_type == "roberta":  # the position offset is the padding id's business in RoBERTa
            out["pad_token_id"] = cfg.position_offset - 1
        return out
    if model_type == "gpt2":
        return {**out, "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": None if cfg.intermediate_size == 4 * cfg.n_embd else cfg.intermediate_size,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "scale_attn_weights": True}
    rope = {"rope_type": "default", **(cfg.rope_scaling or {})}
    out.update({
        "max_position_embeddings": cfg.block_size, "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "attention_dropout": cfg.dropout,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta + rope_scaling
        "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
    })
    if model_type == "qwen2":
        return {**out, "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer}
    out["head_dim"] = cfg.head_size
    if model_type == "llama":
        return {**out, "attention_bias": False, "mlp_bias": False}
    return {**out, "sliding_window": cfg.sliding_window}


# ----------------------------------------------------------------------------- weight-name maps

@dataclass(frozen=True)
class _Weight:
    """One of our tensors = HF tensors `hf` concatenated along dim 0 (each transposed first if
    `transposed`, GPT-2's Conv1D stores (in, out)); `sizes` are their row counts in ours."""
    hf: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    transposed: bool = False


def _gpt2_map(cfg: GPTConfig) -> dict[str, _Weight]:
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    m = {f"transformer.{n}.weight": _Weight((f"transformer.{n}.weight",)) for n in ("wte", "wpe")}
    m.update({f"transformer.ln_f.{k}": _Weight((f"transformer.ln_f.{k}",)) for k in kinds})
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for n in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            for k in kinds:  # Conv1D weights are stored (in, out)
                m[f"{p}{n}.{k}"] = _Weight((f"{p}{n}.{k}",), transposed=k == "weight" and "ln_" not in n)
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = _Weight(("lm_head.weight",))
    return m


def _llama_map(cfg: GPTConfig) -> dict[str, _Weight]:
    m = {"transformer.wte.weight": _Weight(("model.embed_tokens.weight",)),
         "transformer.ln_f.weight": _Weight(("model.norm.weight",))}
    q, kv, inner = cfg.n_head * cfg.head_size, cfg.n_kv_head * cfg.head_size, cfg.intermediate_size
    for i in range(cfg.n_layer):
        o, h = f"transformer.h.{i}.", f"model.layers.{i}."
        m[o + "ln_1.weight"] = _Weight((h + "input_layernorm.weight",))
        m[o + "ln_2.weight"] = _Weight((h + "post_attention_layernorm.weight",))
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            m[f"{o}attn.c_attn.{kind}"] = _Weight(tuple(f"{h}self_attn.{n}_proj.{kind}" for n in "qkv"),
                                                  (q, kv, kv))
        m[o + "attn.c_proj.weight"] = _Weight((h + "self_attn.o_proj.weight",))
        m[o + "mlp.c_fc.weight"] = _Weight((h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                                           (inner, inner))
        m[o + "mlp.c_proj.weight"] = _Weight((h + "mlp.down_proj.weight",))
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = _Weight(("lm_head.weight",))
    return m


def _bert_map(cfg: GPTConfig, model_type: str = "bert") -> dict[str, _Weight]:
    """BertForMaskedLM (`bert.` + `cls.predictions.`) or RobertaForMaskedLM (`roberta.` + `lm_head.`)."""
    p = f"{model_type}."
    e = p + "embeddings."
    m = {"transformer.wte.weight": _Weight((e + "word_embeddings.weight",)),
         "transformer.wpe.weight": _Weight((e + "position_embeddings.weight",)),
         "transformer.wtt.weight": _Weight((e + "token_type_embeddings.weight",))}
    for k in ("weight", "bias"):
        m[f"transformer.ln_e.{k}"] = _Weight((f"{e}LayerNorm.{k}",))
    for i in range(cfg.n_layer):
        o, h = f"transformer.h.{i}.", f"{p}encoder.layer.{i}."
        for k in ("weight", "bias"):
            m[f"{o}attn.c_attn.{k}"] = _Weight(tuple(f"{h}attention.self.{n}.{k}" for n in ("query", "key", "value")),
                                               (cfg.n_embd,) * 3)
            m[f"{o}attn.c_proj.{k}"] = _Weight((f"{h}attention.output.dense.{k}",))
            m[f"{o}ln_1.{k}"] = _Weight((f"{h}attention.output.LayerNorm.{k}",))
            m[f"{o}mlp.c_fc.{k}"] = _Weight((f"{h}intermediate.dense.{k}",))
            m[f"{o}mlp.c_proj.{k}"] = _Weight((f"{h}output.dense.{k}",))
            m[f"{o}ln_2.{k}"] = _Weight((f"{h}output.LayerNorm.{k}",))
    head, ln = ("lm_head.", "layer_norm") if model_type == "roberta" else ("cls.predictions.", "transform.LayerNorm")
    dense = head + ("dense" if model_type == "roberta" else "transform.dense")
    for k in ("weight", "bias"):
        m[f"mlm_transform.dense.{k}"] = _Weight((f"{dense}.{k}",))
        m[f"mlm_transform.ln.{k}"] = _Weight((f"{head}{ln}.{k}",))
    m["lm_head.bias"] = _Weight((head + "bias",))   # the output is tied to word_embeddings
    return m


_WEIGHT_MAPS = {"gpt2": _gpt2_map, "llama": _llama_map, "mistral": _llama_map, "qwen2": _llama_map,
                "bert": _bert_map, "roberta": lambda cfg: _bert_map(cfg, "roberta")}
# Non-weight buffers some writers store: GPT-2's causal-mask buffers, old Llama rotary tables,
# BERT's position/token-type id buffers and the tied copies of its decoder.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq", "embeddings.position_ids",
                     "embeddings.token_type_ids", "predictions.decoder.weight", "predictions.decoder.bias",
                     "lm_head.decoder.weight", "lm_head.decoder.bias")
# Heads of BERT's pretraining checkpoints (BertForPreTraining) an MLM does not use: next-sentence
# prediction and the pooler. Skipped when loading.
_IGNORED_PREFIXES = ("bert.pooler.", "roberta.pooler.", "cls.seq_relationship.")


def block_linears(cfg: GPTConfig) -> tuple[str, dict[str, tuple[str, int, int | None]]]:
    """(model_type, {Hugging Face name of a block's Linear layer: (our nn.Linear holding it, its
    first output row there, its row count or None for all)}), read off the weight map: Llama's
    ``self_attn.q_proj`` is rows [0, n_head * head_size) of our fused ``attn.c_attn``, GPT-2's
    ``attn.c_attn`` is ours whole. LoRA targets and PEFT adapters are named by it."""
    model_type = _family(cfg, None)
    out: dict[str, tuple[str, int, int | None]] = {}
    for ours, w in _WEIGHT_MAPS[model_type](cfg).items():
        if ".h." in ours and ours.endswith(".weight") and ".ln_" not in ours:
            rows = w.sizes or (None,)
            for name, row, n in zip(w.hf, [0, *itertools.accumulate(w.sizes)], rows):
                out[name.removesuffix(".weight")] = (ours.removesuffix(".weight"), row, n)
    return model_type, out


def expected_shapes(cfg: GPTConfig, model_type: str) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> the shape a checkpoint of this config stores it in (from a one-block
    model's parameters on the meta device: no memory, and every block has the same shapes)."""
    with torch.device("meta"):
        one = GPT(replace(cfg, n_layer=1))
        shapes = {n: tuple(p.shape) for n, p in one.named_parameters(remove_duplicate=False)}
    out = {}
    for ours, w in _WEIGHT_MAPS[model_type](cfg).items():
        shape = shapes[re.sub(r"^transformer\.h\.\d+\.", "transformer.h.0.", ours)]
        for name, rows in zip(w.hf, w.sizes or (shape[0],)):
            part = (rows, *shape[1:])
            out[name] = tuple(reversed(part)) if w.transposed else part
    return out


def normalized_name(name: str, model_type: str) -> str:
    """A stored tensor's name as the weight map names it (older GPT-2 checkpoints: no prefix)."""
    if model_type == "gpt2" and not name.startswith(("transformer.", "lm_head")):
        return "transformer." + name
    return name


def ignored_weight(name: str) -> bool:
    """Stored tensors that are not weights of ours (mask buffers, rotary tables, a tied lm_head)."""
    return name.endswith(_IGNORED_SUFFIXES) or name.startswith(_IGNORED_PREFIXES) or name == "lm_head.weight"


# ----------------------------------------------------------------------------- loading

def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index names."""
    where = f"checkpoint {str(folder)!r}"
    if (folder / _SINGLE).exists():
        return [folder / _SINGLE]
    if not (folder / _INDEX).exists():
        raise FileNotFoundError(f"{where}: no {_SINGLE} or {_INDEX} (pickled pytorch_model.bin "
                                "is not loaded, by design)")
    weight_map = json.loads((folder / _INDEX).read_text())["weight_map"]
    files = [folder / f for f in sorted(set(weight_map.values()))]
    for path in files:
        if not path.exists():
            raise FileNotFoundError(f"{where}: {_INDEX} names {path.name!r}, which is missing")
    return files


def load_model(folder, *, dtype: torch.dtype | None = None, device="cpu") -> GPT:
    """A `GPT` from a transformers folder (gpt2, llama, mistral, qwen2) or one we wrote.

    Single or sharded safetensors (model.safetensors.index.json), fp32/bf16/fp16. Weights keep
    their stored dtype unless `dtype` is given. The model is built on the meta device, given
    uninitialised storage in its final dtype and layout, and each stored tensor is copied once,
    from the memory-mapped file straight into its place (a slice of a fused weight, converted
    on the way if `dtype` says so); one file is mapped at a time. So a bf16 checkpoint of P
    parameters holds 2P bytes once loaded, with no fp32 copy and no random init.
    The parsed config.json is kept on `model.hf_config`. The folder is checked first
    (``workers.model.hf_check.check_folder``: config, index, headers, shapes, free memory on
    `device`), so a bad one is one line before anything is allocated.
    """
    from safetensors import safe_open

    from workers.model.hf_check import check_folder

    folder = Path(folder)
    where = f"checkpoint {str(folder)!r}"
    hf, cfg = check_folder(folder, dtype=dtype, device=device)
    model_type = hf.get("model_type", "gpt2")
    files = _weight_files(folder)
    # HF name -> (our name, first row in ours, transposed)
    places: dict[str, tuple[str, int, bool]] = {}
    for ours, w in _WEIGHT_MAPS[model_type](cfg).items():
        for name, row in zip(w.hf, [0, *itertools.accumulate(w.sizes)]):
            places[name] = (ours, row, w.transposed)
    if dtype is None:  # the stored dtype (of the first tensor; checkpoints hold one)
        with safe_open(str(files[0]), framework="pt") as f:
            stored = f.get_slice(next(iter(f.keys()))).get_dtype()
        if stored not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{where}: weights stored as {stored}; supported: {', '.join(_SAFETENSORS_DTYPES)} "
                             "(or pass dtype=)")
        dtype = _SAFETENSORS_DTYPES[stored]
    with torch.device("meta"):
        model = GPT(cfg).to(dtype)
    model.tie_weights()                  # final layout, still without storage
    model.to_empty(device=device)        # straight onto the device: no host copy of the model
    model.tie_weights()                  # to_empty gives tied parameters separate storage
    params = dict(model.named_parameters())
    filled: set[str] = set()  # HF names copied: each exactly once (counting elements let a twice-stored key hide a missing one)
    unexpected: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                key = normalized_name(name, model_type)
                if key not in places:
                    if not ignored_weight(key):
                        unexpected.append(name)
                    continue
                if key in filled:
                    raise ValueError(f"{where}: tensor {name!r} is stored more than once")
                filled.add(key)
                ours, row, transposed = places[key]
                t = f.get_tensor(name)
                t = t.t() if transposed else t
                with torch.no_grad():
                    params[ours].narrow(0, row, t.size(0)).copy_(t)
    if unexpected:
        raise ValueError(f"{where}: unexpected weights {sorted(unexpected)[:8]} for model_type {model_type!r}")
    missing = sorted(set(places) - filled)
    if missing:
        raise ValueError(f"{where}: missing weights for {missing[:8]} (model_type {model_type!r})")
    model.hf_config = hf
    return model


# ----------------------------------------------------------------------------- saving

def _hf_tensors(model: GPT, model_type: str):
    """(HF name, our tensor or a slice of it, transposed?) for every HF weight, without copying."""
    cfg, ours = model.config, model.state_dict()
    if model_type == "gpt2" and not cfg.bias:
        # HF GPT-2 always has biases: a bias-free model is written with zero biases (same function)
        cfg = replace(cfg, bias=True, qkv_bias=True)
    for name, w in _WEIGHT_MAPS[model_type](cfg).items():
        if name in ours:
            t = ours[name].detach()
        else:
            t = torch.zeros(ours[name.removesuffix("bias") + "weight"].shape[0])
        parts = t.split(w.sizes, dim=0) if w.sizes else (t,)
        for hf_name, part in zip(w.hf, parts):
            yield hf_name, part, w.transposed


def save_model(model: GPT, folder, *, dtype: torch.dtype | None = None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra: dict | None = None) -> None:
    """Write config.json and safetensors weights that `AutoModelForCausalLM.from_pretrained` loads.

    dtype: the stored dtype (default: the model's). Over `max_shard_bytes`, weights go into
    model-0000i-of-0000n.safetensors shards with model.safetensors.index.json; stale weight files
    of an earlier save are removed. `extra` keys (eos/bos ids, ...) go into config.json but never
    override the architecture. Each file is written atomically; one shard is copied at a time.
    """
    from safetensors.torch import save_file

    cfg = model.config
    model_type = _family(cfg, getattr(model, "hf_config", {}).get("model_type"))
    dtype = dtype or model.lm_head.weight.dtype
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    shards: list[list] = [[]]
    size = total = 0
    for entry in _hf_tensors(model, model_type):
        nbytes = entry[1].numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
        total += nbytes
    names = [_SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        tensors = {n: (t.t() if transposed else t).to("cpu", dtype).contiguous()
                   for n, t, transposed in shard}
        atomic_write(folder / name, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for f, shard in zip(names, shards) for n, _, _ in shard}}
        atomic_write(folder / _INDEX, lambda p: Path(p).write_text(json.dumps(index, indent=2, sort_keys=True)))
    for stale in folder.glob("model*.safetensors*"):
        if stale.name not in names and (stale.name != _INDEX or len(names) == 1):
            stale.unlink()
    config = {**(extra or {}), **_hf_config(cfg, model_type, dtype)}
    atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True)))


def save_pretrained(model: GPT, directory, extra: dict | None = None) -> None:
    """`save_model(model, directory, extra=extra)` (the name older callers use)."""
    save_model(model, directory, extra=extra)


def load_pretrained(directory, map_location="cpu", dtype: torch.dtype | None = None) -> GPT:
    """`load_model(directory, dtype=dtype, device=map_location)` (the name older callers use)."""
    return load_model(directory, dtype=dtype, device=map_location)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
