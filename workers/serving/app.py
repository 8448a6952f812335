"""The OpenAI-compatible HTTP API over an :class:`~workers.serving.engine.Engine`, and its Ray
Serve deployment.

- :func:`build_app`: the FastAPI app (``/v1/completions``, ``/v1/chat/completions``,
  ``/v1/models``, ``/v1/stats`` and a minimal ``/health``). The same app runs in a Ray Serve
  replica and, in tests, under uvicorn.
- :class:`Guard`: the ASGI layer in front of it. It checks the API key before anything else
  (constant-time, on every route but ``/health``), refuses bodies over the size limit (413)
  and turns any error that escapes into OpenAI's error shape.
- :func:`serve_checkpoint` / :func:`shutdown`: deploy / remove a checkpoint on Ray Serve.

The API key itself never leaves the process that holds it: replicas get its SHA-256 and compare
digests, so it is not in Serve's deployment config, logs or the command line.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.serving import protocol as oa

if TYPE_CHECKING:  # the engine needs torch; importing this module (to validate a pipeline) must not
    from workers.checkpoints import Checkpoint
    from workers.serving.engine import Engine

log = logging.getLogger(__name__)

APP_NAME = "orchestrator-serve"
STREAM_INTERVAL_S = 0.05
"""Least time between two SSE chunks of one stream after the first: tokens of the steps in
between are coalesced, so a busy replica sends fewer, bigger chunks through the proxy."""
STREAM_CHUNKS_PER_S = 200
"""Under load the interval grows so that a replica's streams together send about this many
chunks a second: each chunk costs Python work on the replica (holding the GIL the engine
thread needs) and a hop through the Serve proxy, while the engine's cost per token is fixed."""
SERVE_ENV = {
    # Ray Serve's own knobs (the set its RAY_SERVE_THROUGHPUT_OPTIMIZED picks, without direct
    # ingress): our handlers run on the replica's main event loop, not a second loop in another
    # thread; the router shares the proxy's loop; request-path logs are written in batches
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}
"""Environment of the Serve controller, proxies and replicas: each thread and loop hop per
request costs Python time on the cores the engine needs."""
TRIM_AFTER_BYTES = 1 << 20
"""A request body at least this big is followed by ``malloc_trim``: its transient copies
(bytes, text, parsed JSON) would otherwise stay resident (``workers.cpu.release_freed_memory``)."""
TRIM_DELAY_S = 1.0
"""How long after such a request the trim runs (its body and errors are gone by then)."""
PREP_THREADS = 4
"""Threads per replica that parse, validate, encode and render requests, off the event loop (a
chat render waits there for its worker process: see ``workers.serving.render``)."""
SERVE_LOGGING = {"enable_access_log": False}
"""Serve's logging of the proxies and of our application (else: a formatted line per request)."""


# ============================================================================================
# The ASGI guard: authentication and size limits before any work


def key_digest(key: str | bytes) -> str:
    """What a replica keeps of the API key (it compares digests, in constant time): the SHA-256
    of its UTF-8 bytes, as a client sends them in the header."""
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).hexdigest()


class Guard:
    """ASGI middleware in front of the app: the one authentication check (before the body is
    read), the body size limit (413), and OpenAI-shaped 500s for anything that escapes."""

    def __init__(self, app, *, key_digest: str | None, max_body_bytes: int = oa.MAX_BODY_BYTES):
        self.app, self.digest, self.max_body = app, key_digest, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        headers = dict(scope.get("headers") or ())
        if path != "/health" and not self._authorized(headers.get(b"authorization", b"")):
            return await _send_error(send, oa.APIError(
                "Incorrect or missing API key. Send it in the Authorization header as 'Bearer YOUR_KEY'.",
                status=401, code="invalid_api_key"))
        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await _send_error(send, oa.APIError("Content-Length is not a number"))
        if length > self.max_body:
            return await _send_error(send, _too_large(self.max_body))
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise _too_large(self.max_body)
            return msg

        started = False

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except oa.APIError as e:
            if not started:
                await _send_error(send, e)
        except Exception as e:  # noqa: BLE001 - ours: logged here, an OpenAI-shaped 500 for the client
            from starlette.requests import ClientDisconnect

            if isinstance(e, ClientDisconnect):  # gone while sending its body: nobody to answer
                return
            log.exception("request failed")
            if not started:
                await _send_error(send, oa.server_error())

    def _authorized(self, header: bytes) -> bool:
        if self.digest is None:
            return True
        scheme, _, key = header.partition(b" ")
        # the header's bytes as sent (ASGI gives bytes; decoding them as latin-1 and re-encoding
        # as UTF-8 would never match a non-ASCII key)
        given = key_digest(key.strip()) if scheme.lower() == b"bearer" else ""
        return hmac.compare_digest(given.encode(), self.digest.encode())


def _too_large(limit: int) -> oa.APIError:
    return oa.APIError(f"request body is larger than {limit} bytes", status=413, code="request_too_large")


async def _send_error(send, err: oa.APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ============================================================================================
# The app


@dataclass
class _Choice:
    """One choice's part of an SSE chunk (merged over the events since the last chunk)."""
    index: int
    tag: int
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)
    finish: str | None = None


async def _prepend(first, rest):
    yield first
    async for item in rest:
        yield item


def build_app(loaded: "Checkpoint", engine: "Engine", *, key_digest: str | None = None, max_queue: int = 64,
              stream_interval_s: float = STREAM_INTERVAL_S, max_body_bytes: int = oa.MAX_BODY_BYTES,
              allow_special_tokens: bool = False, template_budget_s: float | None = None):
    """The OpenAI-compatible ASGI app (FastAPI behind :class:`Guard`) over a running ``engine``.

    The event loop does no work that grows with a request: the body is parsed, validated,
    encoded and (chat) rendered in a bounded pool of threads (``PREP_THREADS``; past
    max_batch_size + max_queue requests in preparation: 503 ``overloaded``), sizes are checked
    before anything is encoded, and chat templates render in worker processes under a time
    budget. ``allow_special_tokens``: completion prompts may hold the tokenizer's special
    tokens (off: text from a request is always plain text)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from workers.cpu import release_freed_memory
    from workers.model.sampling import SamplingParams
    from workers.serving.engine import RETRY_AFTER_S, Done, GenerationRequest, Step
    from workers.serving.prompts import PromptEncoder
    from workers.serving.render import TEMPLATE_BUDGET_S, Renderer

    class Inbox:
        """One HTTP request's engine events: ``put`` (on its event loop) adds those of a step,
        :func:`events` takes them. Only some puts wake the consumer: while it waits for any event
        (``eager``), a failure, and the last of its ``count`` final events (``final``); between
        two chunks of a stream it sleeps until the next is due, not once per decode step."""

        __slots__ = ("eager", "failed", "final", "items", "left", "wake")

        def __init__(self, count: int):
            self.items: list = []
            self.left = count
            self.final = self.failed = False
            self.eager = True
            self.wake = asyncio.Event()

        def put(self, events: list) -> None:
            self.items.extend(events)
            last = events[-1]
            if isinstance(last, Done):
                self.left -= 1
                self.final = self.left <= 0
                self.failed = self.failed or last.error is not None
                if self.final or self.failed:
                    self.wake.set()
                    return
            if self.eager:
                self.wake.set()

        async def until(self, deadline: float | None) -> None:
            """Until a put wakes us, or the loop's clock reaches ``deadline`` (if not None)."""
            self.wake.clear()
            if deadline is None:
                await self.wake.wait()
                return
            timer = asyncio.get_running_loop().call_at(deadline, self.wake.set)
            try:
                await self.wake.wait()
            finally:
                timer.cancel()

    app = FastAPI(title="genai-orchestrator OpenAI-compatible API", docs_url=None, redoc_url=None,
                  openapi_url=None, redirect_slashes=False)
    vocab = loaded.model.config.vocab_size
    renderer = Renderer(budget_s=template_budget_s or TEMPLATE_BUDGET_S)
    encoder = PromptEncoder(engine.tokenizer, context=loaded.context, allow_special=allow_special_tokens,
                            renderer=renderer)
    eos_text = engine.decode([loaded.eos_token_id]) if loaded.eos_token_id is not None else ""
    prep_pool = ThreadPoolExecutor(max_workers=PREP_THREADS, thread_name_prefix="prepare")
    prep_limit = engine.max_batch_size + engine.max_queue
    preparing = 0  # requests in the preparation pool (the event loop's count; no lock needed)
    app.state.renderer = renderer  # tests look at its workers

    @app.exception_handler(oa.APIError)
    async def _api_error(request: Request, exc: oa.APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(oa.validation_error(list(exc.errors())).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.method} {request.url.path}; this server answers /v1/completions, "
                        "/v1/chat/completions, /v1/models, /v1/stats and /health",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        return JSONResponse(oa.error_body(message, type=kind, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    def check_model(name: str | None) -> None:
        if name is not None and name != loaded.name:
            raise oa.APIError(f"The model {name!r} does not exist; this server serves {loaded.name!r} "
                              "(see GET /v1/models)", status=404, param="model", code="model_not_found")

    def check_count(count: int, param: str) -> None:
        if not engine.admissible(count):
            raise oa.APIError(f"{param} holds {count} prompts; this server admits at most "
                              f"{engine.max_batch_size + engine.max_queue} at once (max_batch_size + max_queue)",
                              param=param, code="too_many_prompts")

    def check_sizes(obj: dict) -> None:
        """Sizes on the raw JSON, before it is walked, validated or encoded (lengths only)."""
        prompt, messages = obj.get("prompt"), obj.get("messages")
        if isinstance(prompt, str):
            encoder.check_chars(prompt, "prompt")
        elif isinstance(prompt, list) and prompt:
            if isinstance(prompt[0], (str, list)):
                check_count(len(prompt), "prompt")
            items = prompt if isinstance(prompt[0], (str, list)) else [prompt]
            for p in items:
                if isinstance(p, str):
                    encoder.check_chars(p, "prompt")
                elif isinstance(p, list) and len(p) >= loaded.context:
                    oa.check_length(None, len(p), loaded.context, param="prompt")
        if isinstance(messages, list):
            if len(messages) > oa.MAX_MESSAGES:
                raise oa.APIError(f"messages holds {len(messages)} messages; at most {oa.MAX_MESSAGES}",
                                  param="messages")
            for i, m in enumerate(messages):
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, str):
                    encoder.check_chars(content, f"messages[{i}].content")
                elif isinstance(content, list) and len(content) > oa.MAX_MESSAGES:
                    raise oa.APIError(f"messages[{i}].content holds {len(content)} parts; at most "
                                      f"{oa.MAX_MESSAGES}", param="messages")

    def make_requests(body, prompts: list[list[int]], *, param: str, emit, loop) -> list:
        check_count(len(prompts), param)
        out = []
        for i, ids in enumerate(prompts):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise oa.APIError(f"{param} holds token ids outside [0, {vocab}): {bad[:5]}", param=param)
            max_tokens = oa.check_length(body, len(ids), loaded.context, param=param)
            params = SamplingParams(**oa.sampling_kwargs(body, max_tokens))
            try:
                params.validate()
            except ValueError as e:
                raise oa.APIError(str(e).replace("SamplingParams.", "")) from None
            out.append(GenerationRequest(ids, params, tag=i, top_logprobs=body.top_logprobs_count(),
                                         emit=emit, loop=loop, ignore_eos=body.ignore_eos))
        return out

    streams = 0  # SSE streams open on this replica (its event loop's; no lock needed)

    async def events(reqs: list[GenerationRequest], inbox: Inbox, interval: float | None):
        """Yield lists of engine events of ``reqs`` (all that arrived since the last yield) until
        every request is done: after the first list at most one per ``interval`` (longer while
        many streams are open); ``interval`` None: only the final events (a whole answer). A
        request's final event is never held back: a closed-loop client sends its next request
        only then, and its batch slot stays empty until it does. Abort the requests if we are
        cancelled (client gone) or the consumer stops early. A failed request raises its error."""
        loop = asyncio.get_running_loop()
        pending = len(reqs)
        last = None
        try:
            while pending:
                if not (inbox.final or inbox.failed):
                    if interval is None:
                        inbox.eager = False
                        await inbox.until(None)
                    elif interval and last is not None:
                        due = last + max(interval, streams / STREAM_CHUNKS_PER_S)
                        if due > loop.time():
                            inbox.eager = False
                            await inbox.until(due)
                if not inbox.items:
                    inbox.eager = True
                    await inbox.until(None)
                batch, inbox.items = inbox.items, []
                for ev in batch:
                    if isinstance(ev, Done):
                        pending -= 1
                        if ev.error is not None:
                            raise ev.error
                last = loop.time()
                yield batch
        finally:
            if pending:
                engine.abort(reqs)

    def final_choices(reqs: list[GenerationRequest], n: int, *, chat: bool) -> tuple[list[dict], int]:
        """Final choices (index = prompt * n + sample), best ``n`` by cumulative logprob when
        more were sampled (best_of), and the completion-token count."""
        choices, completion_tokens = [], 0
        for r in reqs:
            if r.beam_results is not None:
                items = [(c.text, c.finish_reason, c.token_ids, c.logprobs or [], None) for c in r.beam_results]
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
                    toks = [engine.decode([t]) for t in ids[:len(lps)]]
                    lp = (oa.chat_logprobs(toks, lps, top or None) if chat
                          else oa.completion_logprobs(toks, lps, top or None))
                c = {"index": r.tag * n + j, "logprobs": lp, "finish_reason": finish}
                if chat:
                    c["message"] = {"role": "assistant", "content": text}
                else:
                    c["text"] = text
                choices.append(c)
        return choices, completion_tokens

    def chunk_choices(batch, reqs: list[GenerationRequest], n: int, *, chat: bool,
                      offsets: dict[int, int]) -> tuple[list[dict], int]:
        """A chunk's choices from ``batch``; ``offsets`` (choice index -> characters sent so far)
        carries each choice's ``text_offset`` across the chunks of a stream."""
        merged: dict[int, _Choice] = {}
        tokens = 0
        for ev in batch:
            if not isinstance(ev, Step):
                continue
            r = ev.request
            for d in ev.deltas:
                tokens += 1
                m = merged.get(r.tag * n + d.index)
                if m is None:
                    m = merged[r.tag * n + d.index] = _Choice(r.tag * n + d.index, r.tag)
                m.text += d.text
                if r.top_logprobs is not None:
                    m.tokens.append(engine.decode([d.token_id]))
                    m.logprobs.append(d.logprob)
                    m.top.append(d.top or {})
                m.finish = d.finish
        choices = []
        for index in sorted(merged):
            m = merged[index]
            if not m.text and m.finish is None:
                continue
            lp = None
            k = reqs[m.tag].top_logprobs
            if k is not None:
                top = m.top if k else None
                lp = oa.chat_logprobs(m.tokens, m.logprobs, top) if chat else \
                    oa.completion_logprobs(m.tokens, m.logprobs, top, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(map(len, m.tokens))
            c = {"index": index, "logprobs": lp, "finish_reason": m.finish}
            if chat:
                c["delta"] = {"content": m.text} if m.text else {}
            else:
                c["text"] = m.text
            choices.append(c)
        return choices, tokens

    async def abort_on_disconnect(request: Request, reqs: list[GenerationRequest]) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        engine.abort(reqs)

    async def respond(request: Request, body, reqs: list[GenerationRequest], inbox: Inbox, *,
                      chat: bool, prompt_tokens: int):
        name, n = loaded.name, body.n
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        make = oa.chat_body if chat else oa.completion_body
        if not body.stream:
            watch = asyncio.ensure_future(abort_on_disconnect(request, reqs))
            try:
                async for _ in events(reqs, inbox, None):
                    pass
            finally:
                watch.cancel()
            choices, ct = final_choices(reqs, n, chat=chat)
            return JSONResponse(make(rid, name, choices, oa.usage(prompt_tokens, ct)))

        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = events(reqs, inbox, stream_interval_s)
        # wait for the first events before the response starts: its start and first chunk then
        # leave together, one message through the Serve proxy instead of two
        try:
            first, failure = await stream.__anext__(), None
        except oa.APIError as e:
            first, failure = [], e

        async def sse():
            nonlocal streams
            completion_tokens = 0
            streams += 1
            head = oa.sse(make(rid, name, [{"index": r.tag * n + j, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}
                                           for r in reqs for j in range(n)], None, chunk=True,
                               created=created)) if chat else ""
            try:
                if failure is not None:
                    raise failure
                tail = ""
                offsets: dict[int, int] = {}
                async for batch in _prepend(first, stream):
                    choices, count = chunk_choices(batch, reqs, n, chat=chat, offsets=offsets)
                    completion_tokens += count
                    text = oa.sse(make(rid, name, choices, None, chunk=True, created=created)) if choices else ""
                    text, head = head + text, ""
                    if inbox.final:  # the last events: one message with the usage and [DONE]
                        tail += text
                    elif text:
                        yield text
                if include_usage:
                    tail += oa.sse(make(rid, name, [], oa.usage(prompt_tokens, completion_tokens),
                                        chunk=True, created=created))
                yield tail + oa.SSE_DONE
            except oa.APIError as e:
                yield head + oa.sse(e.body()) + oa.SSE_DONE
            finally:
                streams -= 1
                await stream.aclose()  # aborts unfinished requests (client went away)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def parse(raw: bytes, model):
        """The request body, its model and fields checked (in a preparation thread)."""
        body = oa.parse_body(raw, model, limits=check_sizes)
        check_model(body.model)
        if not loaded.model.config.causal:
            raise oa.APIError(f"{loaded.name!r} is an encoder (masked LM): it does not generate text; use "
                              "POST /v1/embeddings", code="unsupported_model")
        body.check(max_batch_size=engine.max_batch_size, vocab_size=vocab)
        return body

    def prepare_completion(raw: bytes, emit, loop):
        body = parse(raw, oa.CompletionRequest)
        prompts = [encoder.text(p, param="prompt") if isinstance(p, str) else list(p) for p in body.prompts()]
        if not prompts:
            raise oa.APIError("prompt must not be empty", param="prompt")
        return body, make_requests(body, prompts, param="prompt", emit=emit, loop=loop)

    def prepare_chat(raw: bytes, emit, loop):
        body = parse(raw, oa.ChatCompletionRequest)
        ids = encoder.chat([m.model_dump() for m in body.messages], loaded.chat_template,
                           add_generation_prompt=body.add_generation_prompt, eos_token=eos_text)
        return body, make_requests(body, [ids], param="messages", emit=emit, loop=loop)

    trim_due = False  # a malloc_trim is scheduled (after a big body; the event loop's flag)

    def trim_later(loop) -> None:
        """Trim the heap in the pool a moment after a big request, once its copies are freed."""
        nonlocal trim_due

        def run():
            nonlocal trim_due
            trim_due = False
            prep_pool.submit(release_freed_memory)

        if not trim_due:
            trim_due = True
            loop.call_later(TRIM_DELAY_S, run)

    async def prepared(request: Request, prepare):
        """``prepare(raw, emit, loop)`` in the preparation pool -> (body, requests, inbox)."""
        nonlocal preparing
        raw = await request.body()
        if preparing >= prep_limit:
            raise oa.APIError(f"server overloaded: {preparing} requests are being prepared; retry later",
                              status=503, type="server_error", code="overloaded",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
        loop = asyncio.get_running_loop()
        inbox = Inbox(0)
        preparing += 1
        try:
            body, reqs = await loop.run_in_executor(prep_pool, prepare, raw, inbox.put, loop)
        finally:
            preparing -= 1
            if len(raw) >= TRIM_AFTER_BYTES:
                trim_later(loop)
        inbox.left = len(reqs)
        return body, reqs, inbox

    async def generate(request: Request, prepare, *, chat: bool):
        body, reqs, inbox = await prepared(request, prepare)
        # submitted before any byte is sent, so an overloaded server answers a plain 503
        engine.submit(reqs)
        return await respond(request, body, reqs, inbox, chat=chat,
                             prompt_tokens=sum(len(r.prompt_ids) for r in reqs))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, prepare_completion, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, prepare_chat, chat=True)

    if not loaded.model.config.causal:
        from workers.serving.embeddings import add_embedding_routes
        add_embedding_routes(app, loaded, engine, check_model)

    @app.get("/v1/models")
    async def models():
        return oa.models_body(loaded.name, loaded.created)

    @app.get("/v1/stats")
    async def stats():
        return {"model": loaded.name, **engine.snapshot()}

    @app.get("/health")
    async def health():
        alive = engine.snapshot()["alive"]
        return JSONResponse({"status": "ok" if alive else "error"}, status_code=200 if alive else 503)

    return Guard(app, key_digest=key_digest, max_body_bytes=max_body_bytes)


# ============================================================================================
# Ray Serve


_DEPLOYMENT = None


def _deployment():
    """The deployment class (built lazily: importing this module must not need Ray Serve)."""
    global _DEPLOYMENT
    if _DEPLOYMENT is not None:
        return _DEPLOYMENT
    from ray import serve

    from workers.serving.engine import Engine

    @serve.deployment(name="OpenAIServer")
    @serve.ingress()
    class OpenAIServer:
        def __init__(self, checkpoint: str, *, model_name: str | None, key_digest: str | None,
                     max_batch_size: int, max_queue: int, stream_interval_s: float,
                     allow_special_tokens: bool = False, pooling: str = "mean"):
            import ray

            from workers.checkpoints import open_checkpoint
            from workers.cpu import claim_cpus

            # normal priority and one torch thread per CPU of the replica, before the engine
            # thread starts (it inherits both): at Ray's niceness 15 any other process preempts
            # the decode loop, and the proxy and clients it feeds are on the same cores
            claim_cpus(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
            self.loaded = open_checkpoint(checkpoint)
            self.loaded.name = model_name or self.loaded.name
            lm = self.loaded
            if not lm.model.config.causal:  # an encoder serves embeddings
                from workers.serving.embeddings import embedder_for
                self.engine = embedder_for(lm, pooling=pooling, max_batch_size=max_batch_size,
                                           max_queue=max_queue).start()
            else:
                self.engine = Engine(lm.model, lm.tokenizer, eos_token_id=lm.eos_token_id,
                                     end_token_ids=lm.stop_token_ids, max_batch_size=max_batch_size,
                                     max_queue=max_queue).start()
            self._app_args = dict(key_digest=key_digest, max_queue=max_queue, stream_interval_s=stream_interval_s,
                                  allow_special_tokens=allow_special_tokens)

        def __serve_build_asgi_app__(self):
            return build_app(self.loaded, self.engine, **self._app_args)

        def check_health(self):
            if not self.engine.snapshot()["alive"]:
                raise RuntimeError("engine thread died")

        def __del__(self):
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.stop()

    _DEPLOYMENT = OpenAIServer
    return _DEPLOYMENT


def wait_healthy(url: str, timeout: float = 120.0) -> None:
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
                     route_prefix: str = "/", stream_interval_s: float = STREAM_INTERVAL_S,
                     allow_special_tokens: bool = False, pooling: str = "mean") -> str:
    """Deploy ``checkpoint_dir`` as an OpenAI-compatible API on Ray Serve; return its base URL
    (``http://host:port`` + route_prefix; clients use ``<url>/v1``).

    ``api_key`` makes every route but /health require ``Authorization: Bearer KEY`` (only its
    digest reaches the replicas). ``autoscaling`` (``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests``) replaces ``replicas``. Each replica gets ``num_cpus`` and
    ``num_gpus`` (None: one GPU when the cluster has any). ``blocking``: serve until Ctrl-C, then
    remove the application. ``allow_special_tokens``: completion prompts may hold the
    tokenizer's special tokens (off: request text is plain text). A failure or interrupt while
    deploying removes it too. Several
    checkpoints can be served side by side under different ``app_name``/``route_prefix``.
    An encoder checkpoint answers /v1/embeddings, pooled by ``pooling`` (mean or cls).
    """
    import ray
    from ray import serve
    from ray.serve.config import BackpressureConfig

    from workers import storage
    from workers.serving.engine import RETRY_AFTER_S

    if storage.is_local(str(checkpoint_dir)) and not Path(checkpoint_dir).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint_dir!r}: no such folder")
    if replicas < 1:
        raise ValueError(f"replicas: got {replicas}; must be >= 1")
    if max_batch_size < 1 or max_queue < 0:
        raise ValueError(f"max_batch_size={max_batch_size}, max_queue={max_queue}: need max_batch_size >= 1 "
                         "and max_queue >= 0")
    if not ray.is_initialized():
        # workers (the replicas and Serve's proxy) at normal priority, as the orchestrator's own
        # local Ray (orchestrator/runs.py): see workers/cpu.py
        ray.init(_system_config={"worker_niceness": 0})
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    # the proxy inherits the controller's environment
    serve.start(http_options={"host": host, "port": port}, logging_config=SERVE_LOGGING,
                controller_options={"runtime_env": {"env_vars": SERVE_ENV}})

    options: dict[str, Any] = dict(
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus, "runtime_env": {"env_vars": SERVE_ENV}},
        # the replica must see every request it may queue itself (its own 503 carries the
        # OpenAI body); Serve's queue in front of the replicas is bounded too
        max_ongoing_requests=max_batch_size + max_queue + 8,
        max_queued_requests=max(16, 2 * (max_queue + max_batch_size)),
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
        health_check_period_s=5,
    )
    if autoscaling:
        options["autoscaling_config"] = {"min_replicas": autoscaling["min_replicas"],
                                         "max_replicas": autoscaling["max_replicas"],
                                         "initial_replicas": max(1, autoscaling["min_replicas"]),
                                         "target_ongoing_requests": autoscaling["target_ongoing_requests"]}
        options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = replicas
    deployment = _deployment().options(**options)
    app = deployment.bind(str(checkpoint_dir), model_name=model_name,
                          key_digest=key_digest(api_key) if api_key else None,
                          max_batch_size=max_batch_size, max_queue=max_queue, stream_interval_s=stream_interval_s,
                          allow_special_tokens=allow_special_tokens, pooling=pooling)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}{route_prefix.rstrip('/')}"
    try:
        serve.run(app, name=app_name, route_prefix=route_prefix, blocking=False, logging_config=SERVE_LOGGING)
        wait_healthy(url)
        if blocking:
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        shutdown(app_name)
        if not blocking:
            raise
    except BaseException:
        shutdown(app_name)
        raise
    return url


def shutdown(app_name: str | None = None) -> None:
    """Remove application ``app_name``, or stop Ray Serve altogether (None)."""
    from ray import serve

    if app_name is None:
        serve.shutdown()
    else:
        serve.delete(app_name)


def api_key_from(env: str | None = None, file: str | os.PathLike | None = None) -> str | None:
    """The API key from a file (its first line) or an environment variable; None when neither is
    given. Never from the command line, where ``ps`` shows it."""
    if file is not None:
        key = Path(file).read_text(encoding="utf-8").strip()
        if not key:
            raise ValueError(f"API key file {str(file)!r} is empty")
        return key
    if env is not None:
        key = os.environ.get(env, "").strip()
        if not key:
            raise ValueError(f"environment variable {env!r} holding the API key is not set or empty")
        return key
    return None


__all__ = ["APP_NAME", "Guard", "SERVE_ENV", "STREAM_CHUNKS_PER_S", "STREAM_INTERVAL_S", "api_key_from", "build_app",
           "key_digest", "serve_checkpoint", "shutdown", "wait_healthy"]
