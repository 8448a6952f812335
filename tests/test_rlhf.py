"""The `rlhf` kind on a real local Ray: each algorithm raises a verifiable reward on held-out
prompts with a bounded KL to the reference; weights reach rollout actors through the object
store; the ranking pool ranks like its source. A learner killed mid-run and the retried attempt
resuming from the last iteration: tests/test_resume_exact.py.

The task: a character vocabulary {a, b, c, d}; prompts are strings of b/c/d; the reward is the
fraction of 'a' in the completion. A tiny random GPT starts near 1/6.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from workers.kinds import rlhf
from workers.rl.ranking import Ranking, RankingPool, RewardConfig, RewardSource, order_of, resolve_reward
from workers.rl.rollout import Group, RolloutPool, Sample
from workers.stage import local_context

CHARS = "abcd"
REWARD = f"{__name__}:fraction_a"


def fraction_a(prompt: str, completion: str) -> float:
    """The verifiable reward: share of the completion's characters that are 'a'."""
    return completion.count("a") / len(completion) if completion else 0.0


def short(prompt: str, completion: str) -> float:
    """A user check for reward terms: 1 for a completion of at most two characters."""
    return float(len(completion) <= 2)


def make_policy(folder: Path, seed: int = 0, block_size: int = 32) -> Path:
    """A tiny random GPT with a character tokenizer, saved as a self-contained checkpoint."""
    from workers.data import tokenizer as toks
    from workers.model.transformer import GPT, GPTConfig
    from workers.model.hf import save_pretrained

    tok = toks.train_char([CHARS])
    folder.mkdir(parents=True, exist_ok=True)
    toks.save(tok, folder)
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=tok.get_vocab_size(), block_size=block_size, n_layer=1, n_head=2, n_embd=32)
    eos = tok.token_to_id(toks.EOS_TOKEN)
    save_pretrained(GPT(cfg), folder, extra={"eos_token_id": eos, "bos_token_id": eos,
                                             "prompt_template": "{prompt}"})
    return folder


def make_prompts(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    return ["".join(r.choice("bcd") for _ in range(r.randint(3, 6))) for _ in range(n)]


def config(policy: Path, algorithm: str, **over) -> rlhf.Config:
    base = dict(policy=str(policy), reward={"function": REWARD}, prompts={"source": make_prompts(40, 0)},
                eval_prompts=16, algorithm=algorithm, iterations=6, prompts_per_iteration=8,
                samples_per_prompt=8, max_tokens=8, lr=3e-3, epochs=2, batch_size=16,
                beta={"dpo": 0.1, "grpo": 0.04, "rloo": 0.04, "ppo": 0.04}.get(algorithm, 0.1))
    base.update(over)
    return rlhf.Config.model_validate(base)


# ----------------------------------------------------------------------------- pure parts


def scored(rewards: list[list[float]]) -> list[rlhf.ScoredGroup]:
    out = []
    for p, rs in enumerate(rewards):
        g = Group(f"p{p}", [p + 1], [Sample([10 + i], str(i), [0.0]) for i in range(len(rs))])
        out.append(rlhf.ScoredGroup(g, Ranking(rs, order_of(rs))))
    return out


def test_examples_per_algorithm():
    s = scored([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3]])
    best = rlhf.best_of_n_examples(s, top_n=2)
    assert [e.completion_ids for e in best] == [[11], [12], [10], [11]]
    pairs = rlhf.dpo_pairs(s)  # the all-tied prompt gives no pair
    assert [(p.chosen_ids, p.rejected_ids) for p in pairs] == [([11], [10])]
    ex = rlhf.grpo_examples(s)  # the all-tied prompt's advantages are 0 (it still feeds the KL term, as TRL)
    adv = [e.advantage for e in ex]
    assert adv == pytest.approx([-0.4 / 0.4001, 0.4 / 0.4001, 0.0, 0.0, 0.0, 0.0], abs=1e-12)
    assert order_of([0.5, 0.9, 0.5, 0.1]) == [1, 0, 2, 3]  # ties keep sampling order


def test_losses_point_the_right_way():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    # GRPO: a positive advantage pushes the sample's log-probs up; the KL term is 0 at ref == pi
    loss = rlhf.grpo_loss(lp, lp.detach(), lp.detach(), torch.tensor([1.0]), mask, 0.2, 0.1)
    loss.backward()
    assert (lp.grad < 0).all()
    assert float(rlhf.kl_k3(lp.detach(), lp.detach()).abs().max()) == 0.0
    # DPO: at pi == ref the loss is log 2
    z = torch.zeros(3)
    assert abs(float(rlhf.dpo_loss(z, z, z, z, 0.1)) - 0.6931) < 1e-3


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValidationError, match="give one reward source"):
        RewardConfig(model="rm", function=REWARD)
    with pytest.raises(ValidationError, match="algorithm"):
        rlhf.Config(algorithm="ppo2")
    ctx = local_context(tmp_path)
    with pytest.raises(ValueError, match=r"policy: got 'nope'; neither an upstream"):
        rlhf.run(ctx, rlhf.Config(policy="nope", reward={"function": REWARD}))
    with pytest.raises(ValueError, match="reward.function: cannot import 'no_such_mod:f'"):
        resolve_reward(ctx, RewardConfig(function="no_such_mod:f"))
    with pytest.raises(ValueError, match="reward.checks: got 'syntax'; allowed: python_syntax, degeneracy"):
        resolve_reward(ctx, RewardConfig(function=REWARD, checks={"syntax": 1.0}))


# ----------------------------------------------------------------------------- pools on Ray


def test_ranking_pool_spreads_and_ranks(ray_session):
    source = RewardSource("function", REWARD, (str(Path(__file__).parent),))
    pool = RankingPool(source, num_actors=2)
    try:
        scores, order = pool.rank("bcd", ["ab", "aaaa", "bbb", "a"])
        assert scores == [0.5, 1.0, 0.0, 1.0] and order == [1, 3, 0, 2]
        comps = [["a" * i + "b" * (5 - i) for i in range(6)] for _ in range(7)]
        ranks = pool.rank_many([f"p{i}" for i in range(7)], comps)
        assert all(r.order == [5, 4, 3, 2, 1, 0] for r in ranks)
        assert pool.last.completions == 42 and pool.last.per_s > 0
    finally:
        pool.shutdown()
    # check terms: the function's score + 2 x short(...), the user's check imported in the actor
    source = resolve_reward(None, RewardConfig(function=REWARD, checks={f"{__name__}:short": 2.0}))
    assert source.check_names == ["short"] and source.describe() == f"function:{REWARD}"
    pool = RankingPool(source)
    try:
        assert pool.rank("bcd", ["ab", "aaaa", "bbb", "a"]) == ([2.5, 1.0, 0.0, 3.0], [3, 0, 1, 2])
    finally:
        pool.shutdown()


def test_weights_reach_rollout_actors_through_object_store(ray_session, tmp_path):
    from workers.model.hf import load_pretrained
    from workers.model.sampling import SamplingParams, generate

    ck = make_policy(tmp_path / "a", seed=0)
    other = load_pretrained(make_policy(tmp_path / "b", seed=1)).eval()
    pool = RolloutPool(str(ck), num_actors=2)
    try:
        params = dict(n=1, max_tokens=6, temperature=0.0)
        prompts = make_prompts(4, 1)
        before = [g.samples[0].token_ids for g in pool.rollout(prompts, params)]
        pool.sync(ray_session.put(other.state_dict()))
        after = [g.samples[0].token_ids for g in pool.rollout(prompts, params)]
        groups = pool.rollout(prompts, params)
        ids = [g.prompt_ids for g in groups]
        expect = [c[0].token_ids for c in generate(other, ids, SamplingParams(max_tokens=6, temperature=0.0),
                                                   eos_token_id=0)]
        assert after == expect and after != before
        assert pool.last.tokens == sum(len(t) for t in after) and pool.last.tokens_per_s > 0
    finally:
        pool.shutdown()


# ----------------------------------------------------------------------------- acceptance

CASES = [
    # algorithm, min reward gain
    pytest.param("best_of_n", 0.2, id="best_of_n"),
    pytest.param("dpo", 0.2, id="dpo"),
    pytest.param("grpo", 0.3, id="grpo"),
    pytest.param("rloo", 0.3, id="rloo"),
    pytest.param("ppo", 0.3, id="ppo"),
]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,gain", CASES)
def test_algorithm_raises_reward_with_bounded_kl(ray_session, tmp_path, algorithm, gain):
    ck = make_policy(tmp_path / "policy")
    cfg = config(ck, algorithm)
    ctx = local_context(tmp_path)
    out = rlhf.run(ctx, cfg)
    assert len(ctx.sink.metrics("reward_mean")) == cfg.iterations

    print(algorithm, {k: out[k] for k in ("mean_reward_start", "mean_reward_end", "kl")})
    assert out["mean_reward_end"] > out["mean_reward_start"] + gain
    assert 0 < out["kl"] < 2.0
    assert max(ctx.sink.metrics("kl")) < 2.0
    for name in ("reward_max", "loss", "rollout_tokens_per_s", "ranking_completions_per_s", "time_sync_s"):
        assert ctx.sink.metrics(name), name
    assert all(v > 0 for v in ctx.sink.metrics("rollout_tokens_per_s"))
    if algorithm == "ppo":  # the critic learns: its loss and explained variance each iteration
        logged = len(ctx.sink.metrics("reward_mean"))  # this attempt's iterations (a resumed one: the rest)
        assert len(ctx.sink.metrics("critic_loss")) == logged and all(v > 0 for v in ctx.sink.metrics("critic_loss"))
        assert len(ctx.sink.metrics("critic_explained_variance")) == logged
    else:
        assert not ctx.sink.metrics("critic_loss")
    progress = [e for e in ctx.sink.events if e["type"] == "progress"]
    assert progress[-1]["done"] == cfg.iterations and progress[-1]["total"] == cfg.iterations

    # the output is a self-contained checkpoint, template keys carried over, and loads
    folder = Path(out["checkpoint"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    carried = json.loads((folder / "config.json").read_text())
    assert carried["prompt_template"] == "{prompt}" and carried["eos_token_id"] == 0
    from workers.model.hf import load_pretrained
    assert load_pretrained(folder).config.n_embd == 32
