"""The contract between the executor and a stage kind.

A stage kind is one module in ``workers/kinds/`` with:

- ``Config``: a pydantic model (``extra="forbid"``) validating the stage's ``config`` mapping;
- ``run(ctx: StageContext, config: Config) -> dict``: does the work and returns a small
  JSON-serialisable dict of outputs (URIs, digests, numbers) that downstream stages receive
  as ``ctx.inputs[upstream_name]`` and take with ``ctx.upstream(key, ref, field=...)``
  (a stage name or a path/URI in their config; a checkpoint is then opened with
  ``workers.checkpoints.open_checkpoint``);
- optionally ``DISTRIBUTED = True`` when the kind spreads its work over Ray actors it starts
  itself (its runner then holds no CPU; ``ctx.resources`` says what each of its workers gets);
- nothing to declare for the cache key in the usual case: every string of the resolved config
  that names an existing file, folder or glob, or a storage URI, is an input, and every
  ``module:function`` or module name that resolves to user code is followed like an import
  (``orchestrator.fingerprint`` says exactly how). Only what the config cannot show is declared:
- optionally ``inputs(config) -> list``: files, folders, globs, URIs read at paths the config
  does not name (lists and None allowed); they join the key even while missing;
- optionally ``modules(config) -> list[str]``: modules loaded by names the config does not hold;
- optionally ``env(config) -> list[str]``: environment variables whose values change the
  outputs (their values join the key as digests, never in clear);
- optionally ``untracked(config) -> list[str]``: config keys (``params.log_dir``) whose strings
  are not inputs (paths the stage only writes to);
- optionally ``CACHEABLE = False`` when outputs are live things (an endpoint) that a later run
  cannot reuse;
- optionally ``check(config)`` raising ``ValueError("field: message")`` for problems found at
  validation time (before anything starts).
- optionally ``cleanup(stage: str, config: Config) -> None``: called on the driver after an
  attempt was cancelled or timed out (its process killed), to remove what it left running
  outside that process (e.g. a Ray Serve application). It must be safe to call when the attempt
  left nothing behind.

Kinds know nothing of MLflow or the scheduler: they report through ``ctx``. A ``StageContext``
pickles, so it can be shipped into Ray Train workers or actors the kind starts; its
``log_metrics`` and ``progress`` work from any process of the cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class EventSink(Protocol):
    """Where a stage's events go: a Ray queue read by the driver, or a list in tests."""

    def emit(self, event: dict[str, Any]) -> None: ...


class ListSink:
    """Keeps events in memory: for running a kind in-process (tests, benchmarks)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def emit_many(self, events: list[dict[str, Any]]) -> None:
        self.events.extend(events)

    def metrics(self, name: str) -> list[float]:
        """Every logged value of metric ``name``, in order."""
        return [e["metrics"][name] for e in self.events if e["type"] == "metrics" and name in e["metrics"]]


@dataclass(frozen=True)
class Resources:
    """What each worker of a stage gets, and how many workers (None: the kind decides)."""

    cpus: float = 1.0
    gpus: float = 0.0
    workers: int | None = None


@dataclass
class StageContext:
    stage: str
    """The stage's name in the pipeline."""
    run_id: str
    """The stage's MLflow run id (child of the pipeline run)."""
    attempt: int
    """1 for the first try, 2 for the first retry, ..."""
    inputs: dict[str, dict[str, Any]]
    """Upstream stage name -> the outputs it returned."""
    artifact_dir: Path
    """A local folder for this attempt's files; uploaded to ``output_uri`` when the stage ends."""
    output_uri: str
    """Where ``artifact_dir`` lands (local path or storage URI); stable for a given fingerprint,
    so outputs can name files as ``f"{ctx.output_uri}/model.safetensors"``."""
    storage: str
    """The pipeline's storage root (local path or URI)."""
    resources: Resources = field(default_factory=Resources)
    sink: EventSink = field(default_factory=ListSink)
    fingerprint: str = ""
    scratch_uri: str = ""
    """A storage location that survives retries of this fingerprint (e.g. training checkpoints
    to resume from after a failed attempt); empty when the kind does not need one."""

    def upstream(self, key: str, ref: str | None = None, *, field: str, check_path: bool = True) -> str:
        """The one way a kind takes an upstream stage's output: the URI ``ref`` names.

        ``ref`` is an upstream stage's name (its ``key`` output, e.g. ``checkpoint``, ``dataset``,
        ``data``, ``reward_model``) or else a path/URI taken as given (checked to exist unless
        ``check_path`` is False, for globs and ``builtin:`` names the caller resolves). With
        ``ref`` None: the only upstream that has a ``key`` output. Errors name ``field`` (the
        config field holding ``ref``), the bad value and what is allowed.
        """
        from workers import storage

        if ref is None:
            found = [name for name, out in self.inputs.items() if key in out]
            if len(found) != 1:
                raise ValueError(f"{field}: not set and stage {self.stage!r} has {len(found)} upstreams with a "
                                 f"`{key}` output ({found}); it needs exactly one upstream with one, or set "
                                 f"`{field}` to a stage name or a path")
            return self.inputs[found[0]][key]
        if ref in self.inputs:
            if key not in self.inputs[ref]:
                raise ValueError(f"{field}: upstream {ref!r} has no `{key}` output "
                                 f"(its outputs: {sorted(self.inputs[ref])})")
            return self.inputs[ref][key]
        if check_path and not storage.exists(ref):
            raise ValueError(f"{field}: got {ref!r}; neither an upstream of stage {self.stage!r} "
                             f"(upstreams: {sorted(self.inputs) or 'none'}) nor an existing path")
        # a local path made absolute: the workers a kind starts may run in another folder
        return storage.resolve(ref)[1] if check_path and storage.is_local(ref) else ref

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics to the stage's MLflow run (asynchronously, from any process)."""
        clean = {k: float(v) for k, v in metrics.items()}
        self.sink.emit({"type": "metrics", "stage": self.stage, "metrics": clean, "step": step, "ts": time.time()})

    def progress(self, done: float, total: float | None = None, unit: str = "", checkpoint: int | None = None) -> None:
        """Report progress of the stage's own work (steps, tokens, iterations) to the live table
        and the run state (``orchestrator status``); ``checkpoint``: the step a checkpoint was
        just saved at, where a resume would continue from."""
        self.sink.emit({"type": "progress", "stage": self.stage, "done": done, "total": total, "unit": unit,
                        "checkpoint": checkpoint, "ts": time.time()})

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags on the stage's MLflow run (e.g. an endpoint URL, recovery notes)."""
        self.sink.emit({"type": "tags", "stage": self.stage, "tags": {k: str(v) for k, v in tags.items()}, "ts": time.time()})


class BatchingSink:
    """Holds a worker's events and hands them on together, at most every ``every_s`` seconds
    (in order, through the wrapped sink's ``emit_many`` where it has one). For a training loop:
    one event per step is one actor call per step, and the process receiving it takes a core
    from the step's threads each time (~2% of a core at 2 threads on 2 cores). ``flush()`` when
    the work ends."""

    def __init__(self, sink: EventSink, every_s: float = 0.5) -> None:
        self.sink, self.every_s = sink, every_s
        self._held: list[dict[str, Any]] = []
        self._last = time.monotonic()

    def emit(self, event: dict[str, Any]) -> None:
        self._held.append(event)
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        held, self._held = self._held, []
        if not held:
            return
        many = getattr(self.sink, "emit_many", None)
        if many is not None:
            many(held)
        else:
            for e in held:
                self.sink.emit(e)


def local_context(tmp: Path, stage: str = "stage", inputs: dict | None = None, resources: Resources | None = None) -> StageContext:
    """A context for running a kind in-process, outside a pipeline (tests, benchmarks)."""
    art = Path(tmp) / stage / "out"
    art.mkdir(parents=True, exist_ok=True)
    scratch = Path(tmp) / stage / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    return StageContext(
        stage=stage,
        run_id="local",
        attempt=1,
        inputs=inputs or {},
        artifact_dir=art,
        output_uri=str(art),
        storage=str(tmp),
        resources=resources or Resources(),
        sink=ListSink(),
        scratch_uri=str(scratch),
    )
