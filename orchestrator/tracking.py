"""MLflow tracking: the only module that imports mlflow.

One parent run per pipeline run, one nested child run per stage. Stages never talk to MLflow:
their events reach the driver, which writes them here. If the tracking store is briefly
unreachable, writes are kept and retried, so a flaky server loses nothing and fails no stage.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .secrets import redact
from .spool import Spool
from .state import TAG_ROLE, TAG_STATE_URI, RunRecord, StageRecord, StageState

log = logging.getLogger(__name__)

# Registered-model aliases for the checkpoints that stage kinds produce.
KIND_ALIASES = {"pretrain": "pretrained", "finetune": "sft", "rlhf": "aligned"}
_PARAM_MAX = 6000


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for MLflow params."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text[:_PARAM_MAX]
    return out


class Tracker:
    """Writes a pipeline run's tree to MLflow from a background thread, so tracking never holds
    up scheduling. Writes go through a ``Spool`` (on disk beside the run state once
    ``spool_to`` is called): while the store is unreachable they wait there, and a driver killed
    meanwhile leaves them for ``resume`` to send. A write the store refuses (a 4xx, a vanished
    file) is dropped with a warning; one that keeps failing otherwise, after ``max_attempts``."""

    # How long a call whose answer is needed now (creating the pipeline run) waits for the store.
    sync_retry_s = 120.0
    # Tries of a write that fails while the store answers (bounded: it must not block the rest).
    max_attempts = 5

    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        if uri.startswith(("http://", "https://")):
            # MLflow's own client retries a refused connection for minutes (7 retries, backoff
            # factor 2) and waits 120 s on a silent server; our writer retries without end, so
            # each attempt should fail fast. A value the user set wins.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_name = experiment
        self._experiment_id: str | None = None
        self._spool = Spool()
        self.spool_dir: str | None = None
        self._down_since: float | None = None  # the store unreachable since (None: answering)
        # the lock keeps the few synchronous calls (creating the pipeline run) from interleaving
        # with the writer thread's
        self._lock = threading.RLock()
        self._cv = threading.Condition()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="mlflow-writer", daemon=True)
        self._writer.start()

    def spool_to(self, directory: str) -> None:
        """Keep queued writes on disk in ``directory`` from now on; writes an earlier driver of
        this run left there are sent first."""
        with self._cv:
            old, self._spool = self._spool, Spool(directory)
            self.spool_dir = directory
            for entry in old.take():
                self._spool.put(entry)
            self._cv.notify_all()

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        return self._ensure_experiment(self._sync)

    def _ensure_experiment(self, call: Any) -> str:
        if self._experiment_id is None:
            exp = call("get_experiment_by_name", self.experiment_name)
            self._experiment_id = exp.experiment_id if exp else call(
                "create_experiment", self.experiment_name, artifact_location=_artifact_root(self.uri),
                # open in the UI's "Model training" view (runs, metrics, artifacts), not GenAI traces
                tags={"mlflow.experimentKind": "custom_model_development"})
        return self._experiment_id

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Queue a write; the writer thread sends it, and keeps it while the store is down."""
        with self._cv:
            self._spool.put({"m": method, "a": _encode(list(args)), "k": _encode(kwargs)})
            self._cv.notify_all()

    def _write_loop(self) -> None:
        backoff, tries = 0.5, 0
        while True:
            with self._cv:
                while (entry := self._spool.head()) is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                spool = self._spool  # the one to acknowledge in, even if spool_to swaps it meanwhile
            method = entry["m"]
            try:
                self._send(method, _decode(entry["a"]), _decode(entry["k"]))
            except Exception as e:  # noqa: BLE001 - MLflow wraps connection errors in its own types
                if _unreachable(e):  # the store is down: keep the write, and everything after it
                    self._down_since = self._down_since or time.time()
                    log.warning("MLflow write %s deferred (%s); retrying in %.1fs", method, _short(e), backoff)
                    self._pause(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                tries += 1
                self._down_since = None
                if _transient(e) and tries < self.max_attempts:
                    log.warning("MLflow write %s failed (%s); try %d of %d", method, _short(e), tries, self.max_attempts)
                    self._pause(min(0.2 * 2 ** tries, 5.0))
                    continue
                log.warning("MLflow write %s dropped: %s", method, _short(e))
            self._down_since, backoff, tries = None, 0.5, 0
            with self._cv:
                spool.pop()
                self._cv.notify_all()

    def _pause(self, seconds: float) -> None:
        with self._cv:  # woken by close(): a driver leaving must not wait out a backoff
            self._cv.wait_for(lambda: self._closed, timeout=seconds)

    def _send(self, method: str, args: list, kwargs: dict) -> None:
        ids = self._spool.ids
        args = [ids.get(a, a) if isinstance(a, str) else a for a in args]  # placeholders -> run ids
        with self._lock:
            if method == "_create_run":
                handle, run_name, tags = args
                tags = {k: ids.get(v, v) for k, v in tags.items()}
                # in this thread, unretried: the store's errors go to the writer's retry
                experiment = self._ensure_experiment(lambda m, *a, **k: getattr(self.client, m)(*a, **k))
                run = self.client.create_run(experiment, run_name=run_name, tags=tags)
                self._spool.set_id(handle, run.info.run_id)
            elif any(isinstance(a, str) and a.startswith(_PENDING) for a in args):
                raise ValueError(f"its MLflow run was never created ({args[0]})")
            elif method == "_register":
                _register(self.client, *args, **kwargs)
            else:
                getattr(self.client, method)(*args, **kwargs)

    def run_id_of(self, handle: str | None) -> str | None:
        """The MLflow run id a placeholder became (itself while its run is not created yet)."""
        return self._spool.ids.get(handle, handle) if handle else handle

    def resolve_ids(self, record: RunRecord) -> bool:
        """Put real run ids in place of placeholders in ``record``; True if any changed."""
        changed = False
        for rec in record.stages.values():
            real = self.run_id_of(rec.child_run_id)
            if real != rec.child_run_id:
                rec.child_run_id, changed = real, True
        return changed

    def flush(self, timeout: float | None = None, give_up_after_s: float = 5.0) -> bool:
        """Wait until every queued write reached the store. False if some are still pending at
        ``timeout``, or once the store has been unreachable for ``give_up_after_s`` (the writes
        stay spooled)."""
        deadline = None if timeout is None else time.time() + timeout
        with self._cv:
            while len(self._spool):
                now = time.time()
                if deadline is not None and now >= deadline:
                    return False
                if self._down_since is not None and now - self._down_since > give_up_after_s:
                    return False
                self._cv.wait(0.2 if deadline is None else min(0.2, deadline - now))
        return True

    def close(self) -> None:
        """Stop the writer (after the write in flight); what is left stays in the spool."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._writer.join(timeout=5)  # a request in flight to a silent store is not waited out
        self._spool.close()

    @property
    def pending(self) -> int:
        return len(self._spool)

    def _sync(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A call whose answer is needed now (creating the pipeline run): retried with backoff
        while the store is unreachable, up to ``sync_retry_s``."""
        deadline, backoff = time.time() + self.sync_retry_s, 0.5
        while True:
            try:
                with self._lock:
                    return getattr(self.client, method)(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - MLflow wraps connection errors in its own types
                if not (_unreachable(e) or _transient(e)) or time.time() + backoff > deadline:
                    raise
                log.warning("MLflow %s failed (%s); retrying in %.1fs", method, _short(e), backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    # -- pipeline run ------------------------------------------------------------------------
    def start_pipeline(self, name: str, source_text: str, resolved: dict, description: str = "") -> str:
        run = self._sync(
            "create_run", self.experiment_id, run_name=name,
            tags={TAG_ROLE: "pipeline", "pipeline": name, "mlflow.note.content": description or f"pipeline {name}"},
        )
        rid = run.info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "pipeline.yaml").write_text(source_text)
            Path(tmp, "resolved.json").write_text(json.dumps(resolved, indent=2, sort_keys=True, default=str))
            self._sync("log_artifacts", rid, tmp, artifact_path="spec")
        return rid

    def set_state_uri(self, run_id: str, uri: str) -> None:
        self._call("set_tag", run_id, TAG_STATE_URI, uri)

    def reopen(self, run_id: str) -> None:
        self._call("update_run", run_id, status="RUNNING")

    def end_pipeline(self, record: RunRecord) -> None:
        status = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED"}.get(record.state.value, "FAILED")
        self._call("set_tag", record.run_id, "state", record.state.value)
        self._call("set_terminated", record.run_id, status=status)

    # -- stage runs --------------------------------------------------------------------------
    def start_stage(self, parent_id: str, rec: StageRecord, config: dict, resources: dict) -> str:
        """The stage's run id: a placeholder at once (the run is created by the writer, in order
        with the writes that name it; ``run_id_of`` gives the real id once it exists)."""
        rid = f"{_PENDING}{uuid.uuid4().hex}"
        self._call("_create_run", rid, rec.name,
                   {"mlflow.parentRunId": parent_id, TAG_ROLE: "stage", "stage": rec.name, "kind": rec.kind,
                    "fingerprint": rec.fingerprint, "state": rec.state.value})
        params = [Param(k, redact(str(v))) for k, v in flatten({"config": config, "resources": resources}).items()]
        for i in range(0, len(params), 100):
            self._call("log_batch", rid, params=params[i:i + 100])
        return rid

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None, ts: float) -> None:
        self.log_metric_steps(run_id, [(metrics, step, ts)])

    def log_metric_steps(self, run_id: str, rows: list[tuple[dict[str, float], int | None, float]]) -> None:
        """Metrics of several steps, ``(metrics, step, ts)`` each, in as few writes as MLflow takes
        (``log_batch``: up to 1000 metrics)."""
        ms = [Metric(k, float(v), int(ts * 1000), step or 0) for metrics, step, ts in rows for k, v in metrics.items()]
        for i in range(0, len(ms), 1000):
            self._call("log_batch", run_id, metrics=ms[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._call("log_batch", run_id, tags=[RunTag(k, redact(str(v))[:5000]) for k, v in tags.items()])

    def update_stage(self, rec: StageRecord) -> None:
        if not rec.child_run_id:
            return
        tags = {"state": rec.state.value, "attempts": str(rec.attempts), "cache_hit": str(rec.state == StageState.CACHED).lower()}
        if rec.cache_source_run:
            tags["cache_source_run"] = rec.cache_source_run
        if rec.error:
            tags["error"] = rec.error[:5000]
        self.set_tags(rec.child_run_id, tags)
        if rec.state.terminal:
            if rec.traceback:
                self._call("log_text", rec.child_run_id, redact(rec.traceback), "error/traceback.txt")
            if rec.outputs is not None:
                self._call("log_dict", rec.child_run_id, rec.outputs, "outputs.json")
            if rec.elapsed is not None:
                self.log_metrics(rec.child_run_id, {"duration_s": rec.elapsed}, None, time.time())
            status = {"SUCCEEDED": "FINISHED", "CACHED": "FINISHED", "FAILED": "FAILED"}.get(rec.state.value, "KILLED")
            self._call("set_terminated", rec.child_run_id, status=status)

    def log_lineage(self, rec: StageRecord, config: dict, inputs: dict[str, dict]) -> None:
        """Datasets a stage read, as MLflow inputs: the corpus of a tokenize stage, and every
        upstream token dataset (name, digest, source), so the UI links runs to their data."""
        datasets = []
        if rec.kind == "tokenize" and config.get("source"):
            src = config["source"] if isinstance(config["source"], list) else [config["source"]]
            digest = _digest(json.dumps({"source": src, "max_bytes": config.get("max_bytes"),
                                         "max_documents": config.get("max_documents")}, sort_keys=True))
            datasets.append(Dataset(name="corpus", digest=digest, source_type=_source_type(src[0]),
                                    source=json.dumps({"uri": src})))
        for upstream, out in inputs.items():
            if isinstance(out, dict) and out.get("dataset"):
                digest = str(out.get("manifest_sha256") or _digest(json.dumps(out, sort_keys=True, default=str)))[:36]
                datasets.append(Dataset(name=f"{upstream}-tokens", digest=digest,
                                        source_type=_source_type(str(out["dataset"])),
                                        source=json.dumps({"uri": str(out["dataset"])})))
        if datasets and rec.child_run_id:
            tags = [InputTag("mlflow.data.context", "training")]
            self._call("log_inputs", rec.child_run_id, datasets=[DatasetInput(d, tags) for d in datasets])

    def register_checkpoint(self, model_name: str, rec: StageRecord) -> None:
        """Register a stage's new checkpoint in the Model Registry under the kind's alias
        (pretrained, sft, aligned), linked to the stage run."""
        alias = KIND_ALIASES.get(rec.kind)
        ckpt = (rec.outputs or {}).get("checkpoint")
        if not alias or not ckpt or not rec.child_run_id:
            return
        source = ckpt if "://" in ckpt else f"file://{os.path.abspath(ckpt)}"
        self._call("_register", model_name, source, rec.child_run_id, alias,
                   {"stage": rec.name, "kind": rec.kind, "fingerprint": rec.fingerprint})

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None, max_bytes: int = 50 << 20) -> None:
        """Log a stage's small files (big ones, e.g. checkpoints, stay in storage and are tagged)."""
        small = [p for p in Path(local_dir).rglob("*") if p.is_file() and p.stat().st_size <= max_bytes]
        for p in small:
            rel = p.relative_to(local_dir).parent.as_posix()
            dest = "/".join(x for x in (artifact_path, rel if rel != "." else None) if x) or None
            self._call("log_artifact", run_id, str(p), dest)

    def log_dag(self, record: RunRecord, needs: dict[str, tuple[str, ...]]) -> None:
        from .dagplot import draw_dag

        # queued like any write: the picture waits in the spool folder while the store is down
        folder = self.spool_dir or tempfile.mkdtemp(prefix="orch-dag-")
        path = os.path.join(folder, f"dag-{uuid.uuid4().hex[:8]}", "dag.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        draw_dag(needs, {n: s for n, s in record.stages.items()}, path, title=f"{record.pipeline} · {record.state.value}")
        self._call("log_artifact", record.run_id, path)

    # -- queries (status, list, resume) ------------------------------------------------------
    def find_pipeline_runs(self, max_results: int = 50) -> list[Any]:
        exps = self.client.search_experiments()
        if not exps:
            return []
        return self.client.search_runs(
            [e.experiment_id for e in exps], filter_string=f"tags.`{TAG_ROLE}` = 'pipeline'",
            max_results=max_results, order_by=["attributes.start_time DESC"],
        )


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database (MLflow's default is ./mlruns in
    whatever directory the process runs in); servers choose their own."""
    if uri.startswith("sqlite:///"):
        db = os.path.abspath(uri[len("sqlite:///"):])
        name = os.path.splitext(os.path.basename(db))[0]
        return "file://" + os.path.join(os.path.dirname(db), f"{name}-artifacts")
    return None


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _source_type(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else ("code" if uri.startswith("builtin:") else "local")


def _register(client: MlflowClient, name: str, source: str, run_id: str, alias: str, tags: dict) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Checkpoints of the genai-orchestrator pipeline "
                                       f"{name!r}; aliases name the stage that made them.")
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags, await_creation_for=0)
    client.set_registered_model_alias(name, alias, mv.version)


_PENDING = "pending-"  # a stage run id whose MLflow run the writer has not created yet
_ENTITIES = {"Metric": Metric, "Param": Param, "RunTag": RunTag}


def _encode(x: Any) -> Any:
    """A write's arguments as JSON (for the spool): MLflow entities become tagged mappings."""
    if isinstance(x, Metric):
        return {"__entity__": "Metric", "d": [x.key, x.value, x.timestamp, x.step]}
    if isinstance(x, (Param, RunTag)):
        return {"__entity__": type(x).__name__, "d": [x.key, x.value]}
    if isinstance(x, DatasetInput):
        return {"__entity__": "DatasetInput", "dataset": x.dataset.to_dictionary(),
                "tags": [[t.key, t.value] for t in x.tags]}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    return x


def _decode(x: Any) -> Any:
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if isinstance(x, dict):
        kind = x.get("__entity__")
        if kind == "DatasetInput":
            d = {k: v for k, v in x["dataset"].items() if k in ("name", "digest", "source_type", "source", "schema", "profile")}
            return DatasetInput(Dataset(**d), [InputTag(k, v) for k, v in x["tags"]])
        if kind in _ENTITIES:
            return _ENTITIES[kind](*x["d"])
        return {k: _decode(v) for k, v in x.items()}
    return x


def _unreachable(e: Exception) -> bool:
    """Whether the store could not be reached at all (down, network): the write must wait."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        # MLflow's REST client reports a failed connection as "API request to ... failed with exception"
        return e.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") or "failed with exception" in str(e)
    if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return False
    return isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.startswith(("requests", "urllib3"))


def _transient(e: Exception) -> bool:
    """Whether a failed call, the store answering, may succeed if tried again (a 5xx, a locked
    database); a 4xx or a missing file will not."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.error_code in ("INTERNAL_ERROR",)
    if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return False
    return isinstance(e, OSError) or type(e).__module__.startswith("sqlalchemy")


def _short(e: Exception) -> str:
    from .spec import redact  # the store's URL may carry credentials

    return redact(str(e).splitlines()[0][:300]) if str(e) else type(e).__name__


def open_client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def state_uri_of(uri: str, run_id: str) -> str:
    """The run state file recorded on a pipeline run (ValueError naming the run if unknown)."""
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own RestException types
        raise ValueError(f"no pipeline run {run_id!r} in the tracking store {uri}") from None
    state = run.data.tags.get(TAG_STATE_URI)
    if run.data.tags.get(TAG_ROLE) != "pipeline" or not state:
        raise ValueError(f"run {run_id!r} in {uri} is not a pipeline run of this orchestrator")
    return state


class NullTracker(Tracker):
    """Tracks nothing: for measuring what MLflow costs (benchmarks) and for dry runs."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._spool = Spool()
        self._cv = threading.Condition()
        self._n = 0
        self._down_since = None
        self.spool_dir = None

    def spool_to(self, directory: str) -> None:
        pass

    def close(self) -> None:
        pass

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        pass

    def start_pipeline(self, name: str, source_text: str, resolved: dict, description: str = "") -> str:
        import uuid

        return uuid.uuid4().hex

    def start_stage(self, parent_id: str, rec: StageRecord, config: dict, resources: dict) -> str:
        self._n += 1
        return f"{parent_id}-{self._n}"

    def log_dag(self, record: RunRecord, needs: dict[str, tuple[str, ...]]) -> None:
        pass
