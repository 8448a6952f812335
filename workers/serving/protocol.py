"""The OpenAI HTTP API's shapes: request models, their validation, response and SSE chunk bodies.

Plain pydantic and dicts; no torch, no Ray. ``workers.kinds.serve`` turns a validated request into
``workers.model.sampling.SamplingParams`` keyword arguments with :func:`sampling_kwargs` and builds the
bodies below from what its engine produced. Errors are :class:`APIError` carrying the HTTP status
and OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_LOGPROBS = 5
"""Most alternatives per position on completions (``logprobs``), as OpenAI."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives per position on chat completions (``top_logprobs``), as OpenAI."""
MAX_STOPS = 4
"""Stop strings per request (OpenAI: up to 4)."""
MAX_STOP_CHARS = 256
"""Longest stop string: every running sequence searches its text for each, every step."""
MAX_STOP_TOKEN_IDS = 64
"""Most ``stop_token_ids`` per request."""
MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body; a bigger one is answered 413 before it is read."""
INT64 = 2 ** 63

UNSUPPORTED = {
    "echo": "echo", "suffix": "suffix (insertion)", "logit_bias": "logit_bias", "tools": "tools",
    "tool_choice": "tool_choice", "functions": "functions", "function_call": "function_call",
    "parallel_tool_calls": "parallel_tool_calls", "response_format": "response_format",
    "modalities": "modalities", "audio": "audio", "prediction": "prediction", "store": "store",
    "metadata": "metadata", "service_tier": "service_tier", "reasoning_effort": "reasoning_effort",
    "web_search_options": "web_search_options",
}
"""OpenAI request fields this server does not implement: a 400 naming the field when given a
value other than null/false/empty, never silently ignored."""


class APIError(Exception):
    """An error answered to the client with an OpenAI-shaped body."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def server_error(message: str = "The server had an error while processing your request.") -> APIError:
    """A 500 for a fault of ours (the details go to the log, not to the client)."""
    return APIError(message, status=500, type="server_error", code="internal_error")


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """An :class:`APIError` (400) from pydantic validation errors (FastAPI would answer 422)."""
    if not errors:
        return APIError("invalid request body")
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None  # the request field; deeper parts name pydantic's union branches
    if e.get("type") == "extra_forbidden":
        where = ".".join(loc)
        return APIError(f"{where}: unknown field; this server does not accept it (see the OpenAI API "
                        "reference for the fields it does)", param=param, code="unknown_field")
    got = e.get("input")
    got_s = "" if isinstance(got, dict) and not loc else f" (got {json.dumps(got, default=str)[:200]})"
    where = ".".join(loc) or "body"
    return APIError(f"{where}: {e.get('msg', 'invalid value')}{got_s}", param=param)


def _check_strings(value: Any, param: str | None) -> None:
    """Refuse lone surrogates (JSON can carry them as \\ud800 escapes; no tokenizer can)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(f"{param or 'body'}: holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is "
                               "not valid Unicode text", param=param) from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


MAX_MESSAGES = 2048
"""Most messages in one chat request (checked before the body is validated)."""


def parse_body(raw: bytes, model: type[BaseModel], limits=None) -> Any:
    """Parse and validate a request body: UTF-8 JSON object, no NaN/Infinity, no lone surrogates,
    no unsupported or unknown fields, every field in range. Raises :class:`APIError` (400).
    ``limits(obj)`` checks sizes on the parsed JSON before anything walks or validates it
    (the validation of a list of 699k prompts took seconds before its 400)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    try:
        obj = json.loads(text)  # NaN/Infinity parse, and the models refuse them naming the field
    except (ValueError, RecursionError) as e:
        raise APIError(f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(f"request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    if limits is not None:
        limits(obj)
    for key, value in obj.items():
        _check_strings(key, None)
        _check_strings(value, key)
    for key, what in UNSUPPORTED.items():
        if key in obj:
            value = obj.pop(key)
            if value not in (None, False, "", [], {}):
                raise APIError(f"{what} is not supported by this server", param=key, code="unsupported_parameter")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(list(e.errors())) from None


# --------------------------------------------------------------------------------------------
# Requests

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
"""Every request model: unknown fields, wrong types, NaN and infinities are refused."""


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's, plus vLLM's extensions), with
    OpenAI's documented ranges."""

    model_config = _STRICT

    model: str | None = Field(None, max_length=256)
    user: str | None = Field(None, max_length=256)
    """OpenAI's end-user id: accepted, not used."""
    max_tokens: int | None = Field(None, ge=1, lt=INT64)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, lt=INT64)
    """0 or -1: no top-k cut (vLLM uses -1)."""
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, le=20)
    use_beam_search: bool = False
    num_beams: int | None = Field(None, ge=1, le=64)
    length_penalty: float = Field(1.0, ge=-10, le=10)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    ignore_eos: bool = False
    """vLLM's extension: keep generating past the end-of-text token (benchmarks)."""
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def beams(self) -> int:
        """Beam width: ``num_beams``, or ``use_beam_search`` with ``best_of`` (else max(n, 2)) as vLLM."""
        if self.num_beams is not None:
            return self.num_beams
        if self.use_beam_search:
            return self.best_of or max(self.n, 2)
        return 1

    def samples(self) -> int:
        """Sequences to sample (``best_of`` of which the best ``n`` are returned)."""
        return 1 if self.beams() > 1 else (self.best_of or self.n)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; k >= 0: the sampled token's logprob plus the k most likely."""
        raise NotImplementedError

    def check(self, *, max_batch_size: int, vocab_size: int | None = None) -> None:
        """Reject combinations no model could honour (ranges are the fields' own; limits needing
        the prompt are in :func:`check_length`)."""
        def bad(param: str, value: Any, allowed: str) -> APIError:
            return APIError(f"{param} must be {allowed} (got {value!r})", param=param)

        if self.best_of is not None and self.best_of < self.n:
            raise bad("best_of", self.best_of, f">= n ({self.n})")
        beams = self.beams()
        if beams > 1 and beams < self.n:
            raise bad("num_beams", beams, f">= n ({self.n}) for beam search")
        width = max(beams, self.samples())
        if width > max_batch_size:
            # the field that set the width: num_beams (or use_beam_search's best_of), best_of, n
            param = ("num_beams" if self.num_beams is not None else "best_of" if self.best_of is not None else "n") \
                if beams > 1 else "best_of" if self.best_of is not None else "n"
            raise APIError(f"{param} asks for {width} sequences at once; this server runs at most "
                           f"{max_batch_size} (max_batch_size)", param=param)
        if beams > 1 and self.top_logprobs_count():
            # beam search reports the chosen tokens' logprobs, not the alternatives
            name = "top_logprobs" if isinstance(self, ChatCompletionRequest) else "logprobs"
            raise APIError(f"{name} > 0 is not supported with beam search (got {self.top_logprobs_count()}); "
                           f"ask for {'logprobs: true with top_logprobs 0' if name == 'top_logprobs' else 'logprobs: 0'} "
                           "for the chosen tokens' logprobs", param=name)
        if self.stream and (beams > 1 or self.samples() > self.n):
            raise APIError("stream is not supported with beam search or best_of > n", param="stream")
        stops = self.stop_list()
        if len(stops) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise bad("stop", self.stop, f"up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} "
                                         "characters")
        if vocab_size is not None:
            out = [t for t in self.stop_token_ids or () if not 0 <= t < vocab_size]
            if out:
                raise bad("stop_token_ids", out[:5], f"token ids in [0, {vocab_size})")


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # one tokenized prompt
        return list(p)

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, lt=INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_count(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def check(self, *, max_batch_size: int, vocab_size: int | None = None) -> None:
        super().check(max_batch_size=max_batch_size, vocab_size=vocab_size)
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")


def check_length(req: _SamplingRequest, prompt_len: int, context: int, *, param: str) -> int:
    """The max_tokens to run ``req`` with, given a prompt of ``prompt_len`` tokens and a window of
    ``context``; 400 when the prompt or prompt + max_tokens does not fit (as vLLM and OpenAI)."""
    if prompt_len == 0:
        raise APIError(f"{param} is empty after tokenization", param=param)
    if prompt_len >= context:
        raise APIError(f"This model's maximum context length is {context} tokens; the {param} has {prompt_len} "
                       f"tokens, leaving no room for a completion. Shorten the {param}.", param=param,
                       code="context_length_exceeded")
    asked = req.requested_max_tokens()
    room = context - prompt_len
    if asked is None:
        return min(16 if isinstance(req, CompletionRequest) else room, room)
    if asked > room:
        name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        raise APIError(f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{prompt_len + asked} tokens ({prompt_len} in the {param}, {asked} for the completion). "
                       f"Reduce {name} to at most {room}.", param=name, code="context_length_exceeded")
    return asked


def sampling_kwargs(req: _SamplingRequest, max_tokens: int) -> dict[str, Any]:
    """Keyword arguments for ``workers.model.sampling.SamplingParams`` from a checked request."""
    beams = req.beams()
    return dict(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_k=max(req.top_k, 0),
        top_p=req.top_p,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        n=req.n if beams > 1 else req.samples(),
        num_beams=beams,
        length_penalty=req.length_penalty,
        stop=tuple(req.stop_list()),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        seed=req.seed,
        logprobs=req.top_logprobs_count() is not None,
    )


# --------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[str], logprobs: list[float], top: list[dict[str, float]] | None,
                        offset: int = 0) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object (parallel lists)."""
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float], top: list[dict[str, float]] | None) -> dict[str, Any]:
    """The chat ``logprobs`` object: one entry per token, each with its alternatives."""
    def entry(tok: str, lp: float) -> dict[str, Any]:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    content = []
    for i, (tok, lp) in enumerate(zip(tokens, logprobs)):
        e = entry(tok, lp)
        e["top_logprobs"] = [entry(t, v) for t, v in (top[i].items() if top else ())]
        content.append(e)
    return {"content": content}


def completion_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None,
                    *, chunk: bool = False, created: int | None = None) -> dict[str, Any]:
    body = {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None,
              *, chunk: bool = False, created: int | None = None) -> dict[str, Any]:
    body = {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": created or int(time.time()), "model": model, "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def models_body(model: str, created: int, owned_by: str = "genai-orchestrator") -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": owned_by}]}


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line (``[DONE]`` passes as a string)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = sse("[DONE]")

__all__ = [
    "APIError", "ChatCompletionRequest", "CompletionRequest", "MAX_BODY_BYTES", "MAX_MESSAGES", "SSE_DONE", "chat_body",
    "chat_logprobs", "check_length", "completion_body", "completion_logprobs", "error_body", "models_body",
    "new_id", "parse_body", "sampling_kwargs", "server_error", "sse", "usage", "validation_error",
]
