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
   - ``grpo``: advantages (r - mean) / std within each prompt's k samples, PPO-clipped ratio
     (``clip_eps``) to the sampling policy, plus ``beta`` x KL to the frozen initial policy
     (k3 estimator: exp(ref - pi) - (ref - pi) - 1, per token);
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

from pydantic import Field

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

    policy: str | None = Field(None, description="The starting policy (and the frozen reference): an upstream "
                               "stage with a `checkpoint` output, or a checkpoint path/URI (ours or a Hugging Face "
                               "folder). Default: the only upstream with a checkpoint.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward source and ranking actors.")
    prompts: PromptSource = Field(default_factory=PromptSource, description="Training prompts.")
    eval_prompts: int = Field(8, ge=0, description="Prompts held out (the last ones) to measure the mean "
                              "reward before and after training; 0: use the first/last iteration's rollouts.")
    algorithm: Literal["best_of_n", "dpo", "grpo"] = Field("grpo", description="How ranked samples update the policy.")
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
    beta: float = Field(0.1, ge=0, description="dpo: temperature of the implicit reward; grpo: weight of the "
                        "KL penalty to the reference policy.")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="grpo: the ratio is clipped to [1 - eps, 1 + eps].")
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


# ----------------------------------------------------------------------------- 1-2. rollout, score


def rollout(pool: RolloutPool, prompts: list[str], config: Config, seed: int) -> list[Group]:
    params = dict(n=config.samples_per_prompt, max_tokens=config.max_tokens, temperature=config.temperature,
                  top_k=config.top_k, top_p=config.top_p)
    return pool.rollout(prompts, params, seed=seed)


def score(pool: RankingPool, groups: list[Group]) -> list[ScoredGroup]:
    rankings = pool.rank_many([g.prompt for g in groups], [g.texts for g in groups])
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


def grpo_examples(scored: list[ScoredGroup], eps: float = 1e-6) -> list[Example]:
    """Group-relative advantages (r - mean) / std; groups with no spread are dropped (A = 0)."""
    out = []
    for s in scored:
        r = s.ranking.scores
        mean = sum(r) / len(r)
        std = (sum((x - mean) ** 2 for x in r) / max(1, len(r) - 1)) ** 0.5
        if std < eps:
            continue
        out += [Example(s.group.prompt_ids, smp.token_ids, (x - mean) / std) for smp, x in zip(s.group.samples, r)]
    return out


# ----------------------------------------------------------------------------- losses (plain torch)


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], device):
    """Log-probs of each completion's tokens given its prompt: (B, L) completion-aligned, mask (B, L)."""
    import torch
    from torch.nn import functional as F

    rows = [p + c for p, c in zip(prompts, completions)]
    T = max(len(r) for r in rows) - 1
    idx = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, :len(r) - 1] = torch.tensor(r[:-1])
    targets = torch.zeros_like(idx)
    for i, r in enumerate(rows):
        targets[i, :len(r) - 1] = torch.tensor(r[1:])
    idx, targets = idx.to(device), targets.to(device)
    logits, _ = model(idx)                                                       # (B, T, V)
    lp = F.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    L = max(len(c) for c in completions)
    out = torch.zeros((len(rows), L), device=device)
    mask = torch.zeros((len(rows), L), device=device)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        out[i, :len(c)] = lp[i, len(p) - 1:len(p) - 1 + len(c)]
        mask[i, :len(c)] = 1.0
    return out, mask


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


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float, beta: float):
    """Clipped surrogate + beta * k3 KL, averaged per sequence then over sequences (GRPO)."""
    import torch
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -(surrogate - beta * kl_k3(logp, ref_logp))
    return ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()


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

    def __init__(self, checkpoint: str, config: dict, threads: int = 1, rank: int = 0, world: int = 1):
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
            if self.rank == 0:
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
            for f in tmp.iterdir():  # the ranks' files side by side in one folder
                storage.write_bytes(storage.join(uri, f.name), f.read_bytes())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self, uri: str) -> dict:
        from workers.training import sharding

        with local_folder(uri) as local:
            sharding.load_state(local, self.policy, self.optimizer)
            return json.loads((local / STATE_FILE).read_text())

    def peak_memory_bytes(self) -> int:
        from workers.training import sharding
        return sharding.peak_memory_bytes(self.device)

    # -- measuring

    def _logprobs(self, model, prompts, completions, grad: bool = False):
        import torch
        with (torch.enable_grad() if grad else torch.no_grad()), self.autocast():
            return completion_logprobs(model, prompts, completions, self.device)

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

    def _fixed_logprobs(self, model, prompts, comps, chunk: int = 64) -> list:
        """Each completion's token log-probs (1-D, no grad, on the device): every rank computes
        its share, then all of them are exchanged."""
        import torch.distributed as dist

        mine = {}
        for rows in _rank_slices(list(range(len(comps))), self.rank, self.world, chunk):
            use = rows or [0]  # an empty call still joins FSDP's gathers
            lp, _ = self._logprobs(model, [prompts[i] for i in use], [comps[i] for i in use])
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

    def _step(self, chunk: list[int], loss_of) -> float:
        """One optimizer step on ``chunk``: this rank's rows' share of the batch loss, times the
        world size (gradients are averaged over the group); returns the batch's loss.
        ``loss_of(rows)`` is the batch-normalised loss summed over ``rows``."""
        import torch

        from workers.training import sharding

        rows = chunk[self.rank::self.world]
        loss = loss_of(rows or chunk[:1]) * (1.0 if rows else 0.0)  # an empty share still joins the reduction
        self.optimizer.zero_grad(set_to_none=True)
        (loss * self.world).backward()
        if self.cfg.grad_clip > 0:
            sharding.to_local(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip))
        self.optimizer.step()
        return self._all_reduce([loss.item()])[0]

    def update(self, scored: list[ScoredGroup], iteration: int) -> UpdateStats:
        self.policy.train()
        kl = self.kl([s.group for s in scored])
        fn = {"best_of_n": self._update_best_of_n, "dpo": self._update_dpo, "grpo": self._update_grpo}
        losses, n = fn[self.cfg.algorithm](scored, iteration)
        self.policy.eval()
        return UpdateStats(loss=sum(losses) / len(losses) if losses else 0.0, kl=kl, examples=n, steps=len(losses))

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

    def _update_grpo(self, scored, iteration):
        import torch

        ex = grpo_examples(scored)
        if not ex:
            return [], 0
        prompts, comps = [e.prompt_ids for e in ex], [e.completion_ids for e in ex]
        # the sampling policy's and the reference's log-probs, fixed for all of this iteration's steps
        old = self._fixed_logprobs(self.policy, prompts, comps)
        ref = self._fixed_logprobs(self.reference, prompts, comps)
        losses = []
        for epoch in range(self.cfg.epochs):
            for chunk in self._chunks(len(ex), iteration, epoch):

                def loss_of(rows):
                    lp, mask = self._logprobs(self.train_policy, [prompts[i] for i in rows], [comps[i] for i in rows],
                                              grad=True)
                    old_t, ref_t = torch.zeros_like(lp), torch.zeros_like(lp)
                    for row, i in enumerate(rows):
                        old_t[row, :len(old[i])] = old[i]
                        ref_t[row, :len(ref[i])] = ref[i]
                    adv = torch.tensor([ex[i].advantage for i in rows], device=lp.device)
                    loss = grpo_loss(lp, old_t, ref_t, adv, mask, self.cfg.clip_eps, self.cfg.beta)
                    return loss * len(rows) / len(chunk)

                losses.append(self._step(chunk, loss_of))
        return losses, len(ex)


class LearnerGroup:
    """``n`` Learner actors joined in one torch.distributed process group: every call goes to
    all ranks (they are collective) and rank 0's answer is returned."""

    def __init__(self, checkpoint: str, config: Config, n: int, *, cpus: float, gpus: float):
        import ray

        remote = ray.remote(Learner).options(num_cpus=cpus, num_gpus=gpus)
        self.actors = [remote.remote(checkpoint, config.model_dump(), max(1, int(cpus)), r, n) for r in range(n)]
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


def run(ctx, config: Config) -> dict[str, Any]:
    """Train."""
    import ray

    policy_uri = ctx.upstream("checkpoint", config.policy, field="policy")
    policy = open_checkpoint(policy_uri, load=None, field="policy")  # checked before any actor starts
    source = resolve_reward(ctx, config.reward)
    prompts = load_prompts(ctx, config.prompts)
    held_out = prompts[len(prompts) - config.eval_prompts:] if config.eval_prompts else []
    train = prompts[:len(prompts) - config.eval_prompts] if config.eval_prompts else prompts
    if not train:
        raise ValueError(f"eval_prompts: got {config.eval_prompts} with {len(prompts)} prompts; "
                         "no prompts are left for training")
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
        learner = LearnerGroup(policy_uri, config, config.learner_workers, cpus=res.cpus, gpus=res.gpus)
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
