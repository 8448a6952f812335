"""`storage: s3://bucket/prefix` works like a local path, against a real S3-compatible HTTP server
(moto's) reached through pyarrow.fs: artifacts, run state and cache records all live in the
bucket; stages on Ray workers started before the test reach it too."""

from __future__ import annotations

import io
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
    assert f"runs/ons3/write/{fp['write'][:16]}/sub/data.txt" in keys  # artifacts, folder structure kept
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
    assert got == files
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
