"""Reading the token dataset the `tokenize` stage writes, as step-indexed training batches.

Layout (one folder, local or in object storage)::

    manifest.json   {"vocab_size", "dtype", "eos_id", "tokenizer": {"path": ...},
                     "splits": {"train": {"documents", "tokens", "shards": [{"path", ...}]}, "val": ...}}
    train/shard-00000.parquet   one row per document: ids list<uint16|uint32>, doc_id int64

Each shard becomes one stream: its documents concatenated, each followed by EOS.

Batches are a pure function of (seed, step): row ``i`` of the global batch at step ``s`` is a
window of ``block_size + 1`` tokens from shard ``(i + s * G) % S`` (G rows per global batch,
S shards) at an offset drawn by a generator seeded with ``(seed, step, i)``. Rank ``r`` of ``W``
takes rows ``i ≡ r (mod W)``, so any number of workers sees the same global batch, and a resumed
run needs no data-loader state: it just asks for the batch of the step it resumes at. Since
``W`` divides ``G``, rank ``r`` only ever reads shards ``j ≡ r (mod gcd(W, S))``: its own slice
of the shards when ``W`` divides ``S``, every shard when they are coprime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch

from workers import storage

_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_VAL_KEY = 0  # seeds the fixed validation rows; training step s uses key s + 1


@dataclass(frozen=True)
class ShardInfo:
    path: str
    tokens: int
    documents: int


@dataclass(frozen=True)
class TokenDataset:
    """A token dataset's manifest: where its shards are and what they hold."""

    uri: str
    vocab_size: int
    eos_id: int
    dtype: str
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    tokenizer_uri: str | None = None

    @classmethod
    def open(cls, uri: str) -> "TokenDataset":
        manifest_uri = storage.join(uri, "manifest.json")
        if not storage.exists(manifest_uri):
            raise FileNotFoundError(f"token dataset {uri!r}: no manifest.json (is it a tokenize stage's output?)")
        m = storage.read_json(manifest_uri)
        for key in ("vocab_size", "eos_id", "splits"):
            if key not in m:
                raise ValueError(f"token dataset {uri!r}: manifest.json lacks {key!r}")
        dtype = m.get("dtype", "uint32")
        if dtype not in _DTYPES:
            raise ValueError(f"token dataset {uri!r}: manifest dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
        splits = {
            name: [ShardInfo(s["path"], int(s.get("tokens", 0)), int(s.get("documents", 0))) for s in split.get("shards", [])]
            for name, split in m["splits"].items()
        }
        tok = (m.get("tokenizer") or {}).get("path")
        return cls(uri=uri, vocab_size=int(m["vocab_size"]), eos_id=int(m["eos_id"]), dtype=dtype,
                   splits=splits, tokenizer_uri=storage.join(uri, tok) if tok else None)

    def shards(self, split: str) -> list[ShardInfo]:
        return self.splits.get(split, [])

    def load_stream(self, split: str, index: int) -> np.ndarray:
        """Shard ``index`` of ``split`` as one 1-D stream: documents each followed by EOS."""
        shard = self.shards(split)[index]
        fs, path = storage.resolve(storage.join(self.uri, shard.path))
        ids = pq.read_table(path, columns=["ids"], filesystem=fs).column("ids").combine_chunks()
        values = ids.flatten().to_numpy(zero_copy_only=False)
        lengths = ids.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        ends = np.cumsum(lengths)
        values = values.astype(_DTYPES[self.dtype], copy=False)
        # The tokenize stage ends every row with EOS already; add one only where it is missing.
        # (np.insert puts EOS before index `end`, i.e. right after the document's last token.)
        missing = (lengths == 0) | (values[np.maximum(ends - 1, 0)] != self.eos_id)
        return np.insert(values, ends[missing], self.eos_id)


def shards_for_rank(n_shards: int, rank: int, world: int) -> list[int]:
    """The training shards rank ``rank`` of ``world`` ever reads (see the module docstring)."""
    g = math.gcd(world, n_shards)
    return [j for j in range(n_shards) if j % g == rank % g]


class TokenBatches:
    """One rank's share of the step-indexed global batches of a token dataset.

    ``train(step)`` returns this rank's ``grad_accum`` micro-batches of ``batch_size`` rows;
    ``val()`` this rank's share of a fixed validation set of ``eval_steps`` global batches.
    Each micro-batch is ``{"idx": (B, T) int64, "targets": (B, T) int64}``.
    """

    def __init__(self, dataset: TokenDataset, *, block_size: int, batch_size: int, grad_accum: int,
                 rank: int, world: int, seed: int, eval_steps: int = 0, device: str | torch.device = "cpu"):
        self.block_size, self.batch_size, self.grad_accum = block_size, batch_size, grad_accum
        self.rank, self.world, self.seed, self.eval_steps = rank, world, seed, eval_steps
        self.device = torch.device(device)
        self.global_rows = batch_size * grad_accum * world
        train = dataset.shards("train")
        if not train:
            raise ValueError(f"token dataset {dataset.uri!r}: no shards in split 'train'")
        self.n_shards = len(train)
        self.train_streams = {j: dataset.load_stream("train", j) for j in shards_for_rank(self.n_shards, rank, world)}
        for j, stream in self.train_streams.items():
            if len(stream) < block_size + 1:
                raise ValueError(
                    f"token dataset {dataset.uri!r}: train shard {train[j].path!r} holds {len(stream)} tokens "
                    f"(EOS included), fewer than model.block_size + 1 = {block_size + 1}; "
                    "use a smaller block_size or fewer, larger shards")
        # Validation is small: every rank reads all of it as one stream.
        val = [dataset.load_stream("val", j) for j in range(len(dataset.shards("val")))]
        stream = np.concatenate(val) if val else np.zeros(0, dtype=_DTYPES[dataset.dtype])
        self.val_stream = stream if len(stream) >= block_size + 1 else None

    @property
    def has_val(self) -> bool:
        return self.val_stream is not None and self.eval_steps > 0

    def _window(self, stream: np.ndarray, key: int, row: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, key, row])
        start = int(rng.integers(0, len(stream) - self.block_size))
        return stream[start:start + self.block_size + 1]

    def _micro_batches(self, rows: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        out = []
        for k in range(0, len(rows), self.batch_size):
            block = torch.from_numpy(np.stack(rows[k:k + self.batch_size]).astype(np.int64))
            if self.device.type == "cuda":
                block = block.pin_memory().to(self.device, non_blocking=True)
            out.append({"idx": block[:, :-1], "targets": block[:, 1:]})
        return out

    def train(self, step: int) -> list[dict[str, torch.Tensor]]:
        G, S = self.global_rows, self.n_shards
        rows = [self._window(self.train_streams[(i + step * G) % S], step + 1, i) for i in range(self.rank, G, self.world)]
        return self._micro_batches(rows)

    def val(self) -> list[dict[str, torch.Tensor]]:
        if not self.has_val:
            return []
        rows = [self._window(self.val_stream, _VAL_KEY, i)
                for i in range(self.rank, self.global_rows * self.eval_steps, self.world)]
        return self._micro_batches(rows)


def unigram_entropy(dataset: TokenDataset, split: str = "train") -> float:
    """Entropy (nats) of the split's token distribution, EOS included: the loss a model that
    ignores context can reach at best."""
    counts: dict[int, int] = {}
    for j in range(len(dataset.shards(split))):
        values, n = np.unique(dataset.load_stream(split, j), return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            counts[v] = counts.get(v, 0) + c
    p = np.array(list(counts.values()), dtype=np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())

