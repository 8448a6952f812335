"""Filling masked tokens with a masked-LM encoder: the top-k tokens of each mask, with their
probabilities (softmax of the logits at that position over the whole vocabulary, as
transformers' ``fill-mask`` pipeline ranks them). Plain PyTorch."""

from __future__ import annotations

import torch

__all__ = ["fill_mask"]


@torch.no_grad()
def fill_mask(model, ids: list[int], mask_id: int, top_k: int = 5) -> list[list[tuple[int, float]]]:
    """For each position of ``ids`` holding ``mask_id``, in order: [(token id, probability)] best first."""
    if model.config.causal:
        raise ValueError("fill_mask: the model is a decoder (causal); it has no masked-LM head")
    where = [i for i, t in enumerate(ids) if t == mask_id]
    if not where:
        return []
    device = next(model.parameters()).device
    logits, _ = model(torch.tensor([ids], device=device))        # (1, T, V)
    probs = logits[0, where].float().softmax(-1)                 # (M, V)
    top = probs.topk(min(top_k, probs.size(-1)), dim=-1)
    return [list(zip(i.tolist(), p.tolist())) for i, p in zip(top.indices, top.values)]
