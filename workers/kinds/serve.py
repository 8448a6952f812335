"""The ``serve`` stage kind: an OpenAI-compatible HTTP API for a checkpoint, on Ray Serve.

Layout, from the bottom up:

- :class:`Engine`: continuous batching in one replica. A background thread runs the decode loop;
  between two steps it admits waiting requests into the running batch (their prompts are
  prefilled into the shared KV cache, left-padded to the cache's current length) and drops
  finished or abandoned ones. Every sequence keeps its own sampling parameters and seed.
  Beam-search requests run whole (``workers.model.sampling.generate``) between two steps.
- :class:`OpenAIServer`: the Ray Serve deployment (FastAPI ingress) answering
  ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models`` and ``/health``.
- :func:`serve_checkpoint` / :func:`shutdown`: deploy / remove it (the CLI's entry points);
  :func:`run` + :class:`Config`: the stage kind.

Back-pressure is per replica: when ``max_queue`` requests already wait for a batch slot, a new
one is answered 503 with ``Retry-After``; Ray Serve's own ``max_queued_requests`` bounds what
waits in front of the replicas.
"""

import asyncio
import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.serving.protocol import APIError

DISTRIBUTED = True
CACHEABLE = False  # an endpoint lives only as long as the Ray that serves it

log = logging.getLogger(__name__)

APP_NAME = "orchestrator-serve"
RETRY_AFTER_S = 1


# ============================================================================================
# Stage kind config


class Autoscaling(BaseModel):
    """Ray Serve autoscaling (replaces ``replicas`` when given)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    min_replicas: int = Field(1, ge=0)
    """Fewest replicas kept up."""
    max_replicas: int = Field(2, ge=1)
    """Most replicas the autoscaler starts."""
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Requests in flight per replica the autoscaler aims for."""

    @model_validator(mode="after")
    def _order(self) -> "Autoscaling":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"autoscaling.max_replicas ({self.max_replicas}) must be >= "
                             f"autoscaling.min_replicas ({self.min_replicas})")
        return self


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    input: str | None = None
    """Upstream stage whose ``checkpoint`` output is served, or a checkpoint path/URI (ours or a
    Hugging Face folder); None: the only upstream with a ``checkpoint`` output."""
    replicas: int = Field(1, ge=1)
    """Fixed number of replicas (ignored when ``autoscaling`` is set)."""
    autoscaling: Autoscaling | None = None
    """Ray Serve autoscaling bounds; replaces ``replicas``."""
    host: str = "127.0.0.1"
    """Interface the HTTP proxy binds (127.0.0.1: this machine only)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port."""
    max_batch_size: int = Field(8, ge=1)
    """Sequences decoded together per replica (continuous batching)."""
    max_queue: int = Field(64, ge=0)
    """Requests that may wait for a batch slot per replica; more are answered 503 + Retry-After."""
    api_key_env: str | None = None
    """Name of an environment variable holding the API key clients must send (Bearer)."""
    model_name: str | None = None
    """The ``model`` id clients use; default: the checkpoint folder's name."""
    enabled: bool = True
    """False: validate and pass through without deploying (e.g. on CI)."""


# ============================================================================================
# Engine: continuous batching in one replica


class _Request:
    """One prompt's generation: ``width`` sequences (n samples, or best_of), or one beam search."""

    def __init__(self, prompt_ids: list[int], params, *, tag: int, top_logprobs: int | None,
                 emit, loop: asyncio.AbstractEventLoop | None, ignore_eos: bool = False):
        self.prompt_ids = prompt_ids
        self.params = params  # workers.model.sampling.SamplingParams
        self.tag = tag  # position of the prompt in the HTTP request
        self.top_logprobs = top_logprobs
        self.ignore_eos = ignore_eos
        self._emit, self._loop = emit, loop
        self.cancelled = False
        self.seqs: list[_Seq] = []
        self.beam_results: list | None = None  # workers.model.sampling.Completion, for beam search
        self.error: str | None = None
        self.done = False  # the handler got its "done" event (finished, aborted or failed)
        self.submitted = time.monotonic()

    @property
    def width(self) -> int:
        return 1 if self.params.num_beams > 1 else self.params.n


def _deliver(items: list[tuple["_Request", Any]]) -> None:
    for req, item in items:
        req._emit(item)


def _flush(outbox: list[tuple["_Request", Any]]) -> None:
    """Hand a step's events to the handlers' event loops: one wake-up per loop, not per request
    (called from the engine thread)."""
    by_loop: dict[int, tuple[Any, list]] = {}
    for req, item in outbox:
        if req._loop is None:
            req._emit(item)
        else:
            by_loop.setdefault(id(req._loop), (req._loop, []))[1].append((req, item))
    for loop, items in by_loop.values():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # loop closed: the replica is going away
            pass


class _Seq:
    """A running sequence. ``tokens`` = prompt + generated; its last token is not yet in the KV
    cache (it is fed at the next step)."""

    __slots__ = ("req", "index", "tokens", "prompt_len", "generator", "token_ids", "logprobs",
                 "top", "cum", "finish", "text", "emitted", "stop_at", "key")

    def __init__(self, req: _Request, index: int, device):
        import torch

        p = req.params
        self.req, self.index = req, index
        self.tokens = list(req.prompt_ids)
        self.prompt_len = len(self.tokens)
        self.generator = None
        # same seeding as workers.model.sampling: sample i of a prompt draws from seed + i
        if p.seed is not None and p.temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(p.seed + index)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[dict[str, float]] = []
        self.cum = 0.0
        self.finish: str | None = None
        self.text = ""
        self.emitted = 0
        self.stop_at: int | None = None
        # rows with the same key share one pass through the logit pipeline
        self.key = (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty,
                    p.presence_penalty, p.frequency_penalty)


@dataclass
class EngineStats:
    running: int = 0          # sequences in the batch now
    waiting: int = 0          # requests waiting for a slot
    in_flight: int = 0        # requests submitted and not yet finished or aborted
    max_batch_seen: int = 0   # most sequences ever decoded in one step
    steps: int = 0
    tokens: int = 0
    finished: int = 0
    aborted: int = 0
    rejected: int = 0
    rebuilds: int = 0
    alive: bool = True
    batch_hist: dict[int, int] = field(default_factory=dict)  # sequences per step -> steps


class Engine:
    """Continuous batching over one model. Thread-safe ``submit``/``abort``; decoding happens in
    a daemon thread started by :meth:`start`."""

    def __init__(self, model, tokenizer, *, eos_token_id: int | None, max_batch_size: int = 8,
                 max_queue: int = 64, device=None):
        import torch

        from workers.model.transformer import default_device

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.device = torch.device(device or default_device())
        self.block_size = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._rows: list[_Seq] = []
        self._cache = None     # model.KVCache over self._rows
        self._mask = None      # (B, max_len) bool: which cache columns are real for each row
        self._counts = None    # (B, V) float: generated-token counts (presence/frequency)
        self._seen = None      # (B, V) bool: prompt + generated tokens (repetition)
        self.stats = EngineStats()
        self._thread: threading.Thread | None = None
        self._outbox: list[tuple[_Request, Any]] = []  # events of the current step

    # -- public, any thread

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, reqs: list[_Request]) -> None:
        """Queue ``reqs`` (all or none): 503 + Retry-After when the wait queue would overflow."""
        with self._lock:
            # requests beyond the free batch slots wait; at most max_queue of them
            queued = len(self._waiting) + len(reqs) - max(0, self.max_batch_size - len(self._rows))
            if queued > self.max_queue:
                self.stats.rejected += 1
                raise APIError(f"server overloaded: {len(self._waiting)} requests already wait for a batch "
                               f"slot (max_queue={self.max_queue}); retry later", status=503,
                               type="server_error", code="overloaded",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            self._waiting.extend(reqs)
            self.stats.in_flight += len(reqs)
            self.stats.waiting = len(self._waiting)
        self._wake.set()

    def abort(self, reqs: list[_Request]) -> None:
        """Stop generating for ``reqs`` (client gone); their slots free at the next step."""
        for r in reqs:
            r.cancelled = True
        self._wake.set()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            s = self.stats
            s.alive = self._thread is not None and self._thread.is_alive()
            return {**s.__dict__, "batch_hist": dict(s.batch_hist)}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    # -- engine thread

    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                busy = self._step()
            except Exception as e:  # a bug of ours: fail every request in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(f"engine error: {type(e).__name__}: {e}")
                busy = False
            if self._outbox:
                outbox, self._outbox = self._outbox, []
                _flush(outbox)
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
        self._fail_all("server shutting down")
        _flush(self._outbox)

    def _finish_request(self, req: _Request, aborted: bool = False) -> None:
        if req.done:
            return
        req.done = True
        with self._lock:
            self.stats.in_flight -= 1
            if aborted:
                self.stats.aborted += 1
            else:
                self.stats.finished += 1
        self._outbox.append((req, ("done", req.tag, None)))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            pending = list(self._waiting)
            self._waiting.clear()
        reqs = {id(s.req): s.req for s in self._rows}
        self._rows, self._cache = [], None
        for r in [*pending, *reqs.values()]:
            r.error = message
            self._finish_request(r, aborted=True)

    def _step(self) -> bool:
        """One decode step for the whole batch; False when there was nothing to do."""
        # 1. drop finished and abandoned rows
        done = {id(s.req): s.req for s in self._rows if s.finish is not None or s.req.cancelled}
        if done:
            keep = [i for i, s in enumerate(self._rows) if id(s.req) not in done]
            self._select(keep)
            for req in done.values():
                if req.cancelled:  # no-op when it finished before the client left
                    self._finish_request(req, aborted=True)
        # 2. admit waiting requests that fit (FIFO; beam searches run whole, right here)
        admitted: list[_Seq] = []
        while True:
            with self._lock:
                if not self._waiting:
                    break
                req = self._waiting[0]
                if not req.cancelled and req.params.num_beams == 1 and \
                        len(self._rows) + len(admitted) + req.width > self.max_batch_size:
                    break
                self._waiting.popleft()
                self.stats.waiting = len(self._waiting)
            if req.cancelled:
                self._finish_request(req, aborted=True)
            elif req.params.num_beams > 1:
                self._beam_search(req)
            else:
                req.seqs = [_Seq(req, i, self.device) for i in range(req.width)]
                admitted.extend(req.seqs)
        if admitted:
            self._admit(admitted)
        if not self._rows:
            with self._lock:
                self.stats.running = 0
            return bool(admitted)
        # 3. feed every row its pending token; 4. sample the next one
        if self._cache.pos >= self._cache.max_len:
            self._rebuild(self._rows)
        logits = self._forward([s.tokens[-1] for s in self._rows])
        self._sample_and_emit(logits)
        with self._lock:
            self.stats.steps += 1
            self.stats.running = len(self._rows)
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._rows))
            self.stats.batch_hist[len(self._rows)] = self.stats.batch_hist.get(len(self._rows), 0) + 1
        return True

    # -- KV cache bookkeeping

    def _needed_len(self, seqs: list[_Seq]) -> int:
        # the last sampled token is never fed back, hence the -1
        need = max(s.prompt_len + s.req.params.max_tokens - 1 for s in seqs)
        return min(self.block_size, need + 32)  # slack, so newcomers rarely force a rebuild

    def _prefill(self, seqs: list[_Seq], width: int, max_len: int):
        """A cache for ``seqs`` holding each row's tokens but the last, right-aligned at
        ``width``; returns (cache, mask (b, max_len))."""
        import torch

        from workers.model.transformer import KVCache, autocast_context

        b = len(seqs)
        cache = KVCache.empty(self.model, b, max_len, device=self.device)
        mask = torch.zeros((b, max_len), dtype=torch.bool)
        if width > 0:
            idx = torch.zeros((b, width), dtype=torch.long)
            for i, s in enumerate(seqs):
                hist = s.tokens[:-1]
                if hist:
                    idx[i, width - len(hist):] = torch.tensor(hist, dtype=torch.long)
                    mask[i, width - len(hist):width] = True
            mask = mask.to(self.device)
            with torch.inference_mode(), autocast_context(self.device):
                self.model(idx.to(self.device), attention_mask=mask[:, :width], kv_cache=cache)
        else:
            mask = mask.to(self.device)
        return cache, mask

    def _penalty_rows(self, seqs: list[_Seq]):
        import torch

        b = len(seqs)
        counts = torch.zeros((b, self.vocab_size), dtype=torch.float32)
        seen = torch.zeros((b, self.vocab_size), dtype=torch.bool)
        for i, s in enumerate(seqs):
            seen[i, torch.tensor(s.tokens, dtype=torch.long)] = True
            if s.token_ids:
                counts[i].index_add_(0, torch.tensor(s.token_ids), torch.ones(len(s.token_ids)))
        return counts.to(self.device), seen.to(self.device)

    def _rebuild(self, seqs: list[_Seq]) -> None:
        """Lay every row out afresh (first batch, a newcomer longer than the cache, or a full cache)."""
        width = max(len(s.tokens) - 1 for s in seqs)
        max_len = max(self._needed_len(seqs), width + 1)
        self._cache, self._mask = self._prefill(seqs, width, max_len)
        self._counts, self._seen = self._penalty_rows(seqs)
        self._rows = list(seqs)
        with self._lock:
            self.stats.rebuilds += 1

    def _admit(self, new: list[_Seq]) -> None:
        import torch

        if not self._rows:
            self._rebuild(new)
            return
        P = self._cache.pos
        if max(len(s.tokens) - 1 for s in new) > P or self._needed_len(new) > self._cache.max_len + 32:
            self._rebuild(self._rows + new)
            return
        cache, mask = self._prefill(new, P, self._cache.max_len)
        counts, seen = self._penalty_rows(new)
        self._cache.k = [torch.cat((a, b)) for a, b in zip(self._cache.k, cache.k)]
        self._cache.v = [torch.cat((a, b)) for a, b in zip(self._cache.v, cache.v)]
        self._mask = torch.cat((self._mask, mask))
        self._counts = torch.cat((self._counts, counts))
        self._seen = torch.cat((self._seen, seen))
        self._rows.extend(new)

    def _select(self, keep: list[int]) -> None:
        import torch

        if not keep:
            self._rows, self._cache = [], None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.reorder(index)
        self._mask = self._mask.index_select(0, index)
        self._counts = self._counts.index_select(0, index)
        self._seen = self._seen.index_select(0, index)
        self._rows = [self._rows[i] for i in keep]

    def _forward(self, tokens: list[int]):
        """Feed one token per row at the cache's next column -> next-token logits (B, V)."""
        import torch

        from workers.model.transformer import autocast_context

        col = self._cache.pos
        self._mask[:, col] = True
        x = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        with torch.inference_mode(), autocast_context(self.device):
            # position ids come from the mask: each row counts its own real tokens
            logits, _ = self.model(x, attention_mask=self._mask[:, :col + 1], kv_cache=self._cache)
        return logits[:, -1].float()  # (B, V)

    # -- sampling

    def _sample_and_emit(self, logits) -> None:
        import torch

        from workers.model.sampling import _sample, process_logits

        rows = self._rows
        B = len(rows)
        tokens = torch.empty(B, dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, s in enumerate(rows):
            groups[s.key].append(i)
        with torch.inference_mode():
            for idx in groups.values():
                params = rows[idx[0]].req.params
                sel = torch.tensor(idx, device=logits.device)
                proc = process_logits(logits.index_select(0, sel), params,
                                      self._counts.index_select(0, sel), self._seen.index_select(0, sel))
                if params.temperature == 0:
                    tokens[sel] = proc.argmax(-1)
                else:
                    tokens[sel] = _sample(proc.softmax(-1), [rows[i].generator for i in idx])
            logp = logits.log_softmax(-1)  # raw-model log-probs, as workers.model.sampling reports
            lp = logp.gather(1, tokens[:, None]).squeeze(1)
            self._counts.scatter_add_(1, tokens[:, None], torch.ones((B, 1), device=logits.device))
            self._seen.scatter_(1, tokens[:, None], True)
            k = max((s.req.top_logprobs or 0) for s in rows)
            top = logp.topk(k, dim=-1) if k > 0 else None
            host_tok, host_lp = tokens.tolist(), lp.tolist()
            host_top = (top.values.tolist(), top.indices.tolist()) if top is not None else None

        with self._lock:
            self.stats.tokens += B
        by_req: dict[int, list] = collections.defaultdict(list)
        for i, s in enumerate(rows):
            tok, tlp = host_tok[i], host_lp[i]
            s.tokens.append(tok)
            s.token_ids.append(tok)
            s.logprobs.append(tlp)
            s.cum += tlp
            alts = None
            if s.req.top_logprobs:
                n = s.req.top_logprobs
                alts = {self.decode([t]): v for v, t in zip(host_top[0][i][:n], host_top[1][i][:n])}
                s.top.append(alts)
            delta = self._advance_text(s, tok)
            by_req[id(s.req)].append((s, delta, tok, tlp, alts))
        for items in by_req.values():
            req = items[0][0].req
            self._outbox.append((req, ("step", req.tag, [(s.index, delta, tok, tlp, alts, s.finish)
                                                         for s, delta, tok, tlp, alts in items])))
            if all(s.finish is not None for s in req.seqs):
                self._finish_request(req)

    def _advance_text(self, s: _Seq, tok: int) -> str:
        """Update ``s``'s text, finish reason and stop-string cut after token ``tok``; return the
        text that became safe to stream (same conventions as ``workers.model.sampling``)."""
        from workers.model.sampling import _find_stop, _partial_stop

        p = s.req.params
        if (tok == self.eos_token_id and not s.req.ignore_eos) or tok in p.stop_token_ids:
            s.finish = "stop"
        body = s.token_ids[:-1] if s.finish else s.token_ids
        text = self.decode(body)
        stops = p.stop
        cut = _find_stop(text, stops) if stops else None
        if cut is not None:
            text, s.finish, s.stop_at = text[:cut], "stop", cut
        elif s.finish is None and (len(s.token_ids) >= p.max_tokens or len(s.tokens) >= self.block_size):
            s.finish = "length"
        if s.finish is None:  # hold back a possible stop-string prefix and incomplete characters
            stable = text.rstrip("\ufffd")
            stable = stable[:len(stable) - _partial_stop(stable, stops)]
        else:
            stable = s.text = text
        delta = stable[s.emitted:]
        s.emitted = max(s.emitted, len(stable))
        return delta

    def _beam_search(self, req: _Request) -> None:
        from workers.model.transformer import autocast_context
        from workers.model.sampling import generate

        with autocast_context(self.device):
            req.beam_results = generate(self.model, [req.prompt_ids], req.params,
                                        eos_token_id=None if req.ignore_eos else self.eos_token_id, decode=self.decode,
                                        device=self.device)[0]
        with self._lock:
            self.stats.tokens += sum(len(c.token_ids) for c in req.beam_results)
        self._finish_request(req)


# ============================================================================================
# HTTP: the Ray Serve deployment


def _build_app():
    """The FastAPI app and the deployment class (built lazily: importing this module must not
    need Ray Serve or FastAPI, e.g. to validate a pipeline)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    from workers.serving import protocol as oa
    from workers.data.chat import ChatTemplateError, render_chat

    app = FastAPI(title="genai-orchestrator OpenAI-compatible API")

    @app.exception_handler(oa.APIError)
    async def _api_error(request: Request, exc: oa.APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = oa.validation_error(list(exc.errors()))
        return JSONResponse(err.body(), status_code=400)

    @serve.deployment(name="OpenAIServer")
    @serve.ingress(app)
    class OpenAIServer:
        def __init__(self, checkpoint: str, *, model_name: str | None, api_key: str | None,
                     max_batch_size: int, max_queue: int):
            from workers.checkpoints import open_checkpoint

            self.loaded = open_checkpoint(checkpoint)
            self.loaded.name = model_name or self.loaded.name
            self.api_key = api_key
            self.max_batch_size = max_batch_size
            lm = self.loaded
            self.engine = Engine(lm.model, lm.tokenizer, eos_token_id=lm.eos_token_id,
                                 max_batch_size=max_batch_size, max_queue=max_queue).start()

        def check_health(self):
            if not self.engine.snapshot()["alive"]:
                raise RuntimeError("engine thread died")

        def __del__(self):
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.stop()

        # -- helpers

        def _authorize(self, request: Request) -> None:
            if not self.api_key:
                return
            auth = request.headers.get("authorization", "")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise oa.APIError("You didn't provide an API key. Send it in the Authorization header as "
                                  "'Bearer YOUR_KEY'.", status=401, code="invalid_api_key")
            if key.strip() != self.api_key:
                raise oa.APIError("Incorrect API key provided.", status=401, code="invalid_api_key")

        def _check_model(self, name: str | None) -> None:
            if name is not None and name != self.loaded.name:
                raise oa.APIError(f"The model {name!r} does not exist; this server serves {self.loaded.name!r} "
                                  "(see GET /v1/models)", param="model", code="model_not_found")

        def _requests(self, body, prompts: list[list[int]], *, param: str, emit, loop) -> list[_Request]:
            from workers.model.sampling import SamplingParams

            body.check(max_batch_size=self.max_batch_size)
            out = []
            for i, ids in enumerate(prompts):
                bad = [t for t in ids if not 0 <= t < self.loaded.model.config.vocab_size]
                if bad:
                    raise oa.APIError(f"{param} holds token ids outside [0, {self.loaded.model.config.vocab_size}): "
                                      f"{bad[:5]}", param=param)
                max_tokens = oa.check_length(body, len(ids), self.loaded.context, param=param)
                params = SamplingParams(**oa.sampling_kwargs(body, max_tokens))
                try:
                    params.validate()
                except ValueError as e:
                    raise oa.APIError(str(e)) from None
                out.append(_Request(ids, params, tag=i, top_logprobs=body.top_logprobs_count(),
                                    emit=emit, loop=loop, ignore_eos=body.ignore_eos))
            return out

        async def _events(self, reqs: list[_Request], queue: asyncio.Queue):
            """Yield lists of engine events of submitted ``reqs`` (all that arrived since the last
            yield, so a slow reader gets fewer, bigger chunks) until all are done; abort them if we
            are cancelled (client disconnected) or the consumer stops early."""
            pending = len(reqs)
            try:
                while pending:
                    batch = [await queue.get()]
                    while not queue.empty():
                        batch.append(queue.get_nowait())
                    for kind, tag, _ in batch:
                        if kind == "done":
                            pending -= 1
                            if reqs[tag].error:
                                raise oa.APIError(reqs[tag].error, status=500, type="server_error")
                    yield batch
            finally:
                if pending:
                    self.engine.abort(reqs)

        def _choices(self, reqs: list[_Request], n: int, *, chat: bool) -> tuple[list[dict], int]:
            """Final choices (index = prompt * n + sample), best ``n`` by cumulative logprob when
            more were sampled (best_of), and the completion-token count."""
            choices, completion_tokens = [], 0
            for r in reqs:
                if r.beam_results is not None:
                    items = [(c.text, c.finish_reason, c.token_ids, c.logprobs or [], None)
                             for c in r.beam_results]
                    completion_tokens += sum(len(c.token_ids) for c in r.beam_results)
                else:
                    seqs = r.seqs
                    completion_tokens += sum(len(s.token_ids) for s in seqs)
                    if len(seqs) > n:
                        seqs = sorted(seqs, key=lambda s: s.cum, reverse=True)[:n]
                    items = [(s.text, s.finish, s.token_ids, s.logprobs, s.top) for s in seqs]
                for j, (text, finish, ids, lps, top) in enumerate(items[:n]):
                    lp = None
                    if r.top_logprobs is not None:
                        shown = ids[:len(lps)]
                        toks = [self.engine.decode([t]) for t in shown]
                        lp = (oa.chat_logprobs(toks, lps, top or None) if chat
                              else oa.completion_logprobs(toks, lps, top or None))
                    c = {"index": r.tag * n + j, "logprobs": lp, "finish_reason": finish}
                    if chat:
                        c["message"] = {"role": "assistant", "content": text}
                    else:
                        c["text"] = text
                    choices.append(c)
            return choices, completion_tokens

        async def _respond(self, body, reqs: list[_Request], queue: asyncio.Queue, *, chat: bool,
                           prompt_tokens: int):
            name, n = self.loaded.name, body.n
            rid = oa.new_id("chatcmpl" if chat else "cmpl")
            make = oa.chat_body if chat else oa.completion_body
            if not body.stream:
                async for _ in self._events(reqs, queue):
                    pass
                choices, ct = self._choices(reqs, n, chat=chat)
                return JSONResponse(make(rid, name, choices, oa.usage(prompt_tokens, ct)))

            created = int(time.time())
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._events(reqs, queue)

            async def sse():
                completion_tokens = 0
                try:
                    if chat:
                        yield oa.sse(make(rid, name, [{"index": r.tag * n + j, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}
                                                     for r in reqs for j in range(n)], None, chunk=True, created=created))
                    async for batch in events:
                        # per choice: text, token strings, logprobs, alternatives, finish reason
                        merged: dict[int, list] = {}
                        for kind, tag, payload in batch:
                            if kind != "step":
                                continue
                            for index, delta, tok, tlp, alts, finish in payload:
                                completion_tokens += 1
                                m = merged.setdefault(tag * n + index, ["", [], [], [], None, tag])
                                m[0] += delta
                                if reqs[tag].top_logprobs is not None:
                                    m[1].append(self.engine.decode([tok]))
                                    m[2].append(tlp)
                                    m[3].append(alts or {})
                                m[4] = finish
                        choices = []
                        for index, (text, toks_, lps, alts, finish, tag) in sorted(merged.items()):
                            if not text and finish is None:
                                continue
                            lp = None
                            if reqs[tag].top_logprobs is not None:
                                top = alts if reqs[tag].top_logprobs else None
                                lp = (oa.chat_logprobs(toks_, lps, top) if chat
                                      else oa.completion_logprobs(toks_, lps, top))
                            c = {"index": index, "logprobs": lp, "finish_reason": finish}
                            if chat:
                                c["delta"] = {"content": text} if text else {}
                            else:
                                c["text"] = text
                            choices.append(c)
                        if choices:
                            yield oa.sse(make(rid, name, choices, None, chunk=True, created=created))
                    if include_usage:
                        yield oa.sse(make(rid, name, [], oa.usage(prompt_tokens, completion_tokens),
                                          chunk=True, created=created))
                    yield oa.SSE_DONE
                except oa.APIError as e:
                    yield oa.sse(e.body())
                    yield oa.SSE_DONE
                finally:
                    await events.aclose()  # aborts unfinished requests (client went away)

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def _generate(self, request: Request, body, prompts: list[list[int]], *, chat: bool, param: str):
            self._authorize(request)
            self._check_model(body.model)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            reqs = self._requests(body, prompts, param=param, emit=queue.put_nowait, loop=loop)
            # submitted before any byte is sent, so an overloaded server answers a plain 503
            self.engine.submit(reqs)
            return await self._respond(body, reqs, queue, chat=chat, prompt_tokens=sum(map(len, prompts)))

        # -- routes

        @app.post("/v1/completions")
        async def completions(self, body: oa.CompletionRequest, request: Request):
            prompts = [self.engine.encode(p) if isinstance(p, str) else list(p) for p in body.prompts()]
            if not prompts:
                raise oa.APIError("prompt must not be empty", param="prompt")
            return await self._generate(request, body, prompts, chat=False, param="prompt")

        @app.post("/v1/chat/completions")
        async def chat_completions(self, body: oa.ChatCompletionRequest, request: Request):
            try:
                text = render_chat([m.model_dump() for m in body.messages], self.loaded.chat_template,
                                   add_generation_prompt=body.add_generation_prompt,
                                   eos_token=self.engine.decode([self.loaded.eos_token_id])
                                   if self.loaded.eos_token_id is not None else "")
            except ChatTemplateError as e:
                raise oa.APIError(str(e), param="messages") from None
            return await self._generate(request, body, [self.engine.encode(text)], chat=True, param="messages")

        @app.get("/v1/models")
        async def models(self, request: Request):
            self._authorize(request)
            return oa.models_body(self.loaded.name, self.loaded.created)

        @app.get("/health")
        async def health(self):
            snap = self.engine.snapshot()
            return JSONResponse({"status": "ok" if snap["alive"] else "error", "model": self.loaded.name, **snap},
                                status_code=200 if snap["alive"] else 503)

    return OpenAIServer


_SERVER = None


def _server_deployment():
    global _SERVER
    if _SERVER is None:
        _SERVER = _build_app()
    return _SERVER


def _wait_healthy(url: str, timeout: float = 120.0) -> None:
    """Poll ``url``/health (no key needed) until the replica answers 200."""
    import httpx

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.25)
    raise TimeoutError(f"server at {url} not healthy after {timeout:.0f}s (last answer: {last})")


def serve_checkpoint(checkpoint_dir: str, *, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
                     max_batch_size: int = 8, max_queue: int = 64, api_key: str | None = None,
                     model_name: str | None = None, autoscaling: dict | None = None, blocking: bool = True,
                     num_cpus: float = 1.0, num_gpus: float | None = None, app_name: str = APP_NAME,
                     route_prefix: str = "/") -> str:
    """Deploy ``checkpoint_dir`` as an OpenAI-compatible API on Ray Serve; return its base URL
    (``http://host:port`` + route_prefix; clients use ``<url>/v1``).

    ``api_key`` (else env ``ORCHESTRATOR_API_KEY``) makes /v1 routes require ``Authorization:
    Bearer KEY``. ``autoscaling`` (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``)
    replaces ``replicas``. Each replica gets ``num_cpus`` and ``num_gpus`` (None: one GPU when the
    cluster has any). ``blocking``: serve until Ctrl-C, then shut down. Several checkpoints can
    be served side by side under different ``app_name``/``route_prefix`` on one HTTP port.
    """
    import ray
    from ray import serve

    if not Path(checkpoint_dir).exists() and "://" not in str(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint {checkpoint_dir!r}: no such folder")
    if replicas < 1:
        raise ValueError(f"replicas: got {replicas}; must be >= 1")
    if max_batch_size < 1 or max_queue < 0:
        raise ValueError(f"max_batch_size={max_batch_size}, max_queue={max_queue}: need max_batch_size >= 1 "
                         "and max_queue >= 0")
    if api_key is None:
        api_key = os.environ.get("ORCHESTRATOR_API_KEY") or None
    if not ray.is_initialized():
        ray.init()
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    serve.start(http_options={"host": host, "port": port})

    from ray.serve.config import BackpressureConfig

    options: dict[str, Any] = dict(
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # the replica must see every request it may queue itself (its own 503 carries the
        # OpenAI body); Serve's queue in front of the replicas is bounded too
        max_ongoing_requests=max_batch_size + max_queue + 8,
        max_queued_requests=max(16, 2 * (max_queue + max_batch_size)),
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        health_check_period_s=5,
    )
    if autoscaling:
        auto = Autoscaling(**autoscaling)
        options["autoscaling_config"] = {"min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
                                         "initial_replicas": max(1, auto.min_replicas),
                                         "target_ongoing_requests": auto.target_ongoing_requests}
        options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = replicas
    deployment = _server_deployment().options(**options)
    app = deployment.bind(str(checkpoint_dir), model_name=model_name, api_key=api_key,
                          max_batch_size=max_batch_size, max_queue=max_queue)
    serve.run(app, name=app_name, route_prefix=route_prefix, blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}{route_prefix.rstrip('/')}"
    _wait_healthy(url)
    if blocking:
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            shutdown(app_name)
    return url


def shutdown(app_name: str | None = None) -> None:
    """Remove application ``app_name``, or stop Ray Serve altogether (None)."""
    from ray import serve

    if app_name is None:
        serve.shutdown()
    else:
        serve.delete(app_name)


# ============================================================================================
# The stage kind


def run(ctx, config: Config) -> dict:
    """Deploy the upstream checkpoint and return once it answers; it keeps serving after."""
    checkpoint = ctx.upstream("checkpoint", config.input, field="serve.config.input")
    name = config.model_name or Path(str(checkpoint).rstrip("/")).name
    if not config.enabled:
        return {"endpoint": "", "model": name}
    api_key = None
    if config.api_key_env:
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise ValueError(f"serve.config.api_key_env: environment variable {config.api_key_env!r} is not set "
                             "or empty")
    url = serve_checkpoint(checkpoint, host=config.host, port=config.port, replicas=config.replicas,
                           max_batch_size=config.max_batch_size, max_queue=config.max_queue, api_key=api_key,
                           model_name=name, autoscaling=config.autoscaling.model_dump() if config.autoscaling else None,
                           blocking=False, num_cpus=ctx.resources.cpus,
                           num_gpus=ctx.resources.gpus or None)
    ctx.set_tags({"endpoint": url, "model": name})
    ctx.log_metrics({"replicas": float(config.replicas if config.autoscaling is None
                                       else config.autoscaling.min_replicas)})
    return {"endpoint": url, "model": name}


__all__ = ["Config", "Autoscaling", "DISTRIBUTED", "Engine", "run", "serve_checkpoint", "shutdown"]
