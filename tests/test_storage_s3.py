"""`storage: s3://bucket/prefix` works like a local path, against a real S3-compatible HTTP server
(moto's) reached through pyarrow.fs: artifacts, run state and cache records all live in the
bucket; stages on Ray workers started before the test reach it too."""

from __future__ import annotations

import io
import json
import os
import textwrap
import threading

import pytest

from orchestrator import runs
from workers import storage
from tests.conftest import moto_s3
from orchestrator.state import RunState, StageState

FUNCS = '''
import json
from workers import storage

def write(ctx, text):
    (ctx.artifact_dir / "sub").mkdir()
    (ctx.artifact_dir / "sub" / "data.txt").write_text(text)
    return {"data": f"{ctx.output_uri}/sub/data.txt"}

def read(ctx):
    text = storage.read_bytes(ctx.inputs["write"]["data"]).decode()
    (ctx.artifact_dir / "upper.txt").write_text(text.upper())
    return {"upper": text.upper(), "file": f"{ctx.output_uri}/upper.txt"}
'''


@pytest.fixture(scope="module")
def s3():
    """A real S3 HTTP endpoint on 127.0.0.1 with one bucket; the AWS_* settings every client reads."""
    with moto_s3("orch") as (env, client):
        yield type("S3", (), {"env": env, "bucket": "orch", "client": client})


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def test_pipeline_on_s3_state_cache_and_outputs_in_the_bucket(ray_session, s3, tmp_path, tracking_uri):
    (tmp_path / "sfuncs.py").write_text(FUNCS)
    path = tmp_path / "ons3.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: ons3
        storage: s3://{s3.bucket}/runs
        tracking: {{uri: "{tracking_uri}"}}
        defaults: {{retries: 0}}
        stages:
          write: {{kind: python, config: {{entrypoint: "sfuncs:write", params: {{text: hello s3}}}}}}
          read: {{kind: python, needs: [write], config: {{entrypoint: "sfuncs:read"}}}}
    """))
    rec = runs.start_run(runs.prepare(path), stream=io.StringIO(), live=False)
    assert rec.state == RunState.SUCCEEDED, {n: (s.state, s.error) for n, s in rec.stages.items()}
    assert rec.storage == f"s3://{s3.bucket}/runs"
    assert rec.stages["read"].outputs["upper"] == "HELLO S3"  # a Ray worker read what another wrote
    assert storage.read_bytes(rec.stages["read"].outputs["file"]) == b"HELLO S3"
    keys = _keys(s3, "runs/")
    fp = {n: s.fingerprint for n, s in rec.stages.items()}
    assert f"runs/_runs/{rec.run_id}/state.json" in keys  # run state
    assert {f"runs/_cache/{fp['write']}.json", f"runs/_cache/{fp['read']}.json"} <= set(keys)  # cache records
    attempt = rec.stages["write"].outputs["data"][len(f"s3://{s3.bucket}/"):-len("/sub/data.txt")]
    assert attempt.startswith(f"runs/ons3/write/{fp['write'][:16]}/")  # the attempt's own location
    assert {f"{attempt}/sub/data.txt", f"{attempt}/{storage.MANIFEST}"} <= set(keys)  # folder structure kept
    assert not list(tmp_path.glob("**/_cache")), "nothing may land on local disk"
    # the run can be loaded back from the bucket through MLflow's pointer to it
    loaded = runs.load_record(rec.run_id, tracking_uri)
    assert loaded.uri.startswith("s3://") and loaded.state == RunState.SUCCEEDED

    again = runs.start_run(runs.prepare(path), stream=io.StringIO(), live=False)
    assert all(s.state == StageState.CACHED for s in again.stages.values())
    assert again.stages["read"].outputs == rec.stages["read"].outputs


def test_publish_and_download_round_trip(s3, tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    files = {"top.bin": os.urandom(70_000), "a/mid.txt": b"middle", "a/b/deep.json": b'{"k": 1}'}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    uri = f"s3://{s3.bucket}/roundtrip/ckpt"
    storage.publish_dir(src, uri)
    assert storage.exists(uri) and storage.exists(storage.join(uri, "a/b/deep.json"))
    assert storage.read_bytes(storage.join(uri, "a/mid.txt")) == b"middle"
    out = storage.download_dir(uri, tmp_path / "dst")
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    manifest = json.loads(got.pop(storage.MANIFEST))  # written last: the publication is complete
    assert got == files and set(manifest["files"]) == set(files) and storage.published(uri) is None
    assert storage.sha256_file(out / "top.bin") == storage.sha256_file(src / "top.bin")
    storage.delete(uri)
    assert not storage.exists(uri)


def test_writes_are_whole_or_absent_for_concurrent_readers(s3):
    """A PUT becomes visible only when complete: a reader polling while a big object is written
    (and then overwritten) sees nothing, the whole old object or the whole new one."""
    uri = f"s3://{s3.bucket}/atomic/blob.bin"
    # single PUTs (moto answers pyarrow's CompleteMultipartUpload in a way pyarrow 25 rejects;
    # real S3 makes multipart uploads visible only on completion too)
    old, new = b"a" * (4 << 20), b"b" * (4 << 20)
    seen: list[tuple[int, bytes]] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                data = storage.read_bytes(uri)
            except (FileNotFoundError, OSError):
                seen.append((0, b""))
                continue
            seen.append((len(data), data[:1] + data[-1:]))

    t = threading.Thread(target=reader)
    t.start()
    try:
        storage.write_bytes(uri, old)
        storage.write_bytes(uri, new)
    finally:
        stop.set()
        t.join(60)
    assert seen, "the reader never ran"
    assert {s for s in seen} <= {(0, b""), (len(old), b"aa"), (len(new), b"bb")}, sorted(set(seen))[:5]
    assert storage.read_bytes(uri) == new
    # json helpers go through the same path
    storage.write_json(f"s3://{s3.bucket}/atomic/x.json", {"k": [1, 2]})
    assert storage.read_json(f"s3://{s3.bucket}/atomic/x.json") == {"k": [1, 2]}


MANY = '''
import os
import uuid

def many(ctx, n, pid_file):
    token = uuid.uuid4().hex
    for i in range(n):
        (ctx.artifact_dir / f"part-{i:04d}.txt").write_text(token)
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))  # the process that publishes these files once this returns
    return {"token": token, "dir": ctx.output_uri, "n": n}
'''


def test_a_publish_killed_midway_is_never_a_cache_hit(ray_session, s3, tmp_path, tracking_uri):
    """Run 1 publishes; run 2 (--no-cache) is killed while copying its files to the bucket;
    run 3 must not take what run 2 left for a result: every file its outputs name is whole and
    of one attempt, and the half-published attempt is gone."""
    import signal
    import time

    (tmp_path / "manyfuncs.py").write_text(MANY)
    pid_file = tmp_path / "pid"
    path = tmp_path / "killpub.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: killpub
        storage: s3://{s3.bucket}/kp
        tracking: {{uri: "{tracking_uri}"}}
        defaults: {{retries: 0}}
        stages:
          many: {{kind: python, config: {{entrypoint: "manyfuncs:many", untracked: [params.pid_file],
                                          params: {{n: 400, pid_file: "{pid_file}"}}}}}}
    """))
    first = runs.start_run(runs.prepare(path), stream=io.StringIO(), live=False)
    assert first.state == RunState.SUCCEEDED
    base = first.stages["many"].outputs["dir"].rpartition("/")[0][len(f"s3://{s3.bucket}/"):]

    pid_file.unlink()
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("rec", runs.start_run(
        runs.prepare(path), no_cache=True, stream=io.StringIO(), live=False)), daemon=True)
    t.start()
    done = set(_keys(s3, base + "/"))
    killed = False
    deadline = time.time() + 180
    while t.is_alive() and time.time() < deadline:
        new = [k for k in _keys(s3, base + "/") if k not in done]
        if new and pid_file.exists() and not any(k.endswith(storage.MANIFEST) for k in new):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # mid-copy: some files are there, no manifest
            killed = True
            break
        time.sleep(0.02)
    t.join(120)
    assert killed, "the publish finished before it could be killed; raise n"
    assert result["rec"].state == RunState.FAILED
    half = {k.split("/")[len(base.split("/"))] for k in _keys(s3, base + "/") if k not in done}
    assert half, "the killed attempt left files (the case under test)"

    third = runs.start_run(runs.prepare(path), stream=io.StringIO(), live=False)
    assert third.state == RunState.SUCCEEDED
    out = third.stages["many"].outputs
    parts = [k for k in _keys(s3, out["dir"][len(f"s3://{s3.bucket}/"):] + "/") if "/part-" in k]
    assert len(parts) == out["n"]
    assert {s3.client.get_object(Bucket=s3.bucket, Key=k)["Body"].read().decode() for k in parts} == {out["token"]}
    left = {k.split("/")[len(base.split("/"))] for k in _keys(s3, base + "/")}
    assert not (half & left), "the half-published attempt is cleaned up"


LEAK = '''
import json

import ray

def hello(ctx):
    (ctx.artifact_dir / "x.txt").write_text("x")
    # the task's runtime_env, as Ray's state API and dashboard show it
    return {"runtime_env": json.dumps(dict(ray.get_runtime_context().runtime_env))}
'''


def test_secret_key_reaches_no_task_runtime_env_log_or_mlflow(ray_session, s3, tmp_path, tracking_uri, monkeypatch):
    import glob

    import ray
    from mlflow.tracking import MlflowClient

    secret = "s3cr3t-do-not-leak-7f3a9c"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto takes any key; stage tasks use the file
    (tmp_path / "leakfuncs.py").write_text(LEAK)
    path = tmp_path / "leak.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: leak
        storage: s3://{s3.bucket}/leak
        tracking: {{uri: "{tracking_uri}"}}
        defaults: {{retries: 0}}
        stages:
          leaky: {{kind: python, config: {{entrypoint: "leakfuncs:hello"}}}}
    """))
    stream = io.StringIO()
    rec = runs.start_run(runs.prepare(path), stream=stream, live=False)
    assert rec.state == RunState.SUCCEEDED, {n: (s.state, s.error) for n, s in rec.stages.items()}
    assert secret not in stream.getvalue()
    assert secret not in storage.read_bytes(rec.uri).decode()

    # (the session's Ray runs without a dashboard, which ray.util.state needs: the task reads its own)
    env = json.loads(rec.stages["leaky"].outputs["runtime_env"])["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == s3.env["AWS_ENDPOINT_URL"]  # the store's settings are forwarded...
    assert secret not in json.dumps(env) and "AWS_SECRET_ACCESS_KEY" not in env  # ...its secret is not

    logs = ray._private.worker._global_node.get_logs_dir_path()
    for f in glob.glob(f"{logs}/**/*", recursive=True):
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                assert secret.encode() not in fh.read(), f"secret in Ray log {f}"

    client = MlflowClient(tracking_uri)
    for run in client.search_runs([client.get_experiment_by_name("leak").experiment_id]):
        assert secret not in str(run.data.tags) + str(run.data.params)
