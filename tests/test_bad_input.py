"""Issue 22, "Pipelines and CLI" and "Secrets": bounded YAML, bounded numbers, one-line CLI
errors, the cluster check of the training kinds, secrets found by parsing and kept out of what is
printed, saved and logged; then a seeded fuzz of 240 malformed pipeline files through
``orchestrator validate`` (in-process ``main``; a couple through the real command).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.errors import SpecError

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _one_line(argv: list[str], *match: str) -> str:
    rc, out, err = _run(argv)
    assert rc == 2, (argv, rc, out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, (argv, err)
    for m in match:
        assert m in err, (argv, m, err)
    return err


def _spec(tmp: Path, **defaults) -> dict:
    return {"name": "fuzz", "storage": str(tmp / "artifacts"), "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"},
            "defaults": {"retries": 1, "retry_backoff_s": 0.5, **defaults},
            "stages": {"prepare": {"kind": "python", "config": {"entrypoint": "json:dumps", "params": {"obj": 1}},
                                   "resources": {"cpus": 1}},
                       "train": {"kind": "pretrain", "needs": ["prepare"], "resources": {"workers": 1},
                                 "config": {"data": "prepare", "model": "tiny", "max_steps": 10, "lr": 0.001,
                                            "batch_size": 2}}}}


def _write(path: Path, spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False) if not isinstance(spec, str) else spec)
    return path


def test_the_base_spec_is_valid(tmp_path):
    rc, out, err = _run(["validate", str(_write(tmp_path / "p.yaml", _spec(tmp_path)))])
    assert rc == 0, err
    assert "2 stages" in out


# -------------------------------------------------------------------------------- YAML


def _bomb(levels: int, width: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\nname: bomb\nstages: {a: {kind: python, config: {entrypoint: 'json:dumps'}}}\n"


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    t0 = time.perf_counter()
    _one_line(["validate", str(_write(tmp_path / "p.yaml", _bomb(9)))],
              "expands to more than 100000 values (aliases included)")
    assert time.perf_counter() - t0 < 5
    # a few aliases are fine: only the expansion is bounded
    from orchestrator.yamlio import load_yaml_text

    assert load_yaml_text(_bomb(3))["l2"][0][0] == ["lol"] * 9


@pytest.mark.parametrize("text, match", [
    ("a: &a [*a]\nname: x\n", "recursive alias at line 1, column 4"),
    ("a: &a {b: *a}\nname: x\n", "recursive alias at line 1"),
    ("a: " + "[" * 150 + "]" * 150 + "\n", "nested more than 64 levels deep"),
    ("a: " + "[" * 5000 + "\n", "nested more than 64 levels deep"),
    ("".join("  " * i + "a:\n" for i in range(120)) + "  " * 120 + "1\n", "nested"),
], ids=["recursive-list", "recursive-map", "deep", "deep-unclosed", "deep-block"])
def test_recursive_and_deep_yaml(tmp_path, text, match):
    _one_line(["validate", str(_write(tmp_path / "p.yaml", text))], match)


def test_a_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_bytes(b"name: caf\xe9\nstages: {}\n")
    _one_line(["validate", str(p)], "not UTF-8 text: byte 0xe9 at line 1")


# -------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("path, value, match", [
    ("defaults.retry_backoff_s", ".inf", "defaults.retry_backoff_s: Input should be a finite number"),
    ("defaults.retry_backoff_s", "1.0e+9", "defaults.retry_backoff_s: Input should be less than or equal to 3600"),
    ("defaults.retries", "1000", "defaults.retries: Input should be less than or equal to 100"),
    ("defaults.timeout_s", ".nan", "defaults.timeout_s: Input should be a finite number"),
    ("stages.train.retry_backoff_s", "-.inf", "stages.train.retry_backoff_s: Input should be a finite number"),
    ("stages.prepare.resources.cpus", ".nan", "stages.prepare.resources.cpus: Input should be a finite number"),
    ("stages.train.resources.workers", "1000000000", "stages.train.resources.workers: Input should be less than"),
    ("ray.num_cpus", "10000000", "ray.num_cpus: Input should be less than or equal to 100000"),
    ("stages.train.config.lr", ".inf", "stages.train.config.lr: Input should be a finite number"),
    ("stages.train.config.max_steps", "100000000000000000000", "stages.train.config.max_steps: must be at most 1e+12"),
    ("stages.train.config.eval_steps", "100000000000000", "stages.train.config.eval_steps: must be at most 1e+12"),
])
def test_numbers_are_finite_and_bounded(tmp_path, path, value, match):
    p = _write(tmp_path / "p.yaml", _spec(tmp_path))
    _one_line(["validate", str(p), "--set", f"{path}={value}"], match)


def _models(model, seen=None):
    """Every pydantic model reachable from ``model``'s fields."""
    import typing

    from pydantic import BaseModel

    seen = seen if seen is not None else set()
    if model in seen:
        return seen
    seen.add(model)

    def walk(tp):
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            _models(tp, seen)
        for a in typing.get_args(tp):
            walk(a)
    for f in model.model_fields.values():
        walk(f.annotation)
    return seen


def test_every_spec_and_kind_config_model_bounds_its_numbers():
    """Every model a user's YAML reaches refuses inf/NaN and bounds its numbers (``StrictConfig``)."""
    from orchestrator.spec import Pipeline
    from workers import KINDS, load_kind
    from workers.config import StrictConfig

    models = _models(Pipeline)
    for kind in KINDS:
        models |= _models(load_kind(kind).Config)
    loose = sorted(m.__qualname__ for m in models if not issubclass(m, StrictConfig))
    assert not loose
    assert all(m.model_config.get("allow_inf_nan") is False and m.model_config.get("extra") == "forbid"
               for m in models)
    assert len(models) > 15


# -------------------------------------------------------------------------------- CLI


# One bad value for every option of every command (and the positional arguments).
BAD_ARGS = [
    (["generate", "ckpt", "--prompt", ""], "argument --prompt: got ''; must not be empty"),
    (["generate", "ckpt", "--prompt", "a", "--device", "foo"], "argument --device: got 'foo'; allowed: cpu, cuda"),
    (["generate", "ckpt", "--prompt", "a", "--device", "cuda:7"], "argument --device: got 'cuda:7'"),
    (["generate", "", "--prompt", "a"], "argument CHECKPOINT_OR_RUN: got ''"),
    (["generate", "ckpt", "--prompt", "a", "--max-tokens", "0"], "argument --max-tokens: got 0; must be an integer >= 1"),
    (["generate", "ckpt", "--prompt", "a", "--temperature", "inf"], "argument --temperature: got 'inf'; must be a finite"),
    (["generate", "ckpt", "--prompt", "a", "--temperature", "x"], "argument --temperature: got 'x'; expected a number"),
    (["generate", "ckpt", "--prompt", "a", "--top-k", "-1"], "argument --top-k: got -1"),
    (["generate", "ckpt", "--prompt", "a", "--top-p", "nan"], "argument --top-p: got 'nan'"),
    (["generate", "ckpt", "--prompt", "a", "--min-p=-inf"], "argument --min-p: got '-inf'"),
    (["generate", "ckpt", "--prompt", "a", "--repetition-penalty", "nan"], "argument --repetition-penalty"),
    (["generate", "ckpt", "--prompt", "a", "--presence-penalty", "inf"], "argument --presence-penalty"),
    (["generate", "ckpt", "--prompt", "a", "--frequency-penalty", "inf"], "argument --frequency-penalty"),
    (["generate", "ckpt", "--prompt", "a", "--num-beams", "0"], "argument --num-beams: got 0"),
    (["generate", "ckpt", "--prompt", "a", "--length-penalty", "nan"], "argument --length-penalty"),
    (["generate", "ckpt", "--prompt", "a", "--n", "0"], "argument --n: got 0"),
    (["generate", "ckpt", "--prompt", "a", "--stop", ""], "argument --stop: got ''"),
    (["generate", "ckpt", "--prompt", "a", "--seed", "-1"], "argument --seed: got -1"),
    (["generate", "ckpt", "--prompt", "a", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["generate", "ckpt", "--prompt", "a", "--tracking-uri", ""], "argument --tracking-uri: got ''"),
    (["serve", "ckpt", "--port", "0"], "argument --port: got 0; must be an integer in [1, 65535]"),
    (["serve", "ckpt", "--port", "65536"], "argument --port: got 65536"),
    (["serve", "ckpt", "--host", ""], "argument --host: got ''"),
    (["serve", "ckpt", "--replicas", "0"], "argument --replicas: got 0"),
    (["serve", "ckpt", "--max-batch-size", "0"], "argument --max-batch-size: got 0"),
    (["serve", "ckpt", "--max-queue", "-1"], "argument --max-queue: got -1"),
    (["serve", "ckpt", "--model-name", " "], "argument --model-name: got ' '"),
    (["serve", "ckpt", "--api-key-file", ""], "argument --api-key-file: got ''"),
    (["serve", "ckpt", "--address", ""], "argument --address: got ''"),
    (["list", "--limit", "-1"], "argument --limit: got -1; must be an integer in [1, 100000]"),
    (["list", "--limit", "ten"], "argument --limit: got 'ten'; expected an integer"),
    (["status", ""], "argument RUN_ID: got ''"),
    (["resume", "", "--plain"], "argument RUN_ID: got ''"),
    (["resume", "abc", "--address", ""], "argument --address: got ''"),
    (["cancel", ""], "argument RUN_ID: got ''"),
    (["ui", "--port", "-5"], "argument --port: got -5"),
    (["ui", "--host", ""], "argument --host: got ''"),
    (["validate", ""], "argument FILE: got ''"),
    (["validate", "p.yaml", "--set", ""], "argument --set: got ''"),
    (["run", "p.yaml", "--address", " "], "argument --address: got ' '"),
    (["submit", "p.yaml", "--address", "http://h:8265", "--wait-run-id", "inf"], "argument --wait-run-id: got 'inf'"),
    (["submit", "p.yaml", "--address", "http://h:8265", "--wait-run-id", "-1"], "argument --wait-run-id: got '-1'"),
    (["submit", "p.yaml", "--address", "http://h:8265", "--env", ""], "argument --env: got ''"),
    (["submit", "p.yaml", "--address", "http://h:8265", "--exclude", ""], "argument --exclude: got ''"),
    (["submit", "p.yaml", "--address", "http://h:8265", "--working-dir", ""], "argument --working-dir: got ''"),
    (["submit", "p.yaml"], "the following arguments are required: --address"),
    (["logs", "", "--address", "http://h:8265"], "argument JOB_ID: got ''"),
    (["bogus"], "invalid choice: 'bogus'"),
]


@pytest.mark.parametrize("argv, match", BAD_ARGS, ids=[" ".join(a)[:40] for a, _ in BAD_ARGS])
def test_every_cli_argument_is_validated_in_one_line(argv, match):
    _one_line(argv, match, f"(see orchestrator {argv[0] + ' ' if argv[0] != 'bogus' else ''}--help)".replace(" --", " --"))


def test_sampling_combinations_are_one_line_before_loading():
    _one_line(["generate", "/nonexistent-ckpt", "--prompt", "a", "--top-p", "2"], "--top-p: got 2.0; must be in (0, 1]")


# -------------------------------------------------------------------------------- cluster


@pytest.mark.parametrize("kind", ["pretrain", "finetune", "reward"])
def test_training_kinds_check_they_fit_the_cluster(ray_session, tmp_path, kind):
    """More Ray Train workers than the local cluster's CPUs: the attempt fails at once, naming
    stages.<stage>.resources.workers, instead of waiting forever for workers it cannot place."""
    from workers import load_kind
    from workers.cluster import ClusterTooSmall
    from workers.stage import Resources, local_context
    from workers.training import loop

    assert "fit" in load_kind(kind).run.__code__.co_names  # every training kind trains through loop.fit
    ctx = local_context(tmp_path, stage="train", resources=Resources(cpus=1, workers=64))
    t0 = time.perf_counter()
    with pytest.raises(ClusterTooSmall, match=r"stage 'train' needs 64 CPUs at once, the cluster has \d+ in all: "
                                              r"64 Ray Train workers \(stages.train.resources.workers\)"):
        loop.fit(ctx, job=None)
    assert time.perf_counter() - t0 < 30


# -------------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("text, redacted", [
    ("postgresql://u:Pa55/w0rd@host/db", "postgresql://***@host/db"),
    ("https://TOKEN@host/x", "https://***@host/x"),
    ("see http://bob:pw@host:5000/x and s3://b/k", "see http://***@host:5000/x and s3://b/k"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc&v=1",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&v=1"),
    ("https://acct.blob.core.windows.net/c/f?sv=2020&sig=SeCr3t%3D", "https://acct.blob.core.windows.net/c/f?sv=2020&sig=***"),
    ("http://h/cb#access_token=abc&state=1", "http://h/cb#access_token=***&state=1"),
    ("'https://h/api?token=abc'", "'https://h/api?token=***'"),
    ("s3://bucket/key@v1 https://host:8080/a@b sqlite:///mlflow.db abfs://c@a.dfs.core.windows.net/x",
     "s3://bucket/key@v1 https://host:8080/a@b sqlite:///mlflow.db abfs://c@a.dfs.core.windows.net/x"),
    ("wasbs://c:K3y@a.blob.core.windows.net/x", "wasbs://***@a.blob.core.windows.net/x"),
])
def test_uri_credentials_are_found_by_parsing(text, redacted):
    from orchestrator.secrets import redact

    assert redact(text) == redacted


@pytest.mark.parametrize("uri", ["postgresql://u:Pa55/w0rd@host/db", "https://Tok3nXyz@host", "https://h/x?access_token=Pa55"])
def test_spec_refuses_credentials_and_validate_never_prints_them(tmp_path, monkeypatch, uri):
    spec = _spec(tmp_path)
    spec["stages"]["prepare"]["config"]["params"]["obj"] = uri
    err = _one_line(["validate", str(_write(tmp_path / "p.yaml", spec))],
                    "stages.prepare.config.params.obj: a URI with credentials")
    assert "Pa55" not in err and "Tok3nXyz" not in err
    # the tracking store from the environment: printed redacted
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/x.db?token=SeCr3t")
    rc, out, err = _run(["validate", str(_write(tmp_path / "q.yaml", _spec(tmp_path)))])
    assert rc == 0, err
    assert "tracking sqlite:///" in out and "SeCr3t" not in out + err


def test_state_json_and_mlflow_params_are_redacted(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    from orchestrator.state import RunRecord, RunState, StageRecord, StageState
    from orchestrator.tracking import Tracker

    rec = StageRecord(name="a", kind="python", fingerprint="f", state=StageState.FAILED,
                      error="cannot reach postgresql://u:Pa55/w0rd@db/x", traceback="at https://TOKEN@host/y")
    record = RunRecord(run_id="r1", pipeline="p", state=RunState.FAILED, raw_spec={}, source="p.yaml",
                       storage=str(tmp_path), tracking_uri="sqlite:///x", experiment="p", stages={"a": rec})
    record.save()
    saved = Path(record.uri).read_text()
    assert "Pa55" not in saved and "TOKEN" not in saved and "postgresql://***@db/x" in saved

    tracker = Tracker(tracking_uri, "p")
    parent = tracker.start_pipeline("p", "name: p", {"name": "p"}, "")
    child = tracker.start_stage(parent, rec, {"source": "https://h/d?sig=SeCr3t", "n": 1}, {"cpus": 1})
    tracker.flush(timeout=60)
    run = MlflowClient(tracking_uri).get_run(tracker.run_id_of(child))
    tracker.close()
    assert run.data.params["config.source"] == "https://h/d?sig=***"
    assert "SeCr3t" not in json.dumps(run.data.params)


def test_client_env_is_an_allowlist(monkeypatch):
    from workers import storage

    for name in storage.CLIENT_ENV | storage.SECRET_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1", "AWS_PROFILE": "p",
                        "AWS_SHARED_CREDENTIALS_FILE": "/c", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
                        "HADOOP_CONF_DIR": "/etc/hadoop", "AWS_CONTAINER_AUTHORIZATION_TOKEN": "t1",
                        "AWS_BEARER_TOKEN_BEDROCK": "t2", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ACCESS_KEY_ID": "k",
                        "GCS_OAUTH_TOKEN": "t3", "AWS_NEW_SECRET_2030": "t4"}.items():
        monkeypatch.setenv(name, value)
    env = storage.client_env()
    assert env == {
        "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1", "AWS_PROFILE": "p",
        "AWS_SHARED_CREDENTIALS_FILE": "/c", "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
        "HADOOP_CONF_DIR": "/etc/hadoop"}
    forwarded = storage.client_env(forward_secrets=True)
    assert forwarded["AWS_SECRET_ACCESS_KEY"] == "s" and forwarded["AWS_ACCESS_KEY_ID"] == "k"
    assert "AWS_CONTAINER_AUTHORIZATION_TOKEN" not in forwarded and "AWS_NEW_SECRET_2030" not in forwarded


def test_submit_env_warns_for_secrets(tmp_path, monkeypatch):
    """`submit --env` with a secret: the executor's warning (one shared function), before the
    cluster is contacted (here: nothing listens, so the command then fails on --address)."""
    from tests.conftest import free_port

    from orchestrator.secrets import secret_env_warning

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("MY_DB", "postgresql://u:Pa55/w0rd@h/db")
    p = _write(tmp_path / "p.yaml", _spec(tmp_path))
    rc, out, err = _run(["submit", str(p), "--address", f"http://127.0.0.1:{free_port()}", "--env",
                         "AWS_SECRET_ACCESS_KEY", "--env", "MY_DB", "--env", "AWS_REGION=eu-west-1"])
    assert rc == 2
    expected = secret_env_warning(["AWS_SECRET_ACCESS_KEY", "MY_DB"], "the job's runtime_env (--env)")
    assert err.splitlines()[0] == expected
    assert "AWS_REGION" not in err.splitlines()[0] and "s3cr3t" not in err and "Pa55" not in err


# -------------------------------------------------------------------------------- fuzz


def _malformed(rng: random.Random, tmp: Path) -> tuple[str | bytes, list[str]]:
    """One malformed pipeline file (text or bytes) and --set overrides, with exactly one problem."""
    spec = _spec(tmp)
    kind = rng.randrange(14)
    bad_numbers = [".inf", "-.inf", ".nan", "-1", "1.0e+300", "100000000000000000000", "abc", "[]", "{}", "true"]
    if kind == 0:  # a bounded number out of its range
        path = rng.choice(["defaults.retries", "defaults.retry_backoff_s", "defaults.timeout_s",
                           "stages.train.retries", "stages.train.retry_backoff_s", "stages.train.timeout_s",
                           "stages.prepare.resources.cpus", "stages.prepare.resources.gpus",
                           "stages.train.resources.workers", "ray.num_cpus"])
        value = rng.choice(bad_numbers)
        if value in ("true",):
            value = "-1"
        return yaml.safe_dump(spec), [f"{path}={value}"]
    if kind == 1:  # a kind's number
        field = rng.choice(["lr", "max_steps", "batch_size", "grad_accum", "warmup_steps", "min_lr", "eval_every",
                            "weight_decay", "eval_steps", "checkpoint_every"])
        return yaml.safe_dump(spec), [f"stages.train.config.{field}={rng.choice(bad_numbers[:7])}"]
    if kind == 2:  # an unknown field somewhere
        where = rng.choice([spec, spec["defaults"], spec["stages"]["train"], spec["stages"]["prepare"]["resources"],
                            spec["tracking"], spec["stages"]["train"]["config"]])
        where["x" + "".join(rng.choice("abcdefgh_") for _ in range(rng.randrange(1, 12)))] = rng.randrange(9)
    elif kind == 3:  # a bad name
        spec["name"] = rng.choice(["", "Has Caps", "a/b", "x" * 3 + "\n", "é", 7, None, []])
    elif kind == 4:  # needs: unknown, itself, a cycle, twice
        choice = rng.randrange(4)
        if choice == 0:
            spec["stages"]["train"]["needs"] = ["nope"]
        elif choice == 1:
            spec["stages"]["train"]["needs"] = ["train"]
        elif choice == 2:
            spec["stages"]["prepare"]["needs"] = ["train"]
        else:
            spec["stages"]["train"]["needs"] = ["prepare", "prepare"]
    elif kind == 5:  # an unknown kind
        spec["stages"]["prepare"]["kind"] = rng.choice(["pyton", "train", "", "PYTHON", "x" * 40])
    elif kind == 6:  # the wrong type at the top or for a section
        return rng.choice(["[]", "42", "'x'", "null", "name: x\nstages: []\n", "name: x\nstages: 5\n",
                           "name: x\nstages: {}\n", "name: x\n"]), []
    elif kind == 7:  # an alias bomb or a recursive alias
        if rng.random() < 0.7:
            return _bomb(rng.randrange(7, 12), rng.randrange(8, 12)), []
        return rng.choice(["a: &a [*a]\n", "a: &a {k: [1, *a]}\n", "x: &x [&y [*x]]\n"]) + "name: x\n", []
    elif kind == 8:  # not UTF-8
        text = yaml.safe_dump(spec).encode()
        i = rng.randrange(len(text))
        return text[:i] + rng.choice([b"\xff", b"\xc3\x28", b"\xe9", b"\x80\x80"]) + text[i:], []
    elif kind == 9:  # broken syntax: cut inside the outer { (never closed), maybe with junk after
        text = yaml.safe_dump(spec, default_flow_style=True)
        i = rng.randrange(1, len(text) // 2)
        return text[:i] + rng.choice(["", "{", "[", ": :", "\t", "'", "&", "*nope", "!!python/object:os.system"]), []
    elif kind == 10:  # a duplicate key
        return yaml.safe_dump(spec) + rng.choice(["name: again\n", "stages: {}\n", "defaults: {}\n"]), []
    elif kind == 11:  # credentials in a URI
        uri = rng.choice(["postgresql://u:Pa55/w0rd@host/db", "https://TOKEN@host", "s3://AK:SK@bucket/x",
                          "https://h/x?access_token=t", "https://h/x?X-Amz-Signature=s", "http://h/x?sig=s&a=1"])
        target = rng.choice(["storage", "tracking", "param"])
        if target == "storage":
            spec["storage"] = uri
        elif target == "tracking":
            spec["tracking"]["uri"] = uri
        else:
            spec["stages"]["prepare"]["config"]["params"]["obj"] = uri
    elif kind == 12:  # a bad --set
        return yaml.safe_dump(spec), [rng.choice(["novalue", "=5", "stages.train=[", "name.x=1",
                                                  "stages.train.retries=&a [*a]", "stages.prepare.kind=nope"])]
    else:  # a negative or non-numeric resource, a required field gone
        choice = rng.randrange(3)
        if choice == 0:
            spec["stages"]["prepare"]["resources"]["gpus"] = rng.choice([-1, "two", [1]])
        elif choice == 1:
            del spec["stages"]["prepare"]["config"]["entrypoint"]
        else:
            del spec["stages"]["train"]["kind"]
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), []


FUZZ_SPECS = 240


def _fuzz_cases(tmp: Path, n: int) -> list[list[str]]:
    rng = random.Random(22)
    cases = []
    for i in range(n):  # generated with a fixed folder name, so the same seed gives the same files anywhere
        text, overrides = _malformed(rng, Path("/TMP"))
        data = text if isinstance(text, bytes) else text.encode()
        p = tmp / f"f{i}.yaml"
        p.write_bytes(data.replace(b"/TMP", str(tmp).encode()))
        cases.append(["validate", str(p), *[a for o in overrides for a in ("--set", o)]])
    return cases


def test_fuzz_malformed_specs(tmp_path):
    """240 seeded malformed pipeline files: each exit 2 with one line of error, no traceback, < 10 s."""
    slow = []
    for argv in _fuzz_cases(tmp_path, FUZZ_SPECS):
        t0 = time.perf_counter()
        _one_line(argv)
        if time.perf_counter() - t0 > 10:
            slow.append(argv)
    assert not slow


@pytest.mark.slow
def test_fuzz_in_process_matches_the_command(tmp_path):
    cases = _fuzz_cases(tmp_path, 40)
    for argv in (cases[7], cases[29]):
        rc, out, err = _run(argv)
        proc = subprocess.run([sys.executable, "-m", "orchestrator", *argv], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        assert (proc.returncode, proc.stderr) == (rc, err)
