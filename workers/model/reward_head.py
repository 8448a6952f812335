"""A reward model: our GPT trunk plus a scalar head read at the last real token. Plain PyTorch.

``RewardModel(config)`` holds ``gpt`` (a ``workers.model.transformer.GPT``; its lm_head is kept, tied and
unused, so the trunk stays a loadable GPT-2 checkpoint) and ``head`` (nn.Linear(C, 1)).
``score(idx, attention_mask)`` -> (B,) rewards: the head applied to the final-LayerNorm hidden
state of each row's last non-pad token (left or right padding both work; no mask: the last
position). ``forward`` is ``score``, so DDP wraps it like any module.

On disk (safetensors only, never pickles)::

    config.json            HF GPT2Config + "reward_model": true (+ any extra keys)
    model.safetensors      the trunk in HF GPT-2 layout (transformers loads it as GPT2LMHeadModel)
    reward_head.safetensors  {"reward_head.weight": (1, C), "reward_head.bias": (1,)}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from workers.model.hf import atomic_write, load_model, read_config, save_model
from workers.model.transformer import GPT, GPTConfig

__all__ = ["RewardModel", "ValueModel", "save_reward_model", "load_reward_model", "is_reward_model", "HEAD_FILE"]

HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    def __init__(self, config: GPTConfig, gpt: GPT | None = None):
        super().__init__()
        self.config = config
        self.gpt = gpt if gpt is not None else GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (config.n_embd + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "RewardModel":
        """A reward model whose trunk is ``gpt`` (e.g. a fine-tuned policy) and a fresh head."""
        return cls(gpt.config, gpt)

    def score(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T), attention_mask (B, T) 1 = real token -> rewards (B,) in float32."""
        h = self.gpt.hidden_states(idx, attention_mask)            # (B, T, C)
        B, T, _ = h.shape
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=idx.device, dtype=torch.long)
        else:
            # index of the last real token: max position where the mask is 1 (any padding side)
            pos = torch.arange(T, device=idx.device).expand(B, T)
            last = (pos * attention_mask.long()).argmax(dim=-1)    # (B,)
        h_last = h[torch.arange(B, device=idx.device), last]       # (B, C)
        return self.head(h_last.to(self.head.weight.dtype)).squeeze(-1).float()  # (B,)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.score(idx, attention_mask)

    # -- what the training loop asks of a model

    def flops_per_token(self) -> int:
        return self.gpt.flops_per_token()


class ValueModel(RewardModel):
    """A critic: the reward model's trunk and head read at every position, (B, T) values (the
    value of the state after each token). ``forward`` returns them, so DDP/FSDP wrap it as any
    module; ``score`` is unchanged."""

    @classmethod
    def from_reward(cls, reward: RewardModel) -> "ValueModel":
        critic = cls(reward.config, reward.gpt)
        critic.head.load_state_dict(reward.head.state_dict())
        return critic

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.gpt.hidden_states(idx, attention_mask)            # (B, T, C)
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()  # (B, T)


def is_reward_model(directory) -> bool:
    return bool(read_config(directory).get("reward_model"))


def save_reward_model(model: RewardModel, directory, extra: dict | None = None) -> None:
    """Write config.json (+ ``"reward_model": true``), model.safetensors and reward_head.safetensors."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    head = {"reward_head.weight": model.head.weight.detach().cpu().contiguous(),
            "reward_head.bias": model.head.bias.detach().cpu().contiguous()}
    atomic_write(directory / HEAD_FILE, lambda p: save_file(head, p, metadata={"format": "pt"}))
    # config.json last: its presence with "reward_model" marks a complete reward model
    save_model(model.gpt, directory, extra={**(extra or {}), "reward_model": True})


def load_reward_model(directory, map_location="cpu") -> RewardModel:
    """Load a folder written by ``save_reward_model`` (safetensors only). ``hf_config`` holds
    the parsed config.json (chat/prompt templates, eos id, ...)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = read_config(directory)
    if not cfg.get("reward_model"):
        raise ValueError(f"reward model {str(directory)!r}: config.json lacks \"reward_model\": true "
                         "(is it a policy checkpoint rather than a reward stage's output?)")
    head_path = directory / HEAD_FILE
    if not head_path.exists():
        raise FileNotFoundError(f"reward model {str(directory)!r}: no {HEAD_FILE}")
    gpt = load_model(directory)
    model = RewardModel.from_gpt(gpt)
    head = load_file(str(head_path), device="cpu")
    expected = {"reward_head.weight", "reward_head.bias"}
    if set(head) != expected:
        raise ValueError(f"reward model {str(directory)!r}: {HEAD_FILE} holds {sorted(head)}; expected {sorted(expected)}")
    model.head.load_state_dict({"weight": head["reward_head.weight"], "bias": head["reward_head.bias"]})
    model.hf_config = json.loads((directory / "config.json").read_text())
    return model.to(map_location)
