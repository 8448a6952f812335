"""How a compute worker (a Ray Train worker, an encoder actor) takes the CPUs it was given.

Ray starts its worker processes at niceness 15 (its ``worker_niceness`` setting), so that the
raylet and GCS stay responsive. For a compute-bound worker that is costly: every process at
normal priority on the node (Ray's own daemons, the driver, anything else) preempts it at once,
and a preempted OpenMP or Rayon thread stalls its whole team at the next barrier. The issue-14
profile found the pretrain stage's step 1.6x a plain loop's on an idle machine for this reason.
``claim_cpus`` puts the process back at normal priority (where the OS allows it: root,
CAP_SYS_NICE or RLIMIT_NICE) and sets the thread pools to the worker's CPUs, once, at the start
of the worker. Where it may not renice, start Ray with ``worker_niceness`` 0 instead (the
orchestrator's local Ray does when ``can_lower_niceness`` says so; ``cluster.yaml`` sets
``RAY_worker_niceness=0``). Where it may, the local Ray keeps Ray's 15 for everything else
(Ray Train's controller and helper actors, stage runners), which then waits for compute.
"""

from __future__ import annotations

import os

__all__ = ["claim_cpus", "keep_freed_memory", "normal_priority", "can_lower_niceness", "run_in_background", "BACKGROUND_NICENESS"]

BACKGROUND_NICENESS = 19
"""Niceness of helper processes that only relay (the event bus): every Ray worker process wakes
100 times a second (its event loop checks for signals), and at niceness 0 each wake-up on a full
node preempts a compute thread at once, while its OpenMP team waits at the next barrier. At 19
it waits for the compute thread's slice instead and still gets a small share under load.
SCHED_IDLE was tried for the training worker's own non-compute threads and rejected: its main
thread takes the GIL to check signals, and under load from other processes a starved GIL holder
made the step 2.5x slower (issue 14, benchmarks/RESULTS.md)."""


def _renice(target: int, *, lower: bool) -> int:
    """Move every thread of this process to niceness ``target`` (Linux niceness is per thread, and
    threads started later inherit it), only downwards (``lower``) or only upwards; returns the
    niceness the calling thread ends up with. Lowering niceness needs CAP_SYS_NICE or a raised
    RLIMIT_NICE: without them it stays as is."""
    for tid in _threads() or [0]:  # not Linux: the process only
        try:
            now = os.getpriority(os.PRIO_PROCESS, tid)
            if (now > target) if lower else (now < target):
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except (PermissionError, ProcessLookupError):  # not allowed; the thread ended
            pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def run_in_background() -> int:
    """Every thread of this process (and the threads they start later) at ``BACKGROUND_NICENESS``;
    for a helper process that must not preempt training steps on its node. Returns the niceness
    of the calling thread (raising niceness needs no privileges)."""
    return _renice(BACKGROUND_NICENESS, lower=False)


def normal_priority() -> int:
    """Every thread of this process back at niceness 0 (where the OS allows it); for a stage that
    computes in the process Ray gave it (a ``python`` stage's function).
    Returns the niceness of the calling thread."""
    return _renice(0, lower=True)


def can_lower_niceness() -> bool:
    """Whether this process may lower a thread's niceness (root with CAP_SYS_NICE, or a raised
    RLIMIT_NICE): tried on a throwaway thread, raised by one and set back."""
    import threading

    ok = [False]

    def probe() -> None:
        tid = threading.get_native_id()
        try:
            now = os.getpriority(os.PRIO_PROCESS, tid)
            if now >= 19:
                return
            os.setpriority(os.PRIO_PROCESS, tid, now + 1)
            os.setpriority(os.PRIO_PROCESS, tid, now)
            ok[0] = True
        except (PermissionError, OSError):
            pass

    t = threading.Thread(target=probe, name="niceness-probe")
    t.start()
    t.join()
    return ok[0]


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux
        return []


MALLOC_MMAP_THRESHOLD = 32 << 20
"""glibc's most (32 MiB): tensors up to it come from the heap, not from a fresh mmap each time."""
MALLOC_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed tensor memory for reuse instead of returning it to the OS.

    By default a block above 128 KiB (an activation, a gradient, the logits) is mmapped on
    allocation and unmapped on free, and the threshold moves with the process's history: a
    training step then takes thousands of page faults (4,100-4,800 per step for the small model
    of issue 14), each a zeroed 4 KiB page, and which tensors hit that path differs from one
    process to the next. Fixed thresholds (``mallopt``, as ``MALLOC_MMAP_THRESHOLD_`` would at
    start-up) leave ~220 faults a step: the small model's 2-thread step went from 61-68 to
    48 ms (fresh processes, issue 14). The cost is that a worker's resident memory stays at
    its peak, which a training or serving worker reaches every step anyway. Returns False where
    the C library is not glibc."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and \
        bool(libc.mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``): after a burst of big
    transient allocations (a serving replica's multi-megabyte request bodies), which
    ``keep_freed_memory`` would otherwise keep resident. Costs a walk over the heap (~ms);
    called by ``workers.serving.app`` after a request body over 1 MiB. False where the C
    library is not glibc."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def claim_cpus(threads: int, *, torch_threads: bool = True) -> dict[str, int]:
    """Run this worker at normal priority with ``threads`` compute threads.

    Sets torch's intra-op threads (when ``torch_threads``, and then keeps freed tensor memory
    for reuse: ``keep_freed_memory``) and the environment read by thread pools that start
    later (OpenMP, MKL, Rayon for ``tokenizers``). Call it from the thread that
    does the work (Ray Train runs the loop in its own thread; OpenMP settings are per thread).
    Returns ``{"threads", "niceness"}`` so the caller can record what it got.
    """
    threads = max(1, int(threads))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    if torch_threads:
        import torch

        torch.set_num_threads(threads)
        keep_freed_memory()  # a tensor worker: reuse its heap (see keep_freed_memory)
    return {"threads": threads, "niceness": normal_priority()}
