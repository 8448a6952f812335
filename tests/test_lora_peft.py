"""LoRA named as Hugging Face names it, and saved as a PEFT adapter that `peft` itself loads.

The reference is `peft` (0.22): ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
adapter)`` must compute the logits our merged checkpoint computes (fp32, max abs diff <= 1e-4),
for a tiny random Llama written by `transformers` (targets on slices of our fused q/k/v and
gate/up: q_proj alone, v_proj, up_proj, plus o_proj and down_proj) and for GPT-2 (Conv1D,
fan_in_fan_out; one of the two c_proj). Unit cases set the adapters to random values (a trained
B is small); one real `finetune` stage on Ray Train (`lora.save: both`) is the acceptance run.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from workers.checkpoints import open_checkpoint
from workers.model.hf import load_model, save_model
from workers.model.lora import LoRALinear, apply_lora, check_target_modules, merge_lora, save_peft_adapter

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _tokenizer(folder: Path):
    """README's "Bring your own model" tokenizer: a small BPE with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([inspect.getsource(json)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return tok


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """fp32 tiny random models written by transformers: a Llama (GQA) and a GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bases")
    out = {}
    for family in ("llama", "gpt2"):
        folder = root / family
        tok = _tokenizer(folder)
        torch.manual_seed(0)
        if family == "llama":
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
                bos_token_id=0, eos_token_id=1))
        else:
            model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                               initializer_range=0.1, bos_token_id=0, eos_token_id=1))
        model.save_pretrained(folder)
        out[family] = folder
    return out


def peft_logits(base: Path, adapter: Path, x: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        return model(x).logits


def hf_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(x).logits


CASES = {
    # the q rows of the fused c_attn alone, v's rows, up's rows of the fused c_fc, and whole layers
    "llama": (["q_proj", "v_proj", "up_proj", "o_proj", "down_proj"],
              ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    # mlp.c_proj: one of GPT-2's two c_proj
    "gpt2": (["c_attn", "mlp.c_proj", "c_fc"], ["c_attn", "c_fc", "mlp.c_proj"]),
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_loads_in_peft_with_the_merged_models_logits(bases, tmp_path, family):
    targets, written = CASES[family]
    model = load_model(bases[family], dtype=torch.float32).eval()
    apply_lora(model, rank=4, alpha=8.0, target_modules=targets)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:  # B starts at zero; give both factors values a trained pair could have
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        ours = model(x)[0]
    assert save_peft_adapter(model, tmp_path / "adapter", base_model=str(bases[family])) == written
    save_model(merge_lora(model), tmp_path / "merged")

    merged, peft = hf_logits(tmp_path / "merged", x), peft_logits(bases[family], tmp_path / "adapter", x)
    base = hf_logits(bases[family], x)
    assert (merged - base).abs().max() > 0.1  # the adapters change the function: the comparison means something
    assert (peft - merged).abs().max() <= 1e-4
    assert (ours - merged).abs().max() <= 1e-4

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias",
                                "fan_in_fan_out", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": family == "gpt2", "base_model_name_or_path": str(bases[family])}


def test_a_slice_adapter_trains_only_its_rows_and_peft_names_its_keys(bases, tmp_path):
    """q_proj alone on Llama: one adapter on the q rows of our fused c_attn; k and v rows untouched."""
    from safetensors.torch import load_file

    model = load_model(bases["llama"], dtype=torch.float32)
    apply_lora(model, rank=2, alpha=4.0, target_modules=["q_proj"])
    attn = model.transformer.h[0].attn.c_attn
    cfg = model.config
    q = cfg.n_head * cfg.head_size
    assert isinstance(attn, LoRALinear) and attn.slices == ((0, q),)
    assert not isinstance(model.transformer.h[0].mlp.c_fc, LoRALinear)
    with torch.no_grad():
        attn.lora_B[0].fill_(1.0)
    delta = attn.delta_weight()
    assert delta[:q].abs().min() >= 0 and delta[:q].abs().max() > 0 and not delta[q:].any()
    save_peft_adapter(model, tmp_path, base_model="base")
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in keys.items() if ".0." in k} == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (2, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (q, 2)}


@pytest.mark.parametrize("model_type, targets, match", [
    ("llama", ["c_attn"], r"lora.target_modules: got \['c_attn'\]; allowed for this llama model: q_proj, k_proj"),
    ("qwen2", ["q_proj", "qkv"], r"got \['qkv'\]; allowed for this qwen2 model"),
    ("gpt2", ["q_proj"], r"got \['q_proj'\]; allowed for this gpt2 model: c_attn, c_proj, c_fc, attn.c_proj"),
])
def test_target_names_are_the_familys(model_type, targets, match):
    with pytest.raises(ValueError, match=match):
        check_target_modules(targets, model_type)
    check_target_modules(None, model_type)  # the default: every Linear of the family


def test_the_stage_refuses_another_familys_names_before_training(bases, tmp_path):
    from workers.kinds import finetune
    from workers.data import records as sft_data
    from workers.stage import local_context

    data = sft_data.write_jsonl(tmp_path / "sft.jsonl", sft_data.synthetic_sft(8, seed=1))
    cfg = finetune.Config(checkpoint=str(bases["llama"]), data=data, lora={"target_modules": ["c_attn", "c_fc"]})
    with pytest.raises(ValueError, match=r"lora.target_modules: got \['c_attn', 'c_fc'\]; allowed for this llama"):
        finetune.build_job(local_context(tmp_path, "finetune"), cfg)


def test_save_adapter_alone_publishes_the_adapter_and_no_checkpoint(bases, tmp_path):
    """lora.save: adapter: the training checkpoint holds the adapter folder alone, and the stage's
    outputs name it and its base, with no `checkpoint` (a downstream stage asking for one is told so)."""
    from workers.kinds import finetune
    from workers.stage import local_context
    from workers.training.loop import FitResult

    model = load_model(bases["gpt2"], dtype=torch.float32)
    apply_lora(model, rank=2, alpha=4.0)
    trained = tmp_path / "train"
    finetune.save_policy(model, trained, extra={}, save="adapter", base_model=str(bases["gpt2"]))
    assert sorted(p.name for p in trained.iterdir()) == ["adapter"]
    ctx = local_context(tmp_path, "finetune")
    base = open_checkpoint(bases["gpt2"], load=None)
    out = finetune.publish_outputs(ctx, FitResult(trained, {}), base, TEMPLATE, "adapter")
    assert out == {"adapter": str(ctx.artifact_dir / "adapter"), "base_checkpoint": str(bases["gpt2"])}
    assert sorted(p.name for p in (ctx.artifact_dir / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "generation_config.json",
        "tokenizer.json", "tokenizer_config.json"]
    downstream = local_context(tmp_path, "rlhf", inputs={"finetune": out})
    with pytest.raises(ValueError, match=r"upstream 'finetune' has no `checkpoint` output"):
        downstream.upstream("checkpoint", "finetune", field="policy")


# ----------------------------------------------------------------------------- the real stage


@pytest.fixture(scope="module")
def finetuned(ray_session, bases, tmp_path_factory):
    """A short LoRA finetune of the Llama through the stage on Ray Train, saving both."""
    from workers.data import records as sft_data
    from workers.kinds import finetune
    from workers.stage import Resources, local_context

    tmp = tmp_path_factory.mktemp("lora-stage")
    data = sft_data.write_jsonl(tmp / "sft.jsonl", sft_data.synthetic_sft(32, seed=1))
    ctx = local_context(tmp, "finetune", resources=Resources(cpus=1, workers=1))
    cfg = finetune.Config(checkpoint=str(bases["llama"]), data=data, max_steps=4, batch_size=4, lr=3e-2, min_lr=3e-2,
                          warmup_steps=0, eval_steps=1, eval_every=4, checkpoint_every=4, val_fraction=0.1,
                          lora={"rank": 4, "alpha": 16, "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"],
                                "save": "both"})
    return finetune.run(ctx, cfg)


@pytest.mark.slow
def test_finetune_stage_adapter_matches_its_merged_checkpoint_in_peft(finetuned, bases):
    out = finetuned
    adapter, merged = Path(out["adapter"]), Path(out["checkpoint"])
    assert out["base_checkpoint"] == str(bases["llama"])
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "generation_config.json",
        "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == [
        "down_proj", "gate_proj", "q_proj", "v_proj"]
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    ours = hf_logits(merged, x)
    assert (ours - hf_logits(bases["llama"], x)).abs().max() > 1e-2  # four steps moved the function
    assert (peft_logits(bases["llama"], adapter, x) - ours).abs().max() <= 1e-4
    # the merged checkpoint is the stage's `checkpoint` as before: it opens (and serves) like any other
    assert open_checkpoint(merged, load="lm", device="cpu").model.config.n_layer == 2
