"""Running a pipeline on a Ray cluster as a Ray job (the Jobs API on the head's dashboard port).

``submit`` ships the working directory and the pipeline file to the cluster in the job's
runtime environment; the job's entrypoint is the ordinary driver, ``orchestrator run FILE
--address auto``, which connects to the cluster it runs on. Stopping a job sends the driver
SIGINT, which cancels the pipeline the same way Ctrl-C does (stages killed, states recorded).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .errors import SpecError
from .secrets import is_secret_env, secret_env_warning

RUN_ID_LINE = re.compile(r"MLflow run id: ([0-9a-f]{32})")

# Left behind on the laptop: run outputs, local MLflow stores, VCS and build clutter.
DEFAULT_EXCLUDES = [".git", "artifacts", "mlruns", "mlflow.db", "mlartifacts", "__pycache__", "*.pyc",
                    ".pytest_cache", "*.egg-info", ".venv", "venv", "build", "dist"]

# How long the driver gets to cancel its stages and record the cancellation after a stop.
STOP_WAIT_S = 60


@dataclass
class Submitted:
    job_id: str
    run_id: str | None  # None if the driver had not started the run within the wait


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise SpecError(f"--address {address!r}: expected the Ray dashboard URL, e.g. http://HEAD:8265")
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        raise SpecError(f"--address {address!r}: no Ray Jobs API there ({e})") from None


def entrypoint(file: str, overrides: list[str], no_cache: bool = False) -> str:
    """The command the job runs on the head node (inside the shipped working directory)."""
    parts = ["python", "-m", "orchestrator", "run", file, "--plain", "--detach", "--address", "auto"]
    for item in overrides:
        parts += ["--set", item]
    if no_cache:
        parts.append("--no-cache")
    return " ".join(shlex.quote(p) for p in parts)


def _env_vars(env: list[str]) -> dict[str, str]:
    """``NAME`` (your value) or ``NAME=VALUE`` items, for the job's environment."""
    out = {}
    for item in env:
        name, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SpecError(f"--env {item!r}: expected NAME or NAME=VALUE")
        if not sep:
            if name not in os.environ:
                raise SpecError(f"--env {name}: the variable is not set here; use --env {name}=VALUE")
            value = os.environ[name]
        out[name] = value
    secret = [n for n, v in out.items() if is_secret_env(n, v)]
    if warning := secret_env_warning(secret, "the job's runtime_env (--env)"):
        print(warning, file=sys.stderr)
    return out


def submit(file: str, address: str, *, overrides: list[str] | None = None, no_cache: bool = False,
           working_dir: str = ".", env: list[str] | None = None, excludes: list[str] | None = None,
           wait_run_id_s: float = 300.0, stream: TextIO | None = None) -> Submitted:
    """Submit FILE as a Ray job; wait (up to ``wait_run_id_s``) for the driver to name its MLflow run."""
    from .runs import prepare

    overrides = list(overrides or [])
    wd = Path(working_dir).resolve()
    path = Path(file).resolve()
    try:
        rel = path.relative_to(wd).as_posix()
    except ValueError:
        raise SpecError(f"{file}: the pipeline file must be inside the working directory {wd} "
                        "(it travels to the cluster with it)") from None
    prep = prepare(path, overrides)  # bad input fails here, before anything reaches the cluster
    storage_root = prep.pipeline.storage
    excl = list(DEFAULT_EXCLUDES) + list(excludes or [])
    local_root = Path(storage_root)
    if not storage_root.startswith(("s3://", "gs://", "gcs://", "hdfs://", "viewfs://", "file://")) \
            and not local_root.is_absolute():
        excl.append(local_root.as_posix().removeprefix("./"))
    env_vars = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S), **_env_vars(env or [])}
    client = _client(address)
    job_id = client.submit_job(
        entrypoint=entrypoint(rel, overrides, no_cache),
        runtime_env={"working_dir": str(wd), "excludes": excl, "env_vars": env_vars},
        metadata={"pipeline": prep.pipeline.name, "file": rel},
    )
    out = stream or sys.stdout
    print(f"Ray job id: {job_id}", file=out, flush=True)
    run_id = wait_for_run_id(client, job_id, wait_run_id_s)
    if run_id:
        print(f"MLflow run id: {run_id}", file=out, flush=True)
    else:
        print(f"warning: the job has not named its MLflow run yet; see `orchestrator logs {job_id} "
              f"--address {address}`", file=out, flush=True)
    return Submitted(job_id, run_id)


def wait_for_run_id(client: Any, job_id: str, timeout: float) -> str | None:
    """The MLflow run id the driver prints early, read from the job's logs."""
    deadline = time.time() + timeout
    while True:
        m = RUN_ID_LINE.search(client.get_job_logs(job_id))
        if m:
            return m.group(1)
        if client.get_job_status(job_id).is_terminal():
            m = RUN_ID_LINE.search(client.get_job_logs(job_id))
            return m.group(1) if m else None
        if time.time() > deadline:
            return None
        time.sleep(0.5)


def follow_logs(job_id: str, address: str, stream: TextIO | None = None, follow: bool = True) -> str:
    """Print the job's logs (until it ends when ``follow``); returns its final status name."""
    out = stream or sys.stdout
    client = _client(address)
    try:
        status = client.get_job_status(job_id)
    except RuntimeError as e:
        raise SpecError(f"job {job_id!r}: not found at {address} ({e})") from None
    if not follow or status.is_terminal():
        out.write(client.get_job_logs(job_id))
        out.flush()
        return str(client.get_job_status(job_id).value)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    # The log stream closes when the job ends; its status may lag by a moment.
    deadline = time.time() + 30
    while not (status := client.get_job_status(job_id)).is_terminal() and time.time() < deadline:
        time.sleep(0.2)
    return str(status.value)


def stop(job_id: str, address: str, wait_s: float = STOP_WAIT_S + 10) -> str:
    """Stop the job (its driver cancels the pipeline); returns the job's status name."""
    client = _client(address)
    try:
        client.stop_job(job_id)
    except RuntimeError as e:
        raise SpecError(f"job {job_id!r}: cannot stop it at {address} ({e})") from None
    deadline = time.time() + wait_s
    while not (status := client.get_job_status(job_id)).is_terminal() and time.time() < deadline:
        time.sleep(0.2)
    return str(status.value)


def status(job_id: str, address: str) -> str:
    return str(_client(address).get_job_status(job_id).value)
