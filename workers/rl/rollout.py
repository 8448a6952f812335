"""Rollout actors: copies of a policy that sample completions for prompts, for `rlhf` and `evaluate`.

A ``RolloutPool`` starts ``num_actors`` actors, each loading the policy checkpoint once. New
weights reach them through the object store: ``sync(state_dict)`` puts the weights once and every
actor loads the same object (no checkpoint is re-read from disk). ``rollout`` spreads prompts over
the actors and returns one ``Group`` (the prompt and its k ``Sample``s) per prompt.

Prompts come from a ``PromptSource``: a JSONL/Parquet file (``prompt_field``), ``builtin:NAME``,
``input:STAGE`` (an upstream's ``prompts`` list or ``prompts``/``data`` file), or an inline list.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from pydantic import ConfigDict, Field

from workers import storage
from workers.config import StrictConfig
from workers.cpu import claim_cpus

__all__ = [
    "PromptSource", "load_prompts", "BUILTIN_PROMPTS", "Sample", "Group", "RolloutStats",
    "prompt_seed", "encode_prompt", "RolloutActor", "RolloutPool",
]

# Small demo prompts (no download): Python questions in the style of the stdlib docstring data.
BUILTIN_PROMPTS: dict[str, list[str]] = {
    "demo": [
        "What does os.path.join do?", "Explain str.split.", "What is a list comprehension?",
        "How do I read a file in Python?", "What does len() return?", "Explain dict.get.",
        "What is a generator?", "How do I sort a list?", "What does range() do?",
        "Explain json.dumps.", "What is a tuple?", "How do I open a file for writing?",
        "What does enumerate() do?", "Explain zip().", "What is a set?", "What does sum() do?",
        "How do I join strings?", "Explain math.sqrt.", "What is None?", "What does print() do?",
        "How do I copy a list?", "Explain itertools.chain.", "What is a lambda?",
        "What does sorted() return?", "Explain collections.Counter.", "What is pathlib.Path?",
        "How do I check a key is in a dict?", "Explain str.strip.", "What does max() do?",
        "What is a class?", "Explain re.match.", "What does time.sleep do?",
    ],
}


class PromptSource(StrictConfig):
    """Where prompts come from."""

    model_config = ConfigDict(extra="forbid")

    source: str | list[str] = Field("builtin:demo", description="A JSONL/Parquet file (path or URI), "
                                    "`builtin:NAME` (demo, or a workers.data.records set such as "
                                    "stdlib-docstrings), `input:STAGE` (an upstream's `prompts` output), "
                                    "or an inline list of prompts.")
    prompt_field: str = Field("prompt", description="The field holding the prompt in file records.")
    offset: int = Field(0, ge=0, description="Skip this many prompts first (e.g. to evaluate on prompts "
                        "another stage did not train on).")
    limit: int | None = Field(None, ge=1, description="Use at most this many prompts (after offset).")


def _builtin(name: str, limit: int | None) -> list[str]:
    if name in BUILTIN_PROMPTS:
        return list(BUILTIN_PROMPTS[name])
    from workers.data import records as sft_data

    if f"builtin:{name}" not in sft_data.BUILTINS:
        raise ValueError(f"prompts.source: got 'builtin:{name}'; known built-in prompt sets: "
                         f"{', '.join(['builtin:' + n for n in BUILTIN_PROMPTS] + list(sft_data.BUILTINS))}")
    return [str(r.data["prompt"]) for r in sft_data.read_records(f"builtin:{name}", max_records=limit)]


def _read_records(uri: str, field_name: str) -> list[str]:
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs)
        if field_name not in table.column_names:
            raise ValueError(f"prompts.prompt_field: got {field_name!r}; {uri!r} has columns {table.column_names}")
        return [str(v) for v in table.column(field_name).to_pylist()]
    out = []
    for n, line in enumerate(storage.read_bytes(uri).decode().splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if field_name not in rec:
            raise ValueError(f"prompts.prompt_field: got {field_name!r}; line {n} of {uri!r} has fields {sorted(rec)}")
        out.append(str(rec[field_name]))
    return out


def load_prompts(ctx, src: PromptSource, field_name: str = "prompts") -> list[str]:
    """The prompts ``src`` names (errors quote ``field_name``.source)."""
    s = src.source
    if isinstance(s, list):
        prompts = [str(p) for p in s]
    elif s.startswith("builtin:"):
        prompts = _builtin(s.removeprefix("builtin:"), src.offset + (src.limit or 1000))
    elif s.startswith("input:"):
        up = s.removeprefix("input:")
        if up not in ctx.inputs:
            raise ValueError(f"{field_name}.source: got {s!r}; {up!r} is not an upstream of stage {ctx.stage!r} "
                             f"(upstreams: {sorted(ctx.inputs) or 'none'})")
        out = ctx.inputs[up]
        if isinstance(out.get("prompts"), list):
            prompts = [str(p) for p in out["prompts"]]
        elif isinstance(out.get("prompts"), str) or isinstance(out.get("data"), str):
            prompts = _read_records(out.get("prompts") or out["data"], src.prompt_field)
        else:
            raise ValueError(f"{field_name}.source: upstream {up!r} has no `prompts` (list or file) or `data` output "
                             f"(its outputs: {sorted(out)})")
    else:
        if not storage.exists(s):
            raise ValueError(f"{field_name}.source: got {s!r}; no such file (allowed: a JSONL/Parquet file, "
                             "builtin:NAME, input:STAGE, or a list of prompts)")
        prompts = _read_records(s, src.prompt_field)
    if not prompts:
        raise ValueError(f"{field_name}.source: {s!r} holds no prompts")
    prompts = prompts[src.offset:]
    if not prompts:
        raise ValueError(f"{field_name}.offset: got {src.offset}; the source has no prompts after it")
    return prompts[:src.limit] if src.limit else prompts


# ----------------------------------------------------------------------------- typed hand-offs


@dataclass
class Sample:
    token_ids: list[int]           # the completion (a final EOS included)
    text: str
    logprobs: list[float]          # under the policy that sampled it (raw model distribution)
    finish_reason: str | None = None  # "stop" (EOS / stop token) | "length" (max_tokens cut it)


@dataclass
class Group:
    """One prompt and the k completions sampled for it."""

    prompt: str
    prompt_ids: list[int]
    samples: list[Sample] = field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.samples]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [s.finish_reason for s in self.samples]


@dataclass
class RolloutStats:
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The base seed of prompt ``prompt_index``'s samples (sample i: base + i): mixed from both
    numbers (numpy's SeedSequence), so that no two prompts share a stream and seeds s and s + 1
    do not overlap shifted."""
    import numpy as np
    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1, np.uint64)[0] >> 1)


def encode_prompt(policy, prompt: str, room: int) -> list[int]:
    """Token ids of the policy's formatted prompt (a ``workers.checkpoints.Checkpoint``), cut from
    the left so ``room`` new tokens fit in its context."""
    ids = policy.tokenizer.encode(policy.format_prompt(prompt)).ids
    keep = max(1, policy.context - room + 1)
    return ids[-keep:] or [policy.eos_token_id or 0]


# ----------------------------------------------------------------------------- the actor


class RolloutActor:
    """One copy of the policy: samples completions, and scores token sequences (evaluate)."""

    def __init__(self, checkpoint: str, threads: int = 1):
        from workers.checkpoints import open_checkpoint

        claim_cpus(threads)
        self.policy = open_checkpoint(checkpoint)
        self.version = 0

    def set_weights(self, state_dict: dict, version: int) -> int:
        self.policy.model.load_state_dict(state_dict)
        self.version = version
        return version

    def generate(self, prompts: list[str], params: dict, seed: int | None = None,
                 first_index: int = 0) -> list[Group]:
        """``params['seed']`` set: prompt ``first_index + p`` of the whole call draws its samples
        from ``prompt_seed(seed, first_index + p) + i`` (the same however prompts are split over
        actors); else ``seed`` seeds torch's global RNG."""
        import torch

        from workers.model.sampling import SamplingParams, generate

        sp = SamplingParams(**{**params, "logprobs": True})
        if seed is not None and sp.seed is None:
            torch.manual_seed(seed)
        seeds = None if sp.seed is None else [prompt_seed(sp.seed, first_index + p) for p in range(len(prompts))]
        pol = self.policy
        sp.stop_token_ids = tuple(dict.fromkeys((*sp.stop_token_ids, *pol.stop_token_ids)))
        ids = [encode_prompt(pol, p, sp.max_tokens) for p in prompts]
        out = generate(pol.model, ids, sp, eos_token_id=pol.eos_token_id,
                       decode=lambda t: pol.tokenizer.decode(t), seeds=seeds)
        return [Group(p, i, [Sample(c.token_ids, c.text, c.logprobs or [], c.finish_reason) for c in comps])
                for p, i, comps in zip(prompts, ids, out)]

    def nll(self, sequences: list[list[int]]) -> tuple[float, int]:
        """Summed negative log-likelihood and token count of each sequence's tokens after the
        first, in consecutive windows of at most block_size predictions."""
        each = self.nll_each(sequences)
        return sum(each), sum(max(0, len(seq) - 1) for seq in sequences)

    def nll_each(self, sequences: list[list[int]]) -> list[float]:
        """Each sequence's summed negative log-likelihood (as ``nll``)."""
        import torch
        from torch.nn import functional as F

        model, block = self.policy.model, self.policy.context
        out = []
        device = next(model.parameters()).device
        with torch.inference_mode():
            for seq in sequences:
                total = 0.0
                for lo in range(0, len(seq) - 1, block):
                    window = torch.tensor(seq[lo:lo + block + 1], dtype=torch.long, device=device)
                    logits, _ = model(window[None, :-1])                      # (1, T, V)
                    total += float(F.cross_entropy(logits[0].float(), window[1:], reduction="sum"))
                out.append(total)
        return out


class RolloutPool:
    """``num_actors`` rollout actors with the same policy weights."""

    def __init__(self, checkpoint: str, num_actors: int = 1, *, cpus: float = 1.0, gpus: float = 0.0):
        import ray

        remote = ray.remote(RolloutActor).options(num_cpus=cpus, num_gpus=gpus)
        self.actors = [remote.remote(checkpoint, max(1, int(cpus))) for _ in range(num_actors)]
        self.version = 0
        self.last = RolloutStats(0, 0.0)

    def sync(self, state_dict_ref) -> float:
        """Every actor loads the weights behind one object ref (``ray.put(state_dict)``); seconds."""
        import ray

        t0 = time.perf_counter()
        self.version += 1
        ray.get([a.set_weights.remote(state_dict_ref, self.version) for a in self.actors])
        return time.perf_counter() - t0

    def _split(self, items: list) -> list[tuple[int, int]]:
        n, A = len(items), len(self.actors)
        bounds = [round(a * n / A) for a in range(A + 1)]
        return list(zip(bounds, bounds[1:]))

    def rollout(self, prompts: list[str], params: dict, seed: int | None = None) -> list[Group]:
        """One Group per prompt; prompts are split into contiguous chunks, one per actor.
        Seeded params (``params['seed']``): every (prompt, sample) draws from a stream of its own
        (``prompt_seed``); else ``seed`` seeds each actor's RNG as seed + actor index."""
        import ray

        t0 = time.perf_counter()
        refs = [a.generate.remote(prompts[lo:hi], params, None if seed is None else seed + k, lo)
                for k, (a, (lo, hi)) in enumerate(zip(self.actors, self._split(prompts))) if hi > lo]
        groups = [g for chunk in ray.get(refs) for g in chunk]
        tokens = sum(len(s.token_ids) for g in groups for s in g.samples)
        self.last = RolloutStats(tokens, time.perf_counter() - t0)
        return groups

    def nll(self, sequences: list[list[int]]) -> tuple[float, int]:
        import ray

        parts = ray.get([a.nll.remote(sequences[lo:hi])
                         for a, (lo, hi) in zip(self.actors, self._split(sequences)) if hi > lo])
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def nll_each(self, sequences: list[list[int]]) -> list[float]:
        import ray

        parts = ray.get([a.nll_each.remote(sequences[lo:hi])
                         for a, (lo, hi) in zip(self.actors, self._split(sequences)) if hi > lo])
        return [v for p in parts for v in p]

    def shutdown(self) -> None:
        import ray
        for a in self.actors:
            ray.kill(a)
        self.actors = []
