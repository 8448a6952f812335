"""workers.cpu.claim_cpus: a worker started at Ray's niceness 15 gets back to normal priority
(every thread, where the OS allows it) and sets its thread pools to its CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = """
import json, os, threading, time
import torch
from workers.cpu import claim_cpus
stop = threading.Event()
t = threading.Thread(target=stop.wait); t.start()       # a thread that exists before the claim
got = claim_cpus(2)
nice = {tid: os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir("/proc/self/task")}
stop.set(); t.join()
print(json.dumps({"got": got, "torch": torch.get_num_threads(), "nice": nice,
                  "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}}))
"""


def test_claim_cpus_renices_every_thread_and_sets_threads():
    res = subprocess.run([sys.executable, "-c", CHILD], preexec_fn=lambda: os.nice(15), capture_output=True,
                         text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["torch"] == 2 and out["got"]["threads"] == 2
    assert out["env"] == {"OMP_NUM_THREADS": "2", "RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}
    if os.geteuid() == 0:  # lowering niceness needs privileges; without them it must say what it got
        assert out["got"]["niceness"] == 0 and set(out["nice"].values()) == {0}, out
    else:
        assert out["got"]["niceness"] == 15


def test_run_in_background_lowers_every_thread():
    code = ("import json, os, threading; from workers.cpu import run_in_background; e = threading.Event(); "
            "t = threading.Thread(target=e.wait); t.start(); n = run_in_background(); "
            "p = [os.getpriority(os.PRIO_PROCESS, int(x)) for x in os.listdir('/proc/self/task')]; e.set(); t.join(); "
            "print(json.dumps([n, p]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n, niceness = json.loads(res.stdout.strip().splitlines()[-1])
    assert n == 19 and set(niceness) == {19}
