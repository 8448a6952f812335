"""A GPT-2 style decoder in plain PyTorch (nanoGPT-like), stored in Hugging Face GPT-2 layout.

The model knows nothing of Ray, MLflow or configs: distribution, mixed precision and tracking
are applied from outside. Parameter names follow `transformers.GPT2LMHeadModel`
(`transformer.wte`, `transformer.h.N.attn.c_attn`, ...), so `save_pretrained` writes a
checkpoint that `GPT2LMHeadModel.from_pretrained` loads, and `load_pretrained` reads one that
`GPT2LMHeadModel.save_pretrained` wrote. HF's Conv1D stores weights as (in, out); we use
nn.Linear (out, in), so those four weights are transposed at save/load.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

__all__ = [
    "GPTConfig", "SIZES", "config_for", "GPT", "KVCache",
    "save_pretrained", "load_pretrained", "read_config",
    "default_device", "autocast_context",
]


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int          # max sequence length (HF n_positions)
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True        # biases in Linear and LayerNorm (HF GPT-2 always has them)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"model.{name}: got {v!r}; must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd: got {self.n_embd}; must be divisible by "
                             f"model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout: got {self.dropout!r}; must be in [0, 1)")


# Named sizes (torchtitan-style registry). `tiny` is for tests.
SIZES: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "medium": dict(n_layer=6, n_head=6, n_embd=384, block_size=512),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-1.5b": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
}

_CONFIG_FIELDS = {f.name for f in fields(GPTConfig)}


def config_for(model: str | dict, vocab_size: int) -> GPTConfig:
    """A GPTConfig from a size name (`"small"`) or a dict of fields, optionally with `size:` as base.

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

    k[l], v[l]: (B, nh, max_len, hs). `pos` is how many positions are filled; GPT.forward writes
    the new keys/values at [pos, pos+T) of every layer, then advances `pos` by T.
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
        shape = (batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        return cls([torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)],
                   [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)])

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at [pos, pos+T); return all keys/values so far (B, nh, pos+T, hs)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"kv_cache: writing up to position {end} but max_len is {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search: rows follow their parent beams)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]


# ----------------------------------------------------------------------------- modules

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, mask, is_causal, kv_cache: KVCache | None, layer: int):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)                          # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0)             # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # HF "gelu_new": same logits as transformers
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask, is_causal, kv_cache, layer):
        x = x + self.attn(self.ln_1(x), mask, is_causal, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 paper: scale residual projections by 1/sqrt(2 * n_layer)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- sizes and cost

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are excluded by default (token embeddings count
        once, as the tied lm_head weight), as nanoGPT counts."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token, nanoGPT's estimate_mfu: 6N + 12·L·H·Q·T (PaLM appendix B)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.num_params() + 12 * L * H * Q * T

    # -- forward

    def _trunk(self, idx, attention_mask=None, position_ids=None, kv_cache: KVCache | None = None):
        """Blocks + final LayerNorm: (B, T) token ids -> (B, T, C)."""
        B, T = idx.size()
        past = kv_cache.pos if kv_cache is not None else 0
        S = past + T                                         # keys visible to this call
        if S > self.config.block_size:
            raise ValueError(f"sequence length {S} exceeds block_size {self.config.block_size}")
        if attention_mask is not None and attention_mask.size(-1) != S:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)}; expected "
                             f"(B, {S}) = past cached positions + new tokens")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, S, device=idx.device).unsqueeze(0)  # (1, T)
            else:
                # left padding: real tokens count from 0, pads get position 0 (ignored anyway)
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]  # (B, T)

        mask, is_causal = None, False
        if attention_mask is not None:
            # (B, 1, T, S): causal (offset by the cached length) and only real keys. Each query
            # also sees itself so a pad row is never fully masked (that would give NaN).
            qpos = torch.arange(past, S, device=idx.device).view(T, 1)
            kpos = torch.arange(S, device=idx.device).view(1, S)
            causal = kpos <= qpos                                            # (T, S)
            mask = (causal & attention_mask.bool()[:, None, None, :]) | (kpos == qpos)
        elif T > 1:
            if past == 0:
                is_causal = True
            else:  # chunked prefill after a cached prefix: causal with an offset
                qpos = torch.arange(past, S, device=idx.device).view(T, 1)
                mask = torch.arange(S, device=idx.device).view(1, S) <= qpos
        # T == 1 with no padding: the new token sees every cached key, no mask needed.

        x = self.transformer.wte(idx) + self.transformer.wpe(position_ids)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, is_causal, kv_cache, i)
        if kv_cache is not None:
            kv_cache.pos = S
        return self.transformer.ln_f(x)                     # (B, T, C)

    def forward(self, idx, targets=None, *, attention_mask=None, position_ids=None,
                kv_cache: KVCache | None = None, loss_mask=None):
        """idx (B, T) -> (logits (B, T, V), loss or None).

        targets (B, T): -100 is ignored. loss_mask (B, T): extra weight per target (e.g. only
        response tokens in SFT); the loss is the mean over selected tokens.
        attention_mask (B, past + T): 1 real, 0 padding (left padding for batched generation).
        kv_cache: appended to, so the next call only feeds new tokens. Logits for every given
        position are returned (the sampler picks the last).
        """
        x = self._trunk(idx, attention_mask, position_ids, kv_cache)
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

    def hidden_states(self, idx, attention_mask=None) -> torch.Tensor:
        """Final-LayerNorm output (B, T, C), e.g. for a reward model's scalar head."""
        return self._trunk(idx, attention_mask)

    # -- training helpers

    def configure_optimizers(self, weight_decay: float, lr: float, betas=(0.9, 0.95),
                             device_type: str = "cpu"):
        """AdamW with decay on 2-D params only (matmul weights, embeddings); fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **({"fused": True} if fused else {}))


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


# ----------------------------------------------------------------------------- HF layout I/O

# nn.Linear (out, in) <-> HF Conv1D (in, out)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")



def _hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    sd = {}
    for k, t in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to transformer.wte.weight; HF omits it too
        t = t.detach().to("cpu")
        if k.endswith(_CONV1D):
            t = t.t()
        sd[k] = t.contiguous()
    # HF GPT-2 always has biases; a bias-free model is exported with zero biases (same function)
    if not model.config.bias:
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.LayerNorm)) and name != "lm_head":
                sd[f"{name}.bias"] = torch.zeros(mod.weight.shape[0], dtype=mod.weight.dtype)
    return sd


def save_pretrained(model: GPT, directory, extra: dict | None = None) -> None:
    """Write `config.json` (a valid HF GPT2Config) and `model.safetensors`, each atomically.

    `extra` keys (eos/bos token ids, chat template, ...) go into config.json as-is.
    """
    from safetensors.torch import save_file

    cfg = model.config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
    }
    config.update(extra or {})
    _atomic_write(directory / "model.safetensors",
                  lambda p: save_file(_hf_state_dict(model), p, metadata={"format": "pt"}))
    _atomic_write(directory / "config.json",
                  lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True)))


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_config(directory) -> dict:
    """The checkpoint's config.json as a dict (model fields plus any `extra` keys)."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(directory)!r}: no config.json")
    return json.loads(path.read_text())


def load_pretrained(directory, map_location="cpu") -> GPT:
    """Load our checkpoint or one written by `transformers.GPT2LMHeadModel.save_pretrained`.

    Handles the `transformer.` prefix being present or not, a missing (tied) lm_head, and HF's
    non-parameter attention buffers. safetensors only: never unpickles. The parsed config.json
    is kept on `model.hf_config`.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    hf = read_config(directory)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"checkpoint {str(directory)!r}: model_type {hf.get('model_type')!r}; "
                         "only 'gpt2' is supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"checkpoint {str(directory)!r}: activation_function {act!r}; "
                         "supported: gelu_new")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"checkpoint {str(directory)!r}: n_inner {hf['n_inner']!r}; "
                         "only 4 * n_embd is supported")
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"checkpoint {str(directory)!r}: no model.safetensors "
                                "(pickled pytorch_model.bin is not loaded, by design)")
    config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                       n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
    raw = load_file(str(weights), device="cpu")
    sd = {}
    for k, t in raw.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # HF causal-mask buffers, not weights
        if not (k.startswith("transformer.") or k.startswith("lm_head.")):
            k = "transformer." + k
        if k.endswith(_CONV1D):
            t = t.t()
        sd[k] = t
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    model = GPT(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(directory)!r}: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    model.hf_config = hf
    model.to(map_location)
    return model
