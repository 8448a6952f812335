"""Continuous batching over one model, in one serving replica.

A background thread runs the decode loop; between two steps it admits waiting requests into the
running batch (their prompts are prefilled together and written into free rows of the batch's
buffers, right-aligned at the cache's position: ``workers.serving.batch``; a newcomer that does
not fill the batch waits a few steps for others to share that prefill) and drops finished or
abandoned ones. Every sequence keeps its own sampling
parameters and seed; logits go through ``workers.model.sampling``'s pipeline, its sampler and
its stop-string hold-back, so a request gives what ``sampling.generate`` gives it alone.

Beam search runs in a thread of its own (``sampling.generate`` with a ``should_stop`` check
per step), so it never stalls the streams of the batch and stops when its client goes away.

Isolation: an error while admitting, forwarding or sampling one request ends that request alone
(its final event carries a 500) and the batch keeps going. A batched step that fails is retried
request by request to find the culprit. Whatever happens, every submitted request gets exactly
one :class:`Done` event.

Events (typed: :class:`Step`, :class:`Done`) are handed to each request's ``emit`` on its own
event loop, one wake-up per loop per step, not per token.
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from workers.model.sampling import (Completion, GenerationCancelled, SamplingParams, apply_stops, generate,
                                    penalty_counts, pick, prefill, process_logits)
from workers.model.transformer import KVCache, autocast_context, default_device
from workers.serving.batch import BatchState
from workers.serving.protocol import APIError, server_error

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
ADMIT_WAIT_STEPS = 4
"""Most decode steps a request waits so that later arrivals share its prefill (Engine._hold)."""


def _shutting_down() -> APIError:
    return APIError("server shutting down", status=503, type="server_error", code="shutdown")


# ----------------------------------------------------------------------------- events


@dataclass(slots=True)
class Delta:
    """What one sequence of a request produced in one step."""
    index: int                       # sample index within the request (0..width-1)
    text: str                        # text that became safe to stream ("" while held back)
    token_id: int
    logprob: float                   # raw-model log-prob of the token
    top: dict[str, float] | None     # alternatives (when the request asked for them)
    finish: str | None               # "stop" | "length" on the sequence's last step


@dataclass(slots=True)
class Step:
    request: "GenerationRequest"
    deltas: list[Delta]


@dataclass(slots=True)
class Done:
    """The request's final event: finished, aborted (client gone) or failed (``error``)."""
    request: "GenerationRequest"
    error: APIError | None = None


Event = Step | Done


# ----------------------------------------------------------------------------- requests


class GenerationRequest:
    """One prompt's generation: ``width`` sequences (n samples, or best_of), or one beam search.

    ``emit(events)`` receives this request's events of one step, called on ``loop`` (or in the
    engine thread when ``loop`` is None)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, *, tag: int = 0,
                 top_logprobs: int | None = None, emit: Callable[[list[Event]], None] | None = None,
                 loop=None, ignore_eos: bool = False):
        self.prompt_ids = prompt_ids
        self.params = params
        self.tag = tag  # position of the prompt in the HTTP request
        self.top_logprobs = top_logprobs
        self.ignore_eos = ignore_eos
        self.emit = emit or (lambda events: None)
        self.loop = loop
        self.cancelled = False
        self.seqs: list[Seq] = []
        self.beam_results: list[Completion] | None = None
        self.error: APIError | None = None
        self.done = False  # its Done event was queued

    @property
    def width(self) -> int:
        return 1 if self.params.num_beams > 1 else self.params.n


class Seq:
    """A running sequence. ``tokens`` = prompt + generated; its last token is not yet in the KV
    cache (it is fed at the next step)."""

    __slots__ = ("req", "index", "tokens", "prompt_len", "generator", "token_ids", "logprobs",
                 "top", "cum", "finish", "text", "emitted", "key")

    def __init__(self, req: GenerationRequest, index: int, device):
        p = req.params
        self.req, self.index = req, index
        self.tokens = list(req.prompt_ids)
        self.prompt_len = len(self.tokens)
        self.generator = None
        # same seeding as workers.model.sampling: sample i of a prompt draws from seed + i
        if p.seed is not None and not p.greedy:
            self.generator = torch.Generator(device=device).manual_seed(p.seed + index)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[dict[str, float]] = []
        self.cum = 0.0
        self.finish: str | None = None
        self.text = ""
        self.emitted = 0
        # rows with the same key share one pass through the logit pipeline
        self.key = (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty,
                    p.presence_penalty, p.frequency_penalty)


def flush(outbox: list[tuple[GenerationRequest, Event]]) -> None:
    """Hand events to their requests: grouped per request, one wake-up per event loop."""
    per_req: dict[int, tuple[GenerationRequest, list[Event]]] = {}
    for req, ev in outbox:
        per_req.setdefault(id(req), (req, []))[1].append(ev)
    by_loop: dict[int, tuple[Any, list]] = {}
    for req, events in per_req.values():
        if req.loop is None:
            req.emit(events)
        else:
            by_loop.setdefault(id(req.loop), (req.loop, []))[1].append((req, events))
    for loop, items in by_loop.values():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # loop closed: the replica is going away
            pass


def _deliver(items: list[tuple[GenerationRequest, list[Event]]]) -> None:
    for req, events in items:
        req.emit(events)


@dataclass
class EngineStats:
    running: int = 0          # sequences in the batch now
    waiting: int = 0          # requests waiting for a slot
    in_flight: int = 0        # requests submitted and not yet done
    max_batch_seen: int = 0   # most sequences ever decoded in one step
    steps: int = 0
    tokens: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    rejected: int = 0
    rebuilds: int = 0         # whole-batch re-prefills
    resizes: int = 0          # cache grown or compacted in place
    alive: bool = True
    batch_hist: dict[int, int] = field(default_factory=dict)  # sequences per step -> steps


FaultHook = Callable[[str, list[GenerationRequest]], None]
"""Called before each phase ("admit", "forward", "sample", "beam") with the requests it covers;
tests raise from it to inject failures. None in production."""


class Engine:
    """Continuous batching over one model. Thread-safe ``submit``/``abort``; decoding happens in
    a daemon thread started by :meth:`start`."""

    def __init__(self, model, tokenizer, *, eos_token_id: int | None, max_batch_size: int = 8,
                 max_queue: int = 64, device=None, fault_hook: FaultHook | None = None,
                 end_token_ids: tuple[int, ...] = (), admit_wait_steps: int = ADMIT_WAIT_STEPS):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        # every id that ends a generation (Llama 3 has several), like eos: ignore_eos turns them off
        self.end_ids = frozenset(end_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.device = torch.device(device or default_device())
        self.block_size = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self.fault_hook = fault_hook
        self.admit_wait_steps = admit_wait_steps
        self._held = 0  # steps that waiting requests were held back for a shared prefill
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._admitting: list[GenerationRequest] = []  # popped from _waiting, not yet in _rows
        self._beams: set[GenerationRequest] = set()  # beam searches handed to their thread, not done
        self._beam_running: GenerationRequest | None = None
        self._beam_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="beam-search")
        self._rows: list[Seq] = []
        self._batch: BatchState | None = None  # KV cache, mask and penalty state of self._rows
        self.stats = EngineStats()
        self._thread: threading.Thread | None = None
        self._outbox: list[tuple[GenerationRequest, Event]] = []  # events of the current step

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
        self._beam_pool.shutdown(wait=False, cancel_futures=True)
        # beam searches that never started get their final event here (a running one stops
        # at its next step and finds itself done)
        outbox: list = []
        for req in list(self._beams):
            self._finish(req, outbox, error=_shutting_down())
        flush(outbox)

    def admissible(self, count: int) -> bool:
        """Whether ``count`` requests could ever be admitted together (else a 400, not a 503)."""
        return count <= self.max_batch_size + self.max_queue

    def submit(self, reqs: list[GenerationRequest]) -> None:
        """Queue ``reqs`` (all or none): 503 + Retry-After when the wait queue would overflow."""
        with self._lock:
            queued = self._queued_with(reqs)
            if queued > self.max_queue:
                self.stats.rejected += 1
                raise APIError(f"server overloaded: {queued - len(reqs)} requests already wait for a batch "
                               f"slot or the beam-search thread (max_queue={self.max_queue}); retry later",
                               status=503, type="server_error", code="overloaded",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            self._waiting.extend(reqs)
            self.stats.in_flight += len(reqs)
            self.stats.waiting = len(self._waiting)
        self._wake.set()

    def _queued_with(self, reqs: list[GenerationRequest]) -> int:
        """How many requests would wait if ``reqs`` were admitted too (under ``_lock``).

        Every admitted unit of work counts: a request takes its width (n or best_of sequences,
        or num_beams) of the ``max_batch_size`` slots, the running beam search included; beam
        searches queued for their thread wait like any other. In FIFO order, as admitted."""
        free = self.max_batch_size - len(self._rows) - sum(r.width for r in self._admitting) - \
            (self._beam_running.params.num_beams if self._beam_running is not None else 0)
        beam_free = self._beam_running is None
        queued = 0
        pool_queued = [r for r in self._beams if r is not self._beam_running]
        for r in [*pool_queued, *self._waiting, *reqs]:
            if r.cancelled:
                continue
            width = r.params.num_beams if r.params.num_beams > 1 else r.width
            beam = r.params.num_beams > 1
            if queued == 0 and width <= free and (beam_free or not beam):
                free -= width
                beam_free = beam_free and not beam
            else:
                queued += 1
        return queued

    def abort(self, reqs: list[GenerationRequest]) -> None:
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
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                busy = self.step()
            except Exception:  # a bug outside any one request: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(server_error())
                busy = False
            self.drain()
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
        self._fail_all(_shutting_down())
        self.drain()

    def drain(self) -> None:
        """Deliver the events of the step just run (engine thread; tests driving ``step`` call it)."""
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            flush(outbox)

    def _hook(self, phase: str, reqs: list[GenerationRequest]) -> None:
        if self.fault_hook is not None:
            self.fault_hook(phase, reqs)

    def _finish(self, req: GenerationRequest, outbox: list, *, aborted: bool = False,
                error: APIError | None = None) -> None:
        with self._lock:  # the engine and the beam-search thread may both try
            if req.done:
                return
            req.done = True
            req.error = error
            self.stats.in_flight -= 1
            if error is not None:
                self.stats.failed += 1
            elif aborted:
                self.stats.aborted += 1
            else:
                self.stats.finished += 1
        outbox.append((req, Done(req, error)))

    def _fail(self, req: GenerationRequest, phase: str, exc: BaseException) -> None:
        log.error("request failed while %s: %s: %s", phase, type(exc).__name__, exc, exc_info=exc)
        self._finish(req, self._outbox, error=server_error())

    def _fail_all(self, error: APIError) -> None:
        with self._lock:
            pending = [*self._waiting, *self._admitting]
            self._waiting.clear()
            self._admitting = []
        reqs = {id(s.req): s.req for s in self._rows}
        self._rows, self._batch = [], None
        for r in [*pending, *reqs.values()]:
            self._finish(r, self._outbox, error=error)

    def step(self) -> bool:
        """One decode step for the whole batch; False when there was nothing to do."""
        with torch.inference_mode():  # every tensor of the batch state is an inference tensor
            return self._step()

    def _step(self) -> bool:
        # 1. drop finished rows, and every row of a failed or abandoned request; a request's other
        # samples (n > 1) go on when one of them finishes first
        gone = {id(s.req): s.req for s in self._rows if s.req.cancelled or s.req.done}
        keep = [i for i, s in enumerate(self._rows) if s.finish is None and id(s.req) not in gone]
        if len(keep) < len(self._rows):
            self._select(keep)
            for req in gone.values():
                if req.cancelled:  # no-op when it finished before the client left
                    self._finish(req, self._outbox, aborted=True)
        # 2. admit waiting requests that fit (FIFO); beam searches go to their own thread
        admitted = self._take_waiting()
        if admitted:
            self._admit_isolated(admitted)
        if not self._rows:
            with self._lock:
                self.stats.running = 0
            return bool(admitted)
        # 3. feed every row its pending token; 4. sample the next one
        if self._make_room(0, 1) is None:
            self._rebuild(self._rows)
        logits = self._forward_isolated()
        if logits is not None:
            self._sample_and_emit(logits)
        with self._lock:
            B = len(self._rows)
            self.stats.steps += 1
            self.stats.running = B
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, B)
            self.stats.batch_hist[B] = self.stats.batch_hist.get(B, 0) + 1
        return True

    def _take_waiting(self) -> list[GenerationRequest]:
        """Pop the waiting requests that fit the free batch slots (FIFO); beam searches go to
        their own thread, cancelled ones end here."""
        taken: list[GenerationRequest] = []
        popped: list[GenerationRequest] = []
        slots = self.max_batch_size - len(self._rows)
        with self._lock:
            if self._hold(slots):
                return taken
            self._held = 0
            while self._waiting:
                req = self._waiting[0]
                if not req.cancelled and req.params.num_beams == 1 and req.width > slots:
                    break
                self._waiting.popleft()
                popped.append(req)
                if not req.cancelled and req.params.num_beams == 1:
                    slots -= req.width
                    taken.append(req)
            self.stats.waiting = len(self._waiting)
            self._admitting = list(taken)
            # counted by submit's back-pressure from here until they end
            self._beams.update(r for r in popped if not r.cancelled and r.params.num_beams > 1)
        for req in popped:
            if req.cancelled:
                self._finish(req, self._outbox, aborted=True)
            elif req.params.num_beams > 1:
                self._beam_pool.submit(self._run_beam, req)
        return taken

    def _hold(self, slots: int) -> bool:
        """Whether to leave the waiting requests waiting for this step (under ``_lock``).

        Each admission is a prefill forward of its own, mostly per-call overhead for short
        prompts (profiled at ~12% of a replica's time at c=32). Requests that arrive one by one
        (over HTTP, a closed loop's next request comes as the last one ends) would each pay it:
        while a batch is running and the newcomers do not fill its free slots, they wait up to
        ``admit_wait_steps`` steps so that those arriving meanwhile share one prefill. An idle
        engine, a batch they fill, cancelled requests and beam searches go at once."""
        if not self._waiting or not self._rows or self._held >= self.admit_wait_steps:
            return False
        if sum(r.width for r in self._waiting) >= slots:
            return False
        if any(r.cancelled or r.params.num_beams > 1 for r in self._waiting):
            return False
        self._held += 1
        return True

    def _admit_isolated(self, reqs: list[GenerationRequest]) -> None:
        """Admit ``reqs`` together; if that fails, one by one, failing only those that fail alone."""
        try:
            self._admit(reqs)
        except Exception as e:  # noqa: BLE001 - a request's fault: isolate it below
            if len(reqs) == 1:
                self._fail(reqs[0], "admitting", e)
            else:
                for req in reqs:
                    try:
                        self._admit([req])
                    except Exception as e1:  # noqa: BLE001
                        self._fail(req, "admitting", e1)
        finally:
            with self._lock:
                self._admitting = []

    def _admit(self, reqs: list[GenerationRequest]) -> None:
        self._hook("admit", reqs)
        new = [Seq(req, i, self.device) for req in reqs for i in range(req.width)]
        if not self._rows:
            self._rebuild(new)
        else:
            # newcomers are laid out right-aligned at the cache's position and generate from
            # there, prefilled at their own width (positions come from the mask, so the keys and
            # values are the same), written into free rows: the running rows stay where they are
            width = max(len(s.tokens) - 1 for s in new)
            if self._make_room(width, max(s.req.params.max_tokens for s in new)) is None:
                self._rebuild(self._rows + new)
            else:
                cache, mask = self._prefill(new, width, max(width, 1))
                counts, seen = self._penalty_rows(new)
                # state changes only once everything above worked
                self._batch.reserve(len(new), self.max_batch_size)
                self._batch.append(cache, mask, counts, seen, width)
                self._rows = self._rows + new
        for req in reqs:
            req.seqs = [s for s in new if s.req is req]

    # -- KV cache bookkeeping

    def _needed_len(self, seqs: list[Seq]) -> int:
        # the last sampled token is never fed back, hence the -1
        need = max(s.prompt_len + s.req.params.max_tokens - 1 for s in seqs)
        return min(self.block_size, need + 32)  # slack, so newcomers rarely force a rebuild

    def _prefill(self, seqs: list[Seq], width: int, max_len: int):
        """A cache for ``seqs`` holding each row's tokens but the last, right-aligned at
        ``width``; returns (cache, mask (b, max_len))."""
        with autocast_context(self.device):
            _, cache, mask = prefill(self.model, [s.tokens[:-1] for s in seqs], width, max_len, self.device,
                                     mask=True)
        return cache, mask

    def _penalty_rows(self, seqs: list[Seq]):
        return penalty_counts([s.tokens for s in seqs], [s.token_ids for s in seqs], self.vocab_size, self.device)

    def _rebuild(self, seqs: list[Seq]) -> None:
        """Lay every row out afresh (first batch, a newcomer longer than the cache, or a full cache)."""
        width = max(len(s.tokens) - 1 for s in seqs)
        max_len = max(self._needed_len(seqs), width + 1)
        cache, mask = self._prefill(seqs, width, max_len)
        counts, seen = self._penalty_rows(seqs)
        self._batch = BatchState(cache, mask, counts, seen)
        self._rows = list(seqs)
        with self._lock:
            self.stats.rebuilds += 1

    def _make_room(self, width: int, extra: int) -> bool | None:
        """See :meth:`BatchState.make_room`; None: the batch must be rebuilt."""
        moved = self._batch.make_room(width, extra, self.block_size)
        if moved:
            with self._lock:
                self.stats.resizes += 1
        return moved

    def _select(self, keep: list[int]) -> list[int]:
        """Keep rows ``keep`` (ascending); returns the new order (new row i was row order[i])."""
        if not keep:
            self._rows, self._batch = [], None
            return []
        order = self._batch.keep(keep)
        self._rows = [self._rows[i] for i in order]
        if self._batch.trim():
            with self._lock:
                self.stats.resizes += 1
        return order

    def _requests_of(self, rows: list[Seq]) -> list[tuple[GenerationRequest, list[int]]]:
        by: dict[int, tuple[GenerationRequest, list[int]]] = {}
        for i, s in enumerate(rows):
            by.setdefault(id(s.req), (s.req, []))[1].append(i)
        return list(by.values())

    # -- forward

    def _forward_isolated(self):
        """Next-token logits (B, V) for every row; a request whose rows fail is failed and
        dropped (its logits rows are never read). None when no row is left."""
        batch = self._batch
        cache, mask, col = batch.cache, batch.mask, batch.pos
        try:
            self._hook("forward", [r for r, _ in self._requests_of(self._rows)])
            return self._forward(self._rows, cache, mask, col)
        except Exception:  # noqa: BLE001 - find the request at fault, one at a time
            cache.pos = col
        logits = torch.zeros((len(self._rows), self.vocab_size), device=self.device)
        failed = set()
        for req, idx in self._requests_of(self._rows):
            index = torch.tensor(idx, dtype=torch.long, device=self.device)
            sub = KVCache([k.index_select(0, index) for k in cache.k],
                          [v.index_select(0, index) for v in cache.v])
            sub.pos = col
            try:
                self._hook("forward", [req])
                out = self._forward([self._rows[i] for i in idx], sub, mask[index], col)
            except Exception as e:  # noqa: BLE001
                self._fail(req, "decoding", e)
                failed.update(idx)
                continue
            for layer in range(len(cache.k)):
                cache.k[layer][index, :, col] = sub.k[layer][:, :, col]
                cache.v[layer][index, :, col] = sub.v[layer][:, :, col]
            logits[index] = out
        cache.pos = col + 1
        mask[:, col] = True
        keep = [i for i in range(len(self._rows)) if i not in failed]
        if len(keep) < len(self._rows):
            order = self._select(keep)
            if not keep:
                return None
            logits = logits[torch.tensor(order, dtype=torch.long, device=self.device)]
        return logits

    def _forward(self, rows: list[Seq], cache: KVCache, mask, col: int):
        """Feed one token per row at cache column ``col`` -> next-token logits (B, V)."""
        mask[:, col] = True
        x = torch.tensor([s.tokens[-1] for s in rows], dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        with torch.inference_mode(), autocast_context(self.device):
            # position ids come from the mask: each row counts its own real tokens
            logits, _ = self.model(x, attention_mask=mask[:, :col + 1], kv_cache=cache)
        return logits[:, -1].float()  # (B, V)

    # -- sampling

    def _pick(self, logits, idx: list[int], tokens) -> None:
        """Choose the next token of rows ``idx`` (same sampling key) into ``tokens``."""
        rows = self._rows
        params = rows[idx[0]].req.params
        sel = torch.tensor(idx, device=logits.device)
        proc = process_logits(logits.index_select(0, sel), params,
                              self._batch.counts.index_select(0, sel), self._batch.seen.index_select(0, sel))
        tokens[sel] = pick(proc, params, [rows[i].generator for i in idx])

    def _sample_and_emit(self, logits) -> None:
        rows = self._rows
        B = len(rows)
        tokens = torch.zeros(B, dtype=torch.long, device=logits.device)
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, s in enumerate(rows):
            groups[s.key].append(i)
        with torch.inference_mode():
            for idx in groups.values():
                try:
                    self._hook("sample", [r for r, _ in self._requests_of([rows[i] for i in idx])])
                    self._pick(logits, idx, tokens)
                except Exception:  # noqa: BLE001 - retry request by request to find the culprit
                    for req, sub in self._requests_of([rows[i] for i in idx]):
                        one = [idx[j] for j in sub]
                        try:
                            self._hook("sample", [req])
                            self._pick(logits, one, tokens)
                        except Exception as e:  # noqa: BLE001
                            self._fail(req, "sampling", e)
            logp = logits.log_softmax(-1)  # raw-model log-probs, as workers.model.sampling reports
            lp = logp.gather(1, tokens[:, None]).squeeze(1)
            self._batch.counts.scatter_add_(1, tokens[:, None], torch.ones((B, 1), device=logits.device))
            self._batch.seen.scatter_(1, tokens[:, None], True)
            k = min(max((s.req.top_logprobs or 0) for s in rows), logits.size(-1))
            top = logp.topk(k, dim=-1) if k > 0 else None
            host_tok, host_lp = tokens.tolist(), lp.tolist()
            host_top = (top.values.tolist(), top.indices.tolist()) if top is not None else None

        with self._lock:
            self.stats.tokens += B
        for req, idx in self._requests_of(rows):
            if req.done:
                continue
            try:
                deltas = [self._advance(rows[i], host_tok[i], host_lp[i], host_top and
                                        (host_top[0][i], host_top[1][i])) for i in idx]
            except Exception as e:  # noqa: BLE001
                self._fail(req, "detokenizing", e)
                continue
            self._outbox.append((req, Step(req, deltas)))
            if all(s.finish is not None for s in req.seqs):
                self._finish(req, self._outbox)

    def _advance(self, s: Seq, tok: int, tlp: float, top) -> Delta:
        """Record token ``tok`` on ``s``; its text, finish reason and the text safe to stream."""
        req, p = s.req, s.req.params
        s.tokens.append(tok)
        s.token_ids.append(tok)
        s.logprobs.append(tlp)
        s.cum += tlp
        alts = None
        if req.top_logprobs:
            n = req.top_logprobs
            alts = {self.decode([t]): v for v, t in zip(top[0][:n], top[1][:n])}
            s.top.append(alts)
        if (tok in self.end_ids and not req.ignore_eos) or tok in p.stop_token_ids:
            s.finish = "stop"
        body = s.token_ids[:-1] if s.finish else s.token_ids
        last = len(s.token_ids) >= p.max_tokens or len(s.tokens) >= self.block_size
        chk = apply_stops(self.decode(body), p.stop, s.finish, last)
        s.finish = chk.finish
        if s.finish is not None:
            s.text = chk.text
        delta = chk.stable[s.emitted:]
        s.emitted = max(s.emitted, len(chk.stable))
        return Delta(s.index, delta, tok, tlp, alts, s.finish)

    # -- beam search, in its own thread

    def _run_beam(self, req: GenerationRequest) -> None:
        outbox: list = []
        with self._lock:
            self._beam_running = req
        try:
            self._hook("beam", [req])
            with torch.inference_mode(), autocast_context(self.device):
                req.beam_results = generate(
                    self.model, [req.prompt_ids], req.params,
                    eos_token_id=None if req.ignore_eos else self.eos_token_id, decode=self.decode,
                    device=self.device, should_stop=lambda: req.cancelled or self._stop.is_set())[0]
            with self._lock:
                self.stats.tokens += sum(len(c.token_ids) for c in req.beam_results)
            self._finish(req, outbox)
        except GenerationCancelled:
            self._finish(req, outbox, aborted=True)
        except Exception as e:  # noqa: BLE001 - this request alone
            log.error("beam search failed: %s: %s", type(e).__name__, e, exc_info=e)
            self._finish(req, outbox, error=server_error())
        finally:
            with self._lock:
                self._beams.discard(req)
                self._beam_running = None
            flush(outbox)


__all__ = ["ADMIT_WAIT_STEPS", "Delta", "Done", "Engine", "EngineStats", "Event", "GenerationRequest", "RETRY_AFTER_S",
           "Seq", "Step", "flush"]
