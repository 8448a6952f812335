"""What runs on the cluster for each stage attempt: the kind's ``run`` inside a Ray task, and
the event bus that carries metrics and progress from any process back to the driver."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import ray

from workers import storage
from workers.cpu import run_in_background
from .errors import StageError
from .logs import announce_process


@ray.remote(num_cpus=0, max_restarts=0)
class EventBus:
    """Collects events from stages (any process, any node); the driver drains it."""

    def __init__(self) -> None:
        # A relay: at low priority its wake-ups wait for a training step's threads (workers/cpu.py).
        run_in_background()
        self._events: list[dict[str, Any]] = []

    def push(self, events: list[dict[str, Any]]) -> None:
        self._events.extend(events)

    def drain(self) -> list[dict[str, Any]]:
        out, self._events = self._events, []
        return out


class RaySink:
    """``EventSink`` that forwards to an ``EventBus`` actor (fire and forget; order kept per sender)."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus

    def emit(self, event: dict[str, Any]) -> None:
        self.bus.push.remote([event])

    def emit_many(self, events: list[dict[str, Any]]) -> None:
        self.bus.push.remote(list(events))


def _check_json(stage: str, outputs: Any) -> None:
    if not isinstance(outputs, dict):
        raise StageError(stage, f"outputs must be a dict of JSON values, got {type(outputs).__name__}: {outputs!r:.200}",
                         retryable=False)
    for key, value in outputs.items():
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise StageError(stage, f"output {key!r} is not JSON-serialisable ({type(value).__name__}: {value!r:.200}): {e}",
                             retryable=False) from None


# module file -> its mtime when this (pooled) worker process last saw it loaded
_LOADED: dict[str, int] = {}


def _forget_edited_code(roots: list[str]) -> None:
    """A pooled worker keeps modules an earlier stage imported. When a project or user source
    file changed since, drop the loaded project and user modules (those under ``roots`` or
    anywhere outside the stdlib and site-packages, as the fingerprint follows them), so this
    attempt runs the code its fingerprint names (not the old module a worker still holds)."""
    from .fingerprint import third_party

    roots = tuple(os.path.join(os.path.abspath(r), "") for r in roots)
    ours = [(name, m.__file__) for name, m in list(sys.modules.items())
            if isinstance(getattr(m, "__file__", None), str) and not name.startswith("orchestrator")
            and (m.__file__.startswith(roots) or not third_party(os.path.dirname(m.__file__)))]
    edited = False
    for _, f in ours:
        try:
            mtime = os.stat(f).st_mtime_ns
        except OSError:
            continue
        edited |= _LOADED.setdefault(f, mtime) != mtime
        _LOADED[f] = mtime
    if edited:
        for name, _ in ours:
            sys.modules.pop(name, None)
        importlib.invalidate_caches()


def execute_stage(kind: str, config: dict[str, Any], ctx_fields: dict[str, Any], sys_path: list[str]) -> dict[str, Any]:
    """Run one attempt of a stage. Returns {"outputs", "started", "ended"}; raises StageError."""
    for p in reversed(sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    _forget_edited_code(sys_path)
    from workers import load_kind
    from workers.stage import StageContext

    started = time.time()
    stage = ctx_fields["stage"]
    # This process's output is the stage's (the processes it starts announce themselves from
    # the worker setup hook, where the orchestrator started Ray).
    announce_process(stage)
    art = Path(tempfile.mkdtemp(prefix=f"orch-{stage}-"))
    try:
        module = load_kind(kind)
        cfg = module.Config.model_validate(config)
        ctx = StageContext(artifact_dir=art, **ctx_fields)
        try:
            outputs = module.run(ctx, cfg)
        except StageError:
            raise
        except BaseException as e:  # noqa: BLE001 - the user's code: report it, with its traceback
            raise StageError(stage, f"{type(e).__name__}: {e}", traceback.format_exc()) from None
        outputs = {} if outputs is None else outputs
        _check_json(stage, outputs)
        if any(art.iterdir()):
            storage.publish_dir(art, ctx.output_uri)
        return {"outputs": outputs, "started": started, "ended": time.time(), "pid": os.getpid(),
                "has_artifacts": any(art.iterdir())}
    finally:
        shutil.rmtree(art, ignore_errors=True)
        _forget_edited_code(sys_path)  # note what this attempt loaded, as it was
