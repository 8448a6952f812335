"""The executor: launches every ready stage on Ray with the resources it asked for, retries
with exponential backoff, enforces timeouts, honours cancellation, reuses cached outputs and
records state after every transition.

Runs of one fingerprint at the same time run apart rather than wait for each other (no lease to
steal, nothing to deadlock): every attempt publishes into a folder of its own, every run trains in
a scratch folder of its own, and clean-up touches only folders of this run or of runs that are over
(``state.owner_may_be_live``). The cache record names whichever finished last; both are valid."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import ray

from . import state as st
from workers import storage
from workers.cluster import scalable_node_shapes
from .console import StageDisplay
from .errors import StageError
from .logs import STAGE_ENV, RunLogs
from .plan import Plan, PlannedStage
from .runner import EventBus, RaySink, execute_stage
from .state import RunRecord, RunState, StageRecord, StageState
from .tracking import Tracker

log = logging.getLogger(__name__)

_POLL_S = 0.05
_CANCEL_POLL_S = 0.5
_DRAIN_EVERY_S = 1.0
# The driver shares its node with the stages: each drain is an actor call plus a store write
# (a SQLite transaction or an HTTP call) on the cores a training step uses. At 4 a second the
# CLI took ~2.5% of a core during a 2-thread step on 2 cores (issue 14); once a second is
# plenty for a progress column and loss curves, and a finished stage is still seen at once
# (the loop waits on the stages' refs, not on the clock).
_PROGRESS_SAVE_S = 2.0


class Executor:
    def __init__(self, plan: Plan, record: RunRecord, tracker: Tracker, display: StageDisplay,
                 sys_path: list[str] | None = None, no_cache: bool = False, connect: Any = None,
                 forward_secrets: bool = False, logs: RunLogs | None = None):
        self.plan, self.record, self.tracker, self.display = plan, record, tracker, display
        self.logs = logs
        self.sys_path = sys_path or []
        self.no_cache = no_cache
        self.forward_secrets = forward_secrets
        self._connect = connect or (lambda: None)
        self._running: dict[Any, tuple[str, float]] = {}  # ObjectRef -> (stage, submitted at)
        self._retry_at: dict[str, float] = {}
        self._cancel = threading.Event()
        self._last_cancel_poll = 0.0
        self._nodes: tuple[float, list[dict]] | None = None
        self._dirty = False
        self._last_drain = 0.0
        self._progressed = False  # progress drained since the run state was last written
        self._last_progress_save = 0.0
        self._remote: Any = None
        self._bus: Any = None  # Ray is touched only when a stage must run: all-cache-hit runs need none

    def _ensure_ray(self) -> None:
        if self._bus is None:
            self._connect()
            self._remote = ray.remote(execute_stage)
            # On the driver's node: a bus placed on a worker node would die with it, and every
            # later metric, tag and progress event of every stage would be lost. Hard affinity:
            # a soft one let Ray put it on a worker node beside a head with no CPUs (test_faults).
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self._bus = EventBus.options(scheduling_strategy=here).remote()
            if self.logs is not None:
                self.logs.attach()

    # -- public ------------------------------------------------------------------------------
    def request_cancel(self) -> None:
        self._cancel.set()

    def run(self) -> RunState:
        prev = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, lambda *_: self._cancel.set())
        try:
            with self.display:
                self._loop()
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, prev)
            self._drain_events(force=True)
            if self._bus is not None:
                ray.kill(self._bus)
            self._log_stage_output()
        return self.record.state

    def _log_stage_output(self) -> None:
        """Each stage's output (every process of it) as the ``logs/output.log`` artifact of its run."""
        if self.logs is None or self._bus is None:
            return
        self.logs.settle()
        for name, folder in self.logs.stage_folders().items():
            rec = self.record.stages.get(name)
            if rec is not None and rec.child_run_id:
                self.tracker.log_artifacts(rec.child_run_id, str(folder), "logs")

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if self._cancel.is_set() or self._cancel_requested():
                self._cancel_all()
                break
            self._schedule()
            self._save_if_dirty()
            if all(r.state.terminal for r in self.record.stages.values()):
                break
            if self._running:
                # Sleep until a stage finishes or the next drain is due: the driver shares the node
                # with the stages, and each wake-up of it can preempt a training step's thread.
                refs = list(self._running)
                ready, _ = ray.wait(refs, num_returns=1, timeout=_DRAIN_EVERY_S)
                if ready:  # and whatever else finished meanwhile, in one loop turn
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in ready:
                    self._finish(ref)
            else:
                time.sleep(_POLL_S)
            self._check_timeouts()
            self._drain_events()
            if self.tracker.resolve_ids(self.record):  # stage runs the writer created meanwhile
                self._dirty = True
            self._save_if_dirty()
            self.display.update()
        self._drain_events(force=True)
        states = [r.state for r in self.record.stages.values()]
        if self.record.state != RunState.CANCELLED:
            self.record.state = RunState.SUCCEEDED if all(
                s.done or s == StageState.SKIPPED and not self._skipped_for_failure(n)
                for n, s in zip(self.record.stages, states)) else RunState.FAILED
        self.record.save()

    def _save_if_dirty(self) -> None:
        if self._dirty:
            self.record.save()
            self._dirty = False

    def _skipped_for_failure(self, name: str) -> bool:
        return self.record.stages[name].error is not None

    def _schedule(self) -> None:
        now = time.time()
        for s in self.plan.stages:
            rec = self.record.stages[s.name]
            if rec.state == StageState.RETRYING and now >= self._retry_at.get(s.name, 0):
                self._launch(s, rec)
            if rec.state != StageState.PENDING:
                continue
            deps = [self.record.stages[d] for d in s.needs]
            blocked = [d for d in deps if d.state in (StageState.FAILED, StageState.SKIPPED, StageState.CANCELLED)]
            if not s.enabled:
                self._transition(s, rec, StageState.SKIPPED)
            elif blocked:
                rec.error = f"upstream stage {blocked[0].name!r} {blocked[0].state.value.lower()}"
                self._transition(s, rec, StageState.SKIPPED)
            elif all(d.state.done for d in deps):
                if not self._from_cache(s, rec):
                    self._launch(s, rec)

    # -- cache -------------------------------------------------------------------------------
    def _from_cache(self, s: PlannedStage, rec: StageRecord) -> bool:
        if self.no_cache or not s.policy.cache:
            return False
        uri = st.cache_uri(self.record.storage, s.fingerprint)
        if not storage.exists(uri):
            return False
        try:
            entry = storage.read_json(uri)
        except (ValueError, OSError) as e:
            log.warning("ignoring unreadable cache record %s: %s", uri, e)
            return False
        if entry.get("has_artifacts") and (why := storage.published(entry["output_uri"])):
            log.warning("cache record %s: %s; rerunning", uri, why)
            return False
        if entry.get("has_artifacts"):
            self._clean_up(s, entry["output_uri"])
        rec.outputs = entry["outputs"]
        rec.cache_source_run = entry.get("run_id")
        rec.started = rec.ended = time.time()
        self._transition(s, rec, StageState.CACHED)
        return True

    def _write_cache(self, s: PlannedStage, rec: StageRecord, has_artifacts: bool, output_uri: str) -> None:
        """Only for outputs this attempt made under this plan's fingerprint (the record names
        its components, so a later miss can say what changed)."""
        entry = {
            "outputs": rec.outputs, "run_id": self.record.run_id, "stage_run_id": rec.child_run_id,
            "stage": s.name, "pipeline": self.plan.pipeline, "completed": time.time(),
            "has_artifacts": has_artifacts, "output_uri": output_uri,
            "fingerprint": s.fingerprint, "components": s.components.as_dict(),
        }
        storage.write_json(st.cache_uri(self.record.storage, s.fingerprint), entry)
        storage.write_json(st.stage_record_uri(self.record.storage, self.plan.pipeline, s.name), entry)

    # -- launching and finishing -------------------------------------------------------------
    def _output_uri(self, s: PlannedStage, rec: StageRecord) -> str:
        """This attempt's own location (a retry or a later run never writes into it)."""
        return st.output_uri(self.record.storage, self.plan.pipeline, s.name, s.fingerprint,
                             st.attempt_name(self.record.run_id, rec.attempts))

    def _scratch_uri(self, s: PlannedStage) -> str:
        """This run's own (its retries and its resume continue from its checkpoints; a run of the
        same fingerprint beside it trains apart)."""
        return st.scratch_uri(self.record.storage, self.plan.pipeline, s.name, s.fingerprint, self.record.run_id)

    def _infeasible(self, s: PlannedStage) -> str | None:
        """A reason the cluster can never run this stage (asking more than any node has)."""
        if self._nodes is None or time.monotonic() - self._nodes[0] > 5.0:
            self._nodes = (time.monotonic(), [n["Resources"] for n in ray.nodes() if n.get("Alive")] + scalable_node_shapes())
        nodes = self._nodes[1]
        r = s.resources
        if not any(n.get("CPU", 0) >= r.cpus and n.get("GPU", 0) >= r.gpus for n in nodes):
            have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
            return (f"stages.{s.name}.resources asks {r.cpus:g} CPU and {r.gpus:g} GPU per worker; "
                    f"no node of this cluster has that (nodes: {have})")
        return None

    def _launch(self, s: PlannedStage, rec: StageRecord) -> None:
        self._ensure_ray()
        if (reason := self._infeasible(s)) is not None:
            rec.error, rec.started, rec.ended = reason, time.time(), time.time()
            if rec.state == StageState.PENDING:
                self._transition(s, rec, StageState.RUNNING)
            self._transition(s, rec, StageState.FAILED)
            return
        rec.attempts += 1
        rec.error = None
        if rec.started is None or rec.state == StageState.PENDING:
            rec.started = time.time()
        rec.ended = None
        if rec.child_run_id is None:
            rec.child_run_id = self.tracker.start_stage(self.record.run_id, rec, s.config, s.resources.model_dump())
            self.tracker.log_lineage(rec, s.config, {d: self.record.stages[d].outputs or {} for d in s.needs})
        from workers.stage import Resources

        ctx_fields = {
            "stage": s.name, "run_id": rec.child_run_id, "attempt": rec.attempts,
            "inputs": {d: self.record.stages[d].outputs or {} for d in s.needs},
            "output_uri": self._output_uri(s, rec), "storage": self.record.storage,
            "resources": Resources(cpus=s.resources.cpus, gpus=s.resources.gpus, workers=s.resources.workers),
            "sink": RaySink(self._bus), "fingerprint": s.fingerprint,
            "scratch_uri": self._scratch_uri(s),
        }
        opts: dict[str, Any] = {"max_retries": 0, "name": f"stage:{s.name}"}
        if s.distributed:
            opts.update(num_cpus=0, num_gpus=0)  # the kind's own workers ask for the resources
        else:
            opts.update(num_cpus=s.resources.cpus, num_gpus=s.resources.gpus)
        # The store's endpoint and settings reach workers started earlier (secrets only by opt-in);
        # the stage's name lets every process of the stage announce itself, so its output is kept per stage.
        env = {**storage.client_env(self.forward_secrets), STAGE_ENV: s.name}
        opts["runtime_env"] = {"env_vars": env}
        ref = self._remote.options(**opts).remote(s.kind, s.config, ctx_fields, self.sys_path)
        self._running[ref] = (s.name, time.time())
        rec.history.append({"attempt": rec.attempts, "submitted": time.time(), "output_uri": ctx_fields["output_uri"]})
        self._transition(s, rec, StageState.RUNNING)

    def _finish(self, ref: Any) -> None:
        name, _ = self._running.pop(ref)
        s, rec = self.plan[name], self.record.stages[name]
        try:
            result = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return  # cancellation and timeouts are handled where they are decided
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
            if isinstance(cause, StageError):
                self._attempt_failed(s, rec, cause.message, cause.traceback, cause.retryable)
            else:
                self._attempt_failed(s, rec, f"{type(cause).__name__}: {cause}", str(e), True)
            return
        except ray.exceptions.RayError as e:  # worker died, node lost, OOM ...
            self._attempt_failed(s, rec, f"{type(e).__name__}: {e}", "", True)
            return
        rec.outputs = result["outputs"]
        rec.ended = time.time()
        out = rec.history[-1]["output_uri"]
        rec.history[-1].update(started=result["started"], ended=result["ended"], state="SUCCEEDED")
        self._write_cache(s, rec, result["has_artifacts"], out)
        self._transition(s, rec, StageState.SUCCEEDED)
        self._clean_up(s, out)
        if result["has_artifacts"] and storage.is_local(out):
            self.tracker.log_artifacts(rec.child_run_id, storage.resolve(out)[1], "outputs")
        self.tracker.set_tags(rec.child_run_id, {"output_uri": out})
        self.tracker.register_checkpoint(self.plan.pipeline, rec)

    def _clean_up(self, s: PlannedStage, kept: str) -> None:
        """After a success or a hit: attempts cut short beside it, and scratch state (its job is
        done; a resume must not continue a finished training). Only this run's folders and those
        of runs that are over: another run of this fingerprint may be publishing or training now
        (its folders are its own; it publishes its own attempt)."""
        try:
            live = st.owner_may_be_live(self.record.storage)
            spare = lambda name: not name.startswith(self.record.run_id[:12]) and live(name)  # noqa: E731
            parent = st.output_uri(self.record.storage, self.plan.pipeline, s.name, s.fingerprint)
            for gone in storage.remove_unpublished(parent, keep=kept, spare=spare):
                log.info("removed half-published attempt %s", gone)
            scratch = st.scratch_uri(self.record.storage, self.plan.pipeline, s.name, s.fingerprint)
            storage.remove_unpublished(scratch, spare=spare)
        except OSError as e:  # best effort: the result is already safe
            log.warning("stage %s: cleaning up old attempts failed: %s", s.name, e)

    def _attempt_failed(self, s: PlannedStage, rec: StageRecord, message: str, tb: str, retryable: bool) -> None:
        rec.error, rec.traceback = message, tb or None
        rec.history[-1].update(ended=time.time(), state="FAILED", error=message)
        if retryable and rec.attempts <= s.policy.retries:
            delay = s.policy.retry_backoff_s * (2 ** (rec.attempts - 1))
            self._retry_at[s.name] = time.time() + delay
            self._transition(s, rec, StageState.RETRYING)
        else:
            rec.ended = time.time()
            self._transition(s, rec, StageState.FAILED)

    def _check_timeouts(self) -> None:
        now = time.time()
        for ref, (name, submitted) in list(self._running.items()):
            s = self.plan[name]
            if s.policy.timeout_s is not None and now - submitted > s.policy.timeout_s:
                del self._running[ref]
                self._kill([ref])
                self._cleanup(s)
                self._attempt_failed(s, self.record.stages[name],
                                     f"timed out after {s.policy.timeout_s:g}s (stages.{name}.timeout_s)", "", True)

    # -- cancellation ------------------------------------------------------------------------
    def _cancel_requested(self) -> bool:
        now = time.monotonic()
        if now - self._last_cancel_poll < _CANCEL_POLL_S:
            return False
        self._last_cancel_poll = now
        return storage.exists(st.cancel_uri(self.record.storage, self.record.run_id))

    def _kill(self, refs: list[Any]) -> None:
        """Stop attempts for real: force-cancel kills the worker process, and with it the
        actors it owns (tokenizer pools, Train workers, rollout actors)."""
        for ref in refs:
            try:
                ray.cancel(ref, force=True, recursive=True)
            except Exception as e:  # noqa: BLE001 - already finished is fine
                log.debug("cancel %s: %s", ref, e)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=10)

    def _cleanup(self, s: PlannedStage) -> None:
        """Let the kind remove what a killed attempt left outside its process (stage contract)."""
        from workers import load_kind

        module = load_kind(s.kind)
        hook = getattr(module, "cleanup", None)
        if hook is None:
            return
        try:
            hook(s.name, module.Config.model_validate(s.config))
        except Exception as e:  # noqa: BLE001 - cleanup is best effort; the cancel goes on
            log.warning("stage %s: cleanup after cancel failed: %s: %s", s.name, type(e).__name__, e)

    def _cancel_all(self) -> None:
        refs = list(self._running)
        if refs:
            self._kill(refs)
        for ref in refs:
            name, _ = self._running.pop(ref)
            self._cleanup(self.plan[name])
            rec = self.record.stages[name]
            rec.error, rec.ended = "cancelled", time.time()
            self._transition(self.plan[name], rec, StageState.CANCELLED)
        for s in self.plan.stages:
            rec = self.record.stages[s.name]
            if rec.state in (StageState.PENDING, StageState.RETRYING):
                rec.error = rec.error or "cancelled before it started"
                self._transition(s, rec, StageState.CANCELLED)
        self.record.state = RunState.CANCELLED

    # -- events and transitions --------------------------------------------------------------
    def _transition(self, s: PlannedStage, rec: StageRecord, new: StageState) -> None:
        rec.move(new)
        if rec.child_run_id is None and new in (StageState.CACHED, StageState.SKIPPED, StageState.CANCELLED, StageState.FAILED):
            rec.child_run_id = self.tracker.start_stage(self.record.run_id, rec, s.config, s.resources.model_dump())
        if new.terminal and rec.ended is None:
            rec.ended = time.time()
        # Saved once per loop turn (see _save_if_dirty): a crash in between loses nothing that
        # matters, since a finished stage's cache record is written before its transition.
        self._dirty = True
        self.tracker.update_stage(rec)
        self.display.update()

    def _drain_events(self, force: bool = False) -> None:
        # One actor round trip per drain, at most once per _DRAIN_EVERY_S.
        if self._bus is None or (not force and time.monotonic() - self._last_drain < _DRAIN_EVERY_S):
            return
        self._last_drain = time.monotonic()
        try:
            events = ray.get(self._bus.drain.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001 - the bus died with a cancelled cluster
            log.debug("event drain failed: %s", e)
            return
        # A run's metrics of one drain go to the store as one write: a training stage sends one
        # event per step, and a store write per event (a SQLite transaction, or an HTTP call) runs
        # in this process on the cores the steps use.
        steps: dict[str, list[tuple[dict[str, float], int | None, float]]] = {}
        for ev in events:
            rec = self.record.stages.get(ev.get("stage", ""))
            if rec is None or rec.child_run_id is None:
                continue
            if ev["type"] == "metrics":
                steps.setdefault(rec.child_run_id, []).append((ev["metrics"], ev.get("step"), ev["ts"]))
                if (latest := st.headline_metrics(ev["metrics"])) and not rec.state.terminal:
                    rec.progress = {**(rec.progress or {}), "metrics": latest}
                    self._progressed = True
            elif ev["type"] == "progress":
                rec.progress = {**(rec.progress or {}), **{k: ev[k] for k in ("done", "total", "unit")}}
                if ev.get("checkpoint") is not None:
                    rec.progress["checkpoint"] = ev["checkpoint"]
                self._progressed = True
            elif ev["type"] == "tags":
                if rec.child_run_id in steps:  # in order with the run's metrics before them
                    self.tracker.log_metric_steps(rec.child_run_id, steps.pop(rec.child_run_id))
                self.tracker.set_tags(rec.child_run_id, ev["tags"])
        for run_id, rows in steps.items():
            self.tracker.log_metric_steps(run_id, rows)
        # Progress reaches the run state (what `orchestrator status` reads from another terminal)
        # at most every _PROGRESS_SAVE_S: one small atomic file write, not one per event.
        if self._progressed and (force or time.monotonic() - self._last_progress_save >= _PROGRESS_SAVE_S):
            self._dirty, self._progressed = True, False
            self._last_progress_save = time.monotonic()
