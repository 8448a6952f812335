"""Stage kind `evaluate`: held-out perplexity, mean reward, and win rate against a baseline.

- perplexity: exp(mean NLL per token) of ``checkpoint`` (and ``baseline``) on held-out documents:
  a token dataset from a `tokenize` stage (each row a document; scored as EOS + document + EOS,
  so every document token and its closing EOS is predicted; long documents in consecutive
  windows of block_size predictions) or text records (JSONL/Parquet ``text_field``);
- mean_reward: mean reward (model or function) of the checkpoint's samples on ``prompts``;
- win_rate: on the same prompts, with the same seeded sampling for both models (so a checkpoint
  against itself ties everywhere), the share of samples the judge (``reward``) scores higher than
  the baseline's; ties count half.

Work is spread over rollout actors (``workers``, one model at a time) and the reward-ranking pool.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workers import storage
from workers.checkpoints import Checkpoint, open_checkpoint
from workers.rl.ranking import RankingPool, RewardConfig, code_digest, resolve_reward
from workers.rl.rollout import PromptSource, RolloutPool, load_prompts

DISTRIBUTED = True


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(None, description="The model to evaluate: an upstream stage with a "
                                   "`checkpoint` output or a checkpoint path/URI (ours or a Hugging Face folder); "
                                   "default: the only such upstream.")
    baseline: str | None = Field(None, description="A model to compare against (upstream stage name or path): "
                                 "win_rate of `checkpoint` over it.")
    data: str | None = Field(None, description="Perplexity data: an upstream stage with a `dataset` output, a "
                             "token dataset folder (manifest.json), or a JSONL/Parquet file of text records.")
    split: str = Field("val", description="Token dataset split to score.")
    text_field: str = Field("text", description="Field of text records holding the text.")
    max_documents: int = Field(256, ge=1, description="Score at most this many documents.")
    reward: RewardConfig | None = Field(None, description="Reward source for mean_reward, and the judge of "
                                        "win_rate; none: no reward metrics.")
    prompts: PromptSource = Field(default_factory=PromptSource, description="Prompts to sample on.")
    samples_per_prompt: int = Field(1, ge=1, description="Completions per prompt and model.")
    max_tokens: int = Field(32, ge=1, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0: greedy).")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens (0: off).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    seed: int = Field(0, ge=0, description="Sampling seed, the same for both models.")
    workers: int | None = Field(None, ge=1, description="Actors per model; default: resources.workers or 1.")


def code_version(config: Config) -> str:
    return code_digest(("kinds/evaluate.py", "rl/rollout.py", "rl/ranking.py", "checkpoints.py", "model/hf.py",
                        "model/transformer.py", "model/sampling.py", "data/tokens.py"),
                       config.reward)


def check(config: Config) -> None:
    if config.data is None and config.reward is None:
        raise ValueError("data / reward: got neither; give `data` (perplexity) and/or `reward` "
                         "(mean reward, win rate)")
    if config.baseline is not None and config.reward is None:
        raise ValueError(f"reward: not set but baseline is {config.baseline!r}; the win rate needs a "
                         "judge (reward.model or reward.function)")


# ----------------------------------------------------------------------------- perplexity data


def _token_documents(ctx, uri: str, config: Config) -> tuple[list[list[int]], int, int]:
    """(documents, eos id, vocab size) of a token dataset's split."""
    import pyarrow.parquet as pq

    from workers.data.tokens import TokenDataset

    ds = TokenDataset.open(uri)
    shards = ds.shards(config.split)
    if not shards:
        raise ValueError(f"split: got {config.split!r}; token dataset {uri!r} has splits "
                         f"{sorted(k for k, v in ds.splits.items() if v)}")
    docs: list[list[int]] = []
    for shard in shards:
        fs, path = storage.resolve(storage.join(uri, shard.path))
        docs += [list(map(int, d)) for d in pq.read_table(path, columns=["ids"], filesystem=fs).column("ids").to_pylist()]
        if len(docs) >= config.max_documents:
            break
    return docs[:config.max_documents], ds.eos_id, ds.vocab_size


def _text_documents(uri: str, config: Config, checkpoint: Checkpoint) -> tuple[list[list[int]], int, int]:
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq
        fs, path = storage.resolve(uri)
        table = pq.read_table(path, filesystem=fs)
        if config.text_field not in table.column_names:
            raise ValueError(f"text_field: got {config.text_field!r}; {uri!r} has columns {table.column_names}")
        texts = [str(t) for t in table.column(config.text_field).to_pylist()]
    else:
        texts = []
        for n, line in enumerate(storage.read_bytes(uri).decode().splitlines(), 1):
            if line.strip():
                rec = json.loads(line)
                if config.text_field not in rec:
                    raise ValueError(f"text_field: got {config.text_field!r}; line {n} of {uri!r} has fields {sorted(rec)}")
                texts.append(str(rec[config.text_field]))
    if checkpoint.eos_token_id is None:
        raise ValueError(f"checkpoint: {checkpoint.uri!r} names no end-of-text token; documents are scored "
                         "between two")
    tok = checkpoint.tokenizer
    texts = texts[:config.max_documents]
    return ([tok.encode(t, add_special_tokens=False).ids for t in texts], checkpoint.eos_token_id,
            tok.get_vocab_size())


def perplexity_documents(ctx, config: Config, checkpoint: Checkpoint) -> list[list[int]]:
    """The scored sequences: EOS + document + EOS for each held-out document."""
    uri = ctx.upstream("dataset", config.data, field="data")
    if storage.exists(storage.join(uri, "manifest.json")):
        docs, eos, vocab = _token_documents(ctx, uri, config)
    else:
        docs, eos, vocab = _text_documents(uri, config, checkpoint)
    model_vocab = checkpoint.config["vocab_size"]
    if vocab > model_vocab:
        raise ValueError(f"data: {uri!r} has vocab_size {vocab} but the checkpoint's is {model_vocab}; "
                         "evaluate on data tokenized with the checkpoint's tokenizer")
    docs = [[eos] + d + [eos] for d in docs]
    if not docs:
        raise ValueError(f"data: {uri!r} holds no documents")
    return docs


# ----------------------------------------------------------------------------- win rate


def win_rate(scores: list[float], baseline_scores: list[float]) -> tuple[float, dict[str, int]]:
    """Share of paired samples where ``scores`` beats the baseline; ties count half."""
    wins = sum(a > b for a, b in zip(scores, baseline_scores))
    ties = sum(a == b for a, b in zip(scores, baseline_scores))
    n = len(scores)
    return (wins + 0.5 * ties) / n, {"wins": wins, "ties": ties, "losses": n - wins - ties}


# ----------------------------------------------------------------------------- the kind


def run(ctx, config: Config) -> dict[str, Any]:
    check(config)
    checkpoint = ctx.upstream("checkpoint", config.checkpoint, field="checkpoint")
    baseline = ctx.upstream("checkpoint", config.baseline, field="baseline") if config.baseline else None
    res = ctx.resources
    workers = config.workers or res.workers or 1
    out: dict[str, Any] = {"checkpoint": checkpoint}
    docs = None
    if config.data is not None:
        docs = perplexity_documents(ctx, config, open_checkpoint(checkpoint, load=None))
    prompts = load_prompts(ctx, config.prompts) if config.reward is not None else []
    source = resolve_reward(ctx, config.reward) if config.reward is not None else None

    models = {"model": checkpoint, **({"baseline": baseline} if baseline else {})}
    params = dict(n=config.samples_per_prompt, max_tokens=config.max_tokens, temperature=config.temperature,
                  top_k=config.top_k, top_p=config.top_p, seed=config.seed)
    texts: dict[str, tuple[list[str], list[str]]] = {}
    scores: dict[str, list[float]] = {}
    # started first: its actors load while the models' actors work
    ranking = RankingPool.from_config(source, config.reward) if source is not None else None
    try:
        # one model's actors at a time: the stage holds at most `workers` + the ranking actors
        for name, uri in models.items():
            pool = RolloutPool(uri, workers, cpus=res.cpus, gpus=res.gpus)
            try:
                if docs is not None:
                    nll, count = pool.nll(docs)
                    out["perplexity" if name == "model" else "baseline_perplexity"] = math.exp(nll / count)
                    out["perplexity_tokens"] = count
                if ranking is not None:
                    groups = pool.rollout(prompts, params)
                    texts[name] = ([g.prompt for g in groups for _ in g.samples],
                                   [s.text for g in groups for s in g.samples])
            finally:
                pool.shutdown()
        if ranking is not None:
            scores = {name: ranking.score(*pc) for name, pc in texts.items()}
            out["ranking_completions_per_s"] = ranking.last.per_s
    finally:
        if ranking is not None:
            ranking.shutdown()
    if scores:
        out["mean_reward"] = sum(scores["model"]) / len(scores["model"])
        if baseline:
            out["baseline_mean_reward"] = sum(scores["baseline"]) / len(scores["baseline"])
            out["win_rate"], counts = win_rate(scores["model"], scores["baseline"])
            out.update(counts)
    ctx.log_metrics({k: v for k, v in out.items() if isinstance(v, (int, float))})
    (Path(ctx.artifact_dir) / "metrics.json").write_text(json.dumps(out, indent=2, sort_keys=True))
    return out
