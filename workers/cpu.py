"""How a compute worker (a Ray Train worker, an encoder actor) takes the CPUs it was given.

Ray starts its worker processes at niceness 15 (its ``worker_niceness`` setting), so that the
raylet and GCS stay responsive. For a compute-bound worker that is costly: every process at
normal priority on the node (Ray's own daemons, the driver, anything else) preempts it at once,
and a preempted OpenMP or Rayon thread stalls its whole team at the next barrier. The issue-14
profile found the pretrain stage's step 1.6x a plain loop's on an idle machine for this reason.
``claim_cpus`` puts the process back at normal priority (where the OS allows it: root,
CAP_SYS_NICE or RLIMIT_NICE) and sets the thread pools to the worker's CPUs, once, at the start
of the worker. Where it may not renice, start Ray with ``worker_niceness`` 0 instead (the
orchestrator's local Ray does; ``cluster.yaml`` sets ``RAY_worker_niceness=0``).

Priority alone does not keep a step at a plain loop's pace when the worker's threads fill the
cores: every Ray worker process wakes 100 times a second (its event loop checks for signals,
taking the GIL), as do its RPC threads and gloo's loop, and each wake-up on a full core preempts
one compute thread while its team waits for it at the next barrier. Measured on 2 cores with 2
threads (issue 14): ~500 preemptions a second of the compute threads and a 2-thread fine-tuning
step ~10% behind a plain loop. So a worker that owns its CPUs (``claim_cpus(..., exclusive=True)``)
moves its process's other threads to ``SCHED_IDLE``, and helper processes that only relay
(``run_in_background``: the event bus) run there whole: such threads still run, in the gaps the
compute leaves and with a small guaranteed share, but never preempt a compute thread on waking.
"""

from __future__ import annotations

import os
import threading

__all__ = ["claim_cpus", "run_in_background"]


def _renice(target: int = 0, only: list[int] | None = None) -> int:
    """Set every thread of this process to niceness ``target`` (Linux niceness is per thread, and
    threads started later inherit it), or the threads ``only``; returns the niceness the calling
    thread ends up with. Lowering niceness needs CAP_SYS_NICE or a raised RLIMIT_NICE: without
    them it stays as is."""
    tids = only if only is not None else (_threads() or [0])  # not Linux: the process only
    for tid in tids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except (PermissionError, ProcessLookupError):
            pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux
        return []


def _to_idle(tids: list[int]) -> int:
    """Move threads to SCHED_IDLE (allowed without privileges); returns how many moved."""
    if not hasattr(os, "SCHED_IDLE"):
        return 0
    moved = 0
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            moved += 1
        except OSError:  # the thread ended, or not permitted
            pass
    return moved


def run_in_background() -> int:
    """Run every thread of this process (and the threads they start later) at ``SCHED_IDLE``:
    for helper processes that only relay or watch (an event bus), so that their wake-ups never
    preempt a training step on the same node. Returns how many threads moved."""
    return _to_idle(_threads())


def claim_cpus(threads: int, *, torch_threads: bool = True, exclusive: bool = False) -> dict[str, int]:
    """Run this worker at normal priority with ``threads`` compute threads.

    Sets torch's intra-op threads (when ``torch_threads``) and the environment read by thread
    pools that start later (OpenMP, MKL, Rayon for ``tokenizers``). Call it from the thread that
    does the work (Ray Train runs the loop in its own thread; OpenMP settings are per thread).
    ``exclusive``: the calling thread (and the pools it starts afterwards) is the process's only
    compute; its other threads (the runtime's event loop, RPC and collective threads) move to
    ``SCHED_IDLE`` (module docstring). Only where every other thread of the process may wait.
    Returns ``{"threads", "niceness", "idle_threads"}`` so the caller can record what it got.
    """
    threads = max(1, int(threads))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    if torch_threads:
        import torch

        torch.set_num_threads(threads)
    idle = 0
    if exclusive:
        me = threading.get_native_id()
        if hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) == os.SCHED_IDLE:
            try:  # leaving SCHED_IDLE needs the same rights as lowering niceness
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            except OSError:
                pass
        niceness = _renice(0, only=[me])
        idle = _to_idle([t for t in _threads() if t != me])
    else:
        niceness = _renice(0)
    return {"threads": threads, "niceness": niceness, "idle_threads": idle}
