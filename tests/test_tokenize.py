"""The tokenize stage kind on a real local Ray: sources, tokenizers, shards, splits, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from workers.data import corpus
from workers.kinds import tokenize as T
from workers.data.corpus import CorpusError
from workers.stage import Resources, local_context


# ---- helpers ----------------------------------------------------------------------------------

def _make_corpus(root: Path) -> dict[str, str]:
    """txt, jsonl and parquet files with distinct texts; returns {label: text} of every document."""
    root.mkdir(parents=True, exist_ok=True)
    docs: dict[str, str] = {}
    for i in range(3):
        text = f"Plain text file {i}.\nIt has two lines, ünïcödé and emoji 🙂 number {i * 7}.\n"
        (root / f"notes-{i}.txt").write_text(text, encoding="utf-8")
        docs[f"txt{i}"] = text
    lines = []
    for i in range(60):  # ~4 KB: several 1 KiB byte-range units, lines straddle their edges
        text = f"json line {i}: " + "the quick brown fox " * (i % 5) + f"\tend {i}"
        lines.append(json.dumps({"id": i, "text": text}))
        docs[f"jsonl{i}"] = text
    lines.insert(10, "")  # a blank line is not a document
    (root / "lines.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    texts = [f"parquet row {i} " + "xyz " * i for i in range(40)]
    pq.write_table(pa.table({"text": texts, "n": list(range(40))}), root / "rows.parquet", row_group_size=8)
    docs.update({f"pq{i}": t for i, t in enumerate(texts)})
    return docs


def _run(tmp: Path, name: str, workers: int = 1, **config):
    ctx = local_context(tmp / name, resources=Resources(cpus=1, workers=workers))
    out = T.run(ctx, T.Config(**config))
    manifest = json.loads((ctx.artifact_dir / "manifest.json").read_text())
    return ctx, out, manifest


def _rows(art: Path, manifest: dict, split: str) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = {}
    for shard in manifest["splits"][split]["shards"]:
        table = pq.read_table(art / shard["path"])
        for d, ids in zip(table.column("doc_id").to_pylist(), table.column("ids").to_pylist()):
            assert d not in rows
            rows[d] = ids
    return rows


def _digests(manifest: dict) -> list[tuple[str, str]]:
    return [(s["path"], s["sha256"]) for split in ("train", "val") for s in manifest["splits"][split]["shards"]]


@pytest.fixture(scope="module")
def mixed(ray_session, tmp_path_factory):
    """A txt + jsonl + parquet corpus (globs and paths) tokenized by a char tokenizer with 1 and
    2 workers in small units."""
    tmp = tmp_path_factory.mktemp("mixed")
    docs = _make_corpus(tmp / "data")
    cfg = dict(source=[str(tmp / "data" / "*.txt"), str(tmp / "data" / "lines.jsonl"), str(tmp / "data" / "*.parquet")],
               tokenizer={"type": "char"}, shard_size_bytes=1024, val_fraction=0.3, seed=1)
    one = _run(tmp, "w1", workers=1, **cfg)
    two = _run(tmp, "w2", workers=2, **cfg)
    return docs, one, two


# ---- behaviour ---------------------------------------------------------------------------------

def test_every_document_round_trips_exactly_once(mixed):
    from tokenizers import Tokenizer

    docs, (ctx, out, manifest), _ = mixed
    art = ctx.artifact_dir
    tok = Tokenizer.from_file(str(art / "tokenizer.json"))
    rows = {**_rows(art, manifest, "train"), **_rows(art, manifest, "val")}
    assert len(rows) == len(docs) == out["documents"] == manifest["documents"]
    decoded = []
    for ids in rows.values():
        assert ids[-1] == out["eos_id"] and out["eos_id"] not in ids[:-1]
        decoded.append(tok.decode(ids[:-1]))
    assert sorted(decoded) == sorted(docs.values())
    # several units (1 KiB each), so JSONL lines were read from byte ranges
    assert manifest["source"]["units"] > 5 and manifest["source"]["files"] == 5
    assert manifest["dtype"] == "uint16" and pq.read_schema(art / "train/shard-00000.parquet").field("ids").type == pa.list_(pa.uint16())


def test_one_and_two_workers_write_identical_shards(mixed):
    _, (_, out1, m1), (_, out2, m2) = mixed
    assert _digests(m1) == _digests(m2) and len(_digests(m1)) > 5
    assert out1["train_tokens"] == out2["train_tokens"]
    assert m1["tokenizer"]["sha256"] == m2["tokenizer"]["sha256"]


def test_split_by_document_hash_without_overlap(mixed, tmp_path):
    docs, (ctx, out, m), _ = mixed
    train, val = _rows(ctx.artifact_dir, m, "train"), _rows(ctx.artifact_dir, m, "val")
    assert train and val and not set(train) & set(val)
    assert len(train) + len(val) == out["documents"]
    for split, rows in (("train", train), ("val", val)):
        assert m["splits"][split]["documents"] == len(rows)
        assert m["splits"][split]["tokens"] == sum(map(len, rows.values())) == sum(s["tokens"] for s in m["splits"][split]["shards"])
    assert out["train_tokens"] + out["val_tokens"] == sum(map(len, train.values())) + sum(map(len, val.values()))
    assert 0.1 < len(val) / out["documents"] < 0.5  # val_fraction=0.3


def test_metrics_and_progress_are_reported(mixed):
    _, (ctx, out, _), _ = mixed
    sink = ctx.sink
    assert sink.metrics("documents")[-1] == out["documents"]
    assert sink.metrics("tokens")[-1] == out["train_tokens"] + out["val_tokens"]
    tokens, nbytes = sink.metrics("tokens")[-1], sink.metrics("bytes")[-1]
    assert sink.metrics("tokens_per_s")[-1] > 0 and sink.metrics("bytes_per_token")[-1] == pytest.approx(nbytes / tokens)
    assert sink.metrics("startup_s")[-1] > 0 and sink.metrics("encode_s")[-1] > 0  # actor start-up apart
    assert nbytes >= tokens - out["documents"]  # char tokenizer: one id per character (≥ 1 byte), plus one EOS per doc
    progress = [e for e in sink.events if e["type"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] and progress[-1]["unit"] == "shards"


def test_bpe_on_stdlib_loads_in_transformers_and_round_trips(ray_session, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ctx, out, m = _run(tmp_path, "bpe", workers=2, source="builtin:python-stdlib", max_bytes=300_000,
                       shard_size_bytes=64_000, tokenizer={"type": "bpe", "vocab_size": 600})
    assert 0 < m["bytes"] <= 300_000 and m["tokenizer"]["type"] == "bpe" and out["vocab_size"] <= 600
    stdlib = corpus.expand("builtin:python-stdlib")
    first, expected = stdlib[0], 0
    for f in stdlib:  # whole files in sorted order, stopping before the first one past the cap
        if expected + f.size > 300_000:
            break
        expected += f.size
    assert m["bytes"] == expected and m["documents"] == stdlib.index(f)
    text = "def f(x):\n    return x ** 2  # ünïcödé ✓\n\n\tπ = 3.14\n"
    path = str(ctx.artifact_dir / "tokenizer.json")
    tok = Tokenizer.from_file(path)
    hf = PreTrainedTokenizerFast(tokenizer_file=path)
    auto = AutoTokenizer.from_pretrained(str(ctx.artifact_dir))
    assert tok.decode(tok.encode(text).ids) == text
    assert hf.decode(hf.encode(text)) == text and auto.decode(auto.encode(text)) == text
    assert hf.encode(text) == tok.encode(text).ids and auto.eos_token_id == out["eos_id"]
    # the first stdlib file is the first train-or-val document, decoded exactly
    rows = {**_rows(ctx.artifact_dir, m, "train"), **_rows(ctx.artifact_dir, m, "val")}
    assert tok.decode(rows[corpus.doc_id(first, 0)][:-1]) == Path(first.uri).read_text(encoding="utf-8")


def test_char_tokenizer_loads_in_transformers(mixed):
    from transformers import PreTrainedTokenizerFast

    _, (ctx, out, m), _ = mixed
    assert m["tokenizer"]["type"] == "char"
    hf = PreTrainedTokenizerFast(tokenizer_file=str(ctx.artifact_dir / "tokenizer.json"))
    text = "Plain text 🙂 ünïcödé\n\tfox"
    ids = hf.encode(text)
    assert len(ids) == len(text) and hf.decode(ids) == text
    assert out["vocab_size"] == hf.vocab_size + len(hf.added_tokens_decoder) or out["vocab_size"] == len(hf)


def test_max_documents_keeps_the_first_documents_for_any_worker_count(mixed, tmp_path):
    from tokenizers import Tokenizer

    docs = _make_corpus(tmp_path / "data")
    cfg = dict(source=str(tmp_path / "data" / "lines.jsonl"), tokenizer={"type": "char"}, max_documents=25,
               shard_size_bytes=1024, val_fraction=0.3, seed=1)
    c1, o1, m1 = _run(tmp_path, "cap1", workers=1, **cfg)
    c2, o2, m2 = _run(tmp_path, "cap2", workers=2, **cfg)
    assert o1["documents"] == o2["documents"] == 25 and _digests(m1) == _digests(m2)

    def texts(ctx, m, split):
        tok = Tokenizer.from_file(str(ctx.artifact_dir / "tokenizer.json"))
        return {tok.decode(ids[:-1]) for ids in _rows(ctx.artifact_dir, m, split).values()}

    assert texts(c1, m1, "train") | texts(c1, m1, "val") == {docs[f"jsonl{i}"] for i in range(25)}
    # Same seed, same file, but now alone and capped: each document lands in the same split as in
    # the mixed corpus (split by a hash of the document's identity, not its position).
    _, (mctx, _, mm), _ = mixed
    assert texts(c1, m1, "val") == texts(mctx, mm, "val") & {docs[f"jsonl{i}"] for i in range(25)}
    assert texts(c1, m1, "val")


def test_large_vocabulary_is_stored_as_uint32(ray_session, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "a.txt").write_text("w1 w69999 w65536 nope")
    ctx, out, m = _run(tmp_path, "u32", source=str(tmp_path / "a.txt"), tokenizer={"path": str(tmp_path / "big.json")},
                       val_fraction=0.0)
    assert m["dtype"] == out["dtype"] == "uint32" and m["vocab_size"] == 70_002
    table = pq.read_table(ctx.artifact_dir / m["splits"]["train"]["shards"][0]["path"])
    assert table.schema.field("ids").type == pa.list_(pa.uint32())
    assert table.column("ids").to_pylist() == [[3, 70_001, 65_538, 1, 0]]
    assert m["splits"]["val"] == {"documents": 0, "tokens": 0, "shards": []}


# ---- errors -------------------------------------------------------------------------------------

def test_bad_utf8_file_is_reported_by_name(ray_session, tmp_path):
    (tmp_path / "good.txt").write_text("fine\n")
    (tmp_path / "bad.txt").write_bytes(b"line one\nline \xff two\n")
    with pytest.raises(CorpusError, match=r"bad\.txt: not valid UTF-8 \(line 2"):
        _run(tmp_path, "utf8", source=str(tmp_path / "*.txt"), tokenizer={"type": "char"})


def test_bad_json_line_is_reported_by_file_and_line(ray_session, tmp_path):
    good = [json.dumps({"text": f"line {i} " * 20}) for i in range(40)]
    lines = good[:30] + ['{"text": "unterminated'] + good[30:]  # line 31, well past the first 1 KiB unit
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    ctx = local_context(tmp_path / "j", resources=Resources(workers=1))
    with pytest.raises(CorpusError, match=r"c\.jsonl line 31: not valid JSON"):
        T.run(ctx, T.Config(source=str(tmp_path / "c.jsonl"), shard_size_bytes=1024,
                            tokenizer={"path": str(_char_tokenizer(tmp_path))}))


def _char_tokenizer(tmp: Path) -> Path:
    from workers.data import tokenizer as tk

    tk.save(tk.train_char(["abcdefghijklmnopqrstuvwxyz 0123456789"]), tmp / "chartok")
    return tmp / "chartok" / "tokenizer.json"


def test_missing_field_column_and_unmatched_source_are_named(ray_session, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    tok = str(_char_tokenizer(tmp_path))
    with pytest.raises(CorpusError, match=r"d\.jsonl line 1: no field 'text' \(found: \['body'\]\)"):
        _run(tmp_path, "f", source=str(tmp_path / "d.jsonl"), tokenizer={"path": tok})
    with pytest.raises(CorpusError, match=r"d\.parquet: no column 'text' \(columns: \['body'\]\)"):
        _run(tmp_path, "p", source=str(tmp_path / "d.parquet"), tokenizer={"path": tok})
    with pytest.raises(CorpusError, match=r"source '.*nothing-\*\.txt' matches no files"):
        _run(tmp_path, "n", source=str(tmp_path / "nothing-*.txt"), tokenizer={"path": tok})
    with pytest.raises(FileNotFoundError, match=r"tokenizer.path='.*missing\.json'"):
        _run(tmp_path, "m", source=str(tmp_path / "d.jsonl"), text_field="body",
             tokenizer={"path": str(tmp_path / "missing.json")})


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="tokenizer must be"):
        T.Config(source="x.txt", tokenizer={"type": "sentencepiece"})
    with pytest.raises(ValidationError, match="val_fraction"):
        T.Config(source="x.txt", val_fraction=0.7)
    with pytest.raises(ValidationError, match="shard_sise"):
        T.Config(source="x.txt", shard_sise=10)
    assert isinstance(T.Config(source="x.txt", tokenizer={"path": "t.json"}).tokenizer, T.FileTokenizer)
    assert T.Config(source="x.txt").tokenizer.vocab_size == 4096
    for name, field in T.Config.model_fields.items():
        assert field.description, f"Config.{name} has no description"
