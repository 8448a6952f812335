"""How every trainer builds its optimizer: one parameter grouping for the training loop and the
rlhf learner alike.

Weight decay applies to matrices (attention/MLP weights, embeddings) only; biases and norm
gains (1-D parameters) are not decayed, as in nanoGPT and most LLM recipes. Frozen parameters
(a LoRA base) are left out.
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["param_groups", "adamw"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decayed 2-D+ params, undecayed 1-D params] of the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95),
          device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused kernel on CUDA."""
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas),
                             **({"fused": True} if fused else {}))
