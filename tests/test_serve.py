"""The serve stage kind: an OpenAI-compatible API on a real local Ray Serve, called over real HTTP
and with the official ``openai`` client. Serve starts once for the module (two applications on
one port: ``/main``, and ``/guarded`` with an API key and a tiny batch/queue) and is shut down
at the end."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from workers.data import tokenizer as toks
from tests.conftest import SERVE_CHAT_TEMPLATE, free_port
from workers.data.chat import render_chat
from workers.model.hf import load_pretrained
from workers.model.sampling import SamplingParams, generate

# Starting Serve with two replicas takes ~30-60 s of a loaded 2-core machine; kept in the default run.
pytestmark = pytest.mark.slow

MODEL = "tiny-test"
API_KEY = "sk-test-123"


@pytest.fixture(scope="module")
def checkpoint(serve_checkpoint_dir):
    return serve_checkpoint_dir


@pytest.fixture(scope="module")
def server(ray_session, checkpoint):
    from ray import serve

    from workers.serving.app import serve_checkpoint

    port = free_port()
    main = serve_checkpoint(str(checkpoint), port=port, blocking=False, max_batch_size=8, max_queue=16,
                            num_cpus=0.5, app_name="test-main", route_prefix="/main")
    guarded = serve_checkpoint(str(checkpoint), port=port, blocking=False, max_batch_size=1, max_queue=1,
                               api_key=API_KEY, num_cpus=0.5, app_name="test-guarded", route_prefix="/guarded")
    yield {"main": main, "guarded": guarded, "port": port}
    serve.shutdown()


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The same checkpoint run in-process by workers.model.sampling (what the server must reproduce)."""
    model = load_pretrained(checkpoint).eval()
    tok = toks.load(checkpoint / "tokenizer.json")

    def run(prompt: str, ignore_eos: bool = False, **kw):
        params = SamplingParams(**kw)
        eos = None if ignore_eos else toks.eos_id(tok)
        return generate(model, [tok.encode(prompt).ids], params, eos_token_id=eos, decode=tok.decode)[0]

    return run, tok


def client(url: str, key: str = "unused") -> openai.OpenAI:
    # max_retries=0: the client would otherwise retry 503s by itself
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def health(url: str, key: str | None = None) -> dict:
    """The replica's engine counters (/v1/stats)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{url}/v1/stats", timeout=10, headers=headers).json()


# ------------------------------------------------------------------------------ completions


def test_completion_matches_in_process_greedy_and_counts_usage(server, reference):
    run, tok = reference
    res = client(server["main"]).completions.create(model=MODEL, prompt="hello wor", max_tokens=12, temperature=0)
    ref = run("hello wor", max_tokens=12, temperature=0)[0]
    assert res.object == "text_completion" and res.model == MODEL
    assert res.choices[0].text == ref.text
    assert res.choices[0].finish_reason == ref.finish_reason
    assert res.usage.prompt_tokens == len(tok.encode("hello wor").ids)
    assert res.usage.completion_tokens == len(ref.token_ids)
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_list_prompt_with_n_gives_prompt_major_choices(server, reference):
    run, _ = reference
    prompts = ["the quick", "lazy dog", "0123"]
    res = client(server["main"]).completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=8,
                                                    temperature=0.9, seed=11)
    assert [c.index for c in res.choices] == list(range(6))
    for i, p in enumerate(prompts):
        ref = run(p, max_tokens=8, temperature=0.9, seed=11, n=2)  # sample j draws from seed + j
        assert [res.choices[2 * i + j].text for j in range(2)] == [c.text for c in ref]


def test_seed_makes_sampling_reproducible(server):
    c = client(server["main"])
    kw = dict(model=MODEL, prompt="hello", max_tokens=24, temperature=1.0, top_p=0.95, extra_body={"top_k": 20, "min_p": 0.01})
    a = c.completions.create(seed=1234, **kw).choices[0].text
    b = c.completions.create(seed=1234, **kw).choices[0].text
    other = [c.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)]
    assert a == b
    assert any(o != a for o in other)


def test_logprobs_are_the_chosen_tokens_with_alternatives(server, reference):
    run, _ = reference
    res = client(server["main"]).completions.create(model=MODEL, prompt="fox", max_tokens=6, temperature=0,
                                                    logprobs=3)
    lp = res.choices[0].logprobs
    ref = run("fox", max_tokens=6, temperature=0, logprobs=True)[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ref.token_ids)
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely


def test_stop_string_truncates_text(server):
    c = client(server["main"])
    kw = dict(model=MODEL, prompt="hello", max_tokens=30, temperature=1.0, seed=5)
    full = c.completions.create(**kw).choices[0].text
    stop = full[6:8]
    cut = full.find(stop)
    res = c.completions.create(stop=[stop], **kw).choices[0]
    assert res.text == full[:cut]
    assert res.finish_reason == "stop"


def test_beam_search_returns_n_best_beams(server, reference):
    run, _ = reference
    res = httpx.post(f"{server['main']}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "the lazy", "max_tokens": 6, "n": 2, "use_beam_search": True, "best_of": 3})
    assert res.status_code == 200, res.text
    ref = run("the lazy", max_tokens=6, n=2, num_beams=3)
    assert [c["text"] for c in res.json()["choices"]] == [c.text for c in ref]


# ------------------------------------------------------------------------------ chat


def test_chat_renders_the_checkpoint_template(server, reference):
    run, tok = reference
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    res = client(server["main"]).chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                         temperature=0)
    prompt = render_chat(messages, SERVE_CHAT_TEMPLATE)
    assert prompt == "system: be brief\nuser: hello\nassistant:"
    ref = run(prompt, max_tokens=10, temperature=0)[0]
    assert res.object == "chat.completion"
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == ref.text
    assert res.usage.prompt_tokens == len(tok.encode(prompt).ids)


# ------------------------------------------------------------------------------ streaming


def test_streamed_completion_equals_the_whole_one(server):
    c = client(server["main"])
    kw = dict(model=MODEL, prompt="quick brown", max_tokens=20, temperature=0.7, seed=3)
    whole_res = c.completions.create(**kw)
    whole = whole_res.choices[0]
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert all(ch.object == "text_completion" for ch in chunks)
    assert text == whole.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole_res.usage


def test_streamed_chat_sends_role_then_deltas_then_done(server):
    url = server["main"]
    messages = [{"role": "user", "content": "hi"}]
    whole = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                      temperature=0, stream=True))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # the raw wire format: SSE data lines ending with [DONE]
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": messages, "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[1][6:])["choices"][0]["delta"]["content"] is not None


# ------------------------------------------------------------------------------ models, health


def test_models_and_health(server):
    models = client(server["main"]).models.list()
    assert [m.id for m in models.data] == [MODEL]
    h = health(server["main"])
    assert h["model"] == MODEL and h["alive"]
    assert httpx.get(f"{server['main']}/health", timeout=10).json() == {"status": "ok"}


# ------------------------------------------------------------------------------ errors

BAD = [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"prompt": "x" * 300}, "prompt"),
    ({"n": "three"}, "n"),
    ({"prompt": None}, "prompt"),
]


@pytest.mark.parametrize("override,param", BAD, ids=[p for _, p in BAD])
def test_bad_request_is_400_with_openai_error_body(server, override, param):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **override}
    r = httpx.post(f"{server['main']}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"]


def test_malformed_json_is_400(server):
    r = httpx.post(f"{server['main']}/v1/completions", content=b'{"prompt": "hi",', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "JSON" in r.json()["error"]["message"]


def test_openai_client_raises_bad_request(server):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client(server["main"]).completions.create(model=MODEL, prompt="hi", temperature=-1)


def test_api_key_is_required_when_set(server):
    url = server["guarded"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(url, key="sk-wrong").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    ok = client(url, key=API_KEY).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert ok.usage.completion_tokens >= 1
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # probes need no key


# ------------------------------------------------------------------------------ load behaviour


def test_past_the_queue_limit_requests_get_503_with_retry_after(server):
    url = server["guarded"]  # max_batch_size=1, max_queue=1: one runs, one waits, the rest bounce

    def call(_):
        return httpx.post(f"{url}/v1/completions", timeout=120, headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"prompt": "hello", "max_tokens": 200, "temperature": 1.0})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 503 in codes, codes
    assert set(codes) <= {200, 503}
    rejected = [r for r in results if r.status_code == 503]
    assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
    # the replica's own answer (Serve's bound in front of it is looser and carries no JSON body)
    assert any(r.headers["content-type"].startswith("application/json") and
               r.json()["error"]["code"] == "overloaded" for r in rejected)
    assert health(url, API_KEY)["in_flight"] == 0


def test_client_disconnect_mid_stream_frees_the_slot(server):
    url = server["main"]
    before = health(url)["aborted"]
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "hello", "max_tokens": 240, "temperature": 1.0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk in, then hang up
    deadline = time.monotonic() + 20
    h = health(url)
    while (h["in_flight"] or h["aborted"] == before) and time.monotonic() < deadline:
        time.sleep(0.1)
        h = health(url)
    assert h["in_flight"] == 0
    assert h["aborted"] == before + 1  # cut short, not run to max_tokens


def test_concurrent_requests_share_decode_steps(server, reference):
    url = server["main"]
    run, _ = reference
    before = health(url)["batch_hist"]
    prompts = [f"{w} " for w in ("the", "quick brown", "fox", "jumps over", "lazy", "dog.", "hello world", "0")]
    start = threading.Barrier(len(prompts))

    # long enough (no early EOS) that the requests' HTTP arrivals overlap in decoding on a busy machine
    def call(p):
        start.wait()
        return client(url).completions.create(model=MODEL, prompt=p, max_tokens=160, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(call, prompts))
    after = health(url)["batch_hist"]
    grew = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
    assert max(grew) >= 4, grew  # several requests decoded in the same steps
    # joining a running batch (continuous batching) does not change anyone's result
    assert texts == [run(p, max_tokens=160, temperature=0, ignore_eos=True)[0].text for p in prompts]


# ------------------------------------------------------------------------------ the stage kind


def test_serve_stage_deploys_upstream_checkpoint(server, checkpoint, tmp_path):
    from ray import serve

    from workers.kinds import serve as kind
    from workers.stage import Resources, local_context

    ctx = local_context(tmp_path, stage="serve", inputs={"train": {"checkpoint": str(checkpoint)}},
                        resources=Resources(cpus=0.5))
    cfg = kind.Config(port=server["port"], model_name="staged", max_batch_size=2)
    out = kind.run(ctx, cfg)
    try:
        assert out == {"endpoint": f"http://127.0.0.1:{server['port']}", "model": "staged"}
        tags = [e["tags"] for e in ctx.sink.events if e["type"] == "tags"]
        assert tags and tags[0]["endpoint"] == out["endpoint"]
        res = client(out["endpoint"]).completions.create(model="staged", prompt="hi", max_tokens=3)
        assert res.model == "staged" and res.usage.completion_tokens >= 1
    finally:
        serve.delete(kind.app_name("serve"))
    assert kind.DISTRIBUTED is True


def test_serve_config_errors_name_the_field(tmp_path):
    from pydantic import ValidationError

    from workers.kinds import serve as kind
    from workers.stage import local_context

    with pytest.raises(ValidationError, match="replica"):
        kind.Config(replica=2)
    with pytest.raises(ValidationError, match=r"max_replicas \(1\) must be >= autoscaling.min_replicas \(3\)"):
        kind.Config(autoscaling={"min_replicas": 3, "max_replicas": 1})
    ctx = local_context(tmp_path, inputs={"a": {"checkpoint": "x"}, "b": {"checkpoint": "y"}})
    with pytest.raises(ValueError, match="exactly one upstream"):
        kind.run(ctx, kind.Config())
    with pytest.raises(ValueError, match="input: got 'nope'; neither an upstream"):
        kind.run(ctx, kind.Config(input="nope"))


# ------------------------------------------------------------------------------ lifecycle


def test_a_timed_out_serve_stage_leaves_no_serve_application(server, checkpoint, tmp_path, tracking_uri):
    """The stage times out while its replica cannot be placed (it asks for more CPUs than the
    session's Ray has free beside this module's two replicas): the executor kills the attempt
    and the kind's cleanup removes the Serve application."""
    import io

    from ray import serve

    from orchestrator import runs
    from orchestrator.state import StageState
    from workers.kinds import serve as kind

    (tmp_path / "upfuncs.py").write_text("def ckpt(ctx, path):\n    return {'checkpoint': path}\n")
    path = tmp_path / "servetimeout.yaml"
    path.write_text(f"""name: servetimeout
storage: {tmp_path / 'artifacts'}
tracking: {{uri: "{tracking_uri}"}}
defaults: {{retries: 0}}
stages:
  up: {{kind: python, config: {{entrypoint: "upfuncs:ckpt", params: {{path: "{checkpoint}"}}}}}}
  web: {{kind: serve, needs: [up], timeout_s: 25, resources: {{cpus: 3.75}}, config: {{port: {server['port']}}}}}
""")
    seen = threading.Event()
    stop = threading.Event()

    def watch():  # the application did exist while the stage ran
        while not stop.is_set():
            if kind.app_name("web") in serve.status().applications:
                seen.set()
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rec = runs.start_run(runs.prepare(str(path), []), stream=io.StringIO(), live=False)
    finally:
        stop.set()
        watcher.join(5)
    assert rec.stages["web"].state == StageState.FAILED and "timed out" in rec.stages["web"].error
    assert seen.is_set()
    assert kind.app_name("web") not in serve.status().applications


def test_api_key_comes_from_a_file_or_an_env_var_never_the_config(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from workers.kinds import serve as kind
    from workers.serving.app import api_key_from

    f = tmp_path / "key"
    f.write_text("sk-file\n")
    assert api_key_from(file=f) == "sk-file"
    monkeypatch.setenv("MY_KEY", "sk-env")
    assert api_key_from(env="MY_KEY") == "sk-env"
    with pytest.raises(ValueError, match="'UNSET_KEY'"):
        api_key_from(env="UNSET_KEY")
    with pytest.raises(ValidationError, match="api_key"):
        kind.Config(api_key="sk-in-the-yaml")
    with pytest.raises(ValidationError, match="not both"):
        kind.Config(api_key_env="MY_KEY", api_key_file=str(f))


def test_cli_serve_takes_no_key_argument():
    from orchestrator.cli import build_parser

    p = build_parser()
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "ckpt", "--api-key", "sk-visible-in-ps"])
    assert p.parse_args(["serve", "ckpt", "--api-key-file", "/run/secrets/key"]).api_key_file == "/run/secrets/key"


def test_beam_search_over_http_stops_when_its_client_leaves(server):
    url = server["main"]
    h0 = health(url)
    before = h0["aborted"]
    body = json.dumps({"model": MODEL, "prompt": "the lazy", "max_tokens": 240, "num_beams": 8,
                       "ignore_eos": True}).encode()
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port))) as sock:  # a client that hangs up mid-request
        sock.sendall(b"POST /main/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        # hang up once it is submitted (a request still being prepared is dropped, not aborted;
        # compare with the count before: a request of an earlier test may still be finishing)
        while health(url)["in_flight"] <= h0["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)
    deadline = time.monotonic() + 30
    while health(url)["aborted"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    h = health(url)
    assert h["aborted"] == before + 1 and h["in_flight"] == 0


def test_the_api_key_reaches_no_log_and_no_deployment_config(server):
    """Run after the guarded server answered requests with the key (right and wrong ones)."""
    import ray
    from pathlib import Path

    from ray import serve

    ok = client(server["guarded"], key=API_KEY).models.list()
    assert ok.data
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    leaked = [p for p in session.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000
              and API_KEY.encode() in p.read_bytes()]
    assert not leaked, leaked
    status = serve.status().applications["test-guarded"]
    assert API_KEY not in repr(status)
