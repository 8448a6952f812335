"""Where output goes during a run.

- **Ray's own output** (driver logs, raylet and worker prefixes, Train/Serve controllers, C++
  core-worker messages, auth notices) goes to one file per run, ``ray.log``. Quiet mode (the
  CLI's default) redirects the driver's file descriptor 2 there and stops Ray from streaming
  worker output to the terminal, which keeps only what ``terminal`` is given: our table, stage
  errors and the summary. Verbose mode leaves the terminal as Ray has it and still writes the
  files.
- **Each stage's own output**: every process that works for a stage (the stage's task, and the
  Ray Train workers, actors and tasks it starts, which inherit its runtime_env) announces itself
  with ``announce_process`` (see ``STAGE_ENV``); the lines Ray's log monitor streams from those
  processes land in ``<stage>.log``, which the executor attaches to the stage's MLflow run.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

# Set on a stage's Ray task (runtime_env env_vars, inherited by what it starts).
STAGE_ENV = "ORCHESTRATOR_STAGE"
# Runs in every worker process of a Ray the orchestrator starts (ray.init worker_process_setup_hook).
SETUP_HOOK = "orchestrator.logs.announce_process"
_MARKER = ":orchestrator_stage:"  # a line Ray streams like any other, with the process's pid and ip
_HANDLER = "orchestrator_run_logs"
_PENDING_MAX = 2000  # lines kept per process not yet announced


def announce_process(stage: str | None = None) -> None:
    """Print the marker that makes this process's output the stage's (``stage`` or the one in
    the environment). A worker setup hook: it must not raise (Ray would kill the worker) nor
    call Ray (the worker is not ready to submit work yet)."""
    stage = stage or os.environ.get(STAGE_ENV)
    if stage:
        print(f"{_MARKER}{stage}", flush=True)


class RunLogs:
    """One run's log folder: ``ray.log`` and ``<stage>/output.log`` for each stage that printed."""

    def __init__(self, folder: str | Path, quiet: bool = False):
        self.folder = Path(folder)
        self.quiet = quiet
        self.ray_log = self.folder / "ray.log"
        self.terminal: TextIO = sys.stderr
        self.out: TextIO = sys.stdout
        self._file: TextIO | None = None
        self._saved: list[int] = []
        self._procs: dict[tuple[str, int], str] = {}
        self._pending: dict[tuple[str, int], list[str]] = {}
        self._stage_files: dict[str, TextIO] = {}
        self._lock = threading.Lock()
        self._attached = False
        self._removed_ray_handler: Any = None
        self._last_line = 0.0

    # -- the terminal ---------------------------------------------------------------------------
    def __enter__(self) -> RunLogs:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file = open(self.ray_log, "a", buffering=1, encoding="utf-8", errors="replace")
        if self.quiet:
            sys.stdout.flush()
            sys.stderr.flush()
            self._saved = [os.dup(1), os.dup(2)]
            self.out, self.terminal = (os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
                                       for fd in self._saved)
            os.dup2(self._file.fileno(), 1)
            os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
        if self._saved:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, saved in zip((1, 2), self._saved):
                os.dup2(saved, fd)
                os.close(saved)
            self._saved = []
            for stream in (self.out, self.terminal):
                stream.close()
            self.out, self.terminal = sys.stdout, sys.stderr
        with self._lock:
            for f in self._stage_files.values():
                f.close()
            self._stage_files.clear()
            if self._file is not None:
                self._file.close()
                self._file = None

    # -- Ray's worker output --------------------------------------------------------------------
    def attach(self) -> None:
        """Receive the worker output Ray streams to this driver (call once Ray is connected)."""
        if self._attached:
            return
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher  # no public hook

        if self.quiet:  # Ray's own handler prints every worker line to the terminal
            self._removed_ray_handler = [(n, h) for n, h in dispatcher.handlers if n == "ray_print_logs"]
            dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler(_HANDLER, self._on_output)
        self._attached = True

    def detach(self) -> None:
        if not self._attached:
            return
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler(_HANDLER)
        for name, handler in self._removed_ray_handler or []:
            dispatcher.add_handler(name, handler)
        self._attached = False

    def register(self, stage: str, ip: str, pid: int) -> None:
        key = (ip, int(pid))
        with self._lock:
            self._procs[key] = stage
            lines = self._pending.pop(key, [])
            if lines:
                self._write_stage(stage, lines)

    def _on_output(self, data: dict[str, Any]) -> None:
        pid, ip = str(data.get("pid")), data.get("ip", "")
        process = pid.isdigit()  # not "raylet" or "autoscaler"
        lines = []
        for line in data.get("lines", []):
            if line.startswith(_MARKER) and process:
                self.register(line[len(_MARKER):], ip, pid)
            elif not line.startswith((":task_name:", ":actor_name:", ":job_id:")):
                lines.append(line)
        if not lines:
            return
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who} pid={pid}, ip={ip}) " if process else f"({pid}) "
        with self._lock:
            self._last_line = time.monotonic()
            if self._file is not None:
                self._file.write("".join(prefix + l + "\n" for l in lines))
            if not process:
                return
            key = (ip, int(pid))
            stage = self._procs.get(key)
            if stage is not None:
                self._write_stage(stage, lines)
            else:
                pending = self._pending.setdefault(key, [])
                pending.extend(lines)
                del pending[:-_PENDING_MAX]

    def _write_stage(self, stage: str, lines: list[str]) -> None:
        f = self._stage_files.get(stage)
        if f is None:
            f = self._stage_files[stage] = open(self.stage_log(stage), "a", buffering=1, encoding="utf-8",
                                                errors="replace")
        f.write("".join(l + "\n" for l in lines))

    def stage_log(self, stage: str) -> Path:
        """``<folder>/<stage>/output.log`` (a folder per stage: it is logged to MLflow as is)."""
        (self.folder / stage).mkdir(exist_ok=True)
        return self.folder / stage / "output.log"

    def stage_folders(self) -> dict[str, Path]:
        """Stage -> the folder holding its output.log, for stages that printed anything."""
        with self._lock:
            for f in self._stage_files.values():
                f.flush()
            return {stage: self.folder / stage for stage in self._stage_files}

    def settle(self, quiet_s: float = 0.5, max_s: float = 3.0) -> None:
        """Give Ray's log monitor a moment to deliver the last lines (it polls the workers' log
        files; there is no event for 'all delivered'): until ``quiet_s`` passes without a line."""
        if not self._attached:
            return
        start = time.monotonic()
        while time.monotonic() - start < max_s and time.monotonic() - max(self._last_line, start) < quiet_s:
            time.sleep(0.1)
