"""Every loss pinned to numbers: GRPO, RLOO and PPO (advantages, GAE, the clipped surrogate and
value loss, the aggregations), DPO, Bradley-Terry and SFT on fixed tensors, against hand
computations or TRL's own functions; and the wiring that feeds them, through the real code
(margins and each side's mask reach the reward loss, the learner's log-probs are at the rollout
temperature, top-p draws stay inside the nucleus in `generate` and in the serving engine, the
step's loss is the mean over its items across micro-batches and workers, evaluation streams are
independent per (prompt, sample), `python_syntax` forgives a last line only when cut by length).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workers.kinds import rlhf


def tiny_gpt(seed: int = 0, vocab: int = 11):
    from workers.model.transformer import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()


# ----------------------------------------------------------------------------- advantages


def test_grpo_advantages_are_exact_with_the_sample_std_and_an_epsilon():
    from trl.trainer.utils import nanstd  # TRL's own std (Bessel-corrected)

    r = [0.1, 0.9, 0.5]
    # sample std 0.4 (population std would be 0.327 and give -1.22): -0.4 / (0.4 + 1e-4)
    assert rlhf.group_advantages(r) == pytest.approx([-0.4 / 0.4001, 0.4 / 0.4001, 0.0], rel=1e-12, abs=1e-12)
    t = torch.tensor(r, dtype=torch.float64)
    trl = ((t - t.mean()) / (nanstd(t) + 1e-4)).tolist()  # GRPOTrainer's formula
    assert rlhf.group_advantages(r) == pytest.approx(trl, rel=1e-12, abs=1e-12)
    # near-tied rewards (spread 2e-6) stay near 0, not unit scale
    near = rlhf.group_advantages([1.0, 1.0 + 2e-6])
    assert max(abs(a) for a in near) < 0.02
    assert rlhf.group_advantages(r, scale=False) == pytest.approx([-0.4, 0.4, 0.0])  # Dr. GRPO
    assert [e.advantage for e in rlhf.grpo_examples([_scored(r)])] == rlhf.group_advantages(r)


def test_rloo_baseline_leaves_each_sample_out():
    # 1 - mean(2, 6) = -3; 2 - 3.5 = -1.5; 6 - 1.5 = 4.5
    assert rlhf.leave_one_out([1.0, 2.0, 6.0]) == pytest.approx([-3.0, -1.5, 4.5])


def test_gae_matches_the_recursion_by_hand():
    r = torch.tensor([0.0, 0.5, 1.0])
    v = torch.tensor([0.2, 0.4, 0.3])
    g, lam = 0.9, 0.8
    d2 = 1.0 - 0.3                        # last step: V after it is 0
    d1 = 0.5 + g * 0.3 - 0.4
    d0 = 0.0 + g * 0.4 - 0.2
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = rlhf.gae(r, v, g, lam)
    assert adv.tolist() == pytest.approx([a0, a1, a2])
    assert ret.tolist() == pytest.approx([a0 + 0.2, a1 + 0.4, a2 + 0.3])
    # lambda 1, gamma 1: Monte Carlo returns (the sum of the rewards to go)
    _, mc = rlhf.gae(r, v, 1.0, 1.0)
    assert mc.tolist() == pytest.approx([1.5, 1.5, 1.0])


def test_whitening_and_explained_variance():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    w = rlhf.whiten(x)
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-7)
    assert float(w.var(unbiased=False)) == pytest.approx(1.0, rel=1e-6)
    ret = torch.tensor([1.0, 2.0, 3.0])
    assert rlhf.explained_variance(ret, ret) == 1.0
    # residual variance 2/3 of the returns' 2/3: 0
    assert rlhf.explained_variance(torch.tensor([2.0, 2.0, 2.0]), ret) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- policy losses


def test_clipped_surrogate_clips_both_sides_for_both_signs():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    per_token = rlhf.clipped_surrogate(logp, old, adv, 0.2)
    # A > 0: ratio 1.5 clipped to 1.2, ratio 0.5 kept; A < 0: ratio 1.5 kept, ratio 0.5 clipped to 0.8
    assert per_token[0].tolist() == pytest.approx([-1.2, -0.5, 1.5, 0.8])
    per_token.sum().backward()
    # the clipped tokens get no gradient; the others d(-ratio * A)/dlogp = -ratio * A
    assert logp.grad[0].tolist() == pytest.approx([0.0, -0.5, 1.5, 0.0])


def test_grpo_loss_by_hand_with_each_aggregation():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    old = torch.tensor([[-1.1, -1.9, 0.0], [-0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.2, -2.0, 0.0], [-0.4, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    beta, eps = 0.1, 0.2

    def token(lp, o, rf, a):
        ratio = math.exp(lp - o)
        surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
        d = rf - lp
        return -surrogate + beta * (math.exp(d) - d - 1)

    t = [[token(-1.0, -1.1, -1.2, 2.0), token(-2.0, -1.9, -2.0, 2.0)], [token(-0.5, -0.5, -0.4, -1.0)]]
    by_seq = (sum(t[0]) / 2 + t[1][0]) / 2
    by_token = (sum(t[0]) + t[1][0]) / 3
    dr = (sum(t[0]) + t[1][0]) / (2 * 8)
    assert float(rlhf.grpo_loss(logp, old, ref, adv, mask, eps, beta)) == pytest.approx(by_seq, rel=1e-6)
    assert float(rlhf.grpo_loss(logp, old, ref, adv, mask, eps, beta, "token")) == pytest.approx(by_token, rel=1e-6)
    assert float(rlhf.grpo_loss(logp, old, ref, adv, mask, eps, beta, "dr_grpo", max_tokens=8)) == \
        pytest.approx(dr, rel=1e-6)
    # a share of the step's rows, normalised by the whole step: the shares add up to the whole
    whole = rlhf.grpo_loss(logp, old, ref, adv, mask, eps, beta, "token")
    parts = sum(rlhf.grpo_loss(logp[i:i + 1], old[i:i + 1], ref[i:i + 1], adv[i:i + 1], mask[i:i + 1], eps, beta,
                               "token", sequences=2, tokens=3.0) for i in range(2))
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)


def test_value_loss_is_the_larger_of_clipped_and_unclipped():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    new = torch.tensor([[0.5, 0.5, -0.1]])
    ret = torch.tensor([[1.0, -1.0, 0.0]])
    # token 0: unclipped (0.5-1)^2=.25, clipped (0.2-1)^2=.64 -> .32; token 1: (1.5)^2=2.25 vs (1.2)^2 -> 1.125;
    # token 2: inside the clip: 0.01 -> 0.005
    assert rlhf.value_loss(new, old, ret, 0.2)[0].tolist() == pytest.approx([0.32, 1.125, 0.005])


def test_dpo_sft_and_bradley_terry_by_hand():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rc, rr = torch.tensor([-3.5, -5.5]), torch.tensor([-3.8, -4.2])
    beta = 0.5
    logits = [beta * ((-3.0 + 3.5) - (-4.0 + 3.8)), beta * ((-5.0 + 5.5) - (-4.0 + 4.2))]
    expect = sum(-math.log(1 / (1 + math.exp(-x))) for x in logits) / 2
    assert float(rlhf.dpo_loss(pc, pr, rc, rr, beta)) == pytest.approx(expect, rel=1e-6)

    lp = torch.tensor([[-1.0, -2.0, -9.0], [-4.0, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(rlhf.nll_loss(lp, mask)) == pytest.approx(7.0 / 3)  # over the 3 tokens, not per row

    from workers.kinds.reward import bt_loss_from_rewards
    c, r, m = torch.tensor([1.0, 0.2]), torch.tensor([0.5, 0.4]), torch.tensor([0.3, 0.0])
    expect = (-math.log(1 / (1 + math.exp(-(1.0 - 0.5 - 0.3)))) - math.log(1 / (1 + math.exp(-(0.2 - 0.4))))) / 2
    assert float(bt_loss_from_rewards(c, r, m)) == pytest.approx(expect, rel=1e-6)


def test_sft_loss_through_the_model_is_the_mean_over_response_tokens():
    from workers.kinds.finetune import sft_batch, sft_items, sft_loss

    model = tiny_gpt()
    rows = {"ids": np.array([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 9, 0]]), "lengths": np.array([5, 6]),
            "n_prompt": np.array([2, 3])}
    b = sft_batch(rows)
    with torch.no_grad():
        logits, _ = model(b["idx"])
        lp = F.log_softmax(logits.float(), -1)
        # row 0: prompt 1 2, response 3 4 0(eos); row 1: prompt 5 6 7, response 8 9 0(eos)
        terms = [lp[0, 1, 3], lp[0, 2, 4], lp[0, 3, 0], lp[1, 2, 8], lp[1, 3, 9], lp[1, 4, 0]]
        assert float(sft_items(b)) == 6
        assert float(sft_loss(model, b)) == pytest.approx(float(-sum(terms) / 6), rel=1e-5)


# ----------------------------------------------------------------------------- wiring


def test_reward_loss_gets_the_margins_and_scores_each_side_with_its_own_mask():
    from workers.kinds.reward import bt_loss, pair_batch
    from workers.model.reward_head import RewardModel

    torch.manual_seed(0)
    model = RewardModel(tiny_gpt().config).eval()
    rows = {"chosen": np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]]), "chosen_len": np.array([3, 2]),
            "rejected": np.array([[1, 7, 8, 9, 10], [4, 6, 6, 0, 0]]), "rejected_len": np.array([5, 3]),
            "margin": np.array([0.7, -0.3])}
    b = pair_batch(rows)
    with torch.no_grad():
        rc = torch.stack([model.score(torch.tensor([[1, 2, 3]]))[0], model.score(torch.tensor([[4, 5]]))[0]])
        rr = torch.stack([model.score(torch.tensor([[1, 7, 8, 9, 10]]))[0], model.score(torch.tensor([[4, 6, 6]]))[0]])
        expect = -F.logsigmoid(rc - rr - torch.tensor([0.7, -0.3])).mean()
        assert float(bt_loss(model, b)) == pytest.approx(float(expect), rel=1e-5)


def test_learner_logprobs_are_at_the_rollout_temperature():
    from trl.trainer.utils import selective_log_softmax

    model = tiny_gpt()
    prompts, comps = [[1, 2], [3]], [[4, 5, 6], [7]]
    for T in (1.0, 0.7):
        lp, mask = rlhf.completion_logprobs(model, prompts, comps, "cpu", temperature=T)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            logits, _ = model(torch.tensor([p + c[:-1]]))
            expect = selective_log_softmax(logits[0, len(p) - 1:] / T, torch.tensor(c))  # TRL: logits / T
            assert torch.allclose(lp[i, :len(c)], expect, atol=1e-6)
            assert mask[i].tolist() == [1.0] * len(c) + [0.0] * (3 - len(c))


class _Learner(rlhf.Learner):
    """The learner's update path in this process: a world of one, no Ray actor."""

    def __init__(self, policy, cfg):
        import copy

        self.cfg, self.rank, self.world, self.device = cfg, 0, 1, torch.device("cpu")
        self.policy = self.train_policy = policy
        self.reference = copy.deepcopy(policy).eval()
        self.optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
        self.autocast = contextlib.nullcontext
        self.critic = self.train_critic = self.critic_optimizer = None


def _scored(rewards, prompt=(1, 2), comps=None):
    from workers.rl.ranking import Ranking, order_of
    from workers.rl.rollout import Group, Sample

    comps = comps or [[3 + i, 4] for i in range(len(rewards))]
    g = Group("p", list(prompt), [Sample(list(c), str(c), [0.0] * len(c), "stop") for c in comps])
    return rlhf.ScoredGroup(g, Ranking(list(rewards), order_of(list(rewards))))


def test_rloo_advantage_subtracts_the_sequence_kl_before_leaving_one_out():
    cfg = rlhf.Config(algorithm="rloo", beta=0.5)
    learner = _Learner(tiny_gpt(), cfg)
    s = _scored([1.0, 2.0, 6.0])
    prompts = [s.group.prompt_ids] * 3
    comps = [x.token_ids for x in s.group.samples]
    old = [torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.0, -1.0])]
    ref = [torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, -3.0])]
    adv, values, returns = learner._advantages([s], prompts, comps, old, ref)
    # sequence KL (k1) 0, -1, 2 -> rewards 1, 2.5, 5 -> leave-one-out
    expect = rlhf.leave_one_out([1.0, 2.5, 5.0])
    assert [a.tolist() for a in adv] == [pytest.approx([e, e]) for e in expect]
    assert values is None and returns is None


def test_ppo_advantage_is_gae_over_kl_penalised_token_rewards():
    from workers.model.reward_head import ValueModel

    cfg = rlhf.Config.model_validate({"algorithm": "ppo", "beta": 0.5, "gamma": 0.9, "lambda": 0.8,
                                      "whiten_advantages": False})
    learner = _Learner(tiny_gpt(), cfg)
    learner.critic = ValueModel.from_gpt(tiny_gpt(1))
    s = _scored([2.0], comps=[[3, 4, 5]])
    prompts, comps = [s.group.prompt_ids], [s.group.samples[0].token_ids]
    old, ref = [torch.tensor([-1.0, -2.0, -1.0])], [torch.tensor([-1.5, -2.0, -0.5])]
    adv, values, returns = learner._advantages([s], prompts, comps, old, ref)
    with torch.no_grad():
        v = learner.critic(torch.tensor([[1, 2, 3, 4]]))[0, 1:]  # the states before tokens 3, 4, 5
    assert values[0].tolist() == pytest.approx(v.tolist(), rel=1e-5)
    r = torch.tensor([-0.5 * 0.5, 0.0, -0.5 * -0.5 + 2.0])  # -beta (old - ref) per token, + score at the end
    a, ret = rlhf.gae(r, v, 0.9, 0.8)
    assert adv[0].tolist() == pytest.approx(a.tolist(), rel=1e-5)
    assert returns[0].tolist() == pytest.approx(ret.tolist(), rel=1e-5)


def test_every_policy_gradient_algorithm_steps_through_the_one_update_path():
    """grpo, rloo and ppo each take optimizer steps in `_update_policy_gradient` (no second loop);
    ppo's critic learns (its loss and explained variance come back)."""
    from workers.model.reward_head import ValueModel

    for algorithm in ("grpo", "rloo", "ppo"):
        cfg = rlhf.Config(algorithm=algorithm, batch_size=4, epochs=1)
        learner = _Learner(tiny_gpt(), cfg)
        learner.optimizer = torch.optim.SGD(learner.policy.parameters(), lr=0.1)
        if algorithm == "ppo":
            learner.critic = learner.train_critic = ValueModel.from_gpt(tiny_gpt(1))
            learner.critic_optimizer = torch.optim.SGD(learner.critic.parameters(), lr=0.1)
            before_critic = [p.detach().clone() for p in learner.critic.parameters()]
        before = [p.detach().clone() for p in learner.policy.parameters()]
        stats = learner._update_policy_gradient([_scored([0.0, 1.0, 0.5, 0.2]), _scored([1.0, 0.0, 0.3, 0.3])], 1)
        assert stats.steps == 2 and stats.examples == 8, algorithm
        assert any(not torch.equal(a, b) for a, b in zip(before, learner.policy.parameters())), algorithm
        if algorithm == "ppo":
            assert stats.value_loss > 0 and math.isfinite(stats.explained_variance)
            assert any(not torch.equal(a, b) for a, b in zip(before_critic, learner.critic.parameters()))
        else:
            assert stats.value_loss is None and stats.explained_variance is None


# ----------------------------------------------------------------------------- the step's loss over its items


def _world_share(rank: int, world: int, path: str, micro: list[list[int]]) -> None:
    """Ranks' micro-batches of token counts; each writes its share of the step's loss."""
    import torch.distributed as dist

    from workers.training.loop import TrainJob, micro_batch_weights

    dist.init_process_group("gloo", init_method=f"file://{path}.store", rank=rank, world_size=world)
    try:
        job = TrainJob.__new__(TrainJob)
        job.items_fn = lambda b: b["mask"].sum()
        batches = [{"mask": torch.ones(n), "loss": torch.arange(n, dtype=torch.float64) + 10 * rank + k}
                   for k, n in enumerate(micro)]
        weights = micro_batch_weights(batches, job, world, torch.device("cpu"))
        share = sum(float(b["loss"].mean()) * w for b, w in zip(batches, weights))  # loss_fn: the micro-batch mean
        with open(f"{path}.{rank}", "w") as f:
            f.write(repr(share))
    finally:
        dist.destroy_process_group()


def test_step_loss_is_the_mean_over_all_items_across_micro_batches_and_workers():
    """transformers >= 4.46: a 1-token micro-batch weighs 1/31 of the step, not 1/2."""
    import torch.multiprocessing as mp

    micro = {0: [1, 30], 1: [5, 2]}
    every = [float(v) for r in (0, 1) for k, n in enumerate(micro[r]) for v in (np.arange(n) + 10 * r + k)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "share")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_world_share, args=(r, 2, path, micro[r])) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]
        shares = [float(open(f"{path}.{r}").read()) for r in (0, 1)]
    # DDP averages the ranks' gradients: the step's loss is the mean of the shares
    assert sum(shares) / 2 == pytest.approx(sum(every) / len(every), rel=1e-12)


# ----------------------------------------------------------------------------- sampling that feeds the losses


def _nucleus(logits: torch.Tensor, p: float) -> set[int]:
    probs = logits.double().softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep, mass = set(), 0.0
    for t in order:
        if mass >= p:
            break
        keep.add(t)
        mass += float(probs[t])
    return keep


def _outside(model, prompt: list[int], tokens: list[int], p: float) -> int:
    """How many of ``tokens`` (sampled after ``prompt``) fall outside the step's nucleus."""
    bad = 0
    with torch.no_grad():
        for t, tok in enumerate(tokens):
            logits, _ = model(torch.tensor([prompt + tokens[:t]]))
            bad += tok not in _nucleus(logits[0, -1], p)
    return bad


def test_top_p_draws_stay_inside_the_nucleus_in_generate_and_in_the_engine(serve_checkpoint_dir, one_thread):
    from workers.data import tokenizer as toks
    from workers.model.sampling import SamplingParams, generate
    from workers.model.hf import load_pretrained
    from workers.serving.engine import Engine, GenerationRequest

    model = load_pretrained(serve_checkpoint_dir).eval()
    tok = toks.load(serve_checkpoint_dir / "tokenizer.json")
    prompt = tok.encode("the quick").ids
    P = 0.5
    for top_p, seed in ((P, 3), (1.0, 3)):
        params = SamplingParams(n=16, max_tokens=4, temperature=1.0, top_p=top_p, seed=seed)
        outs = generate(model, [prompt], params)[0]
        engine = Engine(model, tok, eos_token_id=None, max_batch_size=16, max_queue=4)
        req = GenerationRequest(prompt, params)
        engine.submit([req])
        for _ in range(100):
            engine.step()
            engine.drain()
            if req.done:
                break
        assert req.done
        for name, samples in (("generate", [c.token_ids for c in outs]), ("engine", [s.token_ids for s in req.seqs])):
            outside = sum(_outside(model, prompt, s, P) for s in samples)
            if top_p < 1:
                assert outside == 0, name
            else:  # the check can fail: without top-p, draws do land outside
                assert outside > 0, name


# ----------------------------------------------------------------------------- evaluation's seeds and checks


def test_seeded_rollouts_give_every_prompt_and_sample_its_own_stream(tmp_path, one_thread):
    from tests.test_rlhf import make_policy
    from workers.rl.rollout import RolloutActor, prompt_seed

    actor = RolloutActor(str(make_policy(tmp_path / "p")))
    params = dict(n=3, max_tokens=8, temperature=1.0, seed=5)
    prompts = ["bcd"] * 4  # the same prompt four times: with seed + i per sample all four were equal
    groups = actor.generate(prompts, params)
    texts = [s.token_ids for g in groups for s in g.samples]
    assert len({tuple(tuple(s.token_ids) for s in g.samples) for g in groups}) == 4
    assert len({tuple(t) for t in texts}) >= 9  # of 12 draws (a few short ones may coincide)
    # the stream is a function of (seed, prompt index, sample index): split as two actors would be
    split = actor.generate(prompts[:2], params, first_index=0) + actor.generate(prompts[2:], params, first_index=2)
    assert [s.token_ids for g in split for s in g.samples] == texts
    assert len({prompt_seed(5, i) for i in range(100)} | {prompt_seed(6, i) for i in range(100)}) == 200
    assert all(s.finish_reason in ("stop", "length") for g in groups for s in g.samples)


def test_python_syntax_forgives_a_junk_last_line_only_when_cut_by_length():
    from workers.rl.checks import resolve_check
    from workers.rl.ranking import FunctionScorer, WithChecks

    prompt = 'def f(x):\n    """Return x."""\n'
    junk = "    return x\n)))) not python ((("
    check = resolve_check("python_syntax")
    assert check([prompt] * 3, [junk] * 3, ["stop", "length", None]) == [0.0, 1.0, 0.0]
    # through a reward's check terms, as the ranking actors score: the reasons reach the check
    scorer = WithChecks(FunctionScorer("tests.test_rlhf:fraction_a"), (("python_syntax", 1.0),))
    scores = scorer([prompt, prompt], [junk, junk], ["stop", "length"])
    assert scores[1] - scores[0] == 1.0


def test_eval_prompts_larger_than_the_prompts_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"stages\.tune\.config\.eval_prompts: got 8 with 8 prompts; at most 7 "):
        rlhf.split_prompts([f"p{i}" for i in range(8)], 8, "tune")
    held, train = rlhf.split_prompts([f"p{i}" for i in range(8)], 3, "tune")
    assert held == ["p5", "p6", "p7"] and train == [f"p{i}" for i in range(5)]
    assert rlhf.split_prompts(["a", "b"], 0, "tune") == ([], ["a", "b"])


def test_ppo_critic_starts_from_the_reward_model_when_it_reads_the_policys_tokens(tmp_path):
    import shutil

    from tests.test_rlhf import make_policy
    from workers.checkpoints import open_checkpoint
    from workers.data import tokenizer as toks
    from workers.model.reward_head import RewardModel, ValueModel, save_reward_model
    from workers.model.hf import load_pretrained
    from workers.rl.ranking import RewardSource

    policy = make_policy(tmp_path / "policy")
    torch.manual_seed(0)
    rm = RewardModel.from_gpt(load_pretrained(policy))
    save_reward_model(rm, tmp_path / "rm", extra={"eos_token_id": 0})
    shutil.copy(policy / "tokenizer.json", tmp_path / "rm" / "tokenizer.json")
    critic = ValueModel.from_reward(rm)
    idx = torch.tensor([[1, 2, 3, 4], [2, 2, 1, 3]])
    with torch.no_grad():  # the critic's value after the last token is the reward model's score
        assert torch.allclose(critic(idx)[:, -1], rm.score(idx), atol=1e-6)
    cfg = rlhf.Config(algorithm="ppo")
    pol = open_checkpoint(str(policy), load=None)
    assert rlhf.critic_source(cfg, RewardSource("model", str(tmp_path / "rm")), pol) == str(tmp_path / "rm")
    assert rlhf.critic_source(rlhf.Config(algorithm="grpo"), RewardSource("model", str(tmp_path / "rm")), pol) is None
    toks.save(toks.train_char(["xyz"]), tmp_path / "rm")  # another vocabulary: the critic starts from the policy
    assert rlhf.critic_source(cfg, RewardSource("model", str(tmp_path / "rm")), pol) is None
