"""Reading a text corpus in bounded pieces: files found from sources, work units, documents.

A *source* is a path, a glob (``data/**/*.jsonl``), a folder (every supported file under it),
a storage URI (``file://``, ``s3://``..., through ``workers.storage``) or
``builtin:python-stdlib`` (the ``.py`` files of the running Python's standard library, without
``site-packages`` and test folders: a real corpus on every machine, no download).

A *document* is one whole text file (``.txt``, ``.md``, ``.py``), one non-blank JSONL line (its
``text_field``), or one Parquet row (its ``text_field`` column). Each document has a stable
``doc_id = file_index * 2**40 + position`` (position: byte offset of the JSONL line, Parquet
row number, 0 for a whole file), so a token row can be traced back to its source.

A *work unit* is a bounded piece of the corpus a worker reads by itself: a group of whole
files, a byte range of a JSONL file (lines are owned by the unit their first byte falls in),
or a run of Parquet row groups. Planning reads only file sizes and Parquet footers.

Anything that cannot be read is a ``CorpusError`` naming the file (and line), never skipped.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import posixpath
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers import storage

BUILTIN_STDLIB = "builtin:python-stdlib"
TEXT_EXTS = (".txt", ".md", ".py")
FORMATS = {**{ext: "text" for ext in TEXT_EXTS}, ".jsonl": "jsonl", ".parquet": "parquet"}
POSITION_BITS = 40  # doc_id = file_index << 40 | position: files up to 1 TiB, 8M files
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class CorpusError(ValueError):
    """A source matched nothing, or a file could not be read or decoded (names the file)."""


@dataclass(frozen=True)
class SourceFile:
    uri: str
    """Where to read it (local path or storage URI)."""
    format: str
    """'text', 'jsonl' or 'parquet'."""
    size: int
    index: int
    """Position in the corpus's file list (the high bits of its documents' ids)."""
    key: str
    """Path relative to its source's base folder: hashed for the train/val split, so the
    split survives moving the corpus or adding files."""


@dataclass(frozen=True)
class Unit:
    index: int
    format: str
    files: tuple[SourceFile, ...]
    start: int = 0
    """JSONL: first byte of the range; Parquet: first row of the first row group."""
    end: int = 0
    """JSONL: end of the byte range (exclusive)."""
    row_groups: tuple[int, ...] = ()
    nbytes: int = 0
    """Approximate input size (planning only)."""


# ---- finding files --------------------------------------------------------------------------

def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _stdlib_files() -> list[tuple[str, str, int]]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _STDLIB_SKIP)
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                out.append((p, os.path.relpath(p, root), os.path.getsize(p)))
    return sorted(out, key=lambda t: t[1])


def _list_source(source: str) -> list[tuple[str, str, int]]:
    """(uri, key, size) of every file a source names, sorted; [] if it matches nothing."""
    if source == BUILTIN_STDLIB:
        return _stdlib_files()
    if source.startswith("builtin:"):
        raise CorpusError(f"source {source!r}: unknown builtin corpus (allowed: {BUILTIN_STDLIB!r})")
    fs, path = storage.resolve(source)
    local = isinstance(fs, pafs.LocalFileSystem)

    def uri_of(p: str) -> str:
        if local:
            return p
        scheme = source.split("://", 1)[0]
        return f"{scheme}://{p}"

    if _has_magic(path):
        parts = path.split("/")
        base = "/".join(p for p in parts[: next(i for i, p in enumerate(parts) if _has_magic(p))]) or "/"
        if local:
            matches = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
            found = [(p, os.path.getsize(p)) for p in matches]
        else:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            found = [(i.path, i.size) for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        return sorted((uri_of(p), posixpath.relpath(p, base), s) for p, s in found)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(uri_of(path), posixpath.basename(path), info.size)]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted((uri_of(i.path), posixpath.relpath(i.path, path), i.size) for i in infos
                      if i.type == pafs.FileType.File and os.path.splitext(i.path)[1] in FORMATS
                      and not posixpath.basename(i.path).startswith("."))
    return []


def expand(sources: str | Iterable[str]) -> list[SourceFile]:
    """Every file the sources name, in source order then sorted path order, without duplicates."""
    if isinstance(sources, str):
        sources = [sources]
    out: list[SourceFile] = []
    seen: set[str] = set()
    for source in sources:
        listed = _list_source(source)
        if not listed:
            raise CorpusError(f"source {source!r} matches no files (give a file, a folder, a glob such as "
                              f"'data/**/*.jsonl', a storage URI, or {BUILTIN_STDLIB!r})")
        for uri, key, size in listed:
            if uri in seen:
                continue
            ext = os.path.splitext(uri)[1].lower()
            if ext not in FORMATS:
                raise CorpusError(f"source {source!r}: file {uri} has an unsupported extension {ext!r} "
                                  f"(allowed: {', '.join(sorted(FORMATS))})")
            seen.add(uri)
            out.append(SourceFile(uri=uri, format=FORMATS[ext], size=int(size or 0), index=len(out), key=key))
    return out


# ---- planning work units -----------------------------------------------------------------------

def _parquet_file(uri: str) -> pq.ParquetFile:
    fs, path = storage.resolve(uri)
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{uri}: not a readable Parquet file ({e})") from None


TAIL_UNITS, TAIL_SPLIT = 2, 4
"""The last ``TAIL_UNITS * unit_bytes`` of a corpus are planned as units ``TAIL_SPLIT`` times
smaller, so that the workers finish together: with equal units, the worker that takes the
last one leaves the others idle for about half a unit."""


def plan_units(files: list[SourceFile], unit_bytes: int, text_field: str = "text") -> list[Unit]:
    """Split the corpus into work units of about ``unit_bytes`` of input each (smaller at the
    end, see ``TAIL_UNITS``; a single file or row group larger than that is one unit by itself).
    Depends only on the corpus and ``unit_bytes``, never on the number of workers."""
    units: list[Unit] = []
    group: list[SourceFile] = []
    group_bytes = 0
    tail_from = sum(f.size for f in files) - TAIL_UNITS * unit_bytes
    pos = 0  # input bytes before the file being planned

    def limit(at: int) -> int:
        """The unit size for input starting at byte ``at`` of the corpus."""
        return unit_bytes if at < tail_from else max(1, unit_bytes // TAIL_SPLIT)

    def add(**kw) -> None:
        units.append(Unit(index=len(units), **kw))

    def flush() -> None:
        nonlocal group, group_bytes
        if group:
            add(format="text", files=tuple(group), nbytes=group_bytes)
        group, group_bytes = [], 0

    for f in files:
        at, pos = pos, pos + f.size
        if f.format == "text":
            if group and group_bytes + f.size > limit(at - group_bytes):
                flush()
            group.append(f)
            group_bytes += f.size
            continue
        flush()
        if f.format == "jsonl":
            start = 0
            while True:
                end = min(start + limit(at + start), f.size)
                add(format="jsonl", files=(f,), start=start, end=end, nbytes=end - start)
                if end >= f.size:
                    break
                start = end
        else:  # parquet: whole row groups, checked for the text column up front
            pf = _parquet_file(f.uri)
            names = pf.schema_arrow.names
            if text_field not in names:
                raise CorpusError(f"{f.uri}: no column {text_field!r} (columns: {names}); set text_field to one of them")
            md = pf.metadata
            row = 0
            rgs: list[int] = []
            first, acc, rg_at = 0, 0, 0  # rg_at: the file's (uncompressed) bytes before row group g
            scale = f.size / max(1, sum(md.row_group(g).total_byte_size for g in range(md.num_row_groups)))
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                size = rg.total_byte_size
                if rgs and acc + size > limit(at + int((rg_at - acc) * scale)):
                    add(format="parquet", files=(f,), start=first, row_groups=tuple(rgs), nbytes=acc)
                    rgs, acc = [], 0
                if not rgs:
                    first = row
                rgs.append(g)
                acc += size
                rg_at += size
                row += rg.num_rows
            if rgs:
                add(format="parquet", files=(f,), start=first, row_groups=tuple(rgs), nbytes=acc)
    flush()
    return units


# ---- reading documents --------------------------------------------------------------------------

def doc_id(f: SourceFile, position: int) -> int:
    return (f.index << POSITION_BITS) | position


def _line_number(uri: str, offset: int) -> int:
    """1-based line number of byte ``offset`` (only computed when reporting an error)."""
    fs, path = storage.resolve(uri)
    n, done = 1, 0
    with fs.open_input_stream(path) as f:
        while done < offset:
            chunk = f.read(min(1 << 20, offset - done))
            if not chunk:
                break
            n += chunk.count(b"\n")
            done += len(chunk)
    return n


def _read_text(unit: Unit) -> Iterator[tuple[int, str]]:
    for f in unit.files:
        data = storage.read_bytes(f.uri)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise CorpusError(f"{f.uri}: not valid UTF-8 (line {line}, byte {e.start}: {e.reason})") from None
        yield doc_id(f, 0), text


def _read_jsonl(unit: Unit, text_field: str) -> Iterator[tuple[int, str]]:
    (f,) = unit.files
    fs, path = storage.resolve(f.uri)
    # Start one byte early: if that byte is a newline, the line at `start` is ours; otherwise
    # the partial line belongs to the previous unit.
    begin = max(unit.start - 1, 0)
    with fs.open_input_file(path) as fh:
        fh.seek(begin)
        data = fh.read(unit.end - begin)
        if unit.end < f.size and not data.endswith(b"\n"):
            tail = []  # finish the line that straddles `end`
            while chunk := fh.read(1 << 16):
                nl = chunk.find(b"\n")
                if nl >= 0:
                    tail.append(chunk[: nl + 1])
                    break
                tail.append(chunk)
            data += b"".join(tail)
    i = 0
    if unit.start > 0:
        nl = data.find(b"\n")
        if nl < 0:
            return
        i = nl + 1
    while i < len(data):
        j = data.find(b"\n", i)
        if j < 0:
            j = len(data)
        line, offset, i = data[i:j], begin + i, j + 1
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorpusError(f"{f.uri} line {_line_number(f.uri, offset)}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or text_field not in obj:
            fields = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise CorpusError(f"{f.uri} line {_line_number(f.uri, offset)}: no field {text_field!r} "
                              f"(found: {fields}); set text_field to the field holding the text")
        text = obj[text_field]
        if not isinstance(text, str):
            raise CorpusError(f"{f.uri} line {_line_number(f.uri, offset)}: field {text_field!r} is "
                              f"{type(text).__name__}, not a string")
        yield doc_id(f, offset), text


def _read_parquet(unit: Unit, text_field: str) -> Iterator[tuple[int, str]]:
    (f,) = unit.files
    pf = _parquet_file(f.uri)
    if text_field not in pf.schema_arrow.names:
        raise CorpusError(f"{f.uri}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
    col = pf.read_row_groups(list(unit.row_groups), columns=[text_field]).column(0)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise CorpusError(f"{f.uri}: column {text_field!r} has type {col.type}, not string")
    if col.null_count:
        first = col.is_null().to_pylist().index(True)
        raise CorpusError(f"{f.uri}: column {text_field!r} is null at row {unit.start + first}")
    for k, text in enumerate(col.to_pylist()):
        yield doc_id(f, unit.start + k), text


def read_unit(unit: Unit, text_field: str = "text") -> Iterator[tuple[int, str]]:
    """(doc_id, text) of every document of a unit, in order (ids ascending)."""
    if unit.format == "text":
        return _read_text(unit)
    if unit.format == "jsonl":
        return _read_jsonl(unit, text_field)
    return _read_parquet(unit, text_field)


def iter_texts(units: Iterable[Unit], text_field: str = "text", max_bytes: int | None = None,
               max_documents: int | None = None) -> Iterator[str]:
    """Document texts in corpus order, stopping at the caps (the last one cut to fit
    ``max_bytes``): a bounded, deterministic sample for training a tokenizer."""
    n = used = 0
    for unit in units:
        for _, text in read_unit(unit, text_field):
            if max_documents is not None and n >= max_documents:
                return
            if max_bytes is not None:
                size = len(text.encode("utf-8"))
                if used + size > max_bytes:
                    cut = text.encode("utf-8")[: max_bytes - used].decode("utf-8", errors="ignore")
                    if cut:
                        yield cut
                    return
                used += size
            n += 1
            yield text


def in_val(key: str, position: int, seed: int, val_fraction: float) -> bool:
    """Deterministic train/val assignment of a document from a hash of its identity
    (file key + position), never from its place in the output."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}:{key}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") < val_fraction * 2.0**64


__all__ = ["BUILTIN_STDLIB", "CorpusError", "SourceFile", "Unit", "expand", "plan_units", "read_unit",
           "iter_texts", "in_val", "doc_id", "POSITION_BITS"]
