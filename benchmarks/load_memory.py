"""Memory of a loaded checkpoint: `workers.model.hf.load_model` vs `AutoModelForCausalLM.from_pretrained`.

Writes a random bf16 checkpoint of a named size (default `smollm-135m`, a Llama-family shape,
sharded), then loads it in fresh processes, each measuring from /proc/self/status: resident set
(VmRSS) after the imports, after loading, and the peak (VmHWM). P parameters in bf16 are 2P bytes;
a load that holds about 2P with a peak near 2P made no fp32 copy and did not materialise the
model twice. A serving replica adds its KV cache on top (printed for the model's full context).

    python benchmarks/load_memory.py                      # ~1 min
    python benchmarks/load_memory.py --size llama-medium --repeats 3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(folder: str, which: str, warm: str) -> None:
    """Load once and print the measurements as JSON (runs in a fresh interpreter). A tiny
    checkpoint is loaded first so first-use costs (lazy imports, thread pools) are not counted."""
    import torch

    torch.set_num_threads(1)
    if which == "transformers":
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    else:
        from workers.model.hf import load_model
    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype="auto") if which == "transformers" else load_model(path)

    del_me = load(warm)
    del del_me
    rss0, peak0 = status_bytes("VmRSS"), status_bytes("VmHWM")
    model = load(folder)
    rss1, peak1 = status_bytes("VmRSS"), status_bytes("VmHWM")
    with torch.inference_mode():  # touches every weight (a memory-mapped one becomes resident)
        idx = torch.arange(8)[None]
        model(idx)
    rss2 = status_bytes("VmRSS")
    params = {p.data_ptr(): p for p in model.parameters()}.values()  # tied weights count once
    nbytes = sum(p.numel() * p.element_size() for p in params)
    dtypes = sorted({str(p.dtype) for p in params})
    print(json.dumps(dict(rss_delta=rss1 - rss0, forward_delta=rss2 - rss0, peak_delta=max(peak1, rss0) - rss0, param_bytes=nbytes,
                          params=sum(p.numel() for p in params), dtypes=dtypes)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="smollm-135m")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "WHICH", "WARM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    import torch

    from workers.model.hf import save_model
    from workers.model.transformer import GPT, config_for

    load = os.getloadavg()[0]
    print(f"size={args.size} vocab={args.vocab} torch={torch.__version__} load average {load:.1f}")
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        cfg = config_for(args.size, args.vocab)
        model = GPT(cfg).to(torch.bfloat16)
        save_model(model, d, max_shard_bytes=100 * 2**20)
        del model
        warm = Path(d) / "warm"
        save_model(GPT(config_for("llama-tiny", 128)).to(torch.bfloat16), warm)
        shards = sorted(p.name for p in Path(d).glob("*.safetensors"))
        print(f"checkpoint: bf16, {len(shards)} safetensors shard(s)")
        results: dict[str, list[dict]] = {"ours (load_model)": [], "transformers (from_pretrained)": []}
        for _ in range(args.repeats):  # interleaved
            for which, key in (("ours", "ours (load_model)"), ("transformers", "transformers (from_pretrained)")):
                out = subprocess.run([sys.executable, __file__, "--child", d, which, str(warm)], check=True,
                                     capture_output=True, text=True, env={**os.environ, "PYTHONPATH": sys.path[0]})
                results[key].append(json.loads(out.stdout.strip().splitlines()[-1]))
    P = results["ours (load_model)"][0]["params"]
    print(f"P = {P / 1e6:.1f}M parameters; 2P = {2 * P / 2**20:.0f} MiB")
    for key, runs in results.items():
        rss = statistics.median(r["rss_delta"] for r in runs)
        peak = statistics.median(r["peak_delta"] for r in runs)
        fwd = statistics.median(r["forward_delta"] for r in runs)
        print(f"{key:>32}: loaded RSS +{rss / 2**20:.0f} MiB ({rss / (2 * P):.2f} x 2P), peak while loading "
              f"+{peak / 2**20:.0f} MiB ({peak / (2 * P):.2f} x 2P), after a first forward +{fwd / 2**20:.0f} MiB "
              f"({fwd / (2 * P):.2f} x 2P); parameters {runs[0]['param_bytes'] / 2**20:.0f} MiB {runs[0]['dtypes']}")
    kv = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_size * cfg.block_size * 2
    print(f"KV cache per sequence at the full {cfg.block_size}-token context (bf16): {kv / 2**20:.0f} MiB")
    print(f"load average after: {os.getloadavg()[0]:.1f}" + ("  WARNING: machine not idle" if load > 0.5 else ""))


if __name__ == "__main__":
    main()
