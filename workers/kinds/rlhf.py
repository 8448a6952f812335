"""Stage kind `rlhf`: improve a policy with ranked samples of its own (best-of-n, DPO, GRPO).

Each iteration has four steps, each its own function with a typed hand-off:

1. ``rollout``  rollout actors (copies of the policy) sample k completions per prompt -> ``Group``s;
2. ``score``    the reward-ranking pool scores and ranks them -> ``ScoredGroup``s;
3. ``update``   the learner group (``learner_workers`` data-parallel actors, DDP or FSDP as
   ``strategy`` says) turns them into the algorithm's examples and takes optimizer steps, each
   step's batch split between the learners:
   - ``best_of_n``: rejection-sampling fine-tuning (NLL) on each prompt's top-ranked completions;
   - ``dpo``: best vs worst completion of each prompt as a preference pair, reference = the
     frozen initial policy, ``beta`` = the implicit reward's temperature;
   - the policy-gradient algorithms share one path (``Learner._update_policy_gradient``): every
     sample's log-probs under the sampling policy and the reference are fixed, an *advantage*
     per token is computed, and each step minimises the PPO-clipped surrogate (``clip_eps``)
     aggregated as ``loss_aggregation`` says. They differ only in the advantage and the KL:
     - ``grpo`` (DeepSeekMath): (r - mean) / (std + 1e-4) within each prompt's k samples (sample
       std; ``scale_rewards: false`` drops the division, as Dr. GRPO), plus ``beta`` x KL to the
       reference in the loss (k3 estimator: exp(ref - pi) - (ref - pi) - 1, per token);
     - ``rloo`` (Ahmadian et al.): the reward minus ``beta`` x the sequence's KL (sum of
       log pi_old - log ref), minus the mean of the other k - 1 samples' (leave-one-out);
     - ``ppo`` (InstructGPT): per-token rewards (-``beta`` x (log pi_old - log ref) per token, the
       score added at the last token; or ``kl_penalty: loss``: the k3 term in the loss as GRPO),
       GAE (``gamma``, ``lambda``) over a learned critic's values, whitened; the critic (a
       separate model: the reward model's trunk and head when the reward is a model with the
       policy's vocabulary, else the policy's trunk with a fresh head) learns the returns with a
       clipped value loss.
   Log-probs are of the tempered distribution the samples were drawn from (logits /
   ``temperature``, as TRL); top-k / top-p are not applied to them (as TRL): the truncated
   distribution gives -inf to tokens outside the nucleus, so the reference's KL and the
   importance ratio would be undefined wherever the two policies' nuclei differ;
4. ``sync``     learner rank 0 gathers the weights (layer by layer under FSDP, no other rank holds
   them whole) and puts them in the object store once; every rollout actor loads them.

The learners checkpoint after every iteration under ``ctx.scratch_uri`` (their shards of the policy
and optimizer state, ``torch.distributed.checkpoint``, + ``state.json``), so a retried attempt
resumes after the last finished iteration, at any number of learners; the output is consolidated
from the last one, once, into the starting checkpoint's Hugging Face layout. An iteration's
prompts, sampling seeds and minibatch order are functions of (seed, iteration), and its rollouts
come from the policy that checkpoint holds: on the same workers a resumed run ends bit-identical
to one never interrupted (tests/test_resume_exact.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from workers import storage
from workers.cluster import ActorGroup, check_fits, count_of
from workers.cpu import claim_cpus
from workers.checkpoints import Checkpoint, cast_model_files, local_folder, open_checkpoint
from workers.rl.ranking import Ranking, RankingPool, RewardConfig, ranking_actors, resolve_reward
from workers.rl.rollout import Group, PromptSource, RolloutPool, load_prompts
from workers.training.loop import ShardingConfig
from workers.training.params import OptimizerConfig, knob

DISTRIBUTED = True
STATE_FILE = "state.json"
LATEST_FILE = "latest.json"


class Config(OptimizerConfig, ShardingConfig):
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

    policy: str | None = Field(None, description="The starting policy (and the frozen reference): an upstream "
                               "stage with a `checkpoint` output, or a checkpoint path/URI (ours or a Hugging Face "
                               "folder). Default: the only upstream with a checkpoint.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward source and ranking actors.")
    prompts: PromptSource = Field(default_factory=PromptSource, description="Training prompts.")
    eval_prompts: int = Field(8, ge=0, description="Prompts held out (the last ones) to measure the mean "
                              "reward before and after training; 0: use the first/last iteration's rollouts.")
    algorithm: Literal["best_of_n", "dpo", "grpo", "rloo", "ppo"] = Field(
        "grpo", description="How scored samples update the policy: best_of_n (rejection sampling), dpo "
        "(Rafailov et al. 2023), grpo (DeepSeekMath, arXiv 2402.03300), rloo (Ahmadian et al., arXiv "
        "2402.14740), ppo (a learned critic and GAE: Schulman et al. 2017, InstructGPT).")
    iterations: int = Field(10, ge=1, description="Rollout -> score -> update -> sync rounds.")
    prompts_per_iteration: int = Field(8, ge=1, description="Prompts sampled per iteration.")
    samples_per_prompt: int = Field(4, ge=2, description="k completions per prompt (ranked against each other).")
    max_tokens: int = Field(32, ge=1, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens (0: off).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    lr: float = knob(OptimizerConfig, "lr", 5e-5)
    weight_decay: float = knob(OptimizerConfig, "weight_decay", 0.0)
    epochs: int = Field(1, ge=1, description="Passes over each iteration's examples.")
    batch_size: int = Field(16, ge=1, description="Examples (sequences, or pairs for dpo) per optimizer step.")
    beta: float = Field(0.1, ge=0, description="dpo: temperature of the implicit reward; grpo, rloo, ppo: "
                        "weight of the KL penalty to the reference policy (grpo: in the loss; rloo: in the "
                        "reward; ppo: as kl_penalty says).")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="grpo, rloo, ppo: the ratio is clipped to "
                            "[1 - eps, 1 + eps].")
    loss_aggregation: Literal["sequence", "token", "dr_grpo"] = Field(
        "sequence", description="grpo, rloo, ppo: how per-token losses become the step's loss. sequence: mean "
        "over each sequence's tokens, then over sequences (GRPO); token: sum over the step's tokens / their "
        "number (DAPO, arXiv 2503.14476); dr_grpo: sum / (sequences x max_tokens) (Dr. GRPO, arXiv 2503.20783).")
    scale_rewards: bool = Field(True, description="grpo: divide each prompt's centred rewards by their std "
                                "(+ 1e-4); false: r - mean only (Dr. GRPO).")
    gamma: float = Field(1.0, ge=0, le=1, description="ppo: discount of GAE (Schulman et al. 2015).")
    lam: float = Field(0.95, ge=0, le=1, alias="lambda", description="ppo: GAE's lambda (1: Monte Carlo "
                       "returns, 0: one-step TD); the YAML key is `lambda`.")
    kl_penalty: Literal["reward", "loss"] = Field("reward", description="ppo: the KL to the reference as a "
                                                  "per-token penalty in the reward (InstructGPT), or as beta x k3 "
                                                  "in the loss (as grpo).")
    value_clip: float = Field(0.2, gt=0, description="ppo: the critic's new values are clipped to the old ones "
                              "+- value_clip in its loss (the larger of the clipped and unclipped squared errors).")
    whiten_advantages: bool = Field(True, description="ppo: whiten the GAE advantages over the iteration's tokens "
                                    "(zero mean, unit variance).")
    critic_lr: float | None = Field(None, gt=0, description="ppo: the critic's learning rate; default: lr.")
    top_n: int = Field(1, ge=1, description="best_of_n: completions kept per prompt (the top-ranked).")
    rollout_workers: int | None = Field(None, ge=1, description="Rollout actors; default: resources.workers or 1.")
    learner_workers: int = Field(1, ge=1, description="Data-parallel learner workers (each with resources.cpus/"
                                 "gpus): every optimizer step's batch is split between them (strategy: ddp or fsdp).")
    seed: int = knob(OptimizerConfig, "seed", 0)
    keep_checkpoints: int = Field(2, ge=1, description="Iteration checkpoints kept in scratch storage.")


# ----------------------------------------------------------------------------- typed hand-offs


@dataclass
class ScoredGroup:
    """A prompt's samples with their ranking (step 2's output, step 3's input)."""

    group: Group
    ranking: Ranking


@dataclass
class Example:
    """One sequence to train on: completion tokens after the prompt, with a weight/advantage."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float = 1.0


@dataclass
class Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class UpdateStats:
    loss: float
    kl: float              # per-token KL(policy || reference) on this iteration's samples, before the update
    examples: int
    steps: int
    value_loss: float | None = None          # ppo: the critic's mean loss over the steps
    explained_variance: float | None = None  # ppo: of the returns by the critic's values, before the update


# ----------------------------------------------------------------------------- 1-2. rollout, score


def rollout(pool: RolloutPool, prompts: list[str], config: Config, seed: int) -> list[Group]:
    params = dict(n=config.samples_per_prompt, max_tokens=config.max_tokens, temperature=config.temperature,
                  top_k=config.top_k, top_p=config.top_p)
    return pool.rollout(prompts, params, seed=seed)


def score(pool: RankingPool, groups: list[Group]) -> list[ScoredGroup]:
    rankings = pool.rank_many([g.prompt for g in groups], [g.texts for g in groups],
                              [g.finish_reasons for g in groups])
    return [ScoredGroup(g, r) for g, r in zip(groups, rankings)]


# ----------------------------------------------------------------------------- 3. examples per algorithm


def best_of_n_examples(scored: list[ScoredGroup], top_n: int = 1) -> list[Example]:
    return [Example(s.group.prompt_ids, s.group.samples[i].token_ids)
            for s in scored for i in s.ranking.order[:top_n]]


def dpo_pairs(scored: list[ScoredGroup]) -> list[Pair]:
    """Best vs worst of each prompt; prompts whose samples all score the same teach nothing."""
    out = []
    for s in scored:
        b, w = s.ranking.best, s.ranking.worst
        if s.ranking.scores[b] > s.ranking.scores[w]:
            out.append(Pair(s.group.prompt_ids, s.group.samples[b].token_ids, s.group.samples[w].token_ids))
    return out


ADVANTAGE_EPS = 1e-4  # TRL's GRPO: (r - mean) / (std + 1e-4)


def group_advantages(rewards: list[float], scale: bool = True, eps: float = ADVANTAGE_EPS) -> list[float]:
    """GRPO: (r - mean) / (std + eps) over one prompt's samples, std the sample std (n - 1, as
    torch.std and TRL); ``scale`` False: r - mean (Dr. GRPO)."""
    mean = sum(rewards) / len(rewards)
    std = (sum((x - mean) ** 2 for x in rewards) / max(1, len(rewards) - 1)) ** 0.5
    return [(x - mean) / (std + eps) if scale else x - mean for x in rewards]


def leave_one_out(rewards: list[float]) -> list[float]:
    """RLOO: each reward minus the mean of the prompt's other samples."""
    k, total = len(rewards), sum(rewards)
    return [x - (total - x) / (k - 1) for x in rewards]


def grpo_examples(scored: list[ScoredGroup], scale: bool = True) -> list[Example]:
    """Every sample with its group-relative advantage (``group_advantages``)."""
    return [Example(s.group.prompt_ids, smp.token_ids, a) for s in scored
            for smp, a in zip(s.group.samples, group_advantages(s.ranking.scores, scale))]


def gae(rewards, values, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2015) over one sequence: rewards and
    values (L,) (the state before token t; after the last token the episode ends, V = 0) ->
    (advantages, returns = advantages + values), each (L,)."""
    import torch
    adv = torch.zeros_like(rewards)
    last = 0.0
    for t in reversed(range(rewards.numel())):
        next_v = values[t + 1] if t + 1 < rewards.numel() else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, adv + values


def whiten(x, eps: float = 1e-8):
    """(x - mean) / std over all of x (population std, as TRL's masked_whiten)."""
    return (x - x.mean()) / (x.var(unbiased=False) + eps).sqrt()


def explained_variance(values, returns) -> float:
    """1 - Var(returns - values) / Var(returns): how much of the returns the critic predicts."""
    var = float(returns.var(unbiased=False))
    return float("nan") if var == 0 else 1.0 - float((returns - values).var(unbiased=False)) / var


# ----------------------------------------------------------------------------- losses (plain torch)


def _pack(prompts: list[list[int]], completions: list[list[int]], device):
    """Right-padded inputs (prompt + completion minus its last token) and targets, (B, T)."""
    import torch

    rows = [p + c for p, c in zip(prompts, completions)]
    T = max(len(r) for r in rows) - 1
    idx = torch.zeros((len(rows), T), dtype=torch.long)
    targets = torch.zeros_like(idx)
    for i, r in enumerate(rows):
        idx[i, :len(r) - 1] = torch.tensor(r[:-1])
        targets[i, :len(r) - 1] = torch.tensor(r[1:])
    return idx.to(device), targets.to(device)


def _completion_aligned(x, prompts, completions):
    """(B, T) per input position -> (B, L) per completion token, and the mask (B, L)."""
    import torch

    L = max(len(c) for c in completions)
    out = torch.zeros((x.size(0), L), device=x.device, dtype=x.dtype)
    mask = torch.zeros((x.size(0), L), device=x.device)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        out[i, :len(c)] = x[i, len(p) - 1:len(p) - 1 + len(c)]
        mask[i, :len(c)] = 1.0
    return out, mask


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], device,
                        temperature: float = 1.0):
    """Log-probs of each completion's tokens given its prompt under softmax(logits / temperature):
    (B, L) completion-aligned, mask (B, L)."""
    from torch.nn import functional as F

    idx, targets = _pack(prompts, completions, device)
    logits, _ = model(idx)                                                       # (B, T, V)
    lp = F.log_softmax(logits.float() / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    return _completion_aligned(lp, prompts, completions)


def completion_values(critic, prompts: list[list[int]], completions: list[list[int]], device):
    """The critic's value of the state before each completion token: (B, L), mask (B, L)."""
    idx, _ = _pack(prompts, completions, device)
    return _completion_aligned(critic(idx).float(), prompts, completions)       # critic: (B, T)


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1, d = ref - pi."""
    import torch
    d = (ref_logp - logp).clamp(-20, 20)
    return torch.exp(d) - d - 1


def nll_loss(logp, mask):
    return -(logp * mask).sum() / mask.sum().clamp_min(1)


def dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta: float):
    """Sequence log-prob sums (B,) -> mean of -log sigmoid(beta * (margin_pi - margin_ref))."""
    from torch.nn import functional as F
    return -F.logsigmoid(beta * ((pol_chosen - ref_chosen) - (pol_rejected - ref_rejected))).mean()


def clipped_surrogate(logp, old_logp, advantages, clip_eps: float):
    """Per-token PPO loss -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A); ``advantages``
    (B,) per sequence or (B, L) per token."""
    import torch
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    return -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)


def aggregate(per_token, mask, how: str, *, sequences: int | None = None, tokens: float | None = None,
              max_tokens: int | None = None):
    """The step's loss from per-token losses (B, L) of some of its rows: sequence (per-sequence
    token means / the step's ``sequences``), token (sum / the step's ``tokens``) or dr_grpo
    (sum / (``sequences`` x ``max_tokens``)). Defaults: these rows are the whole step."""
    sequences = sequences if sequences is not None else per_token.size(0)
    if how == "sequence":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).sum() / sequences
    if how == "token":
        return (per_token * mask).sum() / (tokens if tokens is not None else mask.sum().clamp_min(1))
    if how == "dr_grpo":
        return (per_token * mask).sum() / (sequences * (max_tokens if max_tokens is not None else per_token.size(1)))
    raise ValueError(f"loss_aggregation: got {how!r}; allowed: sequence, token, dr_grpo")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float, beta: float,
              aggregation: str = "sequence", **normalisers):
    """Clipped surrogate + beta * k3 KL per token, aggregated (GRPO: per sequence, then over sequences)."""
    per_token = clipped_surrogate(logp, old_logp, advantages, clip_eps) + beta * kl_k3(logp, ref_logp)
    return aggregate(per_token, mask, aggregation, **normalisers)


def value_loss(values, old_values, returns, clip: float):
    """Per-token clipped value loss 0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-c) - R)^2)."""
    import torch
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


# ----------------------------------------------------------------------------- the learner


def _rank_slices(rows: list[int], rank: int, world: int, chunk: int) -> list[list[int]]:
    """This rank's share (rows ``rank::world``) of ``rows`` in calls of at most ``chunk`` rows, the
    same number of calls on every rank (FSDP's gathers are collective); a call may be empty."""
    mine = rows[rank::world]
    calls = -(-len(rows[0::world]) // chunk) if rows else 0
    return [mine[k * chunk:(k + 1) * chunk] for k in range(calls)]


class Learner:
    """One data-parallel rank of the learner: the policy, the frozen reference (the initial policy)
    and the optimizer, replicated (DDP) or sharded (FSDP) over the group (see
    ``workers.training.sharding``). Runs as a Ray actor, so it gets the stage's GPU when there is
    one. Every rank receives the same scored groups and derives the same batches; each step's
    batch is split between the ranks, each rank's loss weighted so that the gradient averaged
    over the group is the whole batch's (the 1-worker learner's)."""

    def __init__(self, checkpoint: str, config: dict, threads: int = 1, rank: int = 0, world: int = 1,
                 critic: str | None = None):
        import copy

        import torch

        from workers.model.transformer import default_device

        claim_cpus(threads)
        self.cfg = Config.model_validate(config)
        self.rank, self.world = rank, world
        self.device = torch.device(default_device())
        # fp32 master weights (autocast on GPU); the exported checkpoint is cast back to the stored dtype
        pol = open_checkpoint(checkpoint, device="cpu", dtype=torch.float32, field="policy")
        self.policy, self.extra = pol.model, pol.carried_config()
        self.reference = copy.deepcopy(self.policy).eval()
        self.critic = None
        if self.cfg.algorithm == "ppo":
            from workers.model.reward_head import ValueModel

            # InstructGPT: the critic starts from the reward model; a verifiable reward has none,
            # so the critic then starts from the policy's trunk with a fresh head
            self.critic = (ValueModel.from_reward(open_checkpoint(critic, load="reward", device="cpu",
                                                                  dtype=torch.float32, field="reward.model").model)
                           if critic else ValueModel.from_gpt(copy.deepcopy(self.policy)))

    @staticmethod
    def rendezvous() -> str:
        """``tcp://ip:port`` on this actor's node for the group's process group (call on rank 0)."""
        import socket

        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def setup(self, init_method: str) -> str:
        """Join the group's process group and place the models; returns the strategy."""
        import torch
        import torch.distributed as dist

        from workers.model.transformer import autocast_context
        from workers.training import sharding
        from workers.training.loop import resolve_precision
        from workers.training.params import adamw

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", init_method=init_method,
                                rank=self.rank, world_size=self.world)
        precision = resolve_precision(self.device, self.cfg.precision)
        placed = sharding.place(self.policy, self.cfg, world=self.world, device=self.device, precision=precision,
                                local_world=self.world)
        self.train_policy = placed.train_model
        self.reference = sharding.place_frozen(self.reference, placed, world=self.world, device=self.device,
                                               precision=precision)
        # decay matrices only, as the training loop does
        self.optimizer = adamw(self.policy, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                               device_type=placed.optimizer_device)
        self.train_critic = self.critic_optimizer = None
        if self.critic is not None:
            critic = sharding.place(self.critic, self.cfg, world=self.world, device=self.device,
                                    precision=precision, local_world=self.world)
            self.train_critic = critic.train_model
            self.critic_optimizer = adamw(self.critic, lr=self.cfg.critic_lr or self.cfg.lr,
                                          weight_decay=self.cfg.weight_decay, device_type=critic.optimizer_device)
        self.autocast = lambda: autocast_context(self.device, precision)
        return placed.strategy

    # -- weights and checkpoints

    def weights(self) -> list:
        """[ref] of the policy's full CPU state dict in the object store, from rank 0 ([None] on the
        others): under FSDP it is gathered layer by layer onto rank 0 only. Collective."""
        import ray
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return [ray.put(sd) if self.rank == 0 else None]

    def save(self, uri: str, state: dict) -> None:
        """This rank's shard of the policy and optimizer (DCP) into ``uri``; rank 0 adds the state."""
        from workers.training import sharding

        tmp = Path(tempfile.mkdtemp(prefix="rlhf-ckpt-"))
        try:
            sharding.save_state(tmp, self.policy, self.optimizer)
            if self.critic is not None:  # ppo: the critic's own DCP checkpoint beside the policy's
                (tmp / "critic").mkdir()
                sharding.save_state(tmp / "critic", self.critic, self.critic_optimizer)
            if self.rank == 0:
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
            for f in tmp.rglob("*"):  # the ranks' files side by side in one folder
                if f.is_file():
                    storage.write_bytes(storage.join(uri, f.relative_to(tmp).as_posix()), f.read_bytes())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self, uri: str) -> dict:
        from workers.training import sharding

        with local_folder(uri) as local:
            sharding.load_state(local, self.policy, self.optimizer)
            if self.critic is not None:
                sharding.load_state(local / "critic", self.critic, self.critic_optimizer)
            return json.loads((local / STATE_FILE).read_text())

    def peak_memory_bytes(self) -> int:
        from workers.training import sharding
        return sharding.peak_memory_bytes(self.device)

    # -- measuring

    def _logprobs(self, model, prompts, completions, grad: bool = False):
        """At the rollout temperature: the distribution the samples were drawn from."""
        import torch
        with (torch.enable_grad() if grad else torch.no_grad()), self.autocast():
            return completion_logprobs(model, prompts, completions, self.device, self.cfg.temperature)

    def _values(self, critic, prompts, completions, grad: bool = False):
        import torch
        with (torch.enable_grad() if grad else torch.no_grad()), self.autocast():
            return completion_values(critic, prompts, completions, self.device)

    def _chunks(self, n: int, iteration: int, epoch: int) -> list[list[int]]:
        import numpy as np
        order = np.random.default_rng([self.cfg.seed, iteration, epoch]).permutation(n).tolist()
        B = self.cfg.batch_size
        return [order[k:k + B] for k in range(0, n, B)]

    def _all_reduce(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def _fixed_logprobs(self, model, prompts, comps, chunk: int = 64, measure=None) -> list:
        """Each completion's token log-probs (or ``measure``'s per-token values; 1-D, no grad, on
        the device): every rank computes its share, then all of them are exchanged."""
        import torch.distributed as dist

        measure = measure or self._logprobs
        mine = {}
        for rows in _rank_slices(list(range(len(comps))), self.rank, self.world, chunk):
            use = rows or [0]  # an empty call still joins FSDP's gathers
            lp, _ = measure(model, [prompts[i] for i in use], [comps[i] for i in use])
            mine.update({i: lp[r, :len(comps[i])].cpu() for r, i in enumerate(rows)})
        parts = [mine]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, mine)
        merged = {i: t for part in parts for i, t in part.items()}
        return [merged[i].to(self.device) for i in range(len(comps))]

    def kl(self, groups: list[Group]) -> float:
        """Mean per-token KL(policy || reference) (k3) over the groups' samples."""
        prompts = [g.prompt_ids for g in groups for _ in g.samples]
        comps = [s.token_ids for g in groups for s in g.samples]
        total, count = 0.0, 0.0
        for rows in _rank_slices(list(range(len(comps))), self.rank, self.world, 64):
            use = rows or [0]
            lp, mask = self._logprobs(self.policy, [prompts[i] for i in use], [comps[i] for i in use])
            ref, _ = self._logprobs(self.reference, [prompts[i] for i in use], [comps[i] for i in use])
            weight = 1.0 if rows else 0.0
            total += weight * float((kl_k3(lp, ref) * mask).sum())
            count += weight * float(mask.sum())
        total, count = self._all_reduce([total, count])
        return total / max(count, 1.0)

    # -- updating

    def _step(self, chunk: list[int], loss_of, critic_loss_of=None):
        """One optimizer step on ``chunk``: this rank's rows' share of the batch loss, times the
        world size (gradients are averaged over the group); returns the batch's loss.
        ``loss_of(rows)`` is the batch-normalised loss summed over ``rows``; ``critic_loss_of``
        (ppo) the critic's, stepped with its own optimizer: then (loss, critic loss)."""
        import torch

        from workers.training import sharding

        rows = chunk[self.rank::self.world]
        weight = 1.0 if rows else 0.0  # an empty share still joins the reduction
        pairs = [(loss_of, self.policy, self.optimizer)]
        if critic_loss_of is not None:
            pairs.append((critic_loss_of, self.critic, self.critic_optimizer))
        out = []
        for fn, model, optimizer in pairs:
            loss = fn(rows or chunk[:1]) * weight
            optimizer.zero_grad(set_to_none=True)
            (loss * self.world).backward()
            if self.cfg.grad_clip > 0:
                sharding.to_local(torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip))
            optimizer.step()
            out.append(loss.item())
        out = self._all_reduce(out)
        return out[0] if critic_loss_of is None else tuple(out)

    def update(self, scored: list[ScoredGroup], iteration: int) -> UpdateStats:
        self.policy.train()
        kl = self.kl([s.group for s in scored])
        if self.cfg.algorithm in ("grpo", "rloo", "ppo"):
            stats = self._update_policy_gradient(scored, iteration)
        else:
            fn = {"best_of_n": self._update_best_of_n, "dpo": self._update_dpo}[self.cfg.algorithm]
            losses, n = fn(scored, iteration)
            stats = UpdateStats(loss=sum(losses) / len(losses) if losses else 0.0, kl=0.0, examples=n,
                                steps=len(losses))
        self.policy.eval()
        stats.kl = kl
        return stats

    def _update_best_of_n(self, scored, iteration):
        ex = best_of_n_examples(scored, self.cfg.top_n)
        losses = []
        for epoch in range(self.cfg.epochs):
            for chunk in self._chunks(len(ex), iteration, epoch):
                tokens = sum(len(ex[i].completion_ids) for i in chunk)

                def loss_of(rows):
                    lp, mask = self._logprobs(self.train_policy, [ex[i].prompt_ids for i in rows],
                                              [ex[i].completion_ids for i in rows], grad=True)
                    return nll_loss(lp, mask) * mask.sum() / max(tokens, 1)  # the batch's per-token mean

                losses.append(self._step(chunk, loss_of))
        return losses, len(ex)

    def _update_dpo(self, scored, iteration):
        pairs = dpo_pairs(scored)
        losses = []
        for epoch in range(self.cfg.epochs):
            for chunk in self._chunks(len(pairs), iteration, epoch):

                def loss_of(rows):
                    prompts = [pairs[i].prompt_ids for i in rows] * 2
                    comps = [pairs[i].chosen_ids for i in rows] + [pairs[i].rejected_ids for i in rows]
                    lp, mask = self._logprobs(self.train_policy, prompts, comps, grad=True)
                    ref, _ = self._logprobs(self.reference, prompts, comps)
                    seq, ref_seq, B = (lp * mask).sum(1), (ref * mask).sum(1), len(rows)
                    return dpo_loss(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], self.cfg.beta) * B / len(chunk)

                losses.append(self._step(chunk, loss_of))
        return losses, len(pairs)

    def _advantages(self, scored: list[ScoredGroup], prompts, comps, old, ref):
        """Per-token advantages (1-D per sample) of grpo / rloo / ppo, and for ppo the critic's
        old values and the returns (else None)."""
        import torch

        cfg = self.cfg
        rewards = [r for s in scored for r in s.ranking.scores]
        k1 = [(o - f).sum() for o, f in zip(old, ref)]  # each sequence's log pi_old - log ref
        if cfg.algorithm == "grpo":
            seq = [a for s in scored for a in group_advantages(s.ranking.scores, cfg.scale_rewards)]
        elif cfg.algorithm == "rloo":
            seq, n = [], 0
            for s in scored:
                k = len(s.ranking.scores)
                seq += leave_one_out([r - cfg.beta * float(k1[n + j]) for j, r in enumerate(s.ranking.scores)])
                n += k
        if cfg.algorithm != "ppo":
            return [torch.full((len(c),), float(a), device=self.device) for a, c in zip(seq, comps)], None, None
        values = self._fixed_logprobs(self.critic, prompts, comps, measure=self._values)
        adv, returns = [], []
        for i, c in enumerate(comps):
            r = -cfg.beta * (old[i] - ref[i]) if cfg.kl_penalty == "reward" else torch.zeros_like(old[i])
            r[-1] += rewards[i]
            a, ret = gae(r, values[i], cfg.gamma, cfg.lam)
            adv.append(a)
            returns.append(ret)
        if cfg.whiten_advantages:
            flat = whiten(torch.cat(adv))
            adv = list(flat.split([len(c) for c in comps]))
        return adv, values, returns

    def _update_policy_gradient(self, scored: list[ScoredGroup], iteration: int) -> UpdateStats:
        """grpo, rloo and ppo: one rollout -> score -> update path; the algorithm picks the
        advantage (``_advantages``) and whether the KL is a loss term and a critic learns."""
        import torch

        cfg = self.cfg
        prompts = [s.group.prompt_ids for s in scored for _ in s.group.samples]
        comps = [smp.token_ids for s in scored for smp in s.group.samples]
        # the sampling policy's and the reference's log-probs, fixed for all of this iteration's steps
        old = self._fixed_logprobs(self.policy, prompts, comps)
        ref = self._fixed_logprobs(self.reference, prompts, comps)
        adv, old_values, returns = self._advantages(scored, prompts, comps, old, ref)
        kl_in_loss = cfg.algorithm == "grpo" or (cfg.algorithm == "ppo" and cfg.kl_penalty == "loss")
        ev = None
        if returns is not None:
            ev = explained_variance(torch.cat(old_values), torch.cat(returns))

        def padded(per_sample, rows, like):
            out = torch.zeros_like(like)
            for row, i in enumerate(rows):
                out[row, :len(per_sample[i])] = per_sample[i]
            return out

        losses, value_losses = [], []
        for epoch in range(cfg.epochs):
            for chunk in self._chunks(len(comps), iteration, epoch):
                norm = dict(sequences=len(chunk), tokens=sum(len(comps[i]) for i in chunk), max_tokens=cfg.max_tokens)

                def loss_of(rows):
                    lp, mask = self._logprobs(self.train_policy, [prompts[i] for i in rows], [comps[i] for i in rows],
                                              grad=True)
                    per_token = clipped_surrogate(lp, padded(old, rows, lp), padded(adv, rows, lp), cfg.clip_eps)
                    if kl_in_loss:
                        per_token = per_token + cfg.beta * kl_k3(lp, padded(ref, rows, lp))
                    return aggregate(per_token, mask, cfg.loss_aggregation, **norm)

                def critic_loss_of(rows):
                    v, mask = self._values(self.train_critic, [prompts[i] for i in rows], [comps[i] for i in rows],
                                           grad=True)
                    per_token = value_loss(v, padded(old_values, rows, v), padded(returns, rows, v), cfg.value_clip)
                    return aggregate(per_token, mask, cfg.loss_aggregation, **norm)

                if returns is None:
                    losses.append(self._step(chunk, loss_of))
                else:
                    loss, vloss = self._step(chunk, loss_of, critic_loss_of)
                    losses.append(loss)
                    value_losses.append(vloss)
        return UpdateStats(loss=sum(losses) / max(1, len(losses)), kl=0.0, examples=len(comps), steps=len(losses),
                           value_loss=sum(value_losses) / len(value_losses) if value_losses else None,
                           explained_variance=ev)


class LearnerGroup:
    """``n`` Learner actors joined in one torch.distributed process group: every call goes to
    all ranks (they are collective) and rank 0's answer is returned."""

    def __init__(self, checkpoint: str, config: Config, n: int, *, cpus: float, gpus: float,
                 critic: str | None = None):
        import ray

        remote = ray.remote(Learner).options(num_cpus=cpus, num_gpus=gpus)
        self.actors = [remote.remote(checkpoint, config.model_dump(), max(1, int(cpus)), r, n, critic)
                       for r in range(n)]
        init_method = ray.get(self.actors[0].rendezvous.remote())
        self.strategy = ray.get([a.setup.remote(init_method) for a in self.actors])[0]

    def call(self, method: str, *args):
        import ray
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])[0]

    def peak_memory_mb(self) -> list[float]:
        import ray
        return [b / 2**20 for b in ray.get([a.peak_memory_bytes.remote() for a in self.actors])]

    def shutdown(self) -> None:
        import ray
        for a in self.actors:
            ray.kill(a)


# ----------------------------------------------------------------------------- checkpoints in scratch


def _iter_dir(root: str, iteration: int) -> str:
    return storage.join(root, f"iter-{iteration:05d}")


def latest_iteration(root: str) -> int:
    """The last iteration whose checkpoint finished (0: none)."""
    pointer = storage.join(root, LATEST_FILE)
    return int(storage.read_json(pointer)["iteration"]) if storage.exists(pointer) else 0


def checkpoint(learner: LearnerGroup, root: str, iteration: int, state: dict, keep: int) -> None:
    """The learners write iteration's folder, then the pointer moves (atomically), then old ones go."""
    learner.call("save", _iter_dir(root, iteration), {**state, "iteration": iteration})
    storage.write_json(storage.join(root, LATEST_FILE), {"iteration": iteration})
    old = iteration - keep
    if old >= 1 and storage.exists(_iter_dir(root, old)):
        storage.delete(_iter_dir(root, old))


# ----------------------------------------------------------------------------- the kind


def mean_reward(rollout_pool: RolloutPool, ranking_pool: RankingPool, prompts: list[str], config: Config,
                seed: int) -> tuple[float, list[Group]]:
    groups = rollout(rollout_pool, prompts, config, seed)
    scored = score(ranking_pool, groups)
    values = [x for s in scored for x in s.ranking.scores]
    return sum(values) / len(values), groups


def _iteration_prompts(prompts: list[str], config: Config, iteration: int) -> list[str]:
    import numpy as np
    rng = np.random.default_rng([config.seed, iteration])
    n = config.prompts_per_iteration
    idx = rng.permutation(len(prompts))[:n] if n <= len(prompts) else rng.choice(len(prompts), n)
    return [prompts[i] for i in idx]


def critic_source(config: Config, source, policy: Checkpoint) -> str | None:
    """ppo: the reward model the critic starts from (InstructGPT), when it reads the policy's
    tokens (the same vocabulary); else None: the critic starts from the policy's trunk."""
    if config.algorithm != "ppo" or source.kind != "model":
        return None
    reward = open_checkpoint(source.ref, load=None, field="reward.model")
    return source.ref if reward.tokenizer.get_vocab() == policy.tokenizer.get_vocab() else None


def split_prompts(prompts: list[str], eval_prompts: int, stage: str) -> tuple[list[str], list[str]]:
    """(held out: the last ``eval_prompts``, train: the rest); at least one prompt must train."""
    if eval_prompts >= len(prompts):
        raise ValueError(f"stages.{stage}.config.eval_prompts: got {eval_prompts} with {len(prompts)} prompts; "
                         f"at most {len(prompts) - 1} can be held out (at least one must be left for training): "
                         "lower eval_prompts or give more prompts")
    return (prompts[len(prompts) - eval_prompts:] if eval_prompts else []), prompts[:len(prompts) - eval_prompts]


def run(ctx, config: Config) -> dict[str, Any]:
    """Train."""
    import ray

    policy_uri = ctx.upstream("checkpoint", config.policy, field="policy")
    policy = open_checkpoint(policy_uri, load=None, field="policy")  # checked before any actor starts
    source = resolve_reward(ctx, config.reward)
    prompts = load_prompts(ctx, config.prompts)
    held_out, train = split_prompts(prompts, config.eval_prompts, ctx.stage)
    res = ctx.resources
    workers, workers_field = count_of(("config.rollout_workers", config.rollout_workers),
                                      ("resources.workers", res.workers))
    check_fits(ctx.stage, [  # all three groups at once: on too small a cluster the last would wait forever
        ActorGroup("rollout actor", workers, workers_field, res.cpus, res.gpus, "resources"),
        ranking_actors(config.reward),
        ActorGroup("learner", config.learner_workers, "config.learner_workers", res.cpus, res.gpus, "resources"),
    ])
    root = storage.join(ctx.scratch_uri or str(Path(ctx.artifact_dir) / ".scratch"), "rlhf")

    rollout_pool = ranking_pool = learner = None
    try:
        rollout_pool = RolloutPool(policy_uri, workers, cpus=res.cpus, gpus=res.gpus)
        ranking_pool = RankingPool.from_config(source, config.reward)
        learner = LearnerGroup(policy_uri, config, config.learner_workers, cpus=res.cpus, gpus=res.gpus,
                               critic=critic_source(config, source, policy))
        ctx.set_tags({"learner.strategy": learner.strategy})
        start = latest_iteration(root)
        state: dict[str, Any] = {}
        if start:
            state = learner.call("restore", _iter_dir(root, start))
            rollout_pool.sync(learner.call("weights")[0])
            ctx.set_tags({"resumed_from_iteration": str(start)})
            ctx.log_metrics({"resumed_from_iteration": start}, step=start)
        elif held_out:
            state["mean_reward_start"], _ = mean_reward(rollout_pool, ranking_pool, held_out, config, config.seed + 10**6)
            ctx.log_metrics({"mean_reward_start": state["mean_reward_start"]}, step=0)
        ctx.progress(start, config.iterations, "iterations")

        for it in range(start, config.iterations):
            n = it + 1
            t0 = time.perf_counter()
            groups = rollout(rollout_pool, _iteration_prompts(train, config, it), config, config.seed + 1000 * n)
            t1 = time.perf_counter()
            scored = score(ranking_pool, groups)
            t2 = time.perf_counter()
            scored_ref = ray.put(scored)  # one copy for all the learners
            stats: UpdateStats = learner.call("update", scored_ref, n)
            t3 = time.perf_counter()
            sync_s = rollout_pool.sync(learner.call("weights")[0])
            t4 = time.perf_counter()
            rewards = [x for s in scored for x in s.ranking.scores]
            state.setdefault("mean_reward_first_iteration", sum(rewards) / len(rewards))
            state["mean_reward_last_iteration"] = sum(rewards) / len(rewards)
            checkpoint(learner, root, n, state, config.keep_checkpoints)
            t5 = time.perf_counter()
            ctx.log_metrics({
                "reward_mean": sum(rewards) / len(rewards), "reward_max": max(rewards),
                "kl": stats.kl, "loss": stats.loss, "examples": stats.examples, "update_steps": stats.steps,
                **({"critic_loss": stats.value_loss} if stats.value_loss is not None else {}),
                **({"critic_explained_variance": stats.explained_variance}
                   if stats.explained_variance is not None else {}),
                "rollout_tokens_per_s": rollout_pool.last.tokens_per_s,
                "ranking_completions_per_s": ranking_pool.last.per_s,
                "time_generation_s": t1 - t0, "time_ranking_s": t2 - t1, "time_update_s": t3 - t2,
                "time_sync_s": sync_s, "time_checkpoint_s": t5 - t4, "iteration_s": t5 - t0,
                **{f"learner_peak_memory_mb_rank{r}": mb for r, mb in enumerate(learner.peak_memory_mb())},
            }, step=n)
            ctx.progress(n, config.iterations, "iterations", checkpoint=n)

        if held_out:
            end, groups = mean_reward(rollout_pool, ranking_pool, held_out, config, config.seed + 10**6)
            start_reward = state["mean_reward_start"]
        else:
            start_reward, end = state["mean_reward_first_iteration"], state["mean_reward_last_iteration"]
            groups = rollout(rollout_pool, _iteration_prompts(train, config, 0), config, config.seed)
        kl = learner.call("kl", groups)
        ctx.log_metrics({"mean_reward_end": end, "final_kl": kl}, step=config.iterations)
        out = Path(ctx.artifact_dir) / "checkpoint"
        _export(_iter_dir(root, latest_iteration(root)), policy, out)
    finally:
        if learner is not None:
            learner.shutdown()
        for pool in (rollout_pool, ranking_pool):
            if pool is not None:
                pool.shutdown()
    checkpoint_uri = storage.join(ctx.output_uri, "checkpoint")
    return {
        "checkpoint": checkpoint_uri,
        "tokenizer": storage.join(checkpoint_uri, "tokenizer.json"),
        "mean_reward_start": start_reward,
        "mean_reward_end": end,
        "kl": kl,
        "algorithm": config.algorithm,
        "iterations": config.iterations,
        "reward": source.describe(),  # evaluate tells a win rate judged by this reward apart
        "reward_checks": source.check_names,  # ... and checks that were part of the reward
    }


def _export(iter_uri: str, policy: Checkpoint, out: Path) -> None:
    """The last iteration's weights, consolidated once from the learners' shards into the starting
    policy's layout and stored dtype, plus its tokenizer side: self-contained."""
    import torch

    from workers.model.hf import save_model
    from workers.training import sharding

    base = open_checkpoint(policy.uri, device="cpu", dtype=torch.float32, field="policy")
    with local_folder(iter_uri) as local:
        save_model(sharding.consolidate(local, base.model), out, extra=policy.carried_config())
    if policy.stored_dtype:
        cast_model_files(out, policy.stored_dtype)
    policy.write_tokenizer(out)
