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
from typing import Any

from pydantic import BaseModel, ConfigDict

MAX_LOGPROBS = 20
"""Most alternatives per position a request may ask for (OpenAI allows 5 on completions, 20 on chat)."""


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


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """An :class:`APIError` (400) from pydantic/FastAPI validation errors (FastAPI would answer 422)."""
    if not errors:
        return APIError("invalid request body")
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        ctx = e.get("ctx", {}).get("error", "")
        return APIError(f"request body is not valid JSON: {ctx}".rstrip(": "), code="invalid_json")
    param = loc[0] if loc else None  # the request field; deeper parts name pydantic's union branches
    got = e.get("input")
    got_s = "" if isinstance(got, dict) and not loc else f" (got {json.dumps(got, default=str)[:200]})"
    where = ".".join(loc) or "body"
    return APIError(f"{where}: {e.get('msg', 'invalid value')}{got_s}", param=param)


# --------------------------------------------------------------------------------------------
# Requests


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's, plus vLLM's extensions)."""

    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send e.g. ``user``).
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1: no top-k cut (vLLM uses -1)."""
    min_p: float = 0.0
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    num_beams: int | None = None
    length_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
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

    def check(self, *, max_batch_size: int) -> None:
        """Reject values no model could honour (limits needing the prompt are in :func:`check_length`)."""
        def bad(param: str, value: Any, allowed: str) -> APIError:
            return APIError(f"{param} must be {allowed} (got {value!r})", param=param)

        if self.temperature < 0 or self.temperature > 2:
            raise bad("temperature", self.temperature, "between 0 and 2")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", self.top_k, "-1 or 0 (off) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2 <= v <= 2:
                raise bad(name, v, "between -2 and 2")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "> 0")
        if self.n < 1:
            raise bad("n", self.n, ">= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, ">= 1")
        if self.best_of is not None and self.best_of < self.n:
            raise bad("best_of", self.best_of, f">= n ({self.n})")
        beams = self.beams()
        if beams < 1:
            raise bad("num_beams", beams, ">= 1")
        if beams > 1 and beams < self.n:
            raise bad("num_beams", beams, f">= n ({self.n}) for beam search")
        width = max(beams, self.samples())
        if width > max_batch_size:
            raise APIError(f"n/best_of/num_beams asks for {width} sequences at once; this server runs at most "
                           f"{max_batch_size} (max_batch_size)", param="n")
        if self.stream and (beams > 1 or self.samples() > self.n):
            raise APIError("stream is not supported with beam search or best_of > n", param="stream")
        stops = self.stop_list()
        if len(stops) > 4 or any(not s for s in stops):
            raise bad("stop", self.stop, "up to 4 non-empty strings")
        k = self.top_logprobs_count()
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise bad("logprobs", k, f"between 0 and {MAX_LOGPROBS}")


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_count(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def check(self, *, max_batch_size: int) -> None:
        super().check(max_batch_size=max_batch_size)
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise APIError(f"max_completion_tokens must be >= 1 (got {self.max_completion_tokens})",
                           param="max_completion_tokens")
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
    "APIError", "ChatCompletionRequest", "CompletionRequest", "SSE_DONE", "chat_body", "chat_logprobs",
    "check_length", "completion_body", "completion_logprobs", "error_body", "models_body", "new_id",
    "sampling_kwargs", "sse", "usage", "validation_error",
]
