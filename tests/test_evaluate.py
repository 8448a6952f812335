"""The `evaluate` kind on a real local Ray: perplexity equals a direct computation (token
dataset and text records), a checkpoint against itself wins exactly half (ties count half,
same seeded samples), and a policy trained towards the reward beats the one it started from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.nn import functional as F

from test_rlhf import REWARD, fraction_a, make_policy, make_prompts
from workers.kinds import evaluate
from workers.rl.checks import resolve_check
from workers.stage import local_context

EOS = 0


def write_token_dataset(folder: Path, docs: list[list[int]], vocab_size: int) -> Path:
    """A token dataset as the tokenize stage writes it, one `val` shard."""
    (folder / "val").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"ids": pa.array(docs, type=pa.list_(pa.uint16())),
                             "doc_id": pa.array(range(len(docs)), type=pa.int64())}),
                   folder / "val/shard-00000.parquet")
    shard = {"path": "val/shard-00000.parquet", "documents": len(docs), "tokens": sum(map(len, docs))}
    (folder / "manifest.json").write_text(json.dumps({
        "vocab_size": vocab_size, "dtype": "uint16", "eos_id": EOS,
        "splits": {"val": {"documents": len(docs), "tokens": shard["tokens"], "shards": [shard]}}}))
    return folder


def direct_perplexity(model, docs: list[list[int]]) -> float:
    """Each token of EOS + doc + EOS after the first, predicted one at a time from its window's
    context (windows of block_size predictions), independently of the kind's batching."""
    B, nll, n = model.config.block_size, 0.0, 0
    with torch.no_grad():
        for doc in docs:
            seq = [EOS] + doc + [EOS]
            for t in range(1, len(seq)):
                ctx = torch.tensor([seq[(t - 1) // B * B:t]])
                logits, _ = model(ctx)
                nll -= float(F.log_softmax(logits[0, -1], -1)[seq[t]])
                n += 1
    return math.exp(nll / n)


def train_towards_a(src: Path, dst: Path, steps: int = 60) -> Path:
    """A policy fine-tuned (plain torch, in-process) to answer any prompt with 'a's."""
    from tokenizers import Tokenizer

    from workers.model.hf import load_pretrained, save_pretrained

    model = load_pretrained(src)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    prompts = make_prompts(64, 5)
    torch.manual_seed(0)
    for step in range(steps):
        rows = [tok.encode(p).ids + tok.encode("aaaaaaaa").ids for p in prompts[step % 4 * 16:][:16]]
        T = max(map(len, rows))
        idx = torch.tensor([r + [EOS] * (T - len(r)) for r in rows])
        targets = idx[:, 1:].clone()
        for i, r in enumerate(rows):
            targets[i, len(r) - 1:] = -100
            targets[i, :len(r) - 9] = -100  # only the answer
        _, loss = model(idx[:, :-1], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dst.mkdir(parents=True)
    save_pretrained(model, dst, extra={"eos_token_id": EOS, "prompt_template": "{prompt}"})
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    return dst


@pytest.mark.slow
def test_perplexity_matches_direct_computation_and_self_win_rate_is_half(ray_session, tmp_path):
    from workers.model.hf import load_pretrained

    ck = make_policy(tmp_path / "policy", block_size=16)
    docs = [[2 + (i * j + j) % 4 for j in range(n)] for i, n in enumerate([3, 9, 14, 40, 1])]  # 40 > block_size
    ds = write_token_dataset(tmp_path / "tokens", docs, vocab_size=6)
    ctx = local_context(tmp_path, "eval", inputs={"sft": {"checkpoint": str(ck)}, "tok": {"dataset": str(ds)}})
    cfg = evaluate.Config(checkpoint="sft", baseline=str(ck), data="tok", reward={"function": REWARD},
                          prompts={"source": make_prompts(12, 3)}, samples_per_prompt=2, max_tokens=6, workers=2)
    out = evaluate.run(ctx, cfg)
    want = direct_perplexity(load_pretrained(ck).eval(), docs)
    assert out["perplexity"] == pytest.approx(want, rel=1e-4)
    assert out["baseline_perplexity"] == pytest.approx(want, rel=1e-4)
    assert out["perplexity_tokens"] == sum(len(d) + 1 for d in docs)
    # same weights, same seeded samples, deterministic judge: every pair ties
    assert out["win_rate"] == 0.5 and out["ties"] == 24
    assert out["mean_reward"] == out["baseline_mean_reward"]
    assert ctx.sink.metrics("win_rate") == [0.5]
    # standard errors over prompts: the samples' own rewards, spread over 12 prompts; every pair
    # ties (no spread); each sample's log-ratio to itself is 0
    rows = [json.loads(line) for line in (Path(ctx.artifact_dir) / "samples.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["model"] == "model"]
    want_se = evaluate.standard_error([r["prompt"] for r in mine], [fraction_a(r["prompt"], r["completion"]) for r in mine])
    assert want_se > 0 and out["mean_reward_se"] == pytest.approx(want_se, rel=1e-12)
    assert out["baseline_mean_reward_se"] == out["mean_reward_se"] and out["win_rate_se"] == 0.0
    assert out["kl"] == pytest.approx(0.0, abs=1e-4) and out["kl_se"] < 1e-4
    assert ctx.sink.metrics("mean_reward_se") == [out["mean_reward_se"]]

    # text records: the same documents as text give the same perplexity
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ck / "tokenizer.json"))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"body": tok.decode(d)}) + "\n" for d in docs))
    ctx2 = local_context(tmp_path, "eval-text")
    out2 = evaluate.run(ctx2, evaluate.Config(checkpoint=str(ck), data=str(texts), text_field="body"))
    assert out2["perplexity"] == pytest.approx(want, rel=1e-4)


def variety(prompt: str, completion: str) -> float:
    """An independent check the 'a' reward disagrees with: share of distinct characters."""
    return len(set(completion)) / len(completion) if completion else 0.0


@pytest.mark.slow
def test_better_policy_wins_and_reward_hacking_is_called_out(ray_session, tmp_path):
    """A policy trained towards the reward wins by that reward; the independent check that
    disagrees with the reward fell, so the verdict warns of reward hacking and names the judge."""
    start = make_policy(tmp_path / "start")
    better = train_towards_a(start, tmp_path / "better")
    ctx = local_context(tmp_path, "eval", inputs={"rlhf": {"checkpoint": str(better), "reward": f"function:{REWARD}"},
                                                  "sft": {"checkpoint": str(start)}})
    cfg = evaluate.Config(checkpoint="rlhf", baseline="sft", reward={"function": REWARD},
                          prompts={"source": make_prompts(16, 9)}, samples_per_prompt=2, max_tokens=8,
                          checks=[f"{__name__}:variety", "degeneracy"], references=[str(start)])
    out = evaluate.run(ctx, cfg)
    print({k: out[k] for k in ("win_rate", "mean_reward", "baseline_mean_reward", "kl", "warnings")})
    assert out["win_rate"] > 0.75
    assert out["mean_reward"] > out["baseline_mean_reward"] + 0.3
    assert out["wins"] + out["ties"] + out["losses"] == 32
    assert fraction_a("", "aab") == pytest.approx(2 / 3)
    assert out["win_rate_judge"] == "the reward the model was trained against"
    assert out["check_variety"] < out["baseline_check_variety"]
    assert any("reward hacking" in w and "variety" in w for w in out["warnings"])
    assert out["kl"] > 0.1  # the policy moved away from where it started
    # the reference is the baseline's checkpoint: same seeded samples, same figures
    assert out["start_check_variety"] == out["baseline_check_variety"]
    assert list(out["comparison"]) == ["start", "sft (baseline)", "rlhf (evaluated)"]
    assert ctx.sink.metrics("baseline_check_degeneracy") and ctx.sink.metrics("check_variety")
    assert out["samples_per_model"] == 32 and out["prompts_per_model"] == 16
    assert 0 <= out["check_variety_se"] < 0.5 and "check_variety_se" in out["comparison"]["rlhf (evaluated)"]
    assert 0 < out["win_rate_se"] < 0.2 and 0 < out["kl_se"] < out["kl"] and 0 < out["mean_reward_se"] < 0.2
    assert "mean_reward_se" in out["comparison"]["rlhf (evaluated)"]


def test_a_check_the_model_was_trained_against_is_named_and_raises_no_warning(ray_session, tmp_path):
    """An rlhf upstream whose reward held the degeneracy check: evaluate says that check is not
    independent (output, MLflow tag) and does not call its fall reward hacking."""
    start = make_policy(tmp_path / "start")
    ctx = local_context(tmp_path, "eval", inputs={"rlhf": {"checkpoint": str(start), "reward_checks": ["degeneracy"]}})
    out = evaluate.run(ctx, evaluate.Config(checkpoint="rlhf", checks=["degeneracy", f"{__name__}:variety"],
                                            prompts={"source": make_prompts(4, 9)}, max_tokens=4))
    assert out["checks_trained_against"] == ["degeneracy"]
    assert {"checks_trained_against": "degeneracy"} in [e["tags"] for e in ctx.sink.events if e["type"] == "tags"]
    out.update(mean_reward=1.0, baseline_mean_reward=0.0, baseline_check_degeneracy=-1.0,
               baseline_check_variety=out["check_variety"])
    degeneracy = resolve_check("degeneracy")
    assert evaluate.reward_hacking(out, [degeneracy]) == []  # it rose, but the model was trained against it
    out["checks_trained_against"] = []
    assert "check degeneracy got worse" in evaluate.reward_hacking(out, [degeneracy])[0]


def test_standard_error_is_over_prompts_not_samples():
    """Two samples of a prompt agree with each other: the spread that counts is the prompts'."""
    from workers.kinds.evaluate import standard_error

    prompts = ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert standard_error(prompts, [1, 1, 0, 0, 1, 1, 0, 0]) == pytest.approx(math.sqrt(1 / 3 / 4))
    assert standard_error(prompts, [1, 0] * 4) == 0.0  # every prompt's mean is 0.5
    assert standard_error(["a", "a"], [1.0, 0.0]) == 0.0


def test_checks_fail_blank_docstring_only_and_looping_completions():
    from workers.rl.checks import degeneracy, python_syntax

    prompt = 'def add(a, b):\n    """Add two numbers."""\n'
    assert python_syntax(prompt, "    return a + b\n") == 1.0
    cut = "    s = a + b\n    return s.to("
    assert python_syntax(prompt, cut, "length") == 1.0  # cut by max_tokens mid-line: the line is dropped
    assert python_syntax(prompt, cut, "stop") == 0.0    # it ended itself there: judged whole
    for bad in ("\n" * 48, "    pass\n", '    """More docs."""\n    ...\n', "    return (a +\n",
                "    self._._._._._._._._._._._._._._._._._._._._."):
        assert python_syntax(prompt, bad) == 0.0, bad
    assert degeneracy(prompt, "    self._._._._._._._._._._._._._._._._._._._._.") > 0.8
    assert degeneracy(prompt, "\n" * 48) == 1.0
    assert degeneracy(prompt, "    total = a + b\n    return total\n") == 0.0
    assert resolve_check(f"{__name__}:variety").name == "variety"
    with pytest.raises(ValueError, match="checks: got 'syntax'; allowed: python_syntax, degeneracy"):
        resolve_check("syntax")
    with pytest.raises(ValueError, match=r"checks\[1\]: cannot import 'no_such_mod:f'"):
        evaluate.check(evaluate.Config(data="tok", checks=["degeneracy", "no_such_mod:f"]))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="data / reward / checks: got none"):
        evaluate.check(evaluate.Config())
    with pytest.raises(ValueError, match="win rate needs a judge"):
        evaluate.check(evaluate.Config(data="tok", baseline="sft"))
    ctx = local_context(tmp_path, inputs={"a": {"checkpoint": "x"}, "b": {"checkpoint": "y"}})
    with pytest.raises(ValueError, match=r"checkpoint: not set and stage 'stage' has 2 upstreams"):
        evaluate.run(ctx, evaluate.Config(data="tok"))
