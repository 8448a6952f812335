"""Masked-language-model batches: BERT's recipe over the step-indexed windows of a token dataset.

Each row is ``[CLS]`` followed by a ``block_size - 1``-token window of ``TokenBatches`` (documents
separated by the tokenizer's ``[SEP]`` / ``</s>``). Of its tokens, each non-special one is chosen
with probability ``mask_prob`` (15 %), or, with whole-word masking, each word (a word-start
piece and the ``##`` / non-``Ġ`` pieces after it) is chosen with that probability. A chosen token
becomes ``[MASK]`` with probability 0.8, a uniformly random id with 0.1, and stays itself with
0.1; its target is the original token, every other target is -100 (the loss covers chosen
positions only). Special tokens are never chosen.

The masks are a pure function of (seed, step, global row), drawn from their own generator
(``np.random.default_rng([seed, key, step + 1, row])``, key apart from the windows'): the worker
and micro-batch a row lands in follow from the row, so any number of workers masks the same
global batch the same way and a resumed run needs no state to mask the step it resumes at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.data.tokens import _VAL_KEY, TokenBatches, TokenDataset

__all__ = ["MLMSpecials", "MLMBatches", "mask_tokens", "masked_accuracy"]

_MLM_KEY = 0x4D4C4D  # "MLM": the mask generators' stream, apart from the windows'


@dataclass(frozen=True)
class MLMSpecials:
    """What masking needs from the tokenizer."""

    cls_id: int
    mask_id: int
    pad_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    word_starts: tuple[bool, ...] | None = None
    """Per id: does this piece begin a word (whole-word masking); None: pieces are masked alone."""

    @classmethod
    def from_tokenizer(cls, tok, vocab_size: int, whole_word: bool = False) -> "MLMSpecials":
        from workers.data import tokenizer as tk

        roles = tk.encoder_specials(tok)
        if roles is None:
            raise ValueError("objective: mlm needs an encoder's tokenizer (tokenize.tokenizer type wordpiece or "
                             "bpe-roberta: [CLS]/[MASK] or <s>/<mask> tokens); this one has neither")
        specials = tuple(sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special))
        return cls(cls_id=tok.token_to_id(roles["cls_token"]), mask_id=tok.token_to_id(roles["mask_token"]),
                   pad_id=tok.token_to_id(roles["pad_token"]), vocab_size=vocab_size, special_ids=specials,
                   word_starts=tuple(tk.word_starts(tok)) if whole_word else None)


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, specials: MLMSpecials,
                mask_prob: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) for one row of token ids (T,): BERT's 80/10/10 recipe (module docstring)."""
    special = np.isin(ids, specials.special_ids)
    if specials.word_starts is None:
        chosen = (rng.random(ids.shape) < mask_prob) & ~special
    else:
        starts = np.asarray(specials.word_starts, dtype=bool)[np.minimum(ids, len(specials.word_starts) - 1)]
        word = np.cumsum(starts | special) - 1                 # (T,) word index of each piece
        pick = rng.random(int(word[-1]) + 1) < mask_prob       # one draw per word
        chosen = pick[word] & ~special
    how = rng.random(ids.shape)                                # < 0.8 mask, < 0.9 random, else keep
    random_ids = rng.integers(0, specials.vocab_size, ids.shape)
    inputs = ids.copy()
    inputs[chosen & (how < 0.8)] = specials.mask_id
    swap = chosen & (how >= 0.8) & (how < 0.9)
    inputs[swap] = random_ids[swap]
    targets = np.where(chosen, ids, -100)
    return inputs, targets


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct predictions, chosen positions) over a micro-batch's masked targets."""
    chosen = targets != -100
    return (logits.argmax(-1)[chosen] == targets[chosen]).sum(), chosen.sum()


class MLMBatches(TokenBatches):
    """`TokenBatches` whose micro-batches are masked: ``{"idx": inputs, "targets": original ids at
    chosen positions, -100 elsewhere}``, each row ``[CLS]`` + ``block_size - 1`` tokens."""

    def __init__(self, dataset: TokenDataset, *, specials: MLMSpecials, mask_prob: float = 0.15, **kwargs):
        super().__init__(dataset, **kwargs)
        self.specials, self.mask_prob = specials, mask_prob

    def _masked(self, rows: list[np.ndarray], key: int, first_row: int, stride: int) -> list[dict[str, torch.Tensor]]:
        out_rows = []
        for n, window in enumerate(rows):
            row = first_row + n * stride                       # the global row index
            ids = np.concatenate(([self.specials.cls_id], window[:self.block_size - 1])).astype(np.int64)
            rng = np.random.default_rng([self.seed, _MLM_KEY, key, row])
            out_rows.append(mask_tokens(ids, rng, self.specials, self.mask_prob))
        out = []
        for k in range(0, len(out_rows), self.batch_size):
            part = out_rows[k:k + self.batch_size]
            idx = torch.from_numpy(np.stack([p[0] for p in part]))
            targets = torch.from_numpy(np.stack([p[1] for p in part]))
            if self.device.type == "cuda":
                idx, targets = (t.pin_memory().to(self.device, non_blocking=True) for t in (idx, targets))
            out.append({"idx": idx, "targets": targets})
        return out

    def train(self, step: int) -> list[dict[str, torch.Tensor]]:
        G, S = self.global_rows, self.n_shards
        rows = [self._window(self.train_streams[(i + step * G) % S], step + 1, i) for i in range(self.rank, G, self.world)]
        return self._masked(rows, step + 1, self.rank, self.world)

    def val(self) -> list[dict[str, torch.Tensor]]:
        if not self.has_val:
            return []
        rows = [self._window(self.val_stream, _VAL_KEY, i)
                for i in range(self.rank, self.global_rows * self.eval_steps, self.world)]
        return self._masked(rows, _VAL_KEY, self.rank, self.world)
