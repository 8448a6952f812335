"""Starting, resuming, cancelling and inspecting pipeline runs (what the CLI calls)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import spec as spec_mod
from . import state as st
from workers import storage
from .console import StageDisplay
from .errors import SpecError
from .plan import Plan, build_plan
from .state import RunRecord, RunState, StageRecord, StageState


@dataclass
class Prepared:
    """A validated pipeline, ready to run: nothing has started yet."""

    pipeline: spec_mod.Pipeline
    raw: dict[str, Any]
    plan: Plan
    source: str
    source_text: str
    base_dir: str


def prepare(path: str | Path, overrides: list[str] | None = None) -> Prepared:
    """Load, validate and plan a pipeline file. Raises SpecError on any bad input."""
    path = Path(path)
    pipeline, raw = spec_mod.load_pipeline(path, overrides or [])
    base_dir = str(path.resolve().parent)
    _with_path([base_dir, os.getcwd()])
    problems = []
    from .plan import check_graph

    problems.extend(check_graph(pipeline))
    try:
        resolved = spec_mod.check_stages(pipeline, str(path))
    except SpecError as e:
        problems.extend(e.problems)
        resolved = {}
    if problems:
        raise SpecError(problems, str(path))
    plan = build_plan(pipeline, resolved)
    return Prepared(pipeline, raw, plan, str(path), path.read_text(encoding="utf-8"), base_dir)


def _with_path(paths: list[str]) -> None:
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)


def resolve_storage(root: str) -> str:
    return root if not storage.is_local(root) else str(Path(storage.resolve(root)[1]))


def connect_ray(options: spec_mod.RayOptions, address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    addr = address if address is not None else options.address
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if addr:
        ray.init(address=addr, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # "local": start one, as the spec promises, even if a `ray start` cluster runs on this machine.
        # Workers at normal priority: Ray's default niceness 15 lets any other process preempt a
        # training step (see workers/cpu.py); `ray start` clusters get RAY_worker_niceness=0 (cluster.yaml).
        ray.init(address="local", num_cpus=options.num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                 _system_config={"worker_niceness": 0})


def cache_status(prep: Prepared) -> dict[str, str]:
    """'hit' or 'miss' per stage, as a plain `run` would find it now."""
    root = resolve_storage(prep.pipeline.storage)
    out = {}
    for s in prep.plan.stages:
        if not s.policy.cache:
            out[s.name] = "off"
            continue
        try:
            out[s.name] = "hit" if storage.exists(st.cache_uri(root, s.fingerprint)) else "miss"
        except OSError:  # storage out of reach from here (e.g. a cluster's bucket): validation still works
            out[s.name] = "unknown"
    return out


def _ui_hint(record: RunRecord) -> str:
    return (f"MLflow: run {record.run_id} in experiment {record.experiment!r} at {record.tracking_uri}\n"
            f"  see it with: orchestrator ui --tracking-uri {record.tracking_uri}")


def start_run(prep: Prepared, *, no_cache: bool = False, address: str | None = None,
              stream: TextIO | None = None, live: bool | None = None) -> RunRecord:
    from .tracking import Tracker

    p = prep.pipeline
    tracker = Tracker(p.tracking_uri(), p.experiment())
    run_id = tracker.start_pipeline(p.name, prep.source_text, prep.raw, p.description)
    root = resolve_storage(p.storage)
    record = RunRecord(
        run_id=run_id, pipeline=p.name, state=RunState.RUNNING, raw_spec=prep.raw, source=prep.source,
        storage=root, tracking_uri=p.tracking_uri(), experiment=p.experiment(),
        stages={s.name: StageRecord(name=s.name, kind=s.kind, fingerprint=s.fingerprint) for s in prep.plan.stages},
        no_cache=no_cache,
    )
    record.claim_driver()
    record.save()
    tracker.set_state_uri(run_id, record.uri)
    # Early, so `orchestrator submit` can read it from the job's logs.
    print(f"MLflow run id: {run_id}", file=stream or sys.stdout, flush=True)
    return _execute(prep, record, tracker, no_cache=no_cache, address=address, stream=stream, live=live)


def _execute(prep: Prepared, record: RunRecord, tracker: Any, *, no_cache: bool, address: str | None,
             stream: TextIO | None, live: bool | None) -> RunRecord:
    from .executor import Executor

    display = StageDisplay(record, [s.name for s in prep.plan.stages], stream=stream, live=live)
    ex = Executor(prep.plan, record, tracker, display, sys_path=[prep.base_dir, os.getcwd()], no_cache=no_cache,
                  connect=lambda: connect_ray(prep.pipeline.ray, address))
    try:
        ex.run()
    finally:
        tracker.log_dag(record, prep.plan.needs)
        tracker.end_pipeline(record)
        if not tracker.flush(timeout=120):
            print(f"warning: {tracker.pending} MLflow writes could not reach {record.tracking_uri}", file=sys.stderr)
    display.summary(_ui_hint(record))
    return record


def load_record(run_id: str, tracking_uri: str) -> RunRecord:
    from .tracking import state_uri_of

    try:
        uri = state_uri_of(tracking_uri, run_id)
    except ValueError as e:
        raise SpecError(str(e)) from None
    if not storage.exists(uri):
        raise SpecError(f"run {run_id!r}: its state file {uri} is missing")
    return RunRecord.load(uri)


def resume_run(run_id: str, tracking_uri: str, *, address: str | None = None,
               stream: TextIO | None = None, live: bool | None = None) -> RunRecord:
    """Continue a failed, cancelled or killed run: done stages are kept, the rest run again
    under the same MLflow parent run."""
    from .tracking import Tracker

    record = load_record(run_id, tracking_uri)
    if record.state == RunState.SUCCEEDED:
        raise SpecError(f"run {run_id!r} already succeeded; nothing to resume")
    if record.state == RunState.RUNNING and record.driver_alive():
        raise SpecError(f"run {run_id!r} is still running (driver pid {record.driver.get('pid')}); cancel it first")
    src = Path(record.source)
    tmp_raw = record.raw_spec
    pipeline = spec_mod.parse_pipeline(tmp_raw, record.source)
    base_dir = str(src.resolve().parent)
    _with_path([base_dir, os.getcwd()])
    plan = build_plan(pipeline, spec_mod.check_stages(pipeline, record.source))
    source_text = src.read_text(encoding="utf-8") if src.exists() else ""
    prep = Prepared(pipeline, tmp_raw, plan, record.source, source_text, base_dir)
    for s in plan.stages:
        old = record.stages.get(s.name)
        if old is not None and old.state.done:
            continue
        fresh = StageRecord(name=s.name, kind=s.kind, fingerprint=s.fingerprint)
        if old is not None:
            fresh.child_run_id, fresh.history = old.child_run_id, old.history
        record.stages[s.name] = fresh
    cancel = st.cancel_uri(record.storage, run_id)
    if storage.exists(cancel):
        storage.delete(cancel)
    record.state = RunState.RUNNING
    record.claim_driver()
    record.save()
    tracker = Tracker(record.tracking_uri, record.experiment)
    tracker.reopen(run_id)
    return _execute(prep, record, tracker, no_cache=record.no_cache, address=address, stream=stream, live=live)


def cancel_run(run_id: str, tracking_uri: str, wait_s: float = 15.0) -> RunRecord:
    """Ask the run's driver to stop; mark the run cancelled directly if no driver is alive."""
    from .tracking import Tracker

    record = load_record(run_id, tracking_uri)
    if record.state != RunState.RUNNING:
        return record
    storage.write_bytes(st.cancel_uri(record.storage, run_id), str(time.time()).encode())
    deadline = time.time() + wait_s
    while time.time() < deadline:
        record = RunRecord.load(record.uri)
        if record.state != RunState.RUNNING:
            return record
        if not record.driver_alive() and record.driver.get("host") == _host():
            break
        time.sleep(0.2)
    # No live driver (killed): record the cancellation ourselves.
    tracker = Tracker(record.tracking_uri, record.experiment)
    for rec in record.stages.values():
        if not rec.state.terminal:
            rec.state, rec.error, rec.ended = StageState.CANCELLED, "cancelled (driver gone)", time.time()
            tracker.update_stage(rec)
    record.state = RunState.CANCELLED
    record.save()
    tracker.end_pipeline(record)
    return record


def _host() -> str:
    import socket

    return socket.gethostname()


def list_runs(tracking_uri: str, max_results: int = 20) -> list[dict[str, Any]]:
    from .tracking import Tracker

    rows = []
    for run in Tracker(tracking_uri, "Default").find_pipeline_runs(max_results):
        rows.append({"run_id": run.info.run_id, "pipeline": run.data.tags.get("pipeline", run.info.run_name),
                     "state": run.data.tags.get("state", run.info.status), "start": run.info.start_time / 1000})
    return rows


def resolve_checkpoint(ref: str, tracking_uri: str) -> str:
    """A checkpoint folder from a path/URI, a pipeline run id (its last stage with a
    checkpoint) or ``RUN_ID:STAGE``."""
    if not storage.is_local(ref) or Path(ref).exists():
        return ref
    run_id, _, stage = ref.partition(":")
    record = load_record(run_id, tracking_uri)
    names = [stage] if stage else list(reversed(list(record.stages)))
    for name in names:
        rec = record.stages.get(name)
        if rec is None:
            raise SpecError(f"run {run_id!r} has no stage {name!r} (stages: {', '.join(record.stages)})")
        if rec.state.done and rec.outputs and rec.outputs.get("checkpoint"):
            return rec.outputs["checkpoint"]
    raise SpecError(f"{ref!r}: no finished stage with a checkpoint in run {run_id!r}")


def exit_code(record: RunRecord) -> int:
    return 0 if record.state == RunState.SUCCEEDED else 1
