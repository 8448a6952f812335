"""How every trainer builds its optimizer, for the training loop and the rlhf learner alike: the
optimizer knobs (declared once, in ``OptimizerConfig``) and one parameter grouping.

Weight decay applies to matrices (attention/MLP weights, embeddings) only; biases and norm
gains (1-D parameters) are not decayed, as in nanoGPT and most LLM recipes. Frozen parameters
(a LoRA base) are left out.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from workers.config import StrictConfig
from pydantic.fields import FieldInfo

__all__ = ["OptimizerConfig", "knob", "param_groups", "adamw"]


class OptimizerConfig(StrictConfig):
    """The optimizer knobs every training kind shares: the training loop's ``TrainingConfig``
    (pretrain, finetune, reward) and the rlhf learner's config both build on this section."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(6e-4, gt=0, description="Learning rate: the peak of the training loop's warmup + cosine "
                      "schedule; rlhf's learner keeps it constant.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only; biases and norms "
                                "are not decayed).")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU; fp32; bf16 (GPU only, fp32 on CPU).")
    seed: int = Field(1337, ge=0, description="Seeds initialisation, data order, dropout and sampling.")


def knob(section: type[BaseModel], name: str, default: Any) -> Any:
    """Field ``name`` of ``section`` (type bounds and description as declared there) with a kind's
    own default: ``lr: float = knob(TrainingConfig, "lr", 1e-4)``."""
    return FieldInfo.merge_field_infos(section.model_fields[name], default=default)


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
