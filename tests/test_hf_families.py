"""workers/model/hf.py + transformer.py against `transformers`: every family, both directions.

Tiny random models written by `transformers` (GPT-2, Llama with GQA/MQA/rope scaling/tied or
untied, Qwen2, Mistral with and without a sliding window) load into our model with the same
logits and greedy tokens; models we write load in `AutoModelForCausalLM` with the same family and
the same outputs; the KV cache decode equals a full recompute in every family.
"""

from __future__ import annotations

import json

import pytest
import torch

from workers.model.hf import load_model, read_model_config, save_model
from workers.model.sampling import SamplingParams, generate
from workers.model.transformer import GPT, KVCache, config_for

pytestmark = pytest.mark.usefixtures("one_thread")

V = 101
_LLAMA = dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, initializer_range=0.1)

# case -> (transformers config class, its kwargs)
CASES = {
    "gpt2": ("GPT2Config", dict(vocab_size=V, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                activation_function="gelu_new", initializer_range=0.1)),
    "llama-gqa": ("LlamaConfig", dict(_LLAMA, num_key_value_heads=2)),
    "llama-mqa-tied": ("LlamaConfig", dict(_LLAMA, num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-rope-linear": ("LlamaConfig", dict(_LLAMA, num_key_value_heads=2, rope_scaling=dict(
        rope_type="linear", factor=4.0))),
    "llama-rope-llama3": ("LlamaConfig", dict(_LLAMA, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2": ("Qwen2Config", dict(_LLAMA, num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(_LLAMA, num_key_value_heads=2, sliding_window=None)),
    "mistral-window": ("MistralConfig", dict(_LLAMA, num_key_value_heads=2, sliding_window=6)),
}
ARCH = {"GPT2Config": "GPT2LMHeadModel", "LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
        "MistralConfig": "MistralForCausalLM"}


def hf_model(case: str, seed: int = 0, dtype=torch.float32):
    import transformers

    cls_name, kwargs = CASES[case]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    return getattr(transformers, ARCH[cls_name])(config).to(dtype).eval()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """case -> (a folder written by transformers' save_pretrained, that model)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = {}
    for case in CASES:
        model = hf_model(case)
        folder = tmp_path_factory.mktemp(case)
        model.save_pretrained(folder)
        out[case] = (folder, model)
    return out


PROMPTS = [[3, 17, 42, 9, 88, 5, 61, 23, 7, 14], [50, 2, 99, 31, 12, 77, 40, 8, 26, 63]]


def hf_greedy(model, prompts, n: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    return out[:, ids.size(1):].tolist()


def our_greedy(model, prompts, n: int) -> list[list[int]]:
    return [c[0].token_ids for c in generate(model, prompts, SamplingParams(max_tokens=n, temperature=0))]


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_transformers_folder_loads_with_same_logits_and_greedy_tokens(written, case):
    folder, theirs = written[case]
    ours = load_model(folder).eval()
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-4, rtol=0)
    assert our_greedy(ours, PROMPTS, 12) == hf_greedy(theirs, PROMPTS, 12)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_we_write_what_auto_model_loads_with_same_outputs(tmp_path, written, case):
    from transformers import AutoModelForCausalLM

    ours = load_model(written[case][0]).eval()  # carries the model_type (mistral stays mistral)
    torch.manual_seed(2)
    with torch.no_grad():  # new weights, so the outputs are ours, not a copy of the file we read
        for p in ours.parameters():
            p.normal_(0.0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    save_model(ours, tmp_path, extra={"eos_token_id": 1})
    written_cfg = json.loads((tmp_path / "config.json").read_text())
    assert written_cfg["architectures"] == [ARCH[CASES[case][0]]]
    assert written_cfg["eos_token_id"] == 1 and written_cfg["torch_dtype"] == "float32"
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == ARCH[CASES[case][0]]
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)
    assert hf_greedy(theirs, PROMPTS, 12) == our_greedy(ours, PROMPTS, 12)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_kv_cache_decode_equals_full_recompute(written, case):
    model = load_model(written[case][0]).eval()
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(4))
    full, _ = model(idx)
    cache = KVCache.empty(model, 2, 20)
    chunks = [model(idx[:, :7], kv_cache=cache)[0], model(idx[:, 7:10], kv_cache=cache)[0]]
    chunks += [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(10, 20)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)
    # left padding: a short prompt in a padded batch gives its unpadded logits
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :8] = 0
    padded, _ = model(idx, attention_mask=mask)
    alone, _ = model(idx[1:, 8:])
    torch.testing.assert_close(padded[1, 8:], alone[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_bf16_sharded_llama_loads_in_bf16_and_writes_sharded(tmp_path):
    from transformers import AutoModelForCausalLM

    theirs = hf_model("llama-gqa", dtype=torch.bfloat16)
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = load_model(tmp_path / "hf")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(5))
    # the same bf16 weights computed in fp32 on both sides: exact to 1e-4
    up = load_model(tmp_path / "hf", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(up(idx)[0], ref(idx).logits, atol=1e-4, rtol=0)

    save_model(ours, tmp_path / "ours", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype="auto").eval()
    assert back.dtype == torch.bfloat16
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto").eval()
    torch.testing.assert_close(back(idx).logits, again(idx).logits, atol=0, rtol=0)  # same bf16 weights
    # saving again unsharded replaces the shards
    save_model(ours, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "model.safetensors"]


def test_unsupported_model_type_and_options_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    with pytest.raises(ValueError, match=r"model_type 'gemma' is not supported; supported: gpt2, llama, "
                                         r"mistral, qwen2"):
        load_model(tmp_path)
    cfg = dict(CASES["llama-gqa"][1], model_type="llama",
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"rope_scaling type 'yarn' is not supported; supported: default, "
                                         r"linear, llama3"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, rope_parameters=None, hidden_act="gelu")))
    with pytest.raises(ValueError, match=r"hidden_act 'gelu' is not supported; supported: silu"):
        read_model_config(tmp_path)
    with pytest.raises(ValueError, match=r"model.rope_scaling: rope_type 'dynamic' is not supported"):
        config_for({"size": "llama-tiny", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, V)
    with pytest.raises(ValueError, match=r"model.n_kv_head: got 3; must divide model.n_head \(4\)"):
        config_for({"size": "llama-tiny", "n_kv_head": 3}, V)
    with pytest.raises(ValueError, match=r"save_model: no Hugging Face layout for position='rope', "
                                         r"norm='layernorm'"):
        save_model(GPT(config_for({"size": "tiny", "position": "rope"}, V)), tmp_path / "x")
