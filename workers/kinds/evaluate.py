"""Stage kind `evaluate`: held-out perplexity, mean reward, win rate against a baseline, a KL
estimate, and independent checks of the completions.

- perplexity: exp(mean NLL per token) of ``checkpoint`` (and ``baseline``) on held-out documents:
  a token dataset from a `tokenize` stage (each row a document; scored as EOS + document + EOS,
  so every document token and its closing EOS is predicted; long documents in consecutive
  windows of block_size predictions) or text records (JSONL/Parquet ``text_field``);
- mean_reward: mean reward (model or function) of the checkpoint's samples on ``prompts``;
- win_rate: on the same prompts, with the same seeded sampling for both models (so a checkpoint
  against itself ties everywhere), the share of samples the judge (``reward``) scores higher than
  the baseline's; ties count half. When the judge is the reward the model was trained against
  (an `rlhf` upstream's ``reward`` output), the win rate says so (``win_rate_judge``): it then
  measures how well the policy pleases its judge, not that it got better;
- kl: mean over the model's samples of log p_model - log p_baseline of the completion (a Monte
  Carlo estimate of KL(model || baseline); exact in expectation at temperature 1, no top-k/p);
- mean_reward, win_rate and kl each come with a standard error over prompts (``..._se``, see
  ``standard_error``). Seeded sampling gives every (prompt, sample) its own random stream
  (``workers.rl.rollout.prompt_seed``), the same for both models, so that samples of different
  prompts are independent (as the standard errors assume) and the comparison stays paired;
- checks get each completion's finish reason (``python_syntax`` forgives an unfinished last line
  only where ``max_tokens`` cut the completion);
- checks (``workers.rl.checks``): functions of (prompt, completion) no stage trained against,
  logged as ``check_<name>`` for the model, ``baseline_check_<name>`` and ``<ref>_check_<name>``,
  each with its standard error over prompts (``..._se``); where the reward rose over the
  baseline but a check got worse, ``warnings`` says so. A check that was part of the model's
  reward (an `rlhf` upstream's ``reward_checks``) is not independent: ``checks_trained_against``
  names it, and it raises no warning;
- references: more models sampled and scored on the same prompts (e.g. the pretrained model),
  so ``comparison`` holds every model's figures side by side.

Work is spread over rollout actors (``workers``, one model at a time) and the reward-ranking pool.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from workers import storage
from workers.cluster import ActorGroup, check_fits, count_of
from workers.config import StrictConfig
from workers.rl.checks import Check, resolve_check
from workers.checkpoints import Checkpoint, open_checkpoint
from workers.rl.ranking import RankingPool, RewardConfig, ranking_actors, resolve_reward
from workers.rl.rollout import PromptSource, RolloutPool, load_prompts

DISTRIBUTED = True


class Config(StrictConfig):
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
    checks: list[str] = Field(default_factory=list, description="Independent checks of each completion: "
                              "python_syntax, degeneracy (workers.rl.checks) or module:function(prompt, "
                              "completion) -> float (higher is better).")
    references: list[str] = Field(default_factory=list, description="More models (upstream stage names or "
                                  "paths) sampled and scored on the same prompts, e.g. the pretrained one; "
                                  "metrics prefixed with their name.")


def check(config: Config) -> None:
    if config.data is None and config.reward is None and not config.checks:
        raise ValueError("data / reward / checks: got none; give `data` (perplexity), `reward` "
                         "(mean reward, win rate) and/or `checks`")
    if config.baseline is not None and config.reward is None:
        raise ValueError(f"reward: not set but baseline is {config.baseline!r}; the win rate needs a "
                         "judge (reward.model or reward.function)")
    for i, ref in enumerate(config.checks):
        resolve_check(ref, f"checks[{i}]")


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


# ----------------------------------------------------------------------------- verdict


def standard_error(prompts: list[str], values: list[float]) -> float:
    """Standard error of the mean of ``values`` over prompts: a prompt's samples are not
    independent of each other (an easy prompt is easy for all of them), so the spread that
    counts is that of the per-prompt means; 0 with fewer than two prompts."""
    by_prompt: dict[str, list[float]] = {}
    for p, v in zip(prompts, values):
        by_prompt.setdefault(p, []).append(v)
    means = [sum(v) / len(v) for v in by_prompt.values()]
    n = len(means)
    if n < 2:
        return 0.0
    mean = sum(means) / n
    return math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1) / n)


def _name(ref: str) -> str:
    """A metric prefix for a reference model: its stage name, or its folder's name."""
    import re

    return re.sub(r"[^A-Za-z0-9_]+", "_", ref.rstrip("/").rsplit("/", 1)[-1]) or "reference"


def reward_hacking(out: dict[str, Any], checks: list[Check]) -> list[str]:
    """Plain-words warnings where the reward rose over the baseline but an independent check fell
    (a check the model was trained against is not independent: ``checks_trained_against``)."""
    if "baseline_mean_reward" not in out or out["mean_reward"] <= out["baseline_mean_reward"]:
        return []
    warnings = []
    old_r, new_r = out["baseline_mean_reward"], out["mean_reward"]
    for c in checks:
        if c.name in out.get("checks_trained_against", ()):
            continue
        new, old = out[f"check_{c.name}"], out[f"baseline_check_{c.name}"]
        if (new < old) if c.higher_is_better else (new > old):
            direction = "" if c.higher_is_better else ", lower is better"
            warnings.append(f"possible reward hacking: the reward rose ({old_r:.3g} -> {new_r:.3g}) but the "
                            f"independent check {c.name} got worse ({old:.3g} -> {new:.3g}{direction}): the "
                            "model learned to please its reward, not to do better")
    return warnings


def kl_terms(model_groups, baseline_pool: RolloutPool) -> list[float]:
    """Per sample, log p_model(completion) - log p_baseline(completion), from the model's
    sampling logprobs and the baseline's NLL of the same prompt + completion ids; their mean
    is the KL estimate."""
    samples = [(g.prompt_ids, s) for g in model_groups for s in g.samples]
    with_completion = baseline_pool.nll_each([p + s.token_ids for p, s in samples])
    prompt_only = baseline_pool.nll_each([p for p, _ in samples])
    return [sum(s.logprobs) - (po - wc) for (_, s), po, wc in zip(samples, prompt_only, with_completion)]


# ----------------------------------------------------------------------------- the kind


def run(ctx, config: Config) -> dict[str, Any]:
    check(config)
    checkpoint = ctx.upstream("checkpoint", config.checkpoint, field="checkpoint")
    baseline = ctx.upstream("checkpoint", config.baseline, field="baseline") if config.baseline else None
    res = ctx.resources
    workers, workers_field = count_of(("config.workers", config.workers), ("resources.workers", res.workers))
    out: dict[str, Any] = {"checkpoint": checkpoint}
    docs = perplexity_documents(ctx, config, open_checkpoint(checkpoint, load=None)) if config.data is not None else None
    sampling = config.reward is not None or bool(config.checks)
    prompts = load_prompts(ctx, config.prompts) if sampling else []
    source = resolve_reward(ctx, config.reward) if config.reward is not None else None
    checks = [resolve_check(ref, f"checks[{i}]") for i, ref in enumerate(config.checks)]

    # metric prefix -> checkpoint; the model first, then the baseline (the KL needs the model's samples)
    models = {"": checkpoint, **({"baseline_": baseline} if baseline else {})}
    for i, ref in enumerate(config.references):
        models[f"{_name(ref)}_"] = ctx.upstream("checkpoint", ref, field=f"references[{i}]")
    params = dict(n=config.samples_per_prompt, max_tokens=config.max_tokens, temperature=config.temperature,
                  top_k=config.top_k, top_p=config.top_p, seed=config.seed)
    texts: dict[str, tuple[list[str], list[str]]] = {}
    reasons: dict[str, list[str | None]] = {}
    scores: dict[str, list[float]] = {}
    model_groups = None
    # one model's rollout actors beside the ranking actors: on too small a cluster some would wait forever
    check_fits(ctx.stage, [ActorGroup("rollout actor", workers, workers_field, res.cpus, res.gpus, "resources"),
                           *([ranking_actors(config.reward)] if source is not None else [])])
    # started first: its actors load while the models' actors work
    ranking = RankingPool.from_config(source, config.reward) if source is not None else None
    try:
        # one model's actors at a time: the stage holds at most `workers` + the ranking actors
        for prefix, uri in models.items():
            pool = RolloutPool(uri, workers, cpus=res.cpus, gpus=res.gpus)
            try:
                if docs is not None:
                    nll, count = pool.nll(docs)
                    out[f"{prefix}perplexity"] = math.exp(nll / count)
                    out["perplexity_tokens"] = count
                if sampling:
                    groups = pool.rollout(prompts, params)
                    texts[prefix] = ([g.prompt for g in groups for _ in g.samples],
                                     [s.text for g in groups for s in g.samples])
                    reasons[prefix] = [s.finish_reason for g in groups for s in g.samples]
                    model_groups = groups if prefix == "" else model_groups
                    if prefix == "baseline_":
                        terms = kl_terms(model_groups, pool)
                        out["kl"] = sum(terms) / len(terms)
                        out["kl_se"] = standard_error(texts[""][0], terms)
            finally:
                pool.shutdown()
        if ranking is not None:
            scores = {prefix: ranking.score(*pc, reasons[prefix]) for prefix, pc in texts.items()}
            out["ranking_completions_per_s"] = ranking.last.per_s
    finally:
        if ranking is not None:
            ranking.shutdown()
    for prefix, s in scores.items():
        out[f"{prefix}mean_reward"] = sum(s) / len(s)
        out[f"{prefix}mean_reward_se"] = standard_error(texts[prefix][0], s)
    for prefix, (ps, cs) in texts.items():
        for c in checks:
            values = c(ps, cs, reasons[prefix])
            out[f"{prefix}check_{c.name}"] = sum(values) / len(values)
            out[f"{prefix}check_{c.name}_se"] = standard_error(ps, values)
    if texts:
        out["samples_per_model"] = len(next(iter(texts.values()))[0])
        out["prompts_per_model"] = len(prompts)
    if baseline and scores:
        out["win_rate"], counts = win_rate(scores[""], scores["baseline_"])
        out["win_rate_se"] = standard_error(texts[""][0], [float(a > b) + 0.5 * (a == b) for a, b in
                                                           zip(scores[""], scores["baseline_"])])
        out.update(counts)
        trained_against = source is not None and any(
            out_.get("checkpoint") == checkpoint and out_.get("reward") == source.describe()
            for out_ in ctx.inputs.values())
        out["win_rate_judge"] = ("the reward the model was trained against" if trained_against
                                 else f"{source.describe()} (not trained against)")
        ctx.set_tags({"win_rate_judge": out["win_rate_judge"]})
    # checks that were part of the evaluated model's reward (an `rlhf` upstream's reward_checks)
    trained = sorted({name for out_ in ctx.inputs.values() if out_.get("checkpoint") == checkpoint
                      for name in out_.get("reward_checks") or ()} & {c.name for c in checks})
    if trained:
        out["checks_trained_against"] = trained
        ctx.set_tags({"checks_trained_against": ", ".join(trained)})
    out["warnings"] = reward_hacking(out, checks)
    out["comparison"] = _comparison(out, config, models)
    ctx.log_metrics({k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    (Path(ctx.artifact_dir) / "metrics.json").write_text(json.dumps(out, indent=2, sort_keys=True))
    if texts:
        samples = [{"model": prefix.rstrip("_") or "model", "prompt": p, "completion": c}
                   for prefix, (ps, cs) in texts.items() for p, c in zip(ps, cs)]
        (Path(ctx.artifact_dir) / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return out


def _comparison(out: dict[str, Any], config: Config, models: dict[str, str]) -> dict[str, dict[str, float]]:
    """{model label: {metric: value}}: references first, then the baseline, then the model."""
    labels = {f"{_name(r)}_": _name(r) for r in config.references}
    if "baseline_" in models:
        labels["baseline_"] = f"{config.baseline or 'baseline'} (baseline)"
    labels[""] = f"{config.checkpoint or 'model'} (evaluated)"
    metrics = ["perplexity", "mean_reward", "mean_reward_se"] + [k for k in out if k.startswith("check_")]  # + _se
    table = {}
    for prefix, label in labels.items():
        row = {m: out[prefix + m] for m in metrics if isinstance(out.get(prefix + m), (int, float))}
        if row:
            table[label] = row
    return table
