"""`POST /v1/embeddings` for encoder checkpoints (BERT, RoBERTa): OpenAI's shape, batched.

An embedding is the last hidden state pooled over a text's tokens, L2-normalised: ``mean`` (the
default) averages the non-padding tokens (``[CLS]`` and ``[SEP]`` included, as
sentence-transformers' mean pooling does), ``cls`` takes the first token's state. A string is
tokenized with the checkpoint's post-processor (``[CLS] … [SEP]`` / ``<s> … </s>``); token ids
are used as given.

:class:`Embedder` batches like the completions engine: requests from every connection queue in
one place, a thread of its own runs them in forward passes of up to ``max_batch_size`` texts
(right-padded, padding masked out of attention and of the mean), and a full queue (more than
``max_queue`` texts waiting) answers 503 with Retry-After. The route shares the app's auth,
body limit and error shapes (``workers.serving.app``).
"""


# (no `from __future__ import annotations`: FastAPI resolves the route's `Request` annotation at
# runtime, and it is imported inside add_embedding_routes)
import asyncio
import base64
import collections
import logging
import threading
from concurrent.futures import Future
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from workers.serving import protocol as oa

__all__ = ["POOLINGS", "EmbeddingRequest", "Embedder", "embedder_for", "pool", "add_embedding_routes"]

log = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(B, T, C) last hidden states, (B, T) 1 = real token -> (B, C) L2-normalised embeddings."""
    if pooling == "cls":
        vec = hidden[:, 0]
    else:
        m = mask.to(hidden.dtype).unsqueeze(-1)                      # (B, T, 1)
        vec = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(vec.float(), dim=-1)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request."""

    model_config = ConfigDict(extra="forbid")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of lists of token ids.")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    def texts(self) -> list[str | list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if self.input and all(isinstance(t, int) for t in self.input):
            return [list(self.input)]
        return list(self.input)


class _Job:
    __slots__ = ("rows", "out", "left", "future")

    def __init__(self, rows: list[list[int]]):
        self.rows = rows
        self.out: list[np.ndarray | None] = [None] * len(rows)
        self.left = len(rows)
        self.future: Future = Future()


class Embedder:
    """Batched embeddings over one encoder, in a thread of its own (the completions engine's
    interface where the app needs one: ``start``, ``stop``, ``snapshot``, ``encode``)."""

    def __init__(self, model, tokenizer, *, pad_id: int, pooling: str = "mean", max_batch_size: int = 8,
                 max_queue: int = 64, device=None):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: got {pooling!r}; allowed: {', '.join(POOLINGS)}")
        from workers.model.transformer import default_device

        self.device = torch.device(device or default_device())
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.pad_id, self.pooling = pad_id, pooling
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_length = model.max_length
        self.dim = model.config.n_embd
        self.vocab_size = model.config.vocab_size
        self._waiting: collections.deque[tuple[_Job, int]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"requests": 0, "texts": 0, "batches": 0, "rejected": 0, "batch_hist": {}}

    def start(self) -> "Embedder":
        self._thread = threading.Thread(target=self._loop, name="embedder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.stats, "batch_hist": dict(self.stats["batch_hist"]), "waiting": len(self._waiting),
                    "alive": self._thread is not None and self._thread.is_alive()}

    def encode(self, text: str) -> list[int]:
        """Token ids with the checkpoint's specials (`[CLS] … [SEP]`)."""
        return self.tokenizer.encode(text).ids

    def submit(self, rows: list[list[int]]) -> Future:
        """Queue one request's texts (all or none); a Future of their (n, C) embeddings."""
        job = _Job(rows)
        with self._lock:
            if len(self._waiting) + len(rows) > self.max_queue + self.max_batch_size:
                self.stats["rejected"] += 1
                raise oa.APIError(f"server overloaded: {len(self._waiting)} texts already wait (max_queue="
                                  f"{self.max_queue}); retry later", status=503, type="server_error",
                                  code="overloaded", headers={"Retry-After": "1"})
            self._waiting.extend((job, i) for i in range(len(rows)))
            self.stats["requests"] += 1
            self.stats["texts"] += len(rows)
        self._wake.set()
        return job.future

    def embed(self, rows: list[list[int]]) -> np.ndarray:
        """(n, C) float32 embeddings of token id lists, in one forward pass (right-padded)."""
        T = max(len(r) for r in rows)
        idx = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            idx[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        idx, mask = idx.to(self.device), mask.to(self.device)
        with torch.no_grad():
            hidden = self.model.hidden_states(idx, mask)           # (B, T, C)
        return pool(hidden, mask, self.pooling).cpu().numpy()

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            with self._lock:
                batch = [self._waiting.popleft() for _ in range(min(self.max_batch_size, len(self._waiting)))]
            if not batch:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                vecs = self.embed([job.rows[i] for job, i in batch])
                errors = None
            except Exception:  # a bug of ours: these requests fail, the server keeps going
                log.exception("embedding batch failed")
                errors = oa.server_error()
            with self._lock:
                self.stats["batches"] += 1
                hist = self.stats["batch_hist"]
                hist[len(batch)] = hist.get(len(batch), 0) + 1
            for k, (job, i) in enumerate(batch):
                if job.future.done():
                    continue
                if errors is not None:
                    job.future.set_exception(errors)
                    continue
                job.out[i] = vecs[k]
                job.left -= 1
                if job.left == 0:
                    job.future.set_result(np.stack(job.out))
        with self._lock:
            left, self._waiting = list(self._waiting), collections.deque()
        for job, _ in left:
            if not job.future.done():
                job.future.set_exception(oa.APIError("server shutting down", status=503, type="server_error",
                                                     code="shutdown"))


def embedder_for(loaded, *, pooling: str = "mean", max_batch_size: int = 8, max_queue: int = 64,
                 device=None) -> Embedder:
    """An Embedder over an opened encoder checkpoint (``workers.checkpoints.Checkpoint``)."""
    pad = loaded.config.get("pad_token_id")
    if pad is None and loaded.pad_token is not None:
        pad = loaded.tokenizer.token_to_id(loaded.pad_token)
    return Embedder(loaded.model, loaded.tokenizer, pad_id=int(pad or 0), pooling=pooling,
                    max_batch_size=max_batch_size, max_queue=max_queue, device=device)


def _vector(v: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # what OpenAI's client decodes: little-endian float32 bytes
        return base64.b64encode(v.astype("<f4").tobytes()).decode()
    return v.astype(np.float32).tolist()


def add_embedding_routes(app, loaded, embedder: Embedder, check_model) -> None:
    """Register ``POST /v1/embeddings`` on ``app`` (the OpenAI app of ``workers.serving.app``)."""
    from fastapi import Request

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = oa.parse_body(await request.body(), EmbeddingRequest)
        check_model(body.model)
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise oa.APIError(f"dimensions: got {body.dimensions}; this model's embeddings have {embedder.dim} "
                              "(shortening is not supported)", param="dimensions")
        texts = body.texts()
        if not texts:
            raise oa.APIError("input must not be empty", param="input")
        if len(texts) > embedder.max_batch_size + embedder.max_queue:
            raise oa.APIError(f"input holds {len(texts)} texts; this server takes at most "
                              f"{embedder.max_batch_size + embedder.max_queue} at once", param="input",
                              code="too_many_inputs")
        # tokenizing is CPU work: off the event loop
        rows = await asyncio.to_thread(lambda: [embedder.encode(t) if isinstance(t, str) else t for t in texts])
        for i, r in enumerate(rows):
            if not r:
                raise oa.APIError(f"input[{i}] is empty", param="input")
            bad = [t for t in r if not 0 <= t < embedder.vocab_size]
            if bad:
                raise oa.APIError(f"input[{i}] holds token ids outside [0, {embedder.vocab_size}): {bad[:5]}",
                                  param="input")
            if len(r) > embedder.max_length:
                raise oa.APIError(f"input[{i}] is {len(r)} tokens; this model takes at most {embedder.max_length}",
                                  param="input", code="context_length_exceeded")
        vecs = await asyncio.wrap_future(embedder.submit(rows))
        n = sum(map(len, rows))
        return {"object": "list", "model": loaded.name,
                "data": [{"object": "embedding", "index": i, "embedding": _vector(v, body.encoding_format)}
                         for i, v in enumerate(vecs)],
                "usage": {"prompt_tokens": n, "total_tokens": n}}
