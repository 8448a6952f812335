"""workers.cpu.claim_cpus: a worker started at Ray's niceness 15 gets back to normal priority
(every thread, where the OS allows it) and sets its thread pools to its CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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


DROP_SYS_NICE = """
import ctypes, json, os, threading
from workers.cpu import can_lower_niceness, normal_priority
libc = ctypes.CDLL(None, use_errno=True)
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
out = {"privileged": can_lower_niceness()}
def unprivileged():
    # Capabilities are per thread, and threads inherit their creator's: drop CAP_SYS_NICE (23) here.
    h, d = Header(0x20080522, 0), (Data * 2)()
    assert libc.syscall(125, ctypes.byref(h), d) == 0            # capget
    d[0].effective &= ~(1 << 23)
    assert libc.syscall(126, ctypes.byref(h), d) == 0            # capset
    out["unprivileged"] = can_lower_niceness()
    out["niceness"] = normal_priority()
t = threading.Thread(target=unprivileged); t.start(); t.join()
print(json.dumps(out))
"""


def test_can_lower_niceness_says_whether_claim_cpus_will_work():
    """The CLI's local Ray leaves its helpers at Ray's niceness 15 only where compute workers can
    come back to 0 (root with CAP_SYS_NICE, or a raised RLIMIT_NICE); without that they cannot."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop CAP_SYS_NICE from a thread")
    res = subprocess.run([sys.executable, "-c", DROP_SYS_NICE], preexec_fn=lambda: os.nice(15), capture_output=True,
                         text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"privileged": True, "unprivileged": False, "niceness": 15}, out


REUSE = """
import json, sys, torch
from workers.cpu import claim_cpus
from workers.model.transformer import GPT, config_for
def faults():
    st = open("/proc/self/stat").read()
    return int(st[st.rindex(")") + 2:].split()[7])
if sys.argv[1] == "claimed":
    claim_cpus(1)
else:
    torch.set_num_threads(1)
torch.manual_seed(0)
model = GPT(config_for({"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0}, 2048))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 2048, (12, 65))
def step():  # nanoGPT's CPU shakespeare_char shape, 2 layers
    logits = model(x[:, :-1])[0]
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(5):
    step()
f0 = faults()
for _ in range(20):
    step()
print(json.dumps((faults() - f0) / 20))
"""


def test_a_tensor_worker_reuses_freed_memory_instead_of_faulting_it_back_in():
    """claim_cpus (torch workers) fixes glibc's mmap/trim thresholds: a step's large tensors come
    back from the heap, where by default each is mmapped, zero-faulted page by page and unmapped."""
    def faults_per_step(mode: str) -> float:
        res = subprocess.run([sys.executable, "-c", REUSE, mode], capture_output=True, text=True, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])

    default, claimed = faults_per_step("default"), faults_per_step("claimed")
    assert claimed < default / 4, (default, claimed)
