"""One config-driven transformer in plain PyTorch (nanoGPT/litgpt style): GPT-2 and the Llama
family (decoders), BERT and RoBERTa (masked-LM encoders).

A family is a handful of `GPTConfig` fields, not a subclass: the position scheme (`learned`
embeddings or `rope`), the norm (`layernorm` or `rmsnorm`) and where it sits (`pre` or `post`
the residual add), the MLP (`gelu`, `gelu_exact` or `swiglu`), the number of key/value heads
(GQA/MQA), biases and embedding tying. GPT-2 is the defaults; Llama, Mistral and Qwen2 are
`rope` + `rmsnorm` + `swiglu` without biases (Qwen2: `qkv_bias`). BERT is `causal=False`
(bidirectional attention, padding mask only), `norm_position="post"` (with a LayerNorm on the
embeddings and none at the end), `gelu_exact`, `token_types` embeddings and `head="mlm"` (a
dense + GELU + LayerNorm transform before the tied, biased output); RoBERTa adds
`position_offset` (its positions count from padding_idx + 1).

Module names are the same in every family (`transformer.h.N.attn.c_attn` is the fused q/k/v
projection, `mlp.c_fc` the fused gate/up or GELU input, `c_proj` the output projections), so
LoRA targets, the KV cache and sampling work unchanged for all of them. Conversion to and from
the Hugging Face layout lives apart, in `workers.model.hf`, with a weight-name map per family;
it depends on this module, never the other way.

The model knows nothing of Ray, MLflow or configs: distribution, mixed precision and tracking
are applied from outside.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

__all__ = [
    "GPTConfig", "SIZES", "config_for", "GPT", "KVCache", "StepDecoder", "NORMS", "MLPS", "POSITIONS", "ROPE_SCALINGS",
    "NORM_POSITIONS", "HEADS",
    "default_device", "autocast_context",
]

POSITIONS = ("learned", "rope")
ROPE_SCALINGS = ("linear", "llama3")
NORM_POSITIONS = ("pre", "post")
HEADS = ("lm", "mlm")


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int          # max sequence length (HF n_positions / max_position_embeddings)
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True        # biases in every Linear and LayerNorm (GPT-2); False for Llama
    # -- family components (defaults: GPT-2)
    n_kv_head: int | None = None        # key/value heads: n_head (MHA), fewer (GQA), 1 (MQA)
    head_size: int | None = None        # default n_embd // n_head
    intermediate_size: int | None = None  # MLP hidden width; default 4 * n_embd
    norm: str = "layernorm"             # a key of NORMS
    norm_eps: float = 1e-5
    mlp: str = "gelu"                   # a key of MLPS
    position: str = "learned"           # "learned" (wpe) or "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # HF rope_scaling: {"rope_type": "linear"|"llama3", ...}
    qkv_bias: bool | None = None        # bias on the q/k/v projection only; default `bias` (Qwen2: True)
    tie_embeddings: bool = True         # lm_head shares the token embedding
    sliding_window: int | None = None   # Mistral: a query sees at most this many keys (itself included)
    # -- encoders (defaults: a decoder)
    causal: bool = True                 # False: every token sees every real token (BERT)
    norm_position: str = "pre"          # "post": LayerNorm after each residual add (BERT), one on
                                        # the embeddings and no final norm
    token_types: int = 0                # token-type (segment) embeddings; 0 = none (BERT: 2)
    position_offset: int = 0            # first learned position used (RoBERTa: padding_idx + 1)
    head: str = "lm"                    # "mlm": dense + GELU + LayerNorm before the (biased) output

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            _positive_int(name, getattr(self, name))
        for name in ("n_kv_head", "head_size", "intermediate_size", "sliding_window"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"model.n_embd: got {self.n_embd}; must be divisible by "
                                 f"model.n_head ({self.n_head})")
            self.head_size = self.n_embd // self.n_head
        self.n_kv_head = self.n_head if self.n_kv_head is None else self.n_kv_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_kv_head: got {self.n_kv_head}; must divide model.n_head "
                             f"({self.n_head}) (1 = multi-query attention)")
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        self.qkv_bias = self.bias if self.qkv_bias is None else self.qkv_bias
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout: got {self.dropout!r}; must be in [0, 1)")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("position", POSITIONS),
                              ("norm_position", NORM_POSITIONS), ("head", HEADS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}: got {getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        for name in ("token_types", "position_offset"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"model.{name}: got {v!r}; must be a non-negative integer")
        if self.position_offset and (self.position != "learned" or self.position_offset >= self.block_size):
            raise ValueError(f"model.position_offset: got {self.position_offset}; needs learned positions "
                             f"and must be below block_size ({self.block_size})")
        if not self.causal and self.sliding_window is not None:
            raise ValueError("model.sliding_window: a window needs causal=true (encoders see every token)")
        if self.position == "rope" and self.head_size % 2:
            raise ValueError(f"model.head_size: got {self.head_size}; RoPE needs an even head size")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_SCALINGS:
                raise ValueError(f"model.rope_scaling: rope_type {kind!r} is not supported; "
                                 f"supported: {', '.join(ROPE_SCALINGS)} (or none)")


def _positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"model.{name}: got {v!r}; must be a positive integer")


# Llama-family components; a size adds the shape.
_LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, norm_eps=1e-5)
# BERT-family components (masked-LM encoders)
_BERT = dict(causal=False, norm_position="post", mlp="gelu_exact", token_types=2, head="mlm", norm_eps=1e-12)

# Named sizes (torchtitan-style registry). `tiny`/`llama-tiny` are for tests.
SIZES: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "medium": dict(n_layer=6, n_head=6, n_embd=384, block_size=512),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-1.5b": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
    "llama-tiny": dict(_LLAMA, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=176,
                       block_size=128),
    "llama-small": dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=352,
                        block_size=256),
    "llama-medium": dict(_LLAMA, n_layer=6, n_head=6, n_kv_head=2, n_embd=384, intermediate_size=1024,
                         block_size=512),
    # the shapes of Google's BERT-Tiny / BERT-Mini (Turc et al. 2019) and BERT-base
    "bert-tiny": dict(_BERT, n_layer=2, n_head=2, n_embd=128, block_size=512),
    "bert-mini": dict(_BERT, n_layer=4, n_head=4, n_embd=256, block_size=512),
    "bert-base": dict(_BERT, n_layer=12, n_head=12, n_embd=768, block_size=512),
    # the shapes of released models (SmolLM-135M; Llama 3.2 1B), for pretraining their like
    "smollm-135m": dict(_LLAMA, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                        block_size=2048),
    "llama-3.2-1b": dict(_LLAMA, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192,
                         block_size=8192, rope_theta=500000.0, rope_scaling=dict(
                             rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192)),
}

_CONFIG_FIELDS = {f.name for f in fields(GPTConfig)}


def config_for(model: str | dict, vocab_size: int) -> GPTConfig:
    """A GPTConfig from a size name (`"small"`, `"llama-small"`) or a dict of fields, optionally
    with `size:` as base.

    vocab_size comes from the tokenizer; a dict may override it explicitly.
    """
    if isinstance(model, str):
        base, overrides = model, {}
    elif isinstance(model, dict):
        overrides = dict(model)
        base = overrides.pop("size", None)
    else:
        raise ValueError(f"model: got {model!r}; must be a size name ({', '.join(SIZES)}) "
                         "or a mapping of GPTConfig fields")
    fields_: dict = {}
    if base is not None:
        if base not in SIZES:
            raise ValueError(f"model.size: unknown size {base!r}; known sizes: {', '.join(SIZES)}")
        fields_.update(SIZES[base])
    unknown = set(overrides) - _CONFIG_FIELDS
    if unknown:
        raise ValueError(f"model: unknown field(s) {sorted(unknown)}; allowed: "
                         f"{sorted(_CONFIG_FIELDS | {'size'})}")
    fields_["vocab_size"] = vocab_size
    fields_.update(overrides)
    missing = {"block_size", "n_layer", "n_head", "n_embd"} - set(fields_)
    if missing:
        raise ValueError(f"model: missing field(s) {sorted(missing)}; give them or a `size` "
                         f"({', '.join(SIZES)})")
    return GPTConfig(**fields_)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys/values for incremental decoding: no torch.cat per step.

    k[l], v[l]: (B, n_kv_head, max_len, hs). `pos` is how many positions are filled; GPT.forward
    writes the new keys/values at [pos, pos+T) of every layer, then advances `pos` by T. Keys are
    stored after RoPE, so a cached key never needs rotating again.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v
        self.pos = 0

    @classmethod
    def empty(cls, model: "GPT", batch_size: int, max_len: int, device=None,
              dtype: torch.dtype | None = None) -> "KVCache":
        cfg = model.config
        if max_len > cfg.block_size:
            raise ValueError(f"max_len: got {max_len}; exceeds the model's block_size "
                             f"({cfg.block_size})")
        p = model.lm_head.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_size)
        return cls([torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
                   [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)])

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) at [pos, pos+T); return all keys/values so far (B, nkv, pos+T, hs)."""
        T = k.size(2)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"kv_cache: writing up to position {end} but max_len is {self.max_len}")
        kc, vc = self.k[layer], self.v[layer]
        # narrow + copy_: two ops each, where slice assignment dispatches a slice per dimension
        kc.narrow(2, self.pos, T).copy_(k)
        vc.narrow(2, self.pos, T).copy_(v)
        return kc.narrow(2, 0, end), vc.narrow(2, 0, end)

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search: rows follow their parent beams)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]


# ----------------------------------------------------------------------------- rotary positions

def rope_inv_freq(config: GPTConfig) -> torch.Tensor:
    """Inverse frequencies (hs/2,) in fp32, with `rope_scaling` applied as transformers does."""
    hs = config.head_size
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs))
    s = config.rope_scaling
    if s is None:
        return inv
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":  # positions stretched by `factor`
        return inv / s["factor"]
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RoPE:
    """cos/sin tables (L, hs) for positions [0, L), built lazily per device/dtype and grown on
    demand (a 128k-context config need not hold a 128k table). Not a buffer: nothing to load,
    nothing to move, and a model built on the meta device needs no re-initialisation."""

    def __init__(self, config: GPTConfig):
        self.config = config
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (torch.device(device), dtype)
        have = self.tables.get(key)
        if have is None or have[0].size(0) < length:
            n = min(max(length, 2 * (have[0].size(0) if have else 1024)), self.config.block_size)
            n = max(n, length)
            # outside inference mode: training may use the tables built by an earlier generate()
            with torch.inference_mode(False), torch.no_grad():
                t = torch.arange(n, device=device, dtype=torch.float32)
                freqs = torch.outer(t, rope_inv_freq(self.config).to(device))  # (L, hs/2)
                emb = torch.cat((freqs, freqs), dim=-1)                        # (L, hs)
                have = (emb.cos().to(dtype), emb.sin().to(dtype))
            self.tables[key] = have
        return have


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hs) rotated by cos/sin (B|1, T, 1, hs); the half-split layout transformers uses."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalised in fp32, scaled in the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused op; same arithmetic as below
        return F.rms_norm(x, (x.size(-1),), weight, eps)
    return weight * F.rms_norm(x.float(), (x.size(-1),), eps=eps).to(x.dtype)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout without a module call per use: decoding pays nothing for it."""
    return F.dropout(x, p, training=True) if p and training else x


NORMS = {
    "layernorm": lambda cfg: nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias),
    "rmsnorm": lambda cfg: RMSNorm(cfg.n_embd, cfg.norm_eps),
}


class CausalSelfAttention(nn.Module):
    """Multi-head, grouped-query (n_kv_head < n_head) or multi-query (n_kv_head = 1) attention."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.n_kv_head, config.head_size
        self.sizes = (config.n_head * config.head_size,) + (config.n_kv_head * config.head_size,) * 2
        self.c_attn = nn.Linear(config.n_embd, sum(self.sizes), bias=config.qkv_bias)  # q, k, v
        self.c_proj = nn.Linear(self.sizes[0], config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, mask, is_causal, kv_cache: KVCache | None, layer: int, rope):
        B, T, _ = x.size()
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.c_attn(x).view(B, T, nh + 2 * nkv, self.head_size)   # (B, T, nh+2nkv, hs)
        if rope is None:
            q, k, v = qkv.split((nh, nkv, nkv), dim=2)
        else:
            qk, v = qkv.split((nh + nkv, nkv), dim=2)
            q, k = apply_rope(qk, *rope).split((nh, nkv), dim=2)          # q and k rotated in one go
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)                           # (B, nkv, S, hs)
        if k.dtype != q.dtype:                                            # a cache kept in another dtype
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)                     # (B, nh, T, hs)
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, -1))              # (B, T, C)
        return _dropout(y, self.dropout, self.training)


class GeluMLP(nn.Module):
    """GPT-2: Linear -> GELU (tanh approximation, HF "gelu_new") -> Linear; BERT ("gelu_exact"):
    the erf GELU."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.gelu = nn.GELU(approximate="none" if config.mlp == "gelu_exact" else "tanh")
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        y = self.c_proj(self.gelu(self.c_fc(x)))
        return _dropout(y, self.dropout, self.training)


class SwiGLUMLP(nn.Module):
    """Llama: c_proj(silu(gate) * up), gate and up from one fused c_fc (gate rows first)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=config.bias)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)                          # (B, T, I) each
        y = self.c_proj(F.silu(gate) * up)
        return _dropout(y, self.dropout, self.training)


MLPS = {"gelu": GeluMLP, "gelu_exact": GeluMLP, "swiglu": SwiGLUMLP}


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = NORMS[config.norm](config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = NORMS[config.norm](config)
        self.mlp = MLPS[config.mlp](config)
        self.post_norm = config.norm_position == "post"

    def forward(self, x, mask, is_causal, kv_cache, layer, rope):
        if self.post_norm:  # BERT: normalise the sum (ln_1 = attention.output.LayerNorm)
            x = self.ln_1(x + self.attn(x, mask, is_causal, kv_cache, layer, rope))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), mask, is_causal, kv_cache, layer, rope)
        return x + self.mlp(self.ln_2(x))


class MLMTransform(nn.Module):
    """BERT's prediction-head transform before the tied output: dense -> erf GELU -> LayerNorm."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd, bias=True)
        self.ln = NORMS[config.norm](config)

    def forward(self, x):
        return self.ln(F.gelu(self.dense(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.token_types:
            parts["wtt"] = nn.Embedding(config.token_types, config.n_embd)
        post = config.norm_position == "post"
        if post:  # post-LN normalises the embeddings, and each block's output is already normalised
            parts["ln_e"] = NORMS[config.norm](config)
        self.transformer = nn.ModuleDict(dict(
            parts,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.Identity() if post else NORMS[config.norm](config),
        ))
        mlm = config.head == "mlm"
        if mlm:
            self.mlm_transform = MLMTransform(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=mlm)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        self.rope = RoPE(config) if config.position == "rope" else None
        self.apply(self._init_weights)
        # GPT-2 paper: scale residual projections by 1/sqrt(2 * n_layer)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.tie_weights()  # after init: the same seed gives the same values in any layout

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def tie_weights(self) -> None:
        """Lay out wide Linear weights for decoding and share lm_head with the token embedding
        when tied. Call again after assigning new parameter tensors (load_state_dict(assign=True)).

        Layout: a Linear whose output is wider than its input (lm_head, c_attn, c_fc) stores its
        (out, in) weight as the transpose of a contiguous (in, out) tensor. At batch 1 each of
        these is a matrix-vector product, and x @ W with W laid out (in, out) runs 1.3-3x faster
        on CPU (measured, 1 thread: lm_head 8192x384 1.26 -> 0.47 ms, 2048x384 95 -> 61 us).
        Same values, shapes and state dict; only the strides differ, and .to() and
        load_state_dict keep them.
        """
        for mod in self.modules():
            w = getattr(mod, "weight", None)
            if type(mod) is nn.Linear and mod.out_features > mod.in_features and w.is_contiguous():
                with torch.no_grad():
                    mod.weight = nn.Parameter(w.t().contiguous().t(), requires_grad=w.requires_grad)
        if self.config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight

    # -- sizes and cost

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are excluded by default (token embeddings count
        once when tied to lm_head), as nanoGPT counts."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token, nanoGPT's estimate_mfu: 6N + 12·L·H·Q·T (PaLM appendix B)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.head_size, cfg.block_size
        return 6 * self.num_params() + 12 * L * H * Q * T

    # -- forward

    @property
    def max_length(self) -> int:
        """The longest sequence the model takes (RoBERTa's first positions are never used)."""
        return self.config.block_size - self.config.position_offset

    def _trunk(self, idx, attention_mask=None, position_ids=None, kv_cache: KVCache | None = None,
               token_type_ids=None):
        """Blocks + final norm: (B, T) token ids -> (B, T, C)."""
        B, T = idx.size()
        if kv_cache is not None and not self.config.causal:
            raise ValueError("kv_cache: an encoder (causal=false) has no incremental decoding")
        past = kv_cache.pos if kv_cache is not None else 0
        S = past + T                                         # keys visible to this call
        if S > self.max_length:
            raise ValueError(f"sequence length {S} exceeds the model's maximum {self.max_length}")
        if attention_mask is not None and attention_mask.size(-1) != S:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)}; expected "
                             f"(B, {S}) = past cached positions + new tokens")
        if position_ids is None and attention_mask is not None:
            # left padding: real tokens count from 0, pads get position 0 (ignored anyway);
            # right padding (encoders): real tokens count from 0 as well
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]  # (B, T)
        mask, is_causal = self._mask(idx.device, T, past, attention_mask)

        x = self.transformer.wte(idx)                        # (B, T, C)
        if self.config.token_types:                          # none given: every token is type 0 (as HF)
            wtt = self.transformer.wtt
            x = x + (wtt.weight[0] if token_type_ids is None else wtt(token_type_ids))
        rope = None
        if self.rope is not None:
            cos, sin = self.rope(S, idx.device, x.dtype)       # (>= S, hs); positions are < S
            if position_ids is None:                         # contiguous positions: a view, no gather
                cos, sin = cos[past:S], sin[past:S]          # (T, hs)
            else:
                cos, sin = cos[position_ids], sin[position_ids]  # (B, T, hs)
            rope = (cos.unsqueeze(-2), sin.unsqueeze(-2))    # (B|1, T, 1, hs): broadcast over heads
        elif position_ids is None:
            off = self.config.position_offset
            x = x + self.transformer.wpe.weight[off + past:off + S]  # (T, C): a view, no lookup
        else:
            x = x + self.transformer.wpe(position_ids + self.config.position_offset)  # (B, T, C)
        if "ln_e" in self.transformer:
            x = self.transformer.ln_e(x)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, is_causal, kv_cache, i, rope)
        if kv_cache is not None:
            kv_cache.pos = S
        return self.transformer.ln_f(x)                     # (B, T, C)

    def _mask(self, device, T: int, past: int, attention_mask):
        """(attn_mask, is_causal) for T new queries after `past` cached keys: None/True when SDPA's
        own causal mask (or no mask at all) is exact, else a bool mask (B|1, 1, T, S)."""
        S, window = past + T, self.config.sliding_window
        if not self.config.causal:  # every query sees every real key (and itself: no NaN pad rows)
            if attention_mask is None:
                return None, False
            eye = torch.eye(T, S, dtype=torch.bool, device=device)                  # (T, S)
            return attention_mask.bool()[:, None, None, :] | eye, False             # (B, 1, T, S)
        windowed = window is not None and S > window
        if attention_mask is None and not windowed:
            if T == 1:
                return None, False       # the new token sees every cached key
            if past == 0:
                return None, True
        qpos = torch.arange(past, S, device=device).view(T, 1)
        kpos = torch.arange(S, device=device).view(1, S)
        mask = kpos <= qpos                                                  # (T, S) causal
        if windowed:
            mask = mask & (qpos - kpos < window)
        if attention_mask is None:
            return mask, False
        # only real keys; each query also sees itself so a pad row is never fully masked (NaN)
        return (mask & attention_mask.bool()[:, None, None, :]) | (kpos == qpos), False

    def forward(self, idx, targets=None, *, attention_mask=None, position_ids=None,
                kv_cache: KVCache | None = None, loss_mask=None, logits_to_keep: int = 0,
                token_type_ids=None):
        """idx (B, T) -> (logits (B, T, V), loss or None).

        targets (B, T): -100 is ignored. loss_mask (B, T): extra weight per target (e.g. only
        response tokens in SFT); the loss is the mean over selected tokens.
        attention_mask (B, past + T): 1 real, 0 padding (left padding for batched generation).
        (Encoders: 1 real, 0 padding, wherever the padding sits.)
        kv_cache: appended to, so the next call only feeds new tokens. Logits for every given
        position are returned, or only the last `logits_to_keep` (a prefill needs one: with a
        128k vocabulary, logits for every prompt position would dwarf the model).
        token_type_ids (B, T): segment ids of a model with `token_types` (default all 0).
        For masked LM, targets are the original tokens at chosen positions and -100 elsewhere.
        """
        x = self._trunk(idx, attention_mask, position_ids, kv_cache, token_type_ids)
        if logits_to_keep and targets is None:
            x = x[:, -logits_to_keep:]                      # (B, logits_to_keep, C)
        if self.config.head == "mlm":
            x = self.mlm_transform(x)
        logits = self.lm_head(x)                            # (B, T, V)
        loss = None
        if targets is not None:
            flat = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100, reduction="none")  # (B*T,)
            weight = (targets.reshape(-1) != -100).float()
            if loss_mask is not None:
                weight = weight * loss_mask.reshape(-1).float()
            loss = (flat * weight).sum() / weight.sum().clamp_min(1.0)
        return logits, loss

    def hidden_states(self, idx, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """Final-norm output (B, T, C) (an encoder's last hidden state), e.g. for a reward model's
        scalar head or an embedding."""
        return self._trunk(idx, attention_mask, token_type_ids=token_type_ids)

    def step_decoder(self) -> "StepDecoder | None":
        """A :class:`StepDecoder` over the current parameters, or None where it could not mirror
        `forward` exactly: training mode, a module it does not know (LoRA's wrapped Linears,
        FSDP's wrapped blocks, an extra head) or a forward hook."""
        cfg = self.config
        if self.training or (cfg.causal, cfg.norm_position, cfg.head, cfg.token_types, cfg.position_offset) != (
                True, "pre", "lm", 0, 0):
            return None
        for mod in self.modules():
            if mod is not self and type(mod) not in _STEP_MODULES:
                return None
            if mod._forward_hooks or mod._forward_pre_hooks:
                return None
        return StepDecoder(self)


# ----------------------------------------------------------------------------- decoding fast path

class StepDecoder:
    """One decode step of an eval-mode GPT: tokens (B,), one per row, every row at the cache's
    position (no padding mask) -> next-token logits (B, V), the new keys/values written to the
    KVCache.

    The operations of `GPT.forward` in the same order on the same tensors (so the same logits),
    without what one token per row does not need: the module calls (about 65 a step), the 3-D
    Linear reshapes (2-D addmm straight on the stored weights, the same BLAS call), the q/k/v
    transposes ((B, H, 1, hs) is a view of the fused projection), the mask, dropout. At batch 1
    on CPU that was ~10% of a step of the 12 M models, whose matrix-vector products are
    memory-bound (`benchmarks/generate.py --anatomy`). Build one per generation
    (`GPT.step_decoder()`): it holds the parameters as they were then.
    """

    def __init__(self, model: GPT):
        cfg = self.config = model.config
        t = model.transformer
        self.wte = t.wte.weight
        self.wpe = t.wpe.weight if cfg.position == "learned" else None
        self.rope = model.rope
        self.gelu = cfg.mlp == "gelu"
        self.layers = [(_norm_args(b.ln_1), _linear_args(b.attn.c_attn), _linear_args(b.attn.c_proj),
                        _norm_args(b.ln_2), _linear_args(b.mlp.c_fc), _linear_args(b.mlp.c_proj))
                       for b in t.h]
        self.ln_f = _norm_args(t.ln_f)
        self.lm_head = _linear_args(model.lm_head)

    def __call__(self, tokens: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        cfg = self.config
        B, pos = tokens.size(0), kv_cache.pos
        S = pos + 1                                          # keys visible to this step
        nh, nkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_size
        x = torch.embedding(self.wte, tokens)                # (B, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe[pos]
        else:
            cos, sin = self.rope(S, x.device, x.dtype)
            rope = (cos[pos], sin[pos])                      # (hs,): one position for every row and head
        # Mistral's window: the query sees the last `window` keys, so the rest need not be read
        first = max(0, S - cfg.sliding_window) if cfg.sliding_window is not None else 0
        for i, (ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj) in enumerate(self.layers):
            qkv = _linear(_norm(x, ln_1), c_attn).view(B, nh + 2 * nkv, 1, hs)   # (B, H, T=1, hs)
            if rope is None:
                q, k, v = qkv.split_with_sizes((nh, nkv, nkv), 1)
            else:
                qk, v = qkv.split_with_sizes((nh + nkv, nkv), 1)
                q, k = apply_rope(qk, *rope).split_with_sizes((nh, nkv), 1)
            k, v = kv_cache.update(i, k, v)                  # (B, nkv, S, hs)
            if first:
                k, v = k.narrow(2, first, S - first), v.narrow(2, first, S - first)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=nkv != nh)  # (B, nh, 1, hs)
            x = x + _linear(y.reshape(B, nh * hs), attn_proj)
            h = _linear(_norm(x, ln_2), c_fc)
            if self.gelu:
                h = F.gelu(h, approximate="tanh")
            else:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            x = x + _linear(h, mlp_proj)
        kv_cache.pos = S
        return _linear(_norm(x, self.ln_f), self.lm_head)   # (B, V)


def _linear_args(mod: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return mod.weight.t(), mod.bias                         # (in, out): what F.linear hands addmm


def _linear(x: torch.Tensor, args) -> torch.Tensor:
    w, b = args
    return x @ w if b is None else torch.addmm(b, x, w)


def _norm_args(mod: nn.Module) -> tuple:
    if type(mod) is RMSNorm:
        return None, mod.weight, mod.eps
    return mod.normalized_shape, mod.weight, mod.bias, mod.eps


def _norm(x: torch.Tensor, args) -> torch.Tensor:
    if args[0] is None:
        return rms_norm(x, args[1], args[2])
    return torch.layer_norm(x, *args)                       # F.layer_norm's op, minus its Python wrapper


# the modules StepDecoder mirrors; anything else in a model (a LoRA wrapper, FSDP's wrapped
# classes, an extra head) sends decoding through GPT.forward
_STEP_MODULES = {nn.ModuleDict, nn.ModuleList, nn.Embedding, nn.Dropout, nn.Linear, nn.LayerNorm, RMSNorm,
                 nn.GELU, Block, CausalSelfAttention, GeluMLP, SwiGLUMLP}



# ----------------------------------------------------------------------------- devices

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast_context(device, precision: str = "auto"):
    """bf16 autocast on CUDA ("auto" or "bf16"), fp16 on request; plain fp32 on CPU."""
    device_type = torch.device(device).type
    allowed = ("auto", "fp32", "bf16", "fp16")
    if precision not in allowed:
        raise ValueError(f"precision: got {precision!r}; allowed: {', '.join(allowed)}")
    if device_type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type="cuda", dtype=dtype)
