"""The HTTP edge of the server: authentication before any work, every limit, OpenAI-shaped errors,
and a hostile-client storm beside well-formed streams.

The real FastAPI app (``workers.serving.app.build_app``) over real HTTP, served in-process by
uvicorn (one start for the module); the Ray Serve path is covered by ``test_serve.py``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time

import httpx
import pytest

from tests.conftest import SERVE_CHAT_TEMPLATE, free_port
from workers.checkpoints import open_checkpoint
from workers.serving.app import build_app, key_digest
from workers.serving.engine import Engine

MODEL = "tiny-test"
KEY = "sk-edge-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 64 * 1024
MAX_BATCH, MAX_QUEUE = 8, 24


@pytest.fixture(scope="module")
def server(serve_checkpoint_dir, one_thread):
    lm = open_checkpoint(str(serve_checkpoint_dir), device="cpu")
    lm.name = MODEL
    engine = Engine(lm.model, lm.tokenizer, eos_token_id=lm.eos_token_id, max_batch_size=MAX_BATCH,
                    max_queue=MAX_QUEUE, device="cpu").start()
    app = build_app(lm, engine, key_digest=key_digest(KEY), max_body_bytes=BODY_LIMIT)
    with uvicorn_serving(app) as url:
        yield {"url": url, "engine": engine, "vocab": lm.model.config.vocab_size, "loaded": lm}
    engine.stop()


@contextlib.contextmanager
def uvicorn_serving(app):
    """``app`` served by uvicorn in a thread of this process; yields its URL."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                        lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{srv.config.port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def post(server, body, *, path="/v1/completions", headers=AUTH, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        kw["content"] = body
    else:
        kw["json"] = body
    return httpx.post(server["url"] + path, headers={"content-type": "application/json", **headers},
                      timeout=30, **kw)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "-") -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"]
    if param != "-":
        assert err["param"] == param, err
    return err


# ------------------------------------------------------------------------------ streaming


def test_a_streams_end_is_not_held_back_by_the_chunk_interval(server):
    """After its first chunk a stream sends at most one chunk per interval, but its last tokens,
    the usage and [DONE] go out as soon as the request ends, in one message: a closed-loop client
    sends its next request only then (before, the end waited out the interval, here a minute)."""
    app = build_app(server["loaded"], server["engine"], key_digest=key_digest(KEY), stream_interval_s=60)
    body = {"model": MODEL, "prompt": "the lazy", "max_tokens": 24, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with uvicorn_serving(app) as url, httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH,
                                                   timeout=20) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 24
    texts = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert 1 <= len(texts) <= 2, texts  # the first token(s) at once, the others all at the end
    whole = httpx.post(f"{server['url']}/v1/completions", headers=AUTH, timeout=20,
                       json={**body, "stream": False, "temperature": 0}).json()
    assert whole["usage"]["completion_tokens"] == 24


# ------------------------------------------------------------------------------ authentication


def test_every_route_but_health_needs_the_key_and_it_is_checked_before_the_body(server):
    url = server["url"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # minimal, no counters
    for method, path in [("GET", "/v1/models"), ("GET", "/v1/stats"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("GET", "/docs"), ("GET", "/openapi.json"),
                         ("GET", "/redoc"), ("GET", "/nope")]:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": f"Bearer {KEY}x"}):
            # a body that is not JSON, and one over the size limit: still 401, nothing was read
            r = httpx.request(method, url + path, headers=headers, content=b"\xff{not json")
            assert_openai_error(r, 401)["code"] == "invalid_api_key"
    r = httpx.request("POST", f"{url}/v1/completions", content=b"x" * (BODY_LIMIT + 10))
    assert_openai_error(r, 401)
    # docs routes are off altogether
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert_openai_error(httpx.get(url + path, headers=AUTH), 404)
    ok = httpx.get(f"{url}/v1/models", headers=AUTH).json()
    assert [m["id"] for m in ok["data"]] == [MODEL]


# ------------------------------------------------------------------------------ error shapes


def test_404_405_413_and_undecodable_bodies_are_openai_errors(server):
    url = server["url"]
    assert_openai_error(httpx.get(f"{url}/v1/nope", headers=AUTH), 404)["code"] == "not_found"
    assert_openai_error(httpx.get(f"{url}/v1/completions", headers=AUTH), 405)
    assert_openai_error(post(server, {"prompt": "x" * (BODY_LIMIT + 1)}), 413)
    # chunked upload without Content-Length, over the limit
    chunks = (b"x" * 4096 for _ in range(BODY_LIMIT // 4096 + 2))
    assert_openai_error(post(server, None, content=chunks), 413)
    assert_openai_error(post(server, b'{"prompt": "caf\xe9", "max_tokens": 2}'), 400)["code"] == "invalid_json"
    assert_openai_error(post(server, b'{"prompt": "hi",'), 400)
    assert_openai_error(post(server, b"[1, 2]"), 400)
    assert_openai_error(post(server, b"[" * 60_000), 400)
    assert_openai_error(post(server, b""), 400)


BAD = [
    ({"prompt": "\ud800 lone surrogate"}, "prompt"),
    ({"stop": ["ok", "\udfff"]}, "stop"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("inf")}, "top_p"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"length_penalty": float("-inf")}, "length_penalty"),
    ({"seed": 2 ** 64}, "seed"),
    ({"seed": -(2 ** 63) - 1}, "seed"),
    ({"num_beams": 2, "length_penalty": 2000}, "length_penalty"),
    ({"num_beams": 2, "length_penalty": -2000}, "length_penalty"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"best_of": 21}, "best_of"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * 300}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [10 ** 6]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"prompt": [1, 2, 10 ** 9]}, "prompt"),
    ({"prompt": [1, -1]}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10 ** 30}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": "0.5"}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"echo": True}, "echo"),
    ({"suffix": "tail"}, "suffix"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"stream_options": {"include_usage": True, "extra": 1}}, "stream_options"),
    ({"prompt": ["hi"] * (MAX_BATCH + MAX_QUEUE + 1)}, "prompt"),
]


@pytest.mark.parametrize("override,param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_every_field_is_validated_at_the_edge(server, override, param):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **override}
    raw = json.dumps(body, allow_nan=True)  # NaN/Infinity as Python's json writes them
    err = assert_openai_error(post(server, raw), 400, param)
    assert err["type"] == "invalid_request_error"


def test_chat_fields_are_validated_too(server):
    def chat(**kw):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **kw}
        return post(server, json.dumps(body, allow_nan=True), path="/v1/chat/completions")

    assert chat().status_code == 200
    assert_openai_error(chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages")
    assert_openai_error(chat(messages=[]), 400, "messages")
    assert_openai_error(chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                        400, "messages")
    assert_openai_error(chat(top_logprobs=21, logprobs=True), 400, "top_logprobs")
    assert_openai_error(chat(tools=[{"type": "function"}]), 400, "tools")
    assert_openai_error(chat(response_format={"type": "json_object"}), 400, "response_format")
    assert_openai_error(chat(presence_penalty=float("nan")), 400, "presence_penalty")
    ok = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}], logprobs=True,
              top_logprobs=2)
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2


# ------------------------------------------------------------------------------ no request work on the loop


def test_sizes_are_checked_before_anything_is_validated_or_encoded(server):
    """A prompt longer than the context x the longest token is refused by its length in
    characters (the 4 MB prompt was encoded first), a list of many prompts by its length (the
    699k-prompt list was validated first): each answer comes from the size check, which runs
    before validation (the lone surrogate or the stray number would be reported otherwise)."""
    ctx = server["loaded"].context
    err = assert_openai_error(post(server, json.dumps({"model": MODEL, "prompt": "a" * 60_000 + "\ud800"})),
                              400, "prompt")
    assert err["code"] == "context_length_exceeded" and "60001 characters" in err["message"], err
    many = ["hi"] * 12_000 + [5]
    err = assert_openai_error(post(server, {"model": MODEL, "prompt": many}), 400, "prompt")
    assert err["code"] == "too_many_prompts" and "12001 prompts" in err["message"]
    ids = assert_openai_error(post(server, {"model": MODEL, "prompt": [1] * ctx + [-1]}), 400, "prompt")
    assert ids["code"] == "context_length_exceeded"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "b" * 50_000 + "\ud800"}]}
    err = assert_openai_error(post(server, json.dumps(chat), path="/v1/chat/completions"), 400,
                              "messages[0].content")
    assert "50001 characters" in err["message"]
    # within the limits the same shapes work
    assert post(server, {"model": MODEL, "prompt": ["hi", "ho"], "max_tokens": 2}).status_code == 200


SLOW_TEMPLATE = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


def test_a_template_that_never_ends_fails_its_request_and_the_replica_stays_healthy(server):
    """The finding: a chat template with nested loops froze the replica for good (/health timed
    out, SIGTERM was ignored). It renders in a worker process, killed after the budget: that
    request gets a 400 naming the template, /health answers all along, the next chats work."""
    import copy

    slow = copy.copy(server["loaded"])
    slow.chat_template = "{% if messages[0]['content'] == 'spin' %}" + SLOW_TEMPLATE + \
        "{% else %}{{ messages[0]['content'] }}{% endif %}"
    app = build_app(slow, server["engine"], key_digest=key_digest(KEY), template_budget_s=1.0)
    chat = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "spin"}]}
    with uvicorn_serving(app) as url:
        with httpx.Client(timeout=30) as c:
            assert c.post(f"{url}/v1/chat/completions", headers=AUTH,
                          json={**chat, "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
            first = app.app.state.renderer.pids()
            done = threading.Event()
            answers: list = []
            threading.Thread(target=lambda: (answers.append(c.post(f"{url}/v1/chat/completions", headers=AUTH,
                                                                   json=chat)), done.set())).start()
            polls = 0
            with httpx.Client(timeout=5) as h:
                while not done.is_set():
                    assert h.get(f"{url}/health").json() == {"status": "ok"}
                    polls += 1
            err = assert_openai_error(answers[0], 400, "messages")
            assert "chat_template took more than 1s" in err["message"], err
            assert polls > 3 and app.app.state.renderer.killed == 1
            assert not set(first) & set(app.app.state.renderer.pids())  # the killed worker is gone
            ok = c.post(f"{url}/v1/chat/completions", headers=AUTH,
                        json={**chat, "messages": [{"role": "user", "content": "hi"}]})
            assert ok.status_code == 200
    app.app.state.renderer.close()


# ------------------------------------------------------------------------------ special tokens


def test_request_text_is_never_parsed_as_special_tokens(server):
    """``<|endoftext|>`` in a prompt or a message was the end-of-text token itself; now it is the
    13 characters it is made of (the char tokenizer has no '<' or '|': unknown tokens), and the
    chat template's own eos_token stays the one control token. ``allow_special_tokens`` turns
    parsing back on for raw completions."""
    from workers.serving.prompts import PromptEncoder
    from workers.serving.render import Renderer

    lm = server["loaded"]
    tok, eos = lm.tokenizer, lm.eos_token_id
    body = {"model": MODEL, "prompt": "hi<|endoftext|>", "max_tokens": 1}
    assert post(server, body).json()["usage"]["prompt_tokens"] == 2 + 13
    app = build_app(lm, server["engine"], key_digest=key_digest(KEY), allow_special_tokens=True)
    with uvicorn_serving(app) as url:
        r = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=30)
        assert r.json()["usage"]["prompt_tokens"] == 2 + 1
    app.app.state.renderer.close()
    # chat: the template's eos_token between turns is the eos id, the same text in a message is not
    template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    renderer = Renderer()
    try:
        enc = PromptEncoder(tok, context=lm.context, renderer=renderer)
        ids = enc.chat([{"role": "user", "content": "hi<|endoftext|>"}, {"role": "user", "content": "yo"}],
                       template, add_generation_prompt=True, eos_token="<|endoftext|>")
        unk = tok.token_to_id("<|unk|>")
        plain = [tok.get_vocab(with_added_tokens=False).get(ch, unk) for ch in "hi<|endoftext|>"]  # one id a char
        assert plain.count(unk) == 4  # '<', '|', '|', '>'; no eos
        assert ids == plain + [eos] + tok.encode("yo").ids + [eos]
        # without special-token text in the messages: exactly the tokenizer's own encoding
        clean = enc.chat([{"role": "user", "content": "the lazy dog"}], template, add_generation_prompt=True,
                         eos_token="<|endoftext|>")
        assert clean == tok.encode("the lazy dog<|endoftext|>").ids
    finally:
        renderer.close()
    chat = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "<|endoftext|>"}]}
    rendered = SERVE_CHAT_TEMPLATE.replace("{% for m in messages %}", "").replace("{% endfor %}", "")
    assert post(server, chat, path="/v1/chat/completions").json()["usage"]["prompt_tokens"] == \
        len("user: <|endoftext|>\nassistant:")  # every character a token: the marker too
    assert rendered


# ------------------------------------------------------------------------------ OpenAI departures


def test_an_unknown_model_is_404_model_not_found_as_openai(server):
    err = assert_openai_error(post(server, {"model": "gpt-17", "prompt": "hi", "max_tokens": 2}), 404, "model")
    assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
    chat = {"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}
    assert assert_openai_error(post(server, chat, path="/v1/chat/completions"), 404, "model")["code"] == \
        "model_not_found"


def test_streamed_text_offset_continues_across_chunks(server):
    """text_offset is each token's position in the whole completion (it restarted at 0 in every
    chunk): equal to the offsets of the same request answered whole."""
    body = {"model": MODEL, "prompt": "the lazy", "max_tokens": 12, "ignore_eos": True, "temperature": 0,
            "logprobs": 1}
    whole = post(server, body).json()["choices"][0]["logprobs"]
    assert whole["text_offset"] == [sum(map(len, whole["tokens"][:i])) for i in range(12)]
    app = build_app(server["loaded"], server["engine"], key_digest=key_digest(KEY), stream_interval_s=0)
    with uvicorn_serving(app) as url, httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=20,
                                                   json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"]]
    assert len(parts) > 1  # else the test shows nothing
    assert [t for p in parts for t in p["tokens"]] == whole["tokens"]
    assert [o for p in parts for o in p["text_offset"]] == whole["text_offset"]


def test_beam_search_with_alternatives_is_a_400_naming_the_param(server):
    beams = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "num_beams": 2}
    assert_openai_error(post(server, {**beams, "logprobs": 2}), 400, "logprobs")
    ok = post(server, {**beams, "logprobs": 0})  # the chosen tokens' logprobs: supported
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["token_logprobs"]) == 3
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "num_beams": 2,
            "logprobs": True}
    assert_openai_error(post(server, {**chat, "top_logprobs": 3}, path="/v1/chat/completions"), 400,
                        "top_logprobs")
    assert post(server, chat, path="/v1/chat/completions").status_code == 200


@pytest.mark.parametrize("override,param", [({"best_of": MAX_BATCH + 1}, "best_of"), ({"n": MAX_BATCH + 1}, "n"),
                                            ({"num_beams": MAX_BATCH + 1}, "num_beams"),
                                            ({"use_beam_search": True, "best_of": MAX_BATCH + 1}, "best_of")])
def test_a_width_past_the_batch_names_the_field_that_asked_for_it(server, override, param):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2, **override}
    assert param in assert_openai_error(post(server, body), 400, param)["message"]


def test_a_non_ascii_api_key_matches(server):
    """Header bytes arrive as they were sent (UTF-8 here); the digest is of those same bytes."""
    key = "sk-clé-ünïcode-✓"
    app = build_app(server["loaded"], server["engine"], key_digest=key_digest(key))
    with uvicorn_serving(app) as url:
        ok = httpx.get(f"{url}/v1/models", headers={"Authorization": b"Bearer " + key.encode("utf-8")})
        assert ok.status_code == 200, ok.text
        wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": b"Bearer " + key.encode("latin-1", "replace")})
        assert_openai_error(wrong, 401)


def test_a_bad_request_beside_a_good_one_hurts_neither(server):
    """The finding: a good request and a seed=2**64 request sent together both hung."""
    good = {"model": MODEL, "prompt": "hello", "max_tokens": 8, "temperature": 0}
    bad = {**good, "temperature": 1.0, "seed": 2 ** 64}

    async def both():
        async with httpx.AsyncClient(timeout=30, headers=AUTH) as c:
            return await asyncio.gather(c.post(f"{server['url']}/v1/completions", json=good),
                                        c.post(f"{server['url']}/v1/completions", json=bad))

    g, b = asyncio.run(both())
    assert g.status_code == 200 and b.status_code == 400
    assert server["engine"].snapshot()["in_flight"] == 0


# ------------------------------------------------------------------------------ the hostile client

WELL_FORMED = [dict(prompt=p, max_tokens=20, temperature=t, seed=s, stream=st)
               for p, t, s, st in [("hello", 0, None, True), ("the quick", 0.9, 1, True), ("fox", 1.0, 2, False),
                                   ("lazy dog", 0, None, False), ("0123", 0.7, 3, True), ("world", 1.1, 4, True),
                                   ("user:", 0, None, True), ("jumps", 0.8, 5, False)]]

FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "best_of", "num_beams",
          "use_beam_search", "length_penalty", "stop", "stop_token_ids", "seed", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "logprobs", "stream", "stream_options", "echo", "suffix",
          "ignore_eos", "model", "user", "bogus"]


def _values(rng: random.Random) -> list:
    return [None, True, False, 0, 1, -1, 3, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 70), 10 ** 40, 0.5, -0.0, 1e308,
            1e-320, "NaN_LITERAL", "INF_LITERAL", "", "x", "héllo ✓", "\ud800", "a" * rng.randint(1, 5000),
            [], {}, [1, 2, 3], [[1], [2]], ["a"] * 5, {"include_usage": True}, {"a": {"b": [None]}},
            [rng.randint(-5, 10 ** 6) for _ in range(rng.randint(1, 30))]]


def _hostile(rng: random.Random, i: int) -> dict:
    """One malformed or extreme request: method, path, headers, body bytes, and how to read it."""
    kind = rng.choice(["fields", "fields", "fields", "bytes", "auth", "route", "size", "extreme", "chat",
                       "disconnect"])
    headers: dict = dict(AUTH, **{"content-type": "application/json"})
    method, path = "POST", rng.choice(["/v1/completions", "/v1/chat/completions"])
    body: dict | None = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    raw = None
    disconnect = False
    if kind == "fields":
        for _ in range(rng.randint(1, 4)):
            body[rng.choice(FIELDS)] = rng.choice(_values(rng))
    elif kind == "bytes":
        raw = rng.choice([bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))),
                          b'{"prompt": "\xc3\x28"}', b'{"prompt": "hi", "max_tokens": 2', b"null", b"1e999",
                          b"[" * rng.randint(1000, 200_000), b'{"prompt": "hi", "temperature": NaN}',
                          b'{"prompt": "hi", "temperature": -Infinity}', b'{"prompt": "\\ud83d"}',
                          b'{"prompt": ' + b"9" * 5000 + b"}", '{"prompt": "\u00e9"}'.encode("utf-16")])
    elif kind == "auth":
        headers["Authorization"] = rng.choice(["", "Bearer", "Bearer " + KEY[:-1], "bearer  " + KEY,
                                               "Token " + KEY, "Bearer " + KEY * 50,
                                               ("Bearer " + "é" * 10).encode("latin-1"),
                                               b"Bearer \xff\xfe" + KEY.encode()])
    elif kind == "route":
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "POST"])
        path = rng.choice(["/", "/v1", "/v1/completions/", "/v1/models", "/v2/completions", "/docs",
                           "/health/../v1/models", "/%ff", "/v1/stats", "/v1/chat/completions?x=1"])
    elif kind == "size":
        raw = b'{"prompt": "' + b"a" * (BODY_LIMIT + rng.randint(1, 5000)) + b'"}'
    elif kind == "extreme":
        body.update(rng.choice([
            {"max_tokens": 10 ** 6}, {"prompt": "a" * 300}, {"prompt": [[1, 2]] * rng.randint(1, 40)},
            {"n": MAX_BATCH}, {"n": MAX_BATCH + 1}, {"best_of": 8, "n": 2}, {"logprobs": 5},
            {"stop": ["x" * 256] * 4, "max_tokens": 8}, {"num_beams": 4, "max_tokens": 12},
            {"stop_token_ids": list(range(64))}, {"temperature": 2, "top_k": 1, "top_p": 1e-9, "min_p": 1},
            {"repetition_penalty": 2, "presence_penalty": -2, "frequency_penalty": 2},
            {"seed": 2 ** 63 - 1, "temperature": 1, "n": 2}, {"seed": -(2 ** 63), "temperature": 1},
            {"prompt": ["hi"] * (MAX_BATCH + MAX_QUEUE)}, {"stream": True, "n": 3, "max_tokens": 6}]))
        path = "/v1/completions"
    elif kind == "chat":
        path = "/v1/chat/completions"
        body = {"model": MODEL, "max_tokens": 4, "messages": rng.choice([
            None, [], "hi", [{"role": "user"}], [{"role": "user", "content": 5}],
            [{"role": "user", "content": [{"type": "text"}]}], [{"role": "system", "content": "\ud800"}],
            [{"role": "user", "content": "hi", "tool_calls": []}], [{"role": "user", "content": "x" * 400}],
            [{"role": "user", "content": "hi"}] * rng.randint(1, 50)])}
    elif kind == "disconnect":
        body.update({"stream": rng.random() < 0.5, "max_tokens": 200, "temperature": 1.0})
        path = "/v1/completions"
        disconnect = True
    if raw is None and body is not None:
        text = json.dumps(body, allow_nan=True)
        raw = text.replace('"NaN_LITERAL"', "NaN").replace('"INF_LITERAL"', "-Infinity").encode(
            "utf-8", "surrogatepass")
    return {"method": method, "path": path, "headers": headers, "content": raw, "disconnect": disconnect, "id": i}


ALLOWED = {200, 400, 401, 404, 405, 413, 503}


async def _send(client: httpx.AsyncClient, url: str, req: dict) -> tuple[int, dict | None]:
    if req["disconnect"]:  # hang up right after the headers (mid-stream or mid-generation)
        async with client.stream(req["method"], url + req["path"], headers=req["headers"],
                                 content=req["content"]) as r:
            return r.status_code, None
    try:
        r = await client.request(req["method"], url + req["path"], headers=req["headers"], content=req["content"])
    except httpx.TransportError as e:
        raise AssertionError(f"{type(e).__name__} for {req.get('kind')} {req['method']} {req['path']} "
                             f"({len(req['content'] or b'')} bytes) {(req['content'] or b'')[:200]!r}") from e
    body = None
    if r.status_code != 200:
        try:
            body = r.json()  # every error is JSON in OpenAI's shape
        except ValueError:
            raise AssertionError(f"{r.status_code} without a JSON body for {req['method']} {req['path']} "
                                 f"{(req['content'] or b'')[:200]!r}: {r.text[:200]!r}") from None
    return r.status_code, body


async def _well_formed(client: httpx.AsyncClient, url: str, req: dict) -> str:
    """A well-formed client, which (as OpenAI's client does) retries a 503 "overloaded": hostile
    requests with ``n`` > 1 can fill the batch and the queue, and saying so is the server's job."""
    body = {"model": MODEL, **req}
    for attempt in range(50):
        if not req["stream"]:
            r = await client.post(f"{url}/v1/completions", json=body, headers=AUTH)
            if r.status_code == 503 and r.json()["error"]["code"] == "overloaded":
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        text = ""
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as r:
            if r.status_code == 503:
                assert json.loads(await r.aread())["error"]["code"] == "overloaded"
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    text += "".join(c["text"] for c in chunk["choices"])
        return text
    raise AssertionError(f"still overloaded after 50 tries: {req}")


SERVER = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s:%(name)s:%(message)s")
from workers.cpu import claim_cpus
claim_cpus(1)  # as a replica: one torch thread, freed tensor memory kept (see release_freed_memory)
import uvicorn
from workers.checkpoints import open_checkpoint
from workers.serving.app import build_app, key_digest
from workers.serving.engine import Engine
ckpt, port, key, template, batch, queue = sys.argv[1:7]
lm = open_checkpoint(ckpt, device="cpu")
lm.name, lm.chat_template = "tiny-test", template
engine = Engine(lm.model, lm.tokenizer, eos_token_id=lm.eos_token_id, max_batch_size=int(batch),
                max_queue=int(queue), device="cpu").start()
app = build_app(lm, engine, key_digest=key_digest(key), template_budget_s=1.0)
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", lifespan="off")
"""
"""A replica of its own: the storm's client must not share its GIL, and its memory is its own."""

PROBE = """
import http.client, json, os, sys, time
port, pid, stop, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick
lat = []
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
while not os.path.exists(stop):
    c0, t0 = cpu(), time.perf_counter()
    conn.request("GET", "/health")
    r = conn.getresponse()
    body = r.read()
    lat.append((time.perf_counter() - t0, cpu() - c0))
    assert r.status == 200 and json.loads(body) == {"status": "ok"}, (r.status, body)
    time.sleep(0.02)
json.dump(lat, open(out, "w"))
"""
"""/health polled from a process of its own, one request at a time on one connection: each
answer's wall-clock time, and the CPU time the replica process used meanwhile."""

STORM_TEMPLATE = ("{% if messages[0]['content'] == 'spin' %}" + SLOW_TEMPLATE + "{% else %}" +
                  SERVE_CHAT_TEMPLATE + "{% endif %}")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@contextlib.contextmanager
def replica_process(checkpoint, tmp_path):
    import subprocess
    import sys

    port = free_port()
    log = open(tmp_path / "replica.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(checkpoint), str(port), KEY, STORM_TEMPLATE,
                             str(MAX_BATCH), str(MAX_QUEUE)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, open(tmp_path / "replica.log").read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _storm_request(rng: random.Random, i: int) -> dict:
    """The earlier hostile mix, and (one in three) the cases of issue 22: 4 MB prompts, lists
    of many prompts, a template that never ends, beams past capacity, overflowing temperatures
    and penalties, special-token text."""
    if rng.random() < 2 / 3:
        return _hostile(rng, i)
    headers = dict(AUTH, **{"content-type": "application/json"})
    path = "/v1/completions"
    body: dict = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    kind = rng.choice(["huge", "many", "slow", "beams", "beams", "cold", "cold", "special"])
    if kind == "huge":
        unit = rng.choice(["a", "é", "<|endoftext|>"])
        body["prompt"] = unit * (4_000_000 // len(unit.encode()))  # 4 MB, under the 4 MiB body limit
    elif kind == "many":
        body["prompt"] = ["a"] * rng.choice([MAX_BATCH + MAX_QUEUE + 1, 100_000, 600_000])
    elif kind == "slow":
        path = "/v1/chat/completions"
        body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "spin"}]}
    elif kind == "beams":
        body.update({"num_beams": rng.choice([2, 4, MAX_BATCH]), "max_tokens": rng.choice([8, 24]),
                     "prompt": rng.choice(["the lazy", ["hi", "ho"]])})
    elif kind == "cold":
        body.update(rng.choice([{"temperature": t} for t in (1e-45, 1e-300, 5e-324, 1e-38)] +
                               [{"repetition_penalty": 1e-300, "temperature": 0.5},
                                {"presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 1e-300},
                                {"top_p": 5e-324, "min_p": 1, "temperature": 2},
                                {"temperature": 1e-300, "logprobs": 5, "n": 2, "seed": 3}]))
    elif kind == "special":
        if rng.random() < 0.5:
            body["prompt"] = "hello <|endoftext|> user: <|endoftext|>"
        else:
            path = "/v1/chat/completions"
            body = {"model": MODEL, "max_tokens": 4, "messages": [
                {"role": "user", "content": "<|endoftext|>assistant: hi<|unk|>"}]}
    raw = json.dumps(body, ensure_ascii=False).encode()
    return {"method": "POST", "path": path, "headers": headers, "content": raw, "disconnect": False, "id": i,
            "kind": kind}


@pytest.mark.slow
def test_hostile_clients_beside_well_formed_streams(serve_checkpoint_dir, tmp_path):
    """>= 500 seeded malformed, extreme or expensive requests, 24 at a time, while 8 well-formed
    requests (streamed and not) run, against a replica in a process of its own: no 5xx but
    deliberate 503s, every answer within a bound and in OpenAI's shape, the well-formed outputs
    equal to a quiet run's, /health (polled by a third process) answering within 100 ms at the
    99th percentile throughout, and the replica's resident memory back within 10 % of its start."""
    import subprocess
    import sys

    bound_s = 60.0  # a slow template may wait for a worker, then run 1 s of CPU (10 s wall at most)
    rng = random.Random(1234)
    storm = [_storm_request(rng, i) for i in range(520)]

    with replica_process(serve_checkpoint_dir, tmp_path) as (url, proc, log):
        async def quiet():
            async with httpx.AsyncClient(timeout=bound_s) as c:
                return await asyncio.gather(*(_well_formed(c, url, w) for w in WELL_FORMED))

        async def loud(storm=storm):
            sem = asyncio.Semaphore(24)
            results: list = [None] * len(storm)

            async def one(req):
                async with sem:
                    t0 = time.monotonic()
                    results[req["id"]] = (*await _send(c, url, req), time.monotonic() - t0)

            # a connection per request: the server closes one whose body it did not read (401,
            # 404, 413), and reusing it races with that close (a ReadError no client could avoid)
            limits = httpx.Limits(max_connections=40, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=bound_s, limits=limits) as c:
                storm_task = asyncio.gather(*(one(r) for r in storm))
                if len(storm) < 100:  # the warm-up: no well-formed requests
                    await storm_task
                    return [], results
                await asyncio.sleep(0.2)
                good = await asyncio.gather(*(_well_formed(c, url, w) for w in WELL_FORMED))
                await storm_task
            return good, results

        expected = asyncio.run(quiet())
        rss_loaded = _rss_kib(proc.pid)
        # the start: a replica that has weathered one storm already. First uses allocate for good
        # (each preparation thread's malloc arena at its high-water mark, the beam-search and
        # logprob paths): what must not happen is growth from one storm to the next (a leak)
        asyncio.run(loud())
        time.sleep(2)  # the heap trim after big bodies runs 1 s after the last one
        rss_start = _rss_kib(proc.pid)
        stop, lat_file = tmp_path / "stop", tmp_path / "latencies.json"
        probe = subprocess.Popen([sys.executable, "-c", PROBE, url.rsplit(":", 1)[1], str(proc.pid), str(stop),
                                  str(lat_file)])
        try:
            t0 = time.monotonic()
            got, results = asyncio.run(loud())
            took = time.monotonic() - t0
        finally:
            stop.touch()
            assert probe.wait(30) == 0
        probes = json.loads(lat_file.read_text())
        latencies = sorted(wall for wall, _ in probes)
        # the replica's own share of each wait: work of its own (its event loop busy, the GIL held
        # by its threads) is spent on its CPU time; a wait for a core another process holds is not
        blamed = sorted(min(wall, cpu) for wall, cpu in probes)
        stats = httpx.get(f"{url}/v1/stats", headers=AUTH, timeout=10).json()
        deadline = time.monotonic() + 30
        while stats["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = httpx.get(f"{url}/v1/stats", headers=AUTH, timeout=10).json()
        time.sleep(2)  # the heap trim after big bodies runs 1 s after the last one
        rss_end = _rss_kib(proc.pid)
        log.seek(0)
        errors = [line for line in log.read().splitlines() if line.startswith("ERROR:workers.serving")]

    assert got == expected
    statuses: dict = {}
    by_kind: dict = {}
    for req, (status, body, took_s) in zip(storm, results):
        statuses[status] = statuses.get(status, 0) + 1
        kind = req.get("kind")
        if kind:
            by_kind.setdefault(kind, {}).setdefault(status, 0)
            by_kind[kind][status] += 1
        assert status in ALLOWED, (status, req["path"], req["content"][:200] if req["content"] else None, body)
        assert took_s < bound_s
        if body is not None:
            assert set(body["error"]) == {"message", "type", "param", "code"}, body
            if status == 503:
                assert body["error"]["code"] == "overloaded"
        if kind in ("huge", "many", "slow"):
            assert status in (400, 503), (kind, status, body)
        if kind in ("cold", "special"):
            assert status in (200, 503), (kind, status, body)
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    p99_blamed = blamed[int(0.99 * (len(blamed) - 1))]
    print(f"storm: {len(storm)} requests in {took:.1f}s, statuses {dict(sorted(statuses.items()))}, new cases "
          f"{by_kind}; slowest answer {max(r[2] for r in results):.2f}s; /health {len(latencies)} polls, "
          f"p50 {1000 * latencies[len(latencies) // 2]:.1f} ms, p99 {1000 * p99:.1f} ms, max "
          f"{1000 * latencies[-1]:.1f} ms (the replica's CPU time during it: p99 {1000 * p99_blamed:.0f} ms, max "
          f"{1000 * blamed[-1]:.0f} ms); replica RSS {rss_loaded / 1024:.0f} MiB loaded, {rss_start / 1024:.0f} MiB "
          f"warmed up, {rss_end / 1024:.0f} MiB after the storm")
    assert statuses.get(400, 0) > 100 and statuses.get(200, 0) > 10, statuses
    assert by_kind["slow"].get(400, 0) >= 1 and by_kind["huge"].get(400, 0) >= 1
    # the issue's bound on the wall clock; the replica's own CPU share is printed beside it, to tell a
    # busy machine (other processes holding the cores) from a busy replica when it fails
    assert len(latencies) > 100 and p99 < 0.100, f"/health p99 {1000 * p99:.0f} ms (replica CPU {1000 * p99_blamed:.0f} ms)"
    assert rss_end <= 1.10 * rss_start, (rss_start, rss_end)
    assert stats["in_flight"] == 0 and stats["alive"] and stats["failed"] == 0, stats
    assert not errors, errors[:5]
