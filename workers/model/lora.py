"""LoRA (Hu et al. 2021) for our GPT, in plain PyTorch: low-rank adapters on chosen nn.Linear layers.

``apply_lora(model, rank, alpha, dropout, target_modules)`` replaces every ``nn.Linear`` whose
name ends with one of ``target_modules`` (``c_attn``, ``c_proj``, ``c_fc``) by a ``LoRALinear``
holding the original layer (frozen) plus ``A`` (r, in) and ``B`` (out, r); everything else in the
model is frozen too, so only the adapters train. ``B`` starts at zero: the wrapped model computes
exactly the base model's function at step 0.

``merge_lora(model)`` folds ``W + (alpha / r) * B @ A`` back into plain ``nn.Linear`` layers, so a
fine-tuned checkpoint is an ordinary GPT (serves and exports like any other). The module knows
nothing of Ray, MLflow or configs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["LoRALinear", "apply_lora", "merge_lora", "lora_state_dict", "load_lora_state_dict", "TARGETS"]

TARGETS = ("c_attn", "c_proj", "c_fc")
"""The GPT Linear layers LoRA may wrap (attention qkv, attention/MLP output, MLP input)."""


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * dropout(x) @ A^T @ B^T, with ``base`` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora.rank: got {rank}; must be >= 1")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and the LoRA paper's code)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def forward(self, x):
        # (..., in) -> (..., out); the adapter path never materialises the (out, in) delta
        return self.base(x) + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (in eval mode)."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta_weight().to(self.base.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _targets(model: nn.Module, target_modules) -> list[str]:
    bad = sorted(set(target_modules) - set(TARGETS))
    if bad:
        raise ValueError(f"lora.target_modules: got {bad}; allowed: {list(TARGETS)}")
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules=TARGETS) -> nn.Module:
    """Wrap the target Linear layers in place and freeze every other parameter; returns ``model``."""
    names = _targets(model, target_modules)
    if not names:
        raise ValueError(f"lora.target_modules: {list(target_modules)} match no nn.Linear layer of the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear, in place; returns ``model``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _set(model, name, m.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (``...c_attn.lora_A`` etc.), detached on CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load adapter weights saved by ``lora_state_dict`` into a model wrapped by ``apply_lora``."""
    own = {k for k in model.state_dict() if ".lora_" in k}
    if set(sd) != own:
        raise ValueError(f"LoRA adapter keys do not match the model: missing {sorted(own - set(sd))[:5]}, "
                         f"unexpected {sorted(set(sd) - own)[:5]} (different rank or target_modules?)")
    model.load_state_dict(sd, strict=False)
