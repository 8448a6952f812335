"""The GPU paths, each a device switch of a CPU test that covers the same code:

- a bf16 pretrain step on Ray Train (1 worker, 1 GPU: autocast, CUDA peak memory, TF32, MFU
  against the GPU's table peak): tests/test_pretrain.py's fits on CPU;
- FSDP2 over NCCL at world size 1 through the same stage (bf16 mixed precision; and with CPU
  offload, where the optimizer steps on the host): tests/test_sharding.py's gloo fits;
- DDP over NCCL at world size 1, in this process: the DDP-wrapped step's gradients are the bare
  model's (test_sharding.py's DDP reference, on CPU), and a sharded (FSDP2) model's DCP checkpoint
  written and read back on CUDA (test_sharding.py's resume fits);
- a serving engine step on CUDA gives what ``sampling.generate`` gives there
  (tests/test_serve_engine.py on CPU);
- a checkpoint round trip on CUDA: a bf16 model saved from the GPU loads back onto it bit for bit
  through ``open_checkpoint`` (tests/test_checkpoints.py, tests/test_hf_families.py on CPU).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from test_pretrain import base_config, collector_sink, dataset_inputs, make_dataset, metric_steps


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("gpu-ds") / "ds")


def fit_on_gpu(ray, tmp: Path, ds: Path, **config):
    from workers.kinds import pretrain
    from workers.stage import Resources, local_context

    ctx = local_context(tmp, "pretrain", inputs=dataset_inputs(ds), resources=Resources(cpus=1, gpus=1, workers=1))
    ctx = replace(ctx, sink=collector_sink(ray))
    outputs = pretrain.run(ctx, base_config(max_steps=20, precision="bf16", **config))
    return outputs, ctx.sink.events()


def check_fit(outputs, events, strategy: str) -> None:
    from workers.model.hf import load_pretrained

    tags = {k: v for e in events if e["type"] == "tags" for k, v in e["tags"].items()}
    assert tags["train.strategy"] == strategy
    losses = [v for _, v in metric_steps(events, "train_loss")]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    last = [e["metrics"] for e in events if e["type"] == "metrics" and "train_loss" in e["metrics"]][-1]
    assert last["peak_memory_mb_rank0"] > 0  # torch.cuda.max_memory_allocated, not the host's RSS
    model = load_pretrained(outputs["checkpoint"])  # consolidated into the Hugging Face layout
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("strategy, extra", [
    ("ddp", {}),
    ("fsdp", {}),
    ("fsdp", {"fsdp": {"cpu_offload": True}}),
], ids=["bf16-ddp", "fsdp2-nccl-bf16", "fsdp2-nccl-cpu-offload"])
def test_bf16_pretrain_on_ray_train(ray_session, dataset, tmp_path, strategy, extra):
    """One worker on one GPU; fsdp makes Ray Train start an NCCL process group of one."""
    outputs, events = fit_on_gpu(ray_session, tmp_path, dataset, strategy=strategy, **extra)
    check_fit(outputs, events, strategy)
    if strategy == "ddp":
        last = [e["metrics"] for e in events if e["type"] == "metrics" and "mfu" in e["metrics"]][-1]
        assert 0 < last["mfu"] < 1


# ----------------------------------------------------------------------------- NCCL in this process


@pytest.fixture(scope="module")
def nccl():
    import torch.distributed as dist

    from tests.conftest import free_port

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0,
                            device_id=torch.device("cuda", 0))
    yield torch.device("cuda", 0)
    dist.destroy_process_group()


def _tiny(seed: int = 0):
    from workers.model.transformer import GPT, config_for

    torch.manual_seed(seed)
    return GPT(config_for({"size": "llama-tiny", "block_size": 32}, 64))


def test_ddp_step_over_nccl_has_the_bare_models_gradients(nccl):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from workers.training import sharding

    device = nccl
    bare, wrapped = _tiny().to(device), _tiny().to(device)
    ddp = DDP(wrapped, device_ids=[device.index])  # what sharding.replicate builds for world > 1
    x = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1)).to(device)
    for model in (bare, ddp):
        for i, micro in enumerate((x[:2], x[2:])):  # two micro-batches, reduced on the last only
            with sharding.gradient_sync(model, i == 1):
                model(micro, micro)[1].div(2).backward()
    for (name, p), q in zip(bare.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp2_bf16_state_round_trips_through_dcp_on_cuda(nccl, tmp_path):
    from workers.training import sharding
    from workers.training.params import adamw

    device = nccl
    model = sharding.shard(_tiny(), world=1, device=device, precision="bf16", reshard_after_forward=True,
                           cpu_offload=False)
    opt = adamw(model, lr=1e-2, weight_decay=0.0)
    x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(2)).to(device)
    model(x, x)[1].backward()
    opt.step()
    sharding.save_state(tmp_path / "ckpt", model, opt)
    again = sharding.shard(_tiny(seed=5), world=1, device=device, precision="bf16", reshard_after_forward=True,
                           cpu_offload=False)
    opt2 = adamw(again, lr=1e-2, weight_decay=0.0)
    sharding.load_state(tmp_path / "ckpt", again, opt2)
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(sharding.to_local(p), sharding.to_local(q)), name  # full tensors of the shards
    plain = sharding.consolidate(tmp_path / "ckpt", _tiny(seed=6))  # the driver's export, on the host
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(sharding.to_local(p).detach().cpu(), q.detach()), name


# ----------------------------------------------------------------------------- serving, checkpoints


def test_engine_step_on_cuda_matches_generate(serve_checkpoint_dir):
    from workers.data import tokenizer as toks
    from workers.model.sampling import SamplingParams, generate
    from workers.model.hf import load_pretrained
    from workers.serving.engine import Engine, GenerationRequest

    model = load_pretrained(serve_checkpoint_dir, map_location="cuda").eval()
    tok = toks.load(serve_checkpoint_dir / "tokenizer.json")
    eos = toks.eos_id(tok)
    params = SamplingParams(max_tokens=8, temperature=0)
    done = []
    engine = Engine(model, tok, eos_token_id=eos, max_batch_size=2, max_queue=2, device="cuda")
    req = GenerationRequest(tok.encode("hello").ids, params, emit=done.extend)
    engine.submit([req])
    for _ in range(20):
        engine.step()
        engine.drain()
        if req.done:
            break
    assert req.done and req.seqs[0].finish is not None
    ref = generate(model, [tok.encode("hello").ids], params, eos_token_id=eos, decode=tok.decode, device="cuda")[0]
    assert req.seqs[0].token_ids == ref[0].token_ids
    assert engine.stats.in_flight == 0


def test_bf16_checkpoint_round_trip_on_cuda(tmp_path):
    from workers.checkpoints import open_checkpoint
    from workers.data import tokenizer as toks
    from workers.model.hf import save_model

    model = _tiny().to("cuda", torch.bfloat16).eval()
    tok = toks.train_char(["abcdefgh"])
    save_model(model, tmp_path, extra={"eos_token_id": toks.eos_id(tok)})
    toks.save(tok, tmp_path)
    again = open_checkpoint(tmp_path, device="cuda").model
    p = next(again.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    x = torch.randint(0, 64, (2, 16), device="cuda")
    with torch.no_grad():
        assert torch.equal(model(x)[0], again(x)[0])
