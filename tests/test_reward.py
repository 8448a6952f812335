"""The `reward` kind and `workers.model.reward_head`: Bradley-Terry loss (with margins), scores read at
the last real token whatever the padding, a save/load round trip with identical scores, errors
naming files and fields, and one real Ray Train fit reaching high held-out pairwise accuracy on a
learnable synthetic preference.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from workers.kinds import reward
from workers.data import records as sft_data
from workers.data import tokenizer as toks
from workers.model.transformer import GPT, config_for
from workers.model.hf import load_pretrained, save_pretrained
from workers.model.reward_head import HEAD_FILE, RewardModel, load_reward_model, save_reward_model
from workers.stage import Resources, local_context

BLOCK = 64


def make_base(folder: Path, seed: int = 0) -> Path:
    tok = toks.train_char([string.printable])
    torch.manual_seed(seed)
    model = GPT(config_for({"size": "tiny", "block_size": BLOCK}, tok.get_vocab_size()))
    eos = toks.eos_id(tok)
    save_pretrained(model, folder, extra={"eos_token_id": eos, "bos_token_id": eos})
    toks.save(tok, folder)
    return folder


def reward_config(**overrides) -> reward.Config:
    cfg = dict(data="unused", batch_size=8, max_steps=60, lr=2e-3, min_lr=2e-4, warmup_steps=5, weight_decay=0.0,
               eval_every=30, eval_steps=2, checkpoint_every=30, val_fraction=0.25, seed=5)
    cfg.update(overrides)
    return reward.Config(**cfg)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "checkpoint")


# ----------------------------------------------------------------------------- no Ray needed


def test_bradley_terry_loss_and_margin():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(2.0)))) / 2
    assert float(reward.bt_loss_from_rewards(rc, rr)) == pytest.approx(expected, rel=1e-6)
    # a margin asks chosen to win by more: same as shifting the rejected reward up
    m = torch.tensor([0.5, 0.5])
    assert float(reward.bt_loss_from_rewards(rc, rr, m)) == pytest.approx(float(reward.bt_loss_from_rewards(rc, rr + m)))
    assert float(reward.bt_loss_from_rewards(rc, rr, m)) > expected


def test_score_reads_last_real_token_whatever_the_padding(tmp_path):
    torch.manual_seed(0)
    model = RewardModel(config_for({"size": "tiny", "block_size": 32}, 40)).eval()
    a, b = torch.randint(1, 40, (7,)), torch.randint(1, 40, (4,))
    with torch.no_grad():
        alone = torch.stack([model.score(a[None])[0], model.score(b[None])[0]])
        right = torch.zeros(2, 7, dtype=torch.long)
        right[0], right[1, :4] = a, b
        rmask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
        left = torch.zeros(2, 7, dtype=torch.long)
        left[0], left[1, 3:] = a, b
        lmask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
        assert torch.allclose(model.score(right, rmask), alone, atol=1e-5)
        assert torch.allclose(model(left, lmask), alone, atol=1e-5)
        assert model.score(right, rmask).shape == (2,)


def test_save_load_round_trip_gives_identical_scores(tmp_path):
    torch.manual_seed(1)
    model = RewardModel(config_for({"size": "tiny", "block_size": 32}, 40))
    with torch.no_grad():
        model.head.bias.fill_(0.25)
    save_reward_model(model, tmp_path, extra={"chat_template": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", HEAD_FILE, "model.safetensors"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["reward_model"] is True and cfg["chat_template"] == "x"
    loaded = load_reward_model(tmp_path)
    x, mask = torch.randint(0, 40, (3, 10)), torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        assert torch.equal(loaded.score(x, mask), model.eval().score(x, mask))
    assert loaded.hf_config["reward_model"] is True
    load_pretrained(tmp_path)  # the trunk is an ordinary GPT checkpoint
    # a policy checkpoint is not a reward model, and says so
    save_pretrained(model.gpt, tmp_path / "policy")
    with pytest.raises(ValueError, match=r"lacks \"reward_model\": true"):
        load_reward_model(tmp_path / "policy")


def test_pairs_encode_with_margins_and_masks(base, tmp_path):
    data = sft_data.write_jsonl(tmp_path / "p.jsonl", [
        {"q": "hi", "good": "yes !!", "bad": "no", "m": 1.5},
        {"q": "yo", "good": "ok !!", "bad": "nah"},
    ] * 5)
    ctx = local_context(tmp_path, "rm", inputs={"sft": {"checkpoint": str(base)}})
    cfg = reward_config(data=data, prompt_field="q", chosen_field="good", rejected_field="bad", margin_field="m")
    job, _, _, held_out, stats = reward.build_job(ctx, cfg)
    train = sft_data.load_arrays(job.make_batches.keywords["train_uri"])
    assert stats["train_pairs"] + stats["val_pairs"] == 10 and stats["val_pairs"] >= 1
    assert sorted(set(np.concatenate([train["margin"], held_out["margin"]]).tolist())) == [0.0, 1.5]
    b = reward.pair_batch({k: a[:2] for k, a in train.items()})
    tok = toks.load(base / "tokenizer.json")
    eos = toks.eos_id(tok)
    for side in ("chosen", "rejected"):
        n = b[f"{side}_mask"].sum(1)
        assert (b[side][torch.arange(2), n - 1] == eos).all()  # every side ends with EOS
        assert tok.decode(b[side][0, :n[0]].tolist()).startswith("<|user|>\n")
    loss = reward.bt_loss(RewardModel.from_gpt(load_pretrained(base)), b)
    assert loss.ndim == 0 and loss.requires_grad


def test_errors_name_file_line_and_field(base, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    ctx = local_context(tmp_path, "rm", inputs={"sft": {"checkpoint": str(base)}})
    with pytest.raises(sft_data.RecordError, match=rf"{data} line 2: no field 'rejected' .*rejected_field"):
        reward.build_job(ctx, reward_config(data=str(data)))
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}\n')
    with pytest.raises(sft_data.RecordError, match=rf"{data} line 1: field 'margin' is 'big', not a number"):
        reward.build_job(ctx, reward_config(data=str(data)))
    with pytest.raises(ValidationError, match=r"margin_fild"):
        reward_config(margin_fild="m")
    with pytest.raises(ValueError, match=r"checkpoint: upstream 'sft' has no `checkpoint` output"):
        reward.build_job(local_context(tmp_path, "rm", inputs={"sft": {"x": 1}}), reward_config(data=str(data), checkpoint="sft"))


# ----------------------------------------------------------------------------- on Ray Train


@pytest.fixture(scope="module")
def trained(ray_session, base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reward")
    data = sft_data.write_jsonl(tmp / "prefs.jsonl", sft_data.synthetic_preferences(240, seed=2))
    ctx = local_context(tmp, "reward", inputs={"sft": {"checkpoint": str(base)}}, resources=Resources(cpus=1, workers=1))
    cfg = reward_config(data=data)
    _, _, _, held_out, _ = reward.build_job(ctx, cfg)
    return ctx, reward.run(ctx, cfg), held_out


@pytest.mark.slow
def test_reward_model_learns_the_preference(trained):
    ctx, outputs, held_out = trained
    assert outputs["val_pairs"] == len(held_out["margin"]) >= 30
    assert outputs["accuracy"] > 0.8, outputs
    assert outputs["steps"] == 60 and outputs["final_val_loss"] < math.log(2)
    assert ctx.sink.metrics("val_accuracy") == [outputs["accuracy"]]


@pytest.mark.slow
def test_published_reward_model_reloads_with_the_same_scores(trained):
    ctx, outputs, held_out = trained
    folder = Path(outputs["reward_model"])
    assert folder == ctx.artifact_dir / "reward_model"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", "model.safetensors", HEAD_FILE, "tokenizer.json",
                                                               "tokenizer_config.json", "chat_template.jinja",
                                                               "generation_config.json"])
    assert outputs["tokenizer"] == str(folder / "tokenizer.json")
    model = load_reward_model(folder)
    assert reward.pairwise_accuracy(model, held_out) == outputs["accuracy"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["reward_model"] is True and "{prompt}" in cfg["prompt_template"]
    from workers.checkpoints import open_checkpoint
    opened = open_checkpoint(folder, load="reward", device="cpu")
    assert opened.is_reward_model and opened.chat_template and reward.pairwise_accuracy(opened.model, held_out) == outputs["accuracy"]
