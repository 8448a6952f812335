"""The `finetune` kind: response-only loss, LoRA (only adapters train, merged == unmerged), the
chat template saved with the checkpoint, messages records, errors naming files and fields, the
builtin demo data, full fine-tuning stepped in-process, and one real Ray Train fit (LoRA on 2
DDP workers, messages records) shared through a module-scoped fixture.
"""

from __future__ import annotations

import ast
import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from workers.kinds import finetune
from workers.data import records as sft_data
from workers.data import tokenizer as toks
from workers.data.chat import DEFAULT_CHAT_TEMPLATE, render_chat
from workers.model.lora import LoRALinear, apply_lora
from workers.model.transformer import GPT, config_for
from workers.model.hf import load_pretrained, save_pretrained
from workers.stage import Resources, local_context
from workers.training.params import adamw

BLOCK = 64


# ----------------------------------------------------------------------------- helpers


def make_base(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised (final gain 8) `tiny` GPT (block 64) + a char tokenizer over printable ASCII."""
    tok = toks.train_char([string.printable])
    torch.manual_seed(seed)
    model = GPT(config_for({"size": "tiny", "block_size": BLOCK}, tok.get_vocab_size()))
    # At init, tied embeddings (std 0.02) and a unit LayerNorm gain cap every logit near +-1, so
    # a frozen random base (LoRA) could not fit anything; a trained model's final gain is larger.
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(8.0)
    eos = toks.eos_id(tok)
    save_pretrained(model, folder, extra={"eos_token_id": eos, "bos_token_id": eos})
    toks.save(tok, folder)
    return folder


def sft_config(**overrides) -> finetune.Config:
    cfg = dict(data="unused", batch_size=8, max_steps=40, lr=3e-3, min_lr=3e-4, warmup_steps=5, weight_decay=0.0,
               eval_every=20, eval_steps=2, checkpoint_every=20, val_fraction=0.2, seed=3)
    cfg.update(overrides)
    return finetune.Config(**cfg)


def rows_of(job) -> dict[str, np.ndarray]:
    return sft_data.load_arrays(job.make_batches.keywords["val_uri"])


def mean_loss(model, arrays) -> float:
    b = finetune.sft_batch(arrays)
    model.eval()
    with torch.no_grad():
        return float(finetune.sft_loss(model, b))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "checkpoint")


# ----------------------------------------------------------------------------- no Ray needed


def test_loss_covers_response_tokens_only(base, tmp_path):
    model = load_pretrained(base)
    tok = toks.load(base / "tokenizer.json")
    eos = toks.eos_id(tok)
    pairs = [("copy: ab cd", "ab cd"), ("copy: e", "e"), ("x" * 70, "long prompt keeps its end")]
    rows, n_prompt = [], []
    for p, r in pairs:
        ids, kept = sft_data.encode_example(tok.encode(p).ids, tok.encode(r).ids, eos, BLOCK)
        rows.append(ids)
        n_prompt.append(kept)
    ids, lengths = sft_data.pad_rows(rows, BLOCK + 1, eos)
    b = finetune.sft_batch({"ids": ids, "lengths": lengths, "n_prompt": np.array(n_prompt)})
    # the long prompt lost its start, not its end; every row ends with EOS
    assert n_prompt[2] < 70 and rows[2][-1] == eos and len(rows[2]) <= BLOCK + 1
    assert all(r[-1] == eos for r in rows)
    with torch.no_grad():
        logits, loss = model(b["idx"], b["targets"], loss_mask=b["loss_mask"])
        terms = []
        for i, row in enumerate(rows):
            for t in range(n_prompt[i] - 1, len(row) - 1):  # predicts response tokens and the EOS
                terms.append(F.cross_entropy(logits[i, t], torch.tensor(row[t + 1])))
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    # changing prompt tokens' targets cannot change the loss
    b2 = dict(b, targets=b["targets"].masked_fill(b["loss_mask"] == 0, 0))
    with torch.no_grad():
        assert float(finetune.sft_loss(model, b2)) == pytest.approx(float(loss), rel=1e-6)


def test_lora_trains_only_adapters_and_merges_exactly(tmp_path):
    torch.manual_seed(0)
    model = GPT(config_for({"size": "tiny", "block_size": 32}, 50))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8, target_modules=["c_attn", "c_fc"])
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4  # 2 layers x (c_attn, c_fc)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    x = torch.randint(0, 50, (4, 32))
    with torch.no_grad():
        assert torch.equal(model(x)[0], GPT.forward(model, x)[0])
    opt = adamw(model, lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        _, loss = model(x, x)
        loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads == trainable
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen base weight changed"
    model.eval()
    with torch.no_grad():
        lora_logits = model(x)[0]
        assert not torch.allclose(lora_logits, GPT.forward(_fresh(before), x)[0], atol=1e-4)  # adapters learned
        # saved merged (as the kind saves) -> plain GPT with the same logits
        finetune.save_policy(model, tmp_path, extra={})
        assert torch.allclose(load_pretrained(tmp_path)(x)[0], lora_logits, atol=1e-5)


def _fresh(state) -> GPT:
    m = GPT(config_for({"size": "tiny", "block_size": 32}, 50))
    m.load_state_dict(state)
    return m.eval()


def test_messages_records_and_prompt_templates(tmp_path):
    rec = sft_data.Record({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "hello"}]}, "x.jsonl line 1")
    kw = dict(prompt_field="prompt", response_field="response", messages_field="messages", prompt_template=None,
              chat_template=None)
    prompt, response = sft_data.sft_pair(rec, **kw)
    assert response == "hello"
    assert prompt == render_chat(rec.data["messages"][:2], None, add_generation_prompt=True)
    # a plain prompt is one user message through the chat template, which prompt_template reproduces
    plain = sft_data.Record({"prompt": "a {b}", "response": "c"}, "x.jsonl line 2")
    p2, _ = sft_data.sft_pair(plain, **kw)
    assert p2 == "<|user|>\na {b}\n<|assistant|>\n"
    derived = sft_data.derive_prompt_template(DEFAULT_CHAT_TEMPLATE)
    assert derived.format(prompt="a {b}") == p2
    assert sft_data.sft_pair(plain, **{**kw, "prompt_template": "Q: {prompt}\nA:"})[0] == "Q: a {b}\nA:"
    bad = sft_data.Record({"messages": [{"role": "user", "content": "hi"}]}, "x.jsonl line 3")
    with pytest.raises(sft_data.RecordError, match=r"x.jsonl line 3: the last of 'messages' must be an 'assistant'"):
        sft_data.sft_pair(bad, **kw)


def test_record_errors_name_file_and_line(base, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "answer": "b"}\n')
    ctx = local_context(tmp_path, "ft", inputs={"pre": {"checkpoint": str(base)}})
    with pytest.raises(sft_data.RecordError, match=rf"{data} line 3: no field 'response' .*'answer'.*response_field"):
        finetune.build_job(ctx, sft_config(data=str(data)))
    data.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(sft_data.RecordError, match=rf"{data} line 2: not valid JSON"):
        finetune.build_job(ctx, sft_config(data=str(data)))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": ["a", "b"], "response": ["c", None]}), tmp_path / "d.parquet")
    with pytest.raises(sft_data.RecordError, match=r"d.parquet row 1: no field 'response'"):
        finetune.build_job(ctx, sft_config(data=str(tmp_path / "d.parquet")))
    with pytest.raises(sft_data.RecordError, match=r"unknown builtin data set 'builtin:nope'"):
        finetune.build_job(ctx, sft_config(data="builtin:nope"))
    with pytest.raises(ValueError, match=r"checkpoint: got '/nowhere'; neither an upstream of stage 'ft'"):
        finetune.build_job(ctx, sft_config(data=str(data), checkpoint="/nowhere"))
    with pytest.raises(ValueError, match=rf"checkpoint: got '{tmp_path}'; no config.json there"):
        finetune.build_job(ctx, sft_config(data=str(data), checkpoint=str(tmp_path)))
    with pytest.raises(ValueError, match=r"checkpoint: not set and stage 'ft' has 0 upstreams"):
        finetune.build_job(local_context(tmp_path, "ft"), sft_config(data=str(data)))


@pytest.mark.parametrize("overrides, match", [
    ({"epochs": 2}, r"max_steps / epochs: got both"),
    ({"val_fraction": 1.5}, r"val_fraction"),
    ({"prompt_template": "Q: {question}"}, r"prompt_template: got 'Q: \{question\}'"),
    ({"prompt_template": "no field"}, r"prompt_template: got 'no field'; must contain \{prompt\}"),
    ({"lora": {"rank": 0}}, r"lora.rank"),
    ({"lora": {"target_modules": ["wte"]}}, r"lora.target_modules"),
    ({"learning_rate": 1}, r"learning_rate"),
])
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ValidationError, match=match):
        sft_config(**overrides)


def test_builtin_stdlib_data_is_deterministic_and_well_formed():
    a = list(sft_data.read_records(sft_data.BUILTIN_SFT, max_records=30))
    b = list(sft_data.read_records(sft_data.BUILTIN_SFT, max_records=30))
    assert len(a) == 30 and [r.data for r in a] == [r.data for r in b]
    for r in a:
        assert r.data["prompt"].startswith(("def ", "async def ")) and r.data["response"].strip()
        (fn,) = ast.parse(r.data["prompt"] + r.data["response"]).body  # prompt + response is the function
        assert ast.get_docstring(fn) and len(fn.body) >= 2
    prefs = list(sft_data.read_records(sft_data.BUILTIN_PREFERENCES, max_records=30))
    assert len(prefs) == 30 and all(p.data["chosen"] != p.data["rejected"] for p in prefs)
    assert [p.data["chosen"] for p in prefs[:5]] == [r.data["response"] for r in a[:5]]


def test_example_batches_split_the_global_batch_across_ranks():
    arrays = {"ids": np.arange(10 * 3).reshape(10, 3)}
    kw = dict(batch_size=2, seed=1, eval_steps=1, to_batch=lambda r: {"ids": torch.from_numpy(r["ids"])})
    one = sft_data.ExampleBatches(arrays, arrays, grad_accum=2, rank=0, world=1, **kw)
    two = [sft_data.ExampleBatches(arrays, arrays, grad_accum=1, rank=r, world=2, **kw) for r in (0, 1)]
    for step in (0, 3):
        rows = torch.cat([m["ids"] for m in one.train(step)])
        assert torch.equal(rows[0::2], two[0].train(step)[0]["ids"]) and torch.equal(rows[1::2], two[1].train(step)[0]["ids"])
    # an epoch (10 rows = 2.5 steps of 4) visits every example once before repeating
    seen = torch.cat([m["ids"][:, 0] for s in range(3) for m in one.train(s)])[:10] // 3
    assert sorted(seen.tolist()) == list(range(10))


def test_full_finetuning_job_lowers_the_sft_loss(base, tmp_path):
    """The job's own pieces (model from the checkpoint, step-indexed batches, masked loss),
    stepped in-process: the Ray Train loop around them is the one `pretrain` tests."""
    data = sft_data.write_jsonl(tmp_path / "plain.jsonl", sft_data.synthetic_sft(240, seed=1))
    ctx = local_context(tmp_path, "finetune", inputs={"pre": {"checkpoint": str(base)}})
    cfg = sft_config(data=data)
    job, _, _, stats = finetune.build_job(ctx, cfg)
    assert stats["train_examples"] + stats["val_examples"] == 240 and 0 <= stats["truncated_examples"] < 24
    torch.manual_seed(cfg.seed)
    model = job.make_model()
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    before = mean_loss(model, rows_of(job))
    model.train()
    opt = adamw(model, lr=cfg.lr, weight_decay=0.0)
    batches = job.make_batches(0, 1, torch.device("cpu"))
    for step in range(15):
        for b in batches.train(step):
            job.loss_fn(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert mean_loss(model, rows_of(job)) < 0.6 * before
    job.save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    again = load_pretrained(tmp_path / "ckpt")
    assert mean_loss(again, rows_of(job)) == pytest.approx(mean_loss(model, rows_of(job)), rel=1e-6)


# ----------------------------------------------------------------------------- on Ray Train


@pytest.fixture(scope="module")
def lora_run(ray_session, base, tmp_path_factory):
    """LoRA on a copy task given as messages records, on 2 DDP workers (one fit: each costs
    seconds of Ray Train startup)."""
    tmp = tmp_path_factory.mktemp("finetune")
    records = sft_data.synthetic_sft(240, seed=1)
    chats = sft_data.write_jsonl(tmp / "chat.jsonl", [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
        for r in records])
    ctx = local_context(tmp, "finetune", inputs={"pre": {"checkpoint": str(base)}},
                        resources=Resources(cpus=1, workers=2))
    cfg = sft_config(data=chats, lora={"rank": 8, "alpha": 16}, lr=1e-2, min_lr=1e-3, batch_size=4)
    job, _, _, _ = finetune.build_job(ctx, cfg)
    before = mean_loss(load_pretrained(base), rows_of(job))
    return ctx, finetune.run(ctx, cfg), before, rows_of(job)


@pytest.mark.slow
def test_lora_sft_loss_falls_and_checkpoint_is_self_contained(lora_run):
    ctx, outputs, before, val_rows = lora_run
    folder = Path(outputs["checkpoint"])
    assert folder == ctx.artifact_dir / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                        "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert outputs["steps"] == 40 and outputs["train_examples"] + outputs["val_examples"] == 240
    assert outputs["final_val_loss"] < 0.6 * before, (outputs, before)
    # the merged weights alone reproduce the loop's val loss: the mean over the response tokens of
    # the loop's micro-batches (eval_steps=2 global batches of 8 rows; rank r takes rows r, r+2,
    # ...; micro-batches of 4), each micro-batch's mean weighted by its tokens
    model = load_pretrained(folder)
    batches = [np.arange(r, 16, 2)[k:k + 4] for r in (0, 1) for k in (0, 4)]
    parts = [{n: a[i] for n, a in val_rows.items()} for i in batches]
    items = [float(finetune.sft_items(finetune.sft_batch(p))) for p in parts]
    merged = sum(mean_loss(model, p) * n for p, n in zip(parts, items)) / sum(items)
    assert merged == pytest.approx(outputs["final_val_loss"], rel=1e-4)
    cfg = json.loads((folder / "config.json").read_text())
    assert (folder / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    assert cfg["prompt_template"].format(prompt="hi") == render_chat([{"role": "user", "content": "hi"}], DEFAULT_CHAT_TEMPLATE)
    assert cfg["eos_token_id"] == toks.eos_id(toks.load(folder / "tokenizer.json"))


@pytest.mark.slow
def test_lora_checkpoint_is_merged_and_loads_in_transformers(lora_run, base):
    from transformers import GPT2LMHeadModel

    _, outputs, _, _ = lora_run
    folder = Path(outputs["checkpoint"])
    ours, start = load_pretrained(folder).eval(), load_pretrained(base)
    tuned, orig = ours.state_dict(), start.state_dict()
    for k in orig:  # only the adapted Linear weights moved; everything else is the frozen base
        adapted = any(t in k for t in ("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        assert torch.equal(tuned[k], orig[k]) != adapted, k
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x)[0], atol=1e-4)
