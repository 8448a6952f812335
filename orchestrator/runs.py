"""Starting, resuming, cancelling and inspecting pipeline runs (what the CLI calls)."""

from __future__ import annotations

import contextlib
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
from .secrets import secret_env_warning
from .logs import SETUP_HOOK, RunLogs
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
        resolved = spec_mod.check_stages(pipeline, str(path), roots=[base_dir, os.getcwd()])
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


def connect_ray(options: spec_mod.RayOptions, address: str | None = None, *, helpers_at_normal_priority: bool = False) -> None:
    """Join ``address`` (or ``options.address``), or start a local Ray of our own.

    On a local Ray, worker processes start at Ray's default niceness (15) where compute workers
    can set themselves back to 0 (``workers.cpu.claim_cpus``): then Ray Train's controller and
    helper actors, the stage runners and the event bus, each waking 100 times a second, wait
    for a training step's threads instead of preempting them. Where the OS refuses that, and
    when ``helpers_at_normal_priority`` (a server, whose HTTP proxy must not queue behind
    compute), every worker starts at 0."""
    import ray

    from workers.cpu import can_lower_niceness

    if ray.is_initialized():
        return
    addr = address if address is not None else options.address
    # Every worker process announces which stage it works for (orchestrator.logs), so each
    # stage's output is kept apart from Ray's own.
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}, "worker_process_setup_hook": SETUP_HOOK}
    if addr:
        ray.init(address=addr, runtime_env=runtime_env, log_to_driver=True)
    else:
        # "local": start one, as the spec promises, even if a `ray start` cluster runs on this machine.
        # `ray start` clusters get RAY_worker_niceness=0 (cluster.yaml).
        nice = {} if not helpers_at_normal_priority and can_lower_niceness() else {"worker_niceness": 0}
        ray.init(address="local", num_cpus=options.num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=True, _system_config=nice)


def cache_status(prep: Prepared) -> dict[str, str]:
    """'hit' or 'miss' per stage, as a plain `run` would find it now."""
    return {name: status for name, (status, _) in explain_cache(prep).items()}


def explain_cache(prep: Prepared) -> dict[str, tuple[str, list[str]]]:
    """Per stage: 'hit', 'miss', 'off' or 'unknown', and for a miss what changed since the stage
    last ran (config keys, code files, input files, upstream stages)."""
    from .fingerprint import explain

    root = resolve_storage(prep.pipeline.storage)
    out: dict[str, tuple[str, list[str]]] = {}
    for s in prep.plan.stages:
        if not s.policy.cache:
            out[s.name] = ("off", [])
            continue
        try:
            uri = st.cache_uri(root, s.fingerprint)
            if storage.exists(uri):
                entry = storage.read_json(uri)
                why = storage.published(entry["output_uri"]) if entry.get("has_artifacts") else None
                out[s.name] = ("hit", []) if why is None else ("miss", [why])
                continue
            last = st.stage_record_uri(root, prep.plan.pipeline, s.name)
            if not storage.exists(last):
                out[s.name] = ("miss", [])  # never ran here
                continue
            old = storage.read_json(last).get("components") or {}
            out[s.name] = ("miss", explain(old, s.components.as_dict()) or ["no cached outputs"])
        except (OSError, ValueError, KeyError):  # storage out of reach from here (a cluster's bucket)
            out[s.name] = ("unknown", [])
    return out


def _ui_hint(record: RunRecord, logs: RunLogs) -> str:
    uri = spec_mod.redact(record.tracking_uri)
    return (f"MLflow: run {record.run_id} in experiment {record.experiment!r} at {uri}\n"
            f"  see it with: orchestrator ui --tracking-uri {uri}\n"
            f"Logs: {logs.folder} (Ray's own output in ray.log; each stage's in <stage>/output.log, "
            "also on its MLflow run)")


def new_run_logs(prep: Prepared, quiet: bool = False) -> RunLogs:
    """A fresh log folder for a run of ``prep``: under the storage root when it is local."""
    import tempfile

    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    root = prep.pipeline.storage
    base = Path(resolve_storage(root)) if storage.is_local(root) else Path(tempfile.gettempdir()) / "orchestrator"
    return RunLogs(base / "_logs" / stamp, quiet=quiet)


def start_run(prep: Prepared, *, no_cache: bool = False, address: str | None = None,
              stream: TextIO | None = None, live: bool | None = None, logs: RunLogs | None = None) -> RunRecord:
    """Run ``prep``. ``logs``: where Ray's and the stages' output go (an entered ``RunLogs``;
    default: a fresh folder, the terminal left as Ray has it)."""
    if logs is None:
        with new_run_logs(prep) as logs:
            return start_run(prep, no_cache=no_cache, address=address, stream=stream, live=live, logs=logs)
    from .tracking import Tracker

    p = prep.pipeline
    tracker = Tracker(p.tracking_uri(), p.experiment())
    run_id = tracker.start_pipeline(p.name, prep.source_text, prep.raw, p.description)
    root = resolve_storage(p.storage)
    tracker.spool_to(st.spool_dir(root, run_id))
    record = RunRecord(
        run_id=run_id, pipeline=p.name, state=RunState.RUNNING, raw_spec=prep.raw, source=str(Path(prep.source).resolve()),
        storage=root, tracking_uri=spec_mod.redact(p.tracking_uri()), experiment=p.experiment(),
        stages={s.name: StageRecord(name=s.name, kind=s.kind, fingerprint=s.fingerprint) for s in prep.plan.stages},
        no_cache=no_cache,
    )
    record.claim_driver()
    record.save()
    tracker.set_state_uri(run_id, record.uri)
    # Early, so `orchestrator submit` can read it from the job's logs.
    print(f"MLflow run id: {run_id}", file=stream or logs.out, flush=True)
    print(f"Logs: {logs.folder}", file=stream or logs.terminal, flush=True)
    return _execute(prep, record, tracker, no_cache=no_cache, address=address, stream=stream, live=live, logs=logs)


def _execute(prep: Prepared, record: RunRecord, tracker: Any, *, no_cache: bool, address: str | None,
             stream: TextIO | None, live: bool | None, logs: RunLogs) -> RunRecord:
    from .executor import Executor

    stream = stream or logs.terminal
    display = StageDisplay(record, [s.name for s in prep.plan.stages], stream=stream, live=live)
    forward = os.environ.get(FORWARD_SECRETS_ENV) == "1"
    if forward and (warning := secret_env_warning(sorted(set(storage.client_env(True)) & storage.SECRET_ENV),
                                                  f"every stage task's runtime_env ({FORWARD_SECRETS_ENV}=1)")):
        print(warning, file=sys.stderr)
    ex = Executor(prep.plan, record, tracker, display, sys_path=[prep.base_dir, os.getcwd()], no_cache=no_cache,
                  connect=lambda: connect_ray(prep.pipeline.ray, address), forward_secrets=forward, logs=logs)
    try:
        ex.run()
    finally:
        tracker.log_dag(record, prep.plan.needs)
        tracker.end_pipeline(record)
        # Writes are spooled beside the run state: what the store cannot take now is sent on resume.
        # A finished run waits a while for a store that is down; a cancelled one leaves at once.
        patience = 5.0 if record.state == RunState.CANCELLED else 120.0
        if not tracker.flush(timeout=120, give_up_after_s=patience):
            print(f"warning: {tracker.pending} MLflow writes could not reach {spec_mod.redact(record.tracking_uri)}; "
                  f"they are kept in {tracker.spool_dir} and sent by `orchestrator resume {record.run_id}`", file=stream)
        tracker.close()
        if tracker.resolve_ids(record):
            record.save()
    display.summary(_ui_hint(record, logs))
    return record


# Opt-in to hand secret storage credentials (AWS secret key, session token) to stage tasks.
FORWARD_SECRETS_ENV = "ORCHESTRATOR_FORWARD_SECRETS"


def load_record(run_id: str, tracking_uri: str) -> RunRecord:
    uri = _state_uri_from_sqlite(tracking_uri, run_id)
    if uri is None:
        from .tracking import state_uri_of

        try:
            uri = state_uri_of(tracking_uri, run_id)
        except ValueError as e:
            raise SpecError(str(e)) from None
    if not storage.exists(uri):
        raise SpecError(f"run {run_id!r}: its state file {uri} is missing")
    return RunRecord.load(uri)


def _state_uri_from_sqlite(tracking_uri: str, run_id: str) -> str | None:
    """The run's state file from a local SQLite MLflow store, or None to ask MLflow."""
    rows = _query_sqlite(tracking_uri, "SELECT key, value FROM tags WHERE run_uuid = ? AND key IN (?, ?)",
                         (run_id, st.TAG_ROLE, st.TAG_STATE_URI))
    tags = dict(rows or [])
    return tags.get(st.TAG_STATE_URI) if tags.get(st.TAG_ROLE) == "pipeline" else None


def latest_run_id(tracking_uri: str) -> str | None:
    """The most recently started pipeline run in the store (None: there is none)."""
    rows = _query_sqlite(tracking_uri, "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                         "WHERE t.key = ? AND t.value = 'pipeline' AND r.lifecycle_stage = 'active' "
                         "ORDER BY r.start_time DESC LIMIT 1", (st.TAG_ROLE,))
    if rows is not None:
        return rows[0][0] if rows else None
    found = list_runs(tracking_uri, 1)
    return found[0]["run_id"] if found else None


def _query_sqlite(tracking_uri: str, sql: str, args: tuple) -> list[tuple] | None:
    """Rows of a read-only query of a local SQLite MLflow store (its schema: tables ``runs`` and
    ``tags``), or None where MLflow must be asked (another store, a missing, locked or other
    file): importing MLflow and opening its store take seconds, and `orchestrator status` is a
    glance from another terminal."""
    import sqlite3

    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = Path(tracking_uri[len("sqlite:///"):])
    if not path.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as db:
            return db.execute(sql, args).fetchall()
    except sqlite3.Error:
        return None


def resume_run(run_id: str, tracking_uri: str, *, spec: str | None = None, address: str | None = None,
               stream: TextIO | None = None, live: bool | None = None, quiet: bool = False) -> RunRecord:
    """Continue a failed, cancelled or killed run: done stages are kept, the rest run again
    under the same MLflow parent run. ``quiet``: Ray's output to the log folder only.

    ``spec``: which pipeline spec the stages run with when the file changed since the run
    started: "recorded" (the one the run started with) or "current" (the file now; finished
    stages whose fingerprint changes run again). None refuses a changed or missing file."""
    record = load_record(run_id, tracking_uri)
    if record.state == RunState.SUCCEEDED:
        raise SpecError(f"run {run_id!r} already succeeded; nothing to resume")
    if record.state == RunState.RUNNING and record.driver_alive():
        raise SpecError(f"run {run_id!r} is still running (driver pid {record.driver.get('pid')}); cancel it first")
    out = stream or sys.stdout
    src = Path(record.source)
    raw = _spec_to_resume_with(record, spec, out)
    pipeline = spec_mod.parse_pipeline(raw, record.source)
    base_dir = str(src.resolve().parent)
    _with_path([base_dir, os.getcwd()])
    plan = build_plan(pipeline, spec_mod.check_stages(pipeline, record.source, roots=[base_dir, os.getcwd()]))
    source_text = src.read_text(encoding="utf-8") if src.exists() else ""
    prep = Prepared(pipeline, raw, plan, record.source, source_text, base_dir)
    for gone in [n for n in record.stages if n not in {s.name for s in plan.stages}]:
        print(f"stage {gone}: not in the current spec; dropped from the run", file=out, flush=True)
    stages = {}
    for s in plan.stages:
        old = record.stages.get(s.name)
        if old is not None and old.state.done:
            if old.fingerprint == s.fingerprint:
                stages[s.name] = old
                continue
            # Its code, inputs or an upstream changed since: its outputs are not this plan's.
            print(f"stage {s.name}: changed since it ran ({_what_changed(record, s)}); running it again",
                  file=out, flush=True)
        fresh = StageRecord(name=s.name, kind=s.kind, fingerprint=s.fingerprint)
        if old is not None and not old.state.done:
            fresh.child_run_id, fresh.history = old.child_run_id, old.history
        stages[s.name] = fresh
    record.stages, record.raw_spec = stages, raw
    cancel = st.cancel_uri(record.storage, run_id)
    if storage.exists(cancel):
        storage.delete(cancel)
    record.state = RunState.RUNNING
    record.claim_driver()
    record.save()
    from .tracking import Tracker  # after the checks: a refusal answers without importing MLflow

    tracker = Tracker(tracking_uri, record.experiment)
    tracker.spool_to(st.spool_dir(record.storage, run_id))  # first sends what the last driver could not
    tracker.reopen(run_id)
    with new_run_logs(prep, quiet=quiet) as logs:
        print(f"Logs: {logs.folder}", file=stream or logs.terminal, flush=True)
        return _execute(prep, record, tracker, no_cache=record.no_cache, address=address, stream=stream, live=live,
                        logs=logs)


# Where a run's state, outputs and MLflow runs live: a resume cannot move them.
_FIXED_ON_RESUME = ("name", "storage", "tracking")


def _spec_to_resume_with(record: RunRecord, choice: str | None, out: TextIO) -> dict[str, Any]:
    """The raw spec a resume runs with: the recorded one while the file is unchanged, else the
    one ``choice`` names (saying what differs); refused (SpecError) when there is a choice to
    make and none was given."""
    from .specdiff import diff

    flags = "`--spec recorded` (the spec the run started with) or `--spec current` (the file as it is now; " \
            "finished stages whose fingerprint changes run again)"
    src = Path(record.source)
    if not src.is_file():
        if choice == "recorded":
            print(f"pipeline file {src} is gone; resuming with the spec recorded when the run started", file=out, flush=True)
            return record.raw_spec
        raise SpecError(f"run {record.run_id!r}: its pipeline file {src} is gone (moved or deleted); "
                        "resume with `--spec recorded` to run the unfinished stages with the spec recorded when it started")
    try:
        current = spec_mod.load_pipeline(src)[1]
    except SpecError as e:
        if choice == "recorded":
            print(f"pipeline file {src} does not load now ({e}); resuming with the recorded spec", file=out, flush=True)
            return record.raw_spec
        raise SpecError(f"run {record.run_id!r}: its pipeline file does not load now: {e}\n"
                        "resume with `--spec recorded` to run with the spec recorded when it started") from None
    changed = diff(record.raw_spec, current)
    if not changed:
        return record.raw_spec
    listing = "\n".join(f"  {line}" for line in changed)
    if choice is None:
        raise SpecError(f"run {record.run_id!r}: {src} differs from the spec recorded when the run started "
                        f"(recorded -> file):\n{listing}\nresume with {flags}")
    if choice == "recorded":
        print(f"resuming with the recorded spec; {src} differs (recorded -> file, ignored):\n{listing}", file=out, flush=True)
        return record.raw_spec
    if fixed := [k for k in _FIXED_ON_RESUME if record.raw_spec.get(k) != current.get(k)]:
        raise SpecError(f"run {record.run_id!r}: {', '.join(fixed)} changed in {src}; a resume cannot move a run's "
                        "state, outputs and MLflow runs: start a new run with `orchestrator run`, or resume with "
                        "`--spec recorded`")
    print(f"resuming with the current file {src} (recorded -> file):\n{listing}", file=out, flush=True)
    return current


def _what_changed(record: RunRecord, s: Any) -> str:
    """The components that differ from those the stage's outputs were made under (from the
    cache record it wrote), or the old fingerprint when that record is gone."""
    from .fingerprint import explain

    old = record.stages[s.name]
    try:
        entry = storage.read_json(st.cache_uri(record.storage, old.fingerprint))
        return ", ".join(explain(entry.get("components") or {}, s.components.as_dict())) or "fingerprint"
    except (OSError, ValueError):
        return f"fingerprint {old.fingerprint[:12]} -> {s.fingerprint[:12]}"


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
    tracker = Tracker(tracking_uri, record.experiment)
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
    """A checkpoint folder (ours or a Hugging Face one) from a path/URI, a pipeline run id (its
    last stage with a checkpoint) or ``RUN_ID:STAGE``."""
    if not storage.is_local(ref) or Path(ref).exists():
        return ref
    if "/" in ref or ref.startswith((".", "~")):  # a path, not a run id
        raise SpecError(f"checkpoint {ref!r}: no such folder (give a checkpoint folder, a storage URI, a run id "
                        "or RUN_ID:STAGE)")
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
