"""workers/model/transformer.py: shapes, loss, KV cache == recompute, HF GPT-2 round trip, training, sizes."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from workers.training.params import adamw

from workers.model.transformer import GPT, SIZES, GPTConfig, KVCache, autocast_context, config_for, default_device
from workers.model.hf import load_pretrained, read_config, save_pretrained

V = 97


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0, **over) -> GPT:
    torch.manual_seed(seed)
    return GPT(config_for({"size": "tiny", **over}, vocab_size=V)).eval()


def test_forward_shapes_and_random_init_loss():
    m = tiny()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (4, 32), generator=g)
    targets = torch.randint(0, V, (4, 32), generator=g)
    logits, loss = m(idx, targets)
    assert logits.shape == (4, 32, V)
    assert abs(loss.item() - math.log(V)) < 0.1
    assert m(idx)[1] is None
    h = m.hidden_states(idx)
    assert h.shape == (4, 32, 64)
    torch.testing.assert_close(m.lm_head(h), logits)
    torch.testing.assert_close(m(idx, logits_to_keep=1)[0], logits[:, -1:])  # a prefill's only need


def test_loss_mask_and_ignore_index_agree():
    m = tiny()
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    targets = idx.roll(-1, 1)
    keep = torch.zeros(2, 16)
    keep[:, 8:] = 1  # response-only loss
    _, masked = m(idx, targets, loss_mask=keep)
    _, ignored = m(idx, targets.masked_fill(keep == 0, -100))
    _, full = m(idx, targets)
    torch.testing.assert_close(masked, ignored)
    assert abs(masked.item() - full.item()) > 1e-4


@torch.no_grad()
def test_kv_cache_incremental_equals_full_recompute():
    m = tiny()
    idx = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(3))
    full, _ = m(idx)
    cache = KVCache.empty(m, 3, 20)
    chunks = [m(idx[:, :7], kv_cache=cache)[0]]            # prefill
    chunks.append(m(idx[:, 7:10], kv_cache=cache)[0])      # chunk after a cached prefix
    for t in range(10, 20):                                # one token at a time
        chunks.append(m(idx[:, t:t + 1], kv_cache=cache)[0])
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_left_padded_batch_matches_unpadded_and_cache():
    m = tiny()
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (12, 5, 9)]
    T = 12
    idx = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    padded, _ = m(idx, attention_mask=mask)
    assert torch.isfinite(padded).all()  # pad rows never fully masked
    for i, s in enumerate(seqs):
        alone, _ = m(s[None])
        torch.testing.assert_close(padded[i, T - len(s):], alone[0], atol=1e-5, rtol=0)
    # incremental with the mask growing by one real column per step
    cache = KVCache.empty(m, 3, T)
    pref = 6
    out = [m(idx[:, :pref], attention_mask=mask[:, :pref], kv_cache=cache)[0]]
    for t in range(pref, T):
        out.append(m(idx[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache)[0])
    inc = torch.cat(out, 1)
    torch.testing.assert_close(inc * mask[..., None], padded * mask[..., None], atol=1e-5, rtol=0)


@pytest.mark.parametrize("over", [
    {"size": "tiny"},
    {"size": "tiny", "bias": False, "tie_embeddings": False},
    {"size": "llama-tiny"},
    {"size": "llama-tiny", "n_kv_head": 1, "qkv_bias": True},
    {"size": "llama-tiny", "sliding_window": 5},
], ids=["gpt2", "gpt2-no-bias-untied", "llama-gqa", "mqa-qkv-bias", "sliding-window"])
def test_step_decoder_is_the_forward_on_a_kv_cache(over):
    """The decoding fast path gives forward's logits (bit for bit where it does the same ops;
    a sliding window reads only the window's keys where forward masks the others)."""
    m = tiny(**over)
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref, ours = KVCache.empty(m, 2, 12), KVCache.empty(m, 2, 12)
        m(idx[:, :4], kv_cache=ref)
        m(idx[:, :4], kv_cache=ours)
        step = m.step_decoder()
        for t in range(4, 12):
            want = m(idx[:, t:t + 1], kv_cache=ref)[0][:, -1]
            got = step(idx[:, t], ours)
            if "sliding_window" in over:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            else:
                assert torch.equal(got, want)
        assert ours.pos == ref.pos == 12
        torch.testing.assert_close(got, m(idx)[0][:, -1], atol=1e-5, rtol=0)


def test_step_decoder_only_for_models_it_mirrors():
    from workers.model.lora import apply_lora

    m = tiny()
    assert m.train().step_decoder() is None                    # dropout, autograd: forward's job
    assert m.eval().step_decoder() is not None
    handle = m.transformer.h[0].register_forward_hook(lambda *a: None)
    assert m.step_decoder() is None                            # a hook must still run
    handle.remove()
    assert apply_lora(m, rank=2).step_decoder() is None        # wrapped Linears


def test_kv_cache_limits():
    m = tiny()
    with pytest.raises(ValueError, match="block_size"):
        KVCache.empty(m, 1, 129)
    cache = KVCache.empty(m, 1, 4)
    with pytest.raises(ValueError, match="max_len is 4"):
        m(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


@torch.no_grad()
def test_save_then_transformers_loads_same_logits(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = tiny()
    save_pretrained(m, tmp_path, extra={"eos_token_id": 5, "chat_template": "{{ x }}"})
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
    assert (cfg["n_positions"], cfg["n_ctx"], cfg["vocab_size"]) == (128, 128, V)
    assert read_config(tmp_path)["chat_template"] == "{{ x }}"
    assert GPT2Config.from_pretrained(tmp_path).eos_token_id == 5
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(hf(idx).logits, m(idx)[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_transformers_save_then_we_load_same_logits(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(6)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                    activation_function="gelu_new")).eval()
    hf.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(7))
    ref = hf(idx).logits
    ours = load_pretrained(tmp_path / "hf")
    torch.testing.assert_close(ours(idx)[0], ref, atol=1e-5, rtol=0)
    # older-style checkpoint: no "transformer." prefix, causal-mask buffers, no lm_head
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in sd.items() if not k.startswith("lm_head")}
    old["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    old["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / "model.safetensors"))
    (tmp_path / "old" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.testing.assert_close(load_pretrained(tmp_path / "old")(idx)[0], ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_bias_free_model_exports_to_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    m = tiny(bias=False)
    save_pretrained(m, tmp_path)
    idx = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(8))
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hf(idx).logits, m(idx)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(load_pretrained(tmp_path)(idx)[0], m(idx)[0], atol=1e-5, rtol=0)


def test_load_refuses_pickle_only_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": V,
                                                      "n_positions": 8, "n_embd": 8, "n_layer": 1,
                                                      "n_head": 1}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "missing")


def test_loss_falls_when_overfitting_a_tiny_batch():
    m = tiny().train()
    opt = adamw(m, weight_decay=0.1, lr=3e-3)
    idx = torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(9))
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(50):
        _, loss = m(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_optimizer_groups_decay_only_matrices():
    m = tiny()
    opt = adamw(m, weight_decay=0.1, lr=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params(False)


def test_num_params_and_flops_per_token_formula():
    m = tiny()
    L, C, T, H = 2, 64, 128, 2
    per_layer = 12 * C * C + 13 * C  # ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj (with biases)
    n = V * C + L * per_layer + 2 * C  # tied wte/lm_head counted once, + ln_f; wpe excluded
    assert m.num_params() == n
    assert m.num_params(non_embedding=False) == n + T * C
    assert m.flops_per_token() == 6 * n + 12 * L * H * (C // H) * T


def test_config_for_sizes_and_errors():
    assert config_for("small", 500) == GPTConfig(vocab_size=500, block_size=256, n_layer=4,
                                                 n_head=4, n_embd=128)
    c = config_for({"size": "medium", "n_layer": 2, "dropout": 0.1}, 500)
    assert (c.n_layer, c.n_embd, c.block_size, c.dropout) == (2, 384, 512, 0.1)
    explicit = config_for({"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8}, 11)
    assert explicit.vocab_size == 11
    assert SIZES["gpt2-124m"] == dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    with pytest.raises(ValueError, match=r"unknown size 'huge'.*tiny, small, medium, gpt2-124m"):
        config_for("huge", 10)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['layers'\]"):
        config_for({"size": "tiny", "layers": 3}, 10)
    with pytest.raises(ValueError, match=r"missing field\(s\)"):
        config_for({"n_layer": 1}, 10)
    with pytest.raises(ValueError, match="model.n_embd: got 65"):
        config_for({"size": "tiny", "n_embd": 65}, 10)


def test_device_helpers():
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    with autocast_context("cpu", "auto"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision: got 'fp8'"):
        autocast_context("cpu", "fp8")
