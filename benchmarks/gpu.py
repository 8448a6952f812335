"""GPU figures: the MFU of a gpt2-124m pretrain step, and decode tokens/s, on one CUDA device.

Pretrain: the training loop's own pieces on ``cuda`` (``GPT`` gpt2-124m with a 50304 vocabulary,
bf16 autocast as ``precision: bf16`` runs it, TF32 matmuls, fused AdamW from
``workers.training.params.adamw``, gradient clipping at 1.0), batch x 1024 tokens a step; MFU is
the loop's own: ``model.flops_per_token() * tokens/s / gpu_peak_flops(device, "bf16")`` (dense
bf16 peak from ``workers.training.loop``'s table). ``--compile`` adds ``torch.compile``.
Decode: ``workers.model.sampling.generate`` greedy (bf16 autocast, KV cache, the engine's path),
the same model in eval mode, ``--new-tokens`` after a 32-token prompt at each batch size, no stop
token, so every row decodes every step. Each figure: median and min..max over ``--repeats``
timed runs after one warm-up (``benchmarks.method``), CUDA synchronised around each.

    python -m benchmarks.gpu                      # both, 5 repeats
    python -m benchmarks.gpu --batch 16 --compile --decode-batches 1 8 32
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks import method
from workers.model.sampling import SamplingParams, generate
from workers.model.transformer import GPT, autocast_context, config_for
from workers.training.loop import gpu_peak_flops
from workers.training.params import adamw

VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64, as nanoGPT does


def pretrain_step_s(model, step, batch: int, block: int, steps: int) -> float:
    """Seconds per step over ``steps`` steps (synchronised at both ends)."""
    x = torch.randint(0, VOCAB, (batch, block + 1), device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x[:, :-1], x[:, 1:])
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def make_step(model, opt, compiled: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    forward = torch.compile(model) if compiled else model

    def step(idx, targets):
        with autocast_context("cuda", "bf16"):
            _, loss = forward(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def decode_tokens_per_s(model, batch: int, new_tokens: int) -> float:
    prompts = torch.randint(0, VOCAB, (batch, 32)).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = generate(model, prompts, params, eos_token_id=None, device="cuda")
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert all(len(c[0].token_ids) == new_tokens for c in out)
    return batch * new_tokens / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8, help="pretrain rows a step (each 1024 tokens)")
    p.add_argument("--steps", type=int, default=10, help="pretrain steps a timed run")
    p.add_argument("--compile", action="store_true", help="torch.compile the pretrain forward")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=method.MIN_REPEATS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks.gpu needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        sys.exit(2)
    torch.backends.cuda.matmul.allow_tf32 = True  # as the training loop sets on CUDA
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = gpu_peak_flops(name, "bf16")
    print(f"device: {name}; torch {torch.__version__}; bf16 peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")

    torch.manual_seed(0)
    cfg = config_for("gpt2-124m", VOCAB)
    model = GPT(cfg).to("cuda").train()
    opt = adamw(model, lr=6e-4, weight_decay=0.1, device_type="cuda")
    step = make_step(model, opt, args.compile)
    tokens = args.batch * cfg.block_size
    pretrain_step_s(model, step, args.batch, cfg.block_size, 3)  # warm-up (and compilation)
    runs = method.interleave({"pretrain": lambda: pretrain_step_s(model, step, args.batch, cfg.block_size, args.steps)},
                             repeats=args.repeats, warmup=0)
    s = method.summarize(runs["pretrain"])
    fpt = model.flops_per_token()
    print(f"\npretrain gpt2-124m, {args.batch} x {cfg.block_size} tokens a step, bf16"
          f"{', compiled' if args.compile else ''}; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print("| step | tokens/s | MFU |\n| ---: | ---: | ---: |")
    mfu = (lambda sec: fpt * tokens / sec / peak) if peak else (lambda sec: float("nan"))
    print(f"| {s.median * 1e3:.0f} ms ({s.low * 1e3:.0f}..{s.high * 1e3:.0f}) | {tokens / s.median:,.0f} "
          f"| {mfu(s.median):.1%} ({mfu(s.high):.1%}..{mfu(s.low):.1%}) |")

    del opt, step
    model.eval()
    print(f"\ndecode gpt2-124m, greedy, 32-token prompt + {args.new_tokens} new tokens a row")
    print("| batch | tokens/s (median, min..max) |\n| ---: | ---: |")
    for b in args.decode_batches:
        decode_tokens_per_s(model, b, 16)  # warm-up
        runs = method.interleave({"decode": lambda: decode_tokens_per_s(model, b, args.new_tokens)},
                                 repeats=args.repeats, warmup=0)
        d = method.summarize(runs["decode"])
        print(f"| {b} | {d.median:,.0f} ({d.low:,.0f}..{d.high:,.0f}) |")


if __name__ == "__main__":
    main()
