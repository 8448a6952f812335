"""LoRA (Hu et al. 2021) for our GPT, in plain PyTorch, named and exported as Hugging Face's PEFT does.

Targets are the Hugging Face names of each family's Linear layers, matched as PEFT matches them
(a module whose name is the target or ends with ``.<target>``): GPT-2 ``c_attn``, ``c_proj``
(``attn.c_proj``, ``mlp.c_proj`` for one of the two), ``c_fc``; Llama, Mistral, Qwen2
``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``.
``workers.model.hf.block_linears`` says where each lives in ours: our q/k/v are one fused
``c_attn`` and gate/up one ``c_fc``, so a LoRA on ``q_proj`` is an adapter on the q rows of
``c_attn`` alone, its own ``A`` (r, in) and ``B`` (rows, r), exactly PEFT's adapter on q_proj.

``apply_lora`` replaces each targeted ``nn.Linear`` by a ``LoRALinear`` holding the original
layer (frozen) plus one adapter per targeted row slice; everything else in the model is frozen
too, so only the adapters train. ``B`` starts at zero: the wrapped model computes exactly the
base model's function at step 0. ``merge_lora`` folds ``W[slice] + (alpha / r) * B @ A`` back
into plain ``nn.Linear`` layers (an ordinary GPT that serves and exports like any other);
``save_peft_adapter`` writes the adapters as a PEFT folder (adapter_config.json +
adapter_model.safetensors) that ``peft.PeftModel.from_pretrained`` puts on the base checkpoint.
The module knows nothing of Ray, MLflow or configs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["LoRALinear", "apply_lora", "merge_lora", "target_names", "check_target_modules", "save_peft_adapter", "ADAPTER_CONFIG",
           "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
"""PeftModelForCausalLM's name for the wrapped model: every saved key starts with it."""


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * dropout(x) @ A_s^T @ B_s^T on each adapted output slice s
    (rows [row, row + rows) of y; the whole layer is one slice), with ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 slices: tuple[tuple[int, int], ...] | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora.rank: got {rank}; must be >= 1")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.scaling = alpha / rank
        self.slices = tuple(sorted(slices or ((0, base.out_features),)))  # ((first row, rows), ...)
        w = base.weight
        self.lora_A = nn.ParameterList()  # (r, in) each
        self.lora_B = nn.ParameterList()  # (rows, r) each
        for _, rows in self.slices:
            a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (and the LoRA paper's code)
            self.lora_A.append(a)
            self.lora_B.append(nn.Parameter(torch.zeros(rows, rank, device=w.device, dtype=w.dtype)))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """(out, in): the adapters' update of the base weight, zero outside the adapted slices."""
        delta = torch.zeros_like(self.base.weight, dtype=self.lora_A[0].dtype)
        for (row, rows), a, b in zip(self.slices, self.lora_A, self.lora_B):
            delta[row:row + rows] = (b @ a) * self.scaling
        return delta

    def forward(self, x):
        # (..., in) -> (..., out); the adapter path never materialises an (out, in) delta
        y = self.base(x)
        parts, at = [], 0
        for (row, rows), a, b in zip(self.slices, self.lora_A, self.lora_B):
            if row > at:
                parts.append(y.new_zeros(*y.shape[:-1], row - at))
            parts.append((self.lora_dropout(x) @ a.t() @ b.t()) * self.scaling)  # a dropout draw per adapter, as PEFT
            at = row + rows
        if at < y.size(-1):
            parts.append(y.new_zeros(*y.shape[:-1], y.size(-1) - at))
        return y + (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (in eval mode)."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta_weight().to(self.base.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


# ----------------------------------------------------------------------------- targets


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target_modules: the full name, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def _layer_names(cfg) -> tuple[str, dict[str, tuple[str, int, int | None]]]:
    from workers.model.hf import block_linears
    return block_linears(cfg)


def target_names(cfg) -> list[str]:
    """The names ``target_modules`` takes for this model's family: each block Linear's Hugging
    Face name, and with its parent (``mlp.c_proj``) where the short name is shared."""
    _, places = _layer_names(cfg)
    first = [n.split(".") for n in places if ".0." in n]  # the first block's
    short = [p[-1] for p in first]
    return list(dict.fromkeys(short + [".".join(p[-2:]) for p in first if short.count(p[-1]) > 1]))


def _probe(model_type: str):
    """A one-block model config of the family (llama, mistral and qwen2 share their names)."""
    from workers.model.transformer import config_for

    return config_for({"size": "tiny" if model_type == "gpt2" else "llama-tiny", "n_layer": 1}, 8)


def check_target_modules(target_modules, model_type: str | None = None) -> None:
    """Raise the error ``apply_lora`` would for a checkpoint of ``model_type`` (config.json's),
    before any weight is loaded. Without a model_type (a config checked before its checkpoint is
    known): each name's last part must be a Linear name of some family."""
    if model_type is not None:
        _resolve(_probe(model_type), target_modules, model_type)
        return
    known = {n.rsplit(".", 1)[-1]: None for f in ("gpt2", "llama") for n in target_names(_probe(f))}
    bad = [t for t in target_modules or () if t.rsplit(".", 1)[-1] not in known]
    if bad:
        raise ValueError(f"lora.target_modules: got {bad}; allowed: the model family's Hugging Face Linear names "
                         f"({', '.join(known)})")


def _resolve(cfg, target_modules, model_type: str | None = None) -> dict[str, list[tuple[str, int, int | None]]]:
    """{our Linear: [(HF name, first row, rows or None), ...]} for the targeted layers."""
    family, places = _layer_names(cfg)
    model_type = model_type or family
    allowed = target_names(cfg)
    targets = allowed if target_modules is None else list(target_modules)
    bad = [t for t in targets if not any(_matches(hf, t) for hf in places)]
    if bad or not targets:
        raise ValueError(f"lora.target_modules: got {bad or targets}; allowed for this {model_type} model: "
                         f"{', '.join(allowed)} (its Hugging Face Linear names)")
    out: dict[str, list] = {}
    for hf, (ours, row, rows) in places.items():
        if any(_matches(hf, t) for t in targets):
            out.setdefault(ours, []).append((hf, row, rows))
    return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules=None) -> nn.Module:
    """Wrap the targeted Linear layers of a GPT in place and freeze every other parameter;
    returns ``model``. ``target_modules``: Hugging Face names (see ``target_names``); None: every
    Linear of the blocks."""
    targets = _resolve(model.config, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for ours, parts in targets.items():
        base = model.get_submodule(ours)
        slices = tuple((row, rows if rows is not None else base.out_features) for _, row, rows in parts)
        _set(model, ours, LoRALinear(base, rank, alpha, dropout, slices))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear, in place; returns ``model``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _set(model, name, m.merged())
    return model


# ----------------------------------------------------------------------------- PEFT export


def save_peft_adapter(model: nn.Module, folder, *, base_model: str) -> list[str]:
    """Write the adapters of a model wrapped by ``apply_lora`` as a PEFT LoRA folder: its keys
    (``base_model.model.<HF module>.lora_A.weight``, (r, in); ``lora_B``, (rows, r)) and config
    name the Hugging Face modules, so ``PeftModel.from_pretrained(<base_model loaded by
    transformers>, folder)`` computes what the merged model does. Returns the target_modules
    written (short names where they select exactly the adapted layers)."""
    from safetensors.torch import save_file

    from workers.model.hf import atomic_write

    model_type, places = _layer_names(model.config)
    by_place = {(ours, row): hf for hf, (ours, row, _) in places.items()}
    tensors: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not wrappers:
        raise ValueError("save_peft_adapter: the model holds no LoRA adapters")
    first = wrappers[0][1]
    for name, m in wrappers:
        if (m.rank, m.alpha, m.dropout) != (first.rank, first.alpha, first.dropout):
            raise ValueError(f"save_peft_adapter: {name} has another rank/alpha/dropout than {wrappers[0][0]}")
        for (row, _), a, b in zip(m.slices, m.lora_A, m.lora_B):
            hf = by_place[(name, row)]
            adapted.append(hf)
            tensors[f"{_PEFT_PREFIX}{hf}.lora_A.weight"] = a.detach().to("cpu", torch.float32).contiguous()
            tensors[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = b.detach().to("cpu", torch.float32).contiguous()
    # the shortest suffixes that select exactly the adapted modules (PEFT matches them the same way)
    targets, chosen = [], set(adapted)
    for hf in adapted:
        parts = hf.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(h in chosen for h in places if _matches(h, suffix)):
                break
        targets.append(suffix)
    targets = sorted(set(targets))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": first.dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": model_type == "gpt2",  # GPT-2's Conv1D stores (in, out)
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(folder / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True)))
    return targets
