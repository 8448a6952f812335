"""Stage kind ``tokenize``: a text corpus -> a tokenizer + Parquet shards of token ids.

The driver (``run``) never holds the corpus: it lists files, plans bounded work units
(``workers.data.corpus``), trains the tokenizer on a capped sample in one Ray task, then hands the
units to a pool of encoder actors, each loading the tokenizer once, reading its own unit,
encoding it and writing that unit's train and val shards itself. Each unit's output depends
only on the unit, so the dataset is byte-identical for any number of workers.

Output (``ctx.artifact_dir``)::

    tokenizer.json  tokenizer_config.json  manifest.json
    train/shard-00000.parquet ...   val/shard-00000.parquet ...

One row per document: ``doc_id`` int64, ``ids`` list<uint16> (list<uint32> when the vocabulary
exceeds 65536); every row ends with ``eos_id`` so rows can be concatenated as a token stream.
Documents go to val by a hash of their identity (``val_fraction``), never by position.

Where shards are written: actors write straight into ``ctx.artifact_dir`` when the stage's
output is local storage (they are pinned to the node running ``run``, which owns that folder);
when it is an object store they write under ``ctx.scratch_uri`` from any node and ``run``
downloads the finished shards into ``artifact_dir`` before it returns.

The actors' code (``encode_unit``, the ``Encoder`` class) is ``workers.data.encode``: a lean
module, so that each actor's fresh process imports little.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator

from workers import storage
from workers.config import StrictConfig
from workers.cpu import claim_cpus
from workers.data import corpus, encode
from workers.data.corpus import CorpusError, Unit
from workers.stage import StageContext

DISTRIBUTED = True
UINT16_MAX_VOCAB = 1 << 16
_WINDOW_PER_WORKER = 2  # units queued per actor: the next one is ready when one finishes
_MAX_UNIT_TRIES = 3  # a unit whose actor died (node lost, OOM) is redone on a live actor


# ---- config -----------------------------------------------------------------------------------

class BPETokenizer(StrictConfig):
    """Train a byte-level BPE tokenizer (GPT-2 style; any text round-trips)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["bpe"] = Field(description="Byte-level BPE.")
    vocab_size: int = Field(4096, ge=257, le=1 << 22, description="Largest vocabulary, special tokens included.")
    special_tokens: list[str] = Field(default_factory=lambda: ["<|endoftext|>"],
                                      description="Special tokens, given the first ids; `<|endoftext|>` (the document "
                                                  "separator) is always added.")
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often in the sample to be merged.")
    sample_bytes: int = Field(10_000_000, gt=0, description="Train on the first this-many bytes of the corpus.")


class CharTokenizer(StrictConfig):
    """Train a character tokenizer: one id per character seen in the sample."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["char"] = Field(description="One id per character; unseen characters map to `<|unk|>`.")
    special_tokens: list[str] = Field(default_factory=lambda: ["<|endoftext|>"],
                                      description="Special tokens, given the first ids; `<|endoftext|>` and `<|unk|>` "
                                                  "are always added.")
    sample_bytes: int = Field(10_000_000, gt=0, description="Collect characters from the first this-many bytes.")


class WordPieceTokenizer(StrictConfig):
    """Train BERT's WordPiece tokenizer (for masked-LM encoders; `[SEP]` ends every document)."""

    type: Literal["wordpiece"] = Field(description="BERT's WordPiece: its normaliser and pre-tokenizer, specials "
                                                   "[PAD] [UNK] [CLS] [SEP] [MASK], `[CLS] … [SEP]` added by "
                                                   "AutoTokenizer.")
    vocab_size: int = Field(8192, ge=64, le=1 << 22, description="Largest vocabulary, special tokens included.")
    lowercase: bool = Field(True, description="Lower-case and strip accents (bert-base-uncased); false: cased.")
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often in the sample to be merged.")
    sample_bytes: int = Field(10_000_000, gt=0, description="Train on the first this-many bytes of the corpus.")


class RobertaBPETokenizer(StrictConfig):
    """Train a byte-level BPE with RoBERTa's specials (for masked-LM encoders; `</s>` ends every document)."""

    type: Literal["bpe-roberta"] = Field(description="Byte-level BPE with RoBERTa's specials <s> <pad> </s> <unk> "
                                                     "<mask>, `<s> … </s>` added by AutoTokenizer.")
    vocab_size: int = Field(8192, ge=261, le=1 << 22, description="Largest vocabulary, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often in the sample to be merged.")
    sample_bytes: int = Field(10_000_000, gt=0, description="Train on the first this-many bytes of the corpus.")


class FileTokenizer(StrictConfig):
    """Use an existing Hugging Face ``tokenizer.json``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["file"] = Field("file", description="Optional; implied by `path`.")
    path: str = Field(description="A `tokenizer.json` (local path or storage URI).")
    eos_token: str = Field("<|endoftext|>", description="The token appended to every document.")


def _tokenizer_tag(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("type", "file" if "path" in v else None)
    return getattr(v, "type", None)


TokenizerSpec = Annotated[
    Union[Annotated[BPETokenizer, Tag("bpe")], Annotated[CharTokenizer, Tag("char")],
          Annotated[WordPieceTokenizer, Tag("wordpiece")], Annotated[RobertaBPETokenizer, Tag("bpe-roberta")],
          Annotated[FileTokenizer, Tag("file")]],
    Discriminator(_tokenizer_tag, custom_error_type="tokenizer_kind",
                  custom_error_message="tokenizer must be {type: bpe, vocab_size: N}, {type: char}, "
                                       "{type: wordpiece, vocab_size: N}, {type: bpe-roberta, vocab_size: N} or "
                                       "{path: tokenizer.json}"),
]


class Config(StrictConfig):
    """Tokenize a corpus into train/val token shards."""

    model_config = ConfigDict(extra="forbid")
    source: str | list[str] = Field(
        description="Files to read: paths, folders, globs (`data/**/*.jsonl`) or storage URIs of `.txt`/`.md`/`.py` "
                    "(one document per file), `.jsonl` (one per line) and `.parquet` (one per row) files; or "
                    "`builtin:python-stdlib` (the running Python's standard library, no download).")
    text_field: str = Field("text", description="JSONL field / Parquet column holding the text.")
    max_bytes: int | None = Field(None, gt=0, description="Stop before the first document that would take the "
                                                          "corpus past this many UTF-8 bytes.")
    max_documents: int | None = Field(None, gt=0, description="Keep only the first this-many documents.")
    tokenizer: TokenizerSpec = Field(default_factory=lambda: BPETokenizer(type="bpe"),
                                     description="`{type: bpe, vocab_size: 4096}`, `{type: char}`, "
                                                 "`{type: wordpiece}` (BERT), `{type: bpe-roberta}` (RoBERTa) or "
                                                 "`{path: tokenizer.json}`.")
    val_fraction: float = Field(0.05, ge=0.0, le=0.5, description="Share of documents (by hash) held out for "
                                                                  "validation.")
    shard_size_bytes: int = Field(8 << 20, ge=1024, description="Input bytes per work unit (one train and one val "
                                                                "shard each); bounds each worker's memory.")
    seed: int = Field(0, description="Salt of the train/val hash.")

    @field_validator("source")
    @classmethod
    def _nonempty(cls, v: str | list[str]) -> str | list[str]:
        if not v or (isinstance(v, list) and not all(isinstance(s, str) and s for s in v)):
            raise ValueError(f"source must be a non-empty path/glob/URI or list of them, got {v!r}")
        return v

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)


class _Pool:
    """The encoder actors and the units in flight on each.

    A unit goes to the least busy actor; an actor queues a second unit behind its running one
    (so it never waits for the driver between units) only while more units remain than actors,
    so that near the end no unit waits behind another while an actor is idle (the tail)."""

    def __init__(self, make: Any, n: int) -> None:
        self.make = make
        self.inflight: dict[Any, int] = {}
        self.setup: tuple[str, dict[str, Any]] | None = None
        self.started = time.perf_counter()
        for _ in range(n):
            self.add()

    def add(self) -> None:
        a = self.make()
        self.inflight[a] = 0
        if self.setup is not None:
            a.load.remote(self.setup[0], **self.setup[1])

    def load(self, tokenizer_json: str, opts: dict[str, Any]) -> list[Any]:
        """Every actor (and any replacement) loads the tokenizer before its first unit
        (an actor runs one caller's calls in order); returns the first actors' load refs, done
        when each is started and ready."""
        self.setup = (tokenizer_json, opts)
        return [a.load.remote(tokenizer_json, **opts) for a in self.inflight]

    def pick(self, remaining: int) -> Any | None:
        """The actor to give the next unit to, of ``remaining`` undispatched ones; None: wait."""
        a = min(self.inflight, key=self.inflight.__getitem__)
        n = self.inflight[a]
        if n >= _WINDOW_PER_WORKER or (n and remaining <= len(self.inflight)):
            return None
        return a

    def close(self) -> None:
        import ray

        for a in self.inflight:
            ray.kill(a)


# ---- the driver --------------------------------------------------------------------------------

def _train_tokenizer(spec: BPETokenizer | CharTokenizer | WordPieceTokenizer | RobertaBPETokenizer, units: list[Unit], text_field: str,
                     max_bytes: int | None, max_documents: int | None, threads: int) -> str:
    from workers.data import tokenizer as tk

    claim_cpus(threads, torch_threads=False)  # before tokenizers starts its thread pool

    cap = min(spec.sample_bytes, max_bytes or spec.sample_bytes)
    texts = corpus.iter_texts(units, text_field, max_bytes=cap, max_documents=max_documents)
    if spec.type == "bpe":
        tok = tk.train_bpe(texts, spec.vocab_size, spec.special_tokens, spec.min_frequency)
    elif spec.type == "wordpiece":
        tok = tk.train_wordpiece(texts, spec.vocab_size, lowercase=spec.lowercase, min_frequency=spec.min_frequency)
    elif spec.type == "bpe-roberta":
        tok = tk.train_roberta_bpe(texts, spec.vocab_size, min_frequency=spec.min_frequency)
    else:
        tok = tk.train_char(texts, spec.special_tokens)
    return tok.to_str()


def _unwrap(e: Exception) -> Exception:
    """The user-facing error inside a Ray task error (a CorpusError names the bad file)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, (CorpusError, ValueError, FileNotFoundError)):
        return type(cause)(str(cause))
    return e


def _cut(result: dict[str, Any], room_docs: float, room_bytes: float) -> int:
    """How many of a unit's documents fit in what is left of the caps."""
    keep = int(min(result["documents"], room_docs))
    if room_bytes != float("inf"):
        fits = np.cumsum(result["doc_bytes"][:keep]) <= room_bytes
        keep = int(np.count_nonzero(fits))  # cumsum is increasing: the fitting ones are a prefix
    return keep


def _truncate(result: dict[str, Any], keep: int, root: str) -> dict[str, Any]:
    """Keep only a unit's first ``keep`` documents (its shards rewritten, or deleted if empty)."""
    if keep == result["documents"]:
        return result
    ids = result["doc_ids"][:keep]
    shards = dict(result["shards"])
    for split, shard in result["shards"].items():
        if shard is None:
            continue
        uri = storage.join(root, shard["path"])
        table = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
        part = table.filter(pc.is_in(table.column("doc_id"), value_set=pa.array(ids)))
        storage.delete(uri)
        shards[split] = encode.write_shard(part, root, shard["path"]) if part.num_rows else None
    return {**result, "documents": keep, "bytes": int(result["doc_bytes"][:keep].sum()),
            "tokens": int(result["doc_tokens"][:keep].sum()), "shards": shards}


def _pool_size(ctx: StageContext, n_units: int, node_id: str | None) -> int:
    import ray

    cpus = max(ctx.resources.cpus, 1e-3)
    if ctx.resources.workers:
        return max(1, min(ctx.resources.workers, n_units))
    if node_id is not None:  # pinned: the CPUs of this node
        avail = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"]), 1)
    else:
        avail = ray.cluster_resources().get("CPU", 1)
    return max(1, min(int(avail // cpus), n_units))


def _tokenizer_json(spec: TokenizerSpec, units: list[Unit], config: Config, cpus: float,
                    placement: dict[str, Any]) -> tuple[str, str]:
    """(tokenizer.json text, EOS token): read from the given file, or trained on a sample in a
    Ray task with the stage's CPUs."""
    import ray

    from workers.data import tokenizer as tk

    if isinstance(spec, FileTokenizer):
        uri = spec.path if "://" in spec.path else str(Path(spec.path).expanduser())
        if not storage.exists(uri):
            raise FileNotFoundError(f"tokenizer.path={spec.path!r}: no such file (expected a tokenizer.json)")
        return storage.read_bytes(uri).decode(), spec.eos_token
    train = ray.remote(_train_tokenizer).options(num_cpus=cpus, **placement)
    try:
        tok_json = ray.get(train.remote(spec, units, config.text_field, config.max_bytes, config.max_documents,
                                        max(1, int(cpus))))
    except ray.exceptions.RayTaskError as e:
        raise _unwrap(e) from None
    from tokenizers import Tokenizer
    return tok_json, tk.document_end_token(Tokenizer.from_str(tok_json))  # [SEP] / </s> for encoders


def run(ctx: StageContext, config: Config) -> dict[str, Any]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tqdm import tqdm

    from workers.data import tokenizer as tk

    art = Path(ctx.artifact_dir)
    files = corpus.expand(config.sources)
    units = corpus.plan_units(files, config.shard_size_bytes, config.text_field)
    local_out = storage.is_local(ctx.output_uri) or not ctx.scratch_uri
    if local_out:
        root = str(art)
        node_id = ray.get_runtime_context().get_node_id()
        placement = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)}
    else:
        root = storage.join(ctx.scratch_uri, f"tokenize-attempt-{ctx.attempt}")
        node_id, placement = None, {}
    cpus = ctx.resources.cpus
    spec = config.tokenizer
    Encoder = ray.remote(encode.Encoder).options(num_cpus=cpus, **placement)
    threads = max(1, int(cpus))

    def start_pool() -> _Pool:
        return _Pool(lambda: Encoder.remote(threads), _pool_size(ctx, len(units), node_id))

    # 1. the tokenizer. Given as a file, the encoder pool starts first, so that its processes
    # start and import while the driver reads it (a trained one needs the CPUs the pool holds).
    t0 = time.perf_counter()
    pool = start_pool() if isinstance(spec, FileTokenizer) else None
    try:
        tok_json, eos_token = _tokenizer_json(spec, units, config, cpus, placement)
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(tok_json)
        except Exception as e:
            raise ValueError(f"tokenizer.path={getattr(spec, 'path', '')!r} is not a valid tokenizer.json: "
                             f"{e}") from None
        eos_id = tk.eos_id(tok, eos_token)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        dtype = "uint16" if vocab_size <= UINT16_MAX_VOCAB else "uint32"
        tok_path = tk.save(tok, art, eos_token)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    train_s = time.perf_counter() - t0

    # 2. encode every unit on the actor pool
    pool = pool or start_pool()
    capped = config.max_bytes is not None or config.max_documents is not None
    loading = pool.load(tok_json, dict(text_field=config.text_field, eos_id=eos_id, dtype=dtype,
                             val_fraction=config.val_fraction, seed=config.seed, root=root,
                             unk_id=tok.token_to_id(tk.UNK_TOKEN), keep_index=capped))
    for split in ("train", "val"):
        storage.delete(storage.join(root, split))  # leftovers of an earlier attempt
    n_workers = len(pool.inflight)
    results: dict[int, dict[str, Any]] = {}
    room_docs = float(config.max_documents or "inf")
    room_bytes = float(config.max_bytes or "inf")
    stop: tuple[int, int] | None = None  # (unit index, documents kept) where a cap was reached
    prefix = 0  # units [0, prefix) are finished and counted against the caps
    t1 = ready = time.perf_counter()
    bar = tqdm(total=len(units), unit="shard", desc=f"tokenize {ctx.stage}", file=sys.stderr, disable=None)
    tries: dict[int, int] = {}
    redo: deque[int] = deque()  # units whose actor died, dispatched before new ones
    lost: list[str] = []  # one line per dead actor
    try:
        pending: dict[Any, tuple[Any, int]] = {}
        nxt = 0
        while True:
            while (redo or nxt < len(units)) and stop is None:
                a = pool.pick(len(redo) + len(units) - nxt)
                if a is None:
                    break
                if redo:
                    i = redo.popleft()
                else:
                    i, nxt = nxt, nxt + 1
                tries[i] = tries.get(i, 0) + 1
                pool.inflight[a] += 1
                pending[a.encode.remote(units[i])] = (a, i)
            if not pending and not loading:
                break
            [ref], _ = ray.wait(list(pending) + loading, num_returns=1)
            if ref in loading:  # an actor is up with the tokenizer loaded
                loading.remove(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise _unwrap(e) from None
                except ray.exceptions.RayActorError:
                    pass  # died starting: its units are redone below
                if not loading:
                    ready = time.perf_counter()
                continue
            a, i = pending.pop(ref)
            if a in pool.inflight:
                pool.inflight[a] -= 1
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise _unwrap(e) from None
            except ray.exceptions.RayActorError as e:
                # The actor died (its node was lost, OOM...): its unit's staged shards are whole or
                # absent (atomic writes) and a unit's output depends only on the unit, so redoing it
                # on a live actor neither drops nor duplicates documents.
                if tries[i] >= _MAX_UNIT_TRIES:
                    raise RuntimeError(f"tokenize unit {i} ({', '.join(f.uri for f in units[i].files)[:200]}) lost "
                                       f"its encoder actor {tries[i]} times; last error: {e}") from None
                if a in pool.inflight:
                    del pool.inflight[a]
                    lost.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                    if not pool.inflight:  # nobody left: start a replacement where the cluster has room
                        pool.add()
                redo.append(i)
                continue
            bar.update(1)
            ctx.progress(len(results), len(units), "shards")
            # Caps are applied in corpus order, so the result does not depend on timing.
            while stop is None and prefix in results:
                r = results[prefix]
                keep = _cut(r, room_docs, room_bytes) if capped else r["documents"]
                room_docs -= keep
                room_bytes -= int(r["doc_bytes"][:keep].sum()) if capped else 0
                if keep < r["documents"] or room_docs <= 0:
                    stop = (prefix, keep)
                prefix += 1
            done_tokens = sum(r["tokens"] for r in results.values())
            ctx.log_metrics({"tokens": done_tokens, "tokens_per_s": done_tokens / max(time.perf_counter() - t1, 1e-9)},
                            step=len(results))
    finally:
        bar.close()
        pool.close()
    # Start-up (pool created -> every first actor loaded) and the encode phase (-> last result)
    # apart: end to end counts both.
    startup_s, encode_s = ready - pool.started, time.perf_counter() - ready
    redone = sum(t - 1 for t in tries.values())
    if lost:
        ctx.set_tags({"tokenize.recovery": f"{len(lost)} encoder actor(s) died ({lost[0]}); {redone} unit(s) "
                                           f"redone on live actors"})

    # 3. apply the caps, name the shards, write the manifest
    last = stop[0] if stop else len(units) - 1
    for i in [i for i in results if i > last]:
        for shard in results.pop(i)["shards"].values():
            if shard:
                storage.delete(storage.join(root, shard["path"]))
    if stop:
        results[stop[0]] = _truncate(results[stop[0]], stop[1], root)
    if not local_out:
        storage.download_dir(root, art)
        storage.delete(root)
    kept = [results[i] for i in sorted(results)]
    documents = sum(r["documents"] for r in kept)
    if documents == 0:
        raise CorpusError(f"no documents left from source {config.source!r} (max_bytes={config.max_bytes}, "
                          f"max_documents={config.max_documents}): raise the caps")
    splits: dict[str, dict[str, Any]] = {}
    for split in ("train", "val"):
        shards = [r["shards"][split] for r in kept if r["shards"][split]]
        for k, shard in enumerate(shards):
            final = f"{split}/shard-{k:05d}.parquet"
            os.replace(art / shard["path"], art / final)
            shard["path"] = final
        splits[split] = {"documents": sum(s["documents"] for s in shards),
                         "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    nbytes = sum(r["bytes"] for r in kept)
    unknown = sum(r["unknown"] for r in kept)
    manifest = {
        "vocab_size": vocab_size,
        "dtype": dtype,
        "eos_id": eos_id,
        "tokenizer": {"path": "tokenizer.json", "sha256": storage.sha256_file(tok_path), "type": tk.kind_of(tok)},
        "splits": splits,
        "source": {"uris": config.sources, "files": len(files), "text_field": config.text_field,
                   "max_bytes": config.max_bytes, "max_documents": config.max_documents,
                   "val_fraction": config.val_fraction, "seed": config.seed, "units": len(kept)},
        "documents": documents,
        "bytes": nbytes,
    }
    storage.write_json(str(art / "manifest.json"), manifest)
    metrics = {"documents": documents, "bytes": nbytes, "tokens": tokens,
               "tokens_per_s": tokens / max(encode_s, 1e-9), "bytes_per_token": nbytes / max(tokens, 1),
               "workers": n_workers, "tokenizer_s": train_s, "startup_s": startup_s, "encode_s": encode_s,
               # encoders' time in units (reading, encoding, writing), summed: encode_s x workers minus
               # this is what the pool lost to dispatch and the last unit's tail.
               "encode_busy_s": sum(r["busy_s"] for r in results.values()),
               "actor_failures": len(lost), "units_redone": redone}
    if unknown:
        metrics["unknown_tokens"] = unknown
        ctx.set_tags({"tokenize.warning": f"{unknown} characters were not in the char tokenizer's sample "
                                          f"and became <|unk|>; raise tokenizer.sample_bytes"})
    ctx.log_metrics(metrics, step=len(units))
    ctx.progress(len(units), len(units), "shards")
    return {
        "dataset": ctx.output_uri,
        "manifest": storage.join(ctx.output_uri, "manifest.json"),
        "tokenizer": storage.join(ctx.output_uri, "tokenizer.json"),
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "dtype": dtype,
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "documents": documents,
    }


__all__ = ["DISTRIBUTED", "BPETokenizer", "CharTokenizer", "WordPieceTokenizer", "RobertaBPETokenizer", "Config",
           "FileTokenizer", "run"]
