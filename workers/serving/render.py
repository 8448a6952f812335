"""Chat templates rendered in child processes, so that no template can hold a replica.

A chat template is code from a checkpoint file: Jinja2's sandbox stops it reaching Python, but
not from looping (two nested ``range(100000)`` loops are 10^10 iterations) or from building a
string of gigabytes, and a render running in a thread of the replica can be neither killed nor
interrupted (it held the GIL and ignored SIGTERM). So the replica never runs one: a small
pool of worker processes (``python -m workers.serving.render``; jinja2 only, no torch) render,
each under an address-space limit; a render that has not answered within its time budget is
SIGKILLed, its request fails with a 400 naming the template, and a fresh worker replaces it.

Protocol: one JSON line per request on the worker's stdin (``messages``, ``template``,
``add_generation_prompt``, ``eos_token``, ``max_chars``), one JSON line back on its stdout:
``{"text": ...}`` or ``{"error": ...}`` (a ChatTemplateError: the template rejected the
conversation, or its output passed ``max_chars``).
"""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import threading
import time

from workers.data.chat import ChatTemplateError

TEMPLATE_BUDGET_S = 2.0
"""CPU time a render may take before its worker is killed (a normal one takes ~1 ms)."""
RENDER_WORKERS = 2
"""Worker processes per replica (started on demand): ~20 MB each."""
WORKER_MEMORY_BYTES = 1 << 30
"""Address-space limit of a worker: a template building a huge string gets a MemoryError."""


class RenderError(ChatTemplateError):
    """The render failed: the template's own error, or it ran out of time or memory."""


WALL_FACTOR = 10
"""A render is killed after TEMPLATE_BUDGET_S of its worker's CPU time, or this many times it
in wall-clock time, whichever comes first."""
POLL_S = 0.1
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
WORKER_START_S = 60.0
"""Most time a worker may take to start (a Python start-up on a loaded machine): not a render's."""


class _Worker:
    def __init__(self):
        # the worker imports this package from where this process found it (a Ray worker may
        # have it on sys.path only, e.g. a job's working_dir)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.serving.render"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        try:
            self._read_line(WORKER_START_S)  # its "ready" line: start-up is not in a render's budget
        except (TimeoutError, EOFError):
            self.kill()
            raise

    def call(self, job: dict, budget_s: float) -> dict:
        line = (json.dumps(job, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
        cpu0 = self.cpu_s()
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        # the budget is the worker's CPU time (a loaded machine may leave it waiting for a core),
        # and at most WALL_FACTOR times it in wall-clock time
        return json.loads(self._read_line(budget_s * WALL_FACTOR,
                                          lambda: cpu0 is not None and self.cpu_s() - cpu0 < budget_s))

    def cpu_s(self) -> float | None:
        """CPU seconds the worker used so far (None where /proc is not there)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _TICKS
        except (OSError, IndexError, ValueError):
            return None

    def _read_line(self, timeout_s: float, more_time=lambda: True) -> bytes:
        """A line from the worker within ``timeout_s``; ``more_time()`` is asked every
        ``POLL_S`` whether it is still within its budget (False: TimeoutError at once)."""
        deadline = time.monotonic() + timeout_s
        buf = b""
        fd = self.proc.stdout.fileno()
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not select.select([fd], [], [], min(left, POLL_S))[0]:
                if not more_time():
                    raise TimeoutError
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class Renderer:
    """Render chat templates in up to ``workers`` child processes (thread-safe, blocking)."""

    def __init__(self, workers: int = RENDER_WORKERS, budget_s: float = TEMPLATE_BUDGET_S):
        self.budget_s = budget_s
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(workers)
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self.killed = 0  # workers killed for running past the budget (a stat for tests)

    def render(self, messages: list[dict], template: str | None, *, add_generation_prompt: bool,
               eos_token: str, max_chars: int) -> str:
        """The prompt text, or :class:`RenderError`; TimeoutError when no worker is free within the
        budget (the caller answers 503: the server is busy, the request is not at fault)."""
        if not self._slots.acquire(timeout=self.budget_s):
            raise TimeoutError("every chat-template worker is busy")
        try:
            try:
                worker = self._take()
            except (TimeoutError, EOFError, OSError):
                raise TimeoutError("a chat-template worker did not start") from None
            job = dict(messages=messages, template=template, add_generation_prompt=add_generation_prompt,
                       eos_token=eos_token, max_chars=max_chars)
            try:
                reply = worker.call(job, self.budget_s)
            except (TimeoutError, EOFError, OSError, ValueError) as e:
                self._discard(worker)
                if isinstance(e, TimeoutError):
                    self.killed += 1
                    raise RenderError(f"chat_template took more than {self.budget_s:g}s of CPU time to render this "
                                      "conversation (a template whose loops or output grow with it)") from None
                raise RenderError("chat_template failed to render: its worker process died (out of memory?)") \
                    from None
            self._idle.put(worker)
        finally:
            self._slots.release()
        if "error" in reply:
            raise RenderError(reply["error"])
        return reply["text"]

    def _take(self) -> _Worker:
        try:
            worker = self._idle.get_nowait()
            if worker.proc.poll() is None:
                return worker
            self._discard(worker)
        except queue.Empty:
            pass
        worker = _Worker()
        with self._lock:
            self._all.add(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)

    def close(self) -> None:
        with self._lock:
            workers, self._all = list(self._all), set()
        for w in workers:
            w.kill()

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._all]


def _serve() -> None:
    """The worker's loop: render one JSON job per line until stdin closes."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    from workers.data.chat import render_chat

    sys.stdout.buffer.write(b"ready\n")
    sys.stdout.buffer.flush()
    for line in sys.stdin.buffer:
        try:
            job = json.loads(line)
            text = render_chat(job["messages"], job["template"], add_generation_prompt=job["add_generation_prompt"],
                               eos_token=job["eos_token"], max_chars=job["max_chars"])
            reply = {"text": text}
        except ChatTemplateError as e:
            reply = {"error": str(e)}
        except MemoryError:
            reply = {"error": "chat_template failed to render: it ran out of memory"}
        except Exception as e:  # noqa: BLE001 - the template's fault, reported to its request
            reply = {"error": f"chat_template failed to render: {type(e).__name__}: {e}"}
        sys.stdout.buffer.write((json.dumps(reply, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass"))
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    _serve()


__all__ = ["RENDER_WORKERS", "RenderError", "Renderer", "TEMPLATE_BUDGET_S"]
