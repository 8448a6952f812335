"""Reward sources and a pool of reward-ranking Ray actors, shared by the `rlhf` and `evaluate` kinds.

A reward source is either a reward model (the `reward` stage's ``reward_model`` folder, scored
with ``workers.model.reward_head``) or a user function ``module:function(prompt, completion) -> float``
(a verifiable reward). A ``RankingPool`` starts ``num_actors`` actors that each hold the source,
spreads the (prompt, completion) pairs of many prompts over them, and returns for each prompt a
``Ranking``: the scores and the completions' order, best first (ties keep sampling order).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

from pydantic import ConfigDict, Field, model_validator

from workers.cluster import ActorGroup
from workers.config import StrictConfig
from workers.cpu import claim_cpus
from workers.rl.checks import resolve_check
from workers.rl.functions import ENTRYPOINT, import_root, resolve_function

__all__ = [
    "RewardConfig", "RewardSource", "Ranking", "RankingStats", "RankingPool",
    "resolve_reward", "order_of", "make_scorer", "reward_modules", "ranking_actors",
]

class RewardConfig(StrictConfig):
    """Where rewards come from, and how many actors score."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="An upstream stage with a `reward_model` output, or the "
                              "path/URI of a reward model folder. Default (with no `function`): the only "
                              "upstream with a `reward_model` output.")
    function: str | None = Field(None, pattern=ENTRYPOINT, description="A verifiable reward instead: "
                                 "module:function(prompt, completion) -> float.")
    checks: dict[str, float] = Field(default_factory=dict, description="Verifiable terms added to the reward: "
                                     "check (python_syntax, degeneracy or module:function) -> weight; the reward is "
                                     "the model's (or function's) score + sum of weight x check (a check where lower "
                                     "is better takes a negative weight). A policy trained so is no longer judged "
                                     "independently by these checks: `evaluate` says so.")
    num_actors: int = Field(1, ge=1, description="Reward-ranking actors the scoring is spread over.")
    batch_size: int = Field(32, ge=1, description="Sequences per reward-model forward pass.")
    cpus: float = Field(1.0, gt=0, description="CPUs per ranking actor.")
    gpus: float = Field(0.0, ge=0, description="GPUs per ranking actor (a reward model on GPU).")

    @model_validator(mode="after")
    def _one_source(self) -> "RewardConfig":
        if self.model is not None and self.function is not None:
            raise ValueError(f"model / function: got both (model={self.model!r}, function={self.function!r}); "
                             "give one reward source")
        return self


@dataclass(frozen=True)
class RewardSource:
    """A resolved reward source: ``kind`` 'model' (``ref`` = reward model folder URI) or
    'function' (``ref`` = module:function, importable after adding ``sys_path``)."""

    kind: str
    ref: str
    sys_path: tuple[str, ...] = ()
    checks: tuple[tuple[str, float], ...] = ()  # (check reference, weight): terms added to the score

    def describe(self) -> str:
        """The model or function (without the check terms: ``check_names`` lists those)."""
        return f"{self.kind}:{self.ref}"

    @property
    def check_names(self) -> list[str]:
        """The names (as ``evaluate`` logs them) of the checks in this reward."""
        return [resolve_check(ref).name for ref, _ in self.checks]


@dataclass
class Ranking:
    """One prompt's completions, scored and ordered best first."""

    scores: list[float]
    order: list[int]

    @property
    def best(self) -> int:
        return self.order[0]

    @property
    def worst(self) -> int:
        return self.order[-1]


@dataclass
class RankingStats:
    completions: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.completions / self.seconds if self.seconds > 0 else 0.0


def order_of(scores: list[float]) -> list[int]:
    """Indices best first; equal scores keep their original order (stable)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


# ----------------------------------------------------------------------------- resolving sources


def reward_modules(reward: RewardConfig | None) -> list[str]:
    """The user modules a reward function and its user checks live in (their source joins the
    stage's fingerprint)."""
    if reward is None:
        return []
    refs = ([reward.function] if reward.function else []) + [c for c in reward.checks if ":" in c]
    return [ref.partition(":")[0] for ref in refs]


def resolve_reward(ctx, config: RewardConfig, field: str = "reward") -> RewardSource:
    """The reward source ``config`` names, checked now (import the function and the checks,
    find the folder)."""
    for ref in config.checks:
        resolve_check(ref, f"{field}.checks")
    checks = tuple(config.checks.items())
    if config.function is not None:
        try:
            resolve_function(config.function)
        except Exception as e:  # noqa: BLE001 - the user's module: report why it failed
            raise ValueError(f"{field}.function: cannot import {config.function!r}: {type(e).__name__}: {e}") from None
    # where the user's modules were found, so that the ranking actors import them too
    roots = tuple(dict.fromkeys(r for r in map(import_root, reward_modules(config)) if r))
    if config.function is not None:
        return RewardSource("function", config.function, roots, checks)
    uri = ctx.upstream("reward_model", config.model, field=f"{field}.model")
    return RewardSource("model", uri, roots, checks)


# ----------------------------------------------------------------------------- scorers


class FunctionScorer:
    def __init__(self, entrypoint: str):
        self.entrypoint = entrypoint
        self.fn = resolve_function(entrypoint)

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        out = []
        for p, c in zip(prompts, completions):
            v = self.fn(p, c)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise TypeError(f"reward.function {self.entrypoint!r} returned {v!r} ({type(v).__name__}); "
                                "it must return a float")
            out.append(float(v))
        return out


class RewardModelScorer:
    """Scores prompt + completion + EOS ids (as the `reward` kind trained it: prompt and
    completion encoded apart, ``sft_data.encode_example``) with a reward model. Sequences are
    batched by equal length, so no padding is needed."""

    def __init__(self, uri: str, batch_size: int = 32, device: str | None = None):
        from workers.checkpoints import open_checkpoint

        self.checkpoint = open_checkpoint(uri, load="reward", device=device, field="reward.model")
        if not self.checkpoint.is_reward_model:
            raise ValueError(f"reward.model: {uri!r} is not a reward model (its config.json lacks "
                             "\"reward_model\": true); give a `reward` stage's output")
        self.model = self.checkpoint.model
        self.device = next(self.model.parameters()).device
        self.batch_size = batch_size

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        import torch

        from workers.data.records import encode_example

        ck = self.checkpoint
        enc = ck.tokenizer.encode
        ids = [encode_example(enc(ck.format_prompt(p)).ids, enc(c, add_special_tokens=False).ids, ck.eos_token_id,
                              ck.context - 1)[0] for p, c in zip(prompts, completions)]
        scores = [0.0] * len(ids)
        by_len: dict[int, list[int]] = {}
        for i, seq in enumerate(ids):
            by_len.setdefault(len(seq), []).append(i)
        with torch.inference_mode():
            for rows in by_len.values():
                for k in range(0, len(rows), self.batch_size):
                    chunk = rows[k:k + self.batch_size]
                    idx = torch.tensor([ids[i] for i in chunk], dtype=torch.long, device=self.device)
                    out = self.model.score(idx, torch.ones_like(idx))  # (B,)
                    for i, s in zip(chunk, out.float().tolist()):
                        scores[i] = s
        return scores


class WithChecks:
    """A scorer plus weighted checks: score + sum of weight x check(prompt, completion)."""

    def __init__(self, scorer: Callable[[list[str], list[str]], list[float]], checks: tuple[tuple[str, float], ...]):
        self.scorer = scorer
        self.checks = [(resolve_check(ref), weight) for ref, weight in checks]

    def __call__(self, prompts: list[str], completions: list[str],
                 finish_reasons: list[str | None] | None = None) -> list[float]:
        scores = self.scorer(prompts, completions)
        for check, weight in self.checks:
            scores = [s + weight * v for s, v in zip(scores, check(prompts, completions, finish_reasons))]
        return scores


def make_scorer(source: RewardSource, batch_size: int = 32) -> Callable[[list[str], list[str]], list[float]]:
    for p in reversed(source.sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    scorer = FunctionScorer(source.ref) if source.kind == "function" else RewardModelScorer(source.ref, batch_size)
    return WithChecks(scorer, source.checks)  # no checks: the scorer's scores


# ----------------------------------------------------------------------------- the actor pool


def ranking_actors(config: RewardConfig) -> ActorGroup:
    """What the ranking pool ``config`` asks of the cluster (``workers.cluster.check_fits``)."""
    return ActorGroup("ranking actor", config.num_actors, "config.reward.num_actors", config.cpus, config.gpus,
                      "config.reward")


class RankingActor:
    """Holds one reward source; scores (prompt, completion) pairs."""

    def __init__(self, source: RewardSource, batch_size: int, threads: int):
        claim_cpus(threads)
        self.scorer = make_scorer(source, batch_size)

    def score(self, prompts: list[str], completions: list[str],
              finish_reasons: list[str | None] | None = None) -> list[float]:
        return self.scorer(prompts, completions, finish_reasons)


class RankingPool:
    """``num_actors`` ranking actors; ``rank_many`` spreads many prompts' completions over them."""

    def __init__(self, source: RewardSource, num_actors: int = 1, *, batch_size: int = 32,
                 cpus: float = 1.0, gpus: float = 0.0):
        import ray

        remote = ray.remote(RankingActor).options(num_cpus=cpus, num_gpus=gpus)
        self.source = source
        self.actors = [remote.remote(source, batch_size, max(1, int(cpus))) for _ in range(num_actors)]
        self.last = RankingStats(0, 0.0)

    @classmethod
    def from_config(cls, source: RewardSource, config: RewardConfig) -> "RankingPool":
        return cls(source, config.num_actors, batch_size=config.batch_size, cpus=config.cpus, gpus=config.gpus)

    def score(self, prompts: list[str], completions: list[str],
              finish_reasons: list[str | None] | None = None) -> list[float]:
        """Scores of (prompt, completion) pairs, split into contiguous chunks, one per actor;
        ``finish_reasons`` ("stop" | "length" per completion) reach the checks that take them."""
        import ray

        n, A = len(prompts), len(self.actors)
        t0 = time.perf_counter()
        bounds = [round(a * n / A) for a in range(A + 1)]
        reasons = finish_reasons if finish_reasons is not None else [None] * n
        refs = [actor.score.remote(prompts[lo:hi], completions[lo:hi], reasons[lo:hi])
                for actor, lo, hi in zip(self.actors, bounds, bounds[1:]) if hi > lo]
        scores = [s for chunk in ray.get(refs) for s in chunk]
        self.last = RankingStats(n, time.perf_counter() - t0)
        return scores

    def rank_many(self, prompts: list[str], completions: list[list[str]],
                  finish_reasons: list[list[str | None]] | None = None) -> list[Ranking]:
        """One Ranking per prompt of its completions; ``self.last`` holds the throughput."""
        flat_p = [p for p, cs in zip(prompts, completions) for _ in cs]
        flat_c = [c for cs in completions for c in cs]
        flat_r = [r for rs in finish_reasons for r in rs] if finish_reasons is not None else None
        scores = self.score(flat_p, flat_c, flat_r)
        out, k = [], 0
        for cs in completions:
            s = scores[k:k + len(cs)]
            k += len(cs)
            out.append(Ranking(s, order_of(s)))
        return out

    def rank(self, prompt: str, completions: list[str]) -> tuple[list[float], list[int]]:
        r = self.rank_many([prompt], [completions])[0]
        return r.scores, r.order

    def shutdown(self) -> None:
        import ray
        for a in self.actors:
            ray.kill(a)
        self.actors = []

