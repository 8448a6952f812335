"""Prompt/response and preference records for the `finetune` and `reward` kinds, and how they
become fixed-length token rows and step-indexed batches.

**Sources** (``data:`` in a stage config):

- a JSONL file, a Parquet file, a folder or glob of them, or a storage URI (``s3://...``): one
  record per non-blank JSONL line or Parquet row. A missing or mistyped field is a
  ``RecordError`` naming the file and line (JSONL) or row (Parquet).
- ``builtin:stdlib-docstrings`` (SFT demo data, no download): one record per function of the
  running Python's standard library (``.py`` files found like ``builtin:python-stdlib``, parsed
  with ``ast``) that has a docstring and a body: ``prompt`` = the ``def`` line(s) and the
  docstring, ``response`` = the rest of the body (both dedented to the ``def``). Files and
  functions come in sorted, source order, so the data is deterministic for a given Python.
- ``builtin:stdlib-preferences`` (reward-model demo data): the same functions as
  ``{prompt, chosen, rejected, margin}``: ``chosen`` is the real body, ``rejected`` a corrupted
  copy the way small code models fail (looping, stopping mid-line, a stub body; chosen by a hash
  of the function; see ``corrupt``).

**Record shapes.** SFT: ``{prompt, response}`` (field names configurable) or OpenAI-style
``{messages: [{role, content}, ...]}`` whose last message must be the assistant's reply (the
response); earlier messages are rendered into the prompt through the chat template.
Preferences: ``{prompt, chosen, rejected}`` with an optional numeric ``margin``.

**Prompts** are rendered like the server's chat endpoint does: a plain prompt is a single user
message through the chat template (or through ``prompt_template``, a ``{prompt}`` format string,
when one is given). ``derive_prompt_template`` turns a chat template into that format string, and
both are stored in the checkpoint's config.json.

**Rows.** ``encode_example`` makes ``prompt ids + response ids + EOS`` of at most
``block_size + 1`` tokens: when too long, the prompt keeps its *last* tokens (down to half the
block; the end holds the assistant tag) and the response is cut on the right. ``ExampleBatches``
serves such rows as step-indexed batches (a pure function of ``(seed, step)``, as
``workers.data.tokens.TokenBatches``), so resuming needs no data-loader state.

``synthetic_sft`` and ``synthetic_preferences`` make small learnable tasks for tests.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from workers import storage

BUILTIN_SFT = "builtin:stdlib-docstrings"
BUILTIN_PREFERENCES = "builtin:stdlib-preferences"
BUILTINS = (BUILTIN_SFT, BUILTIN_PREFERENCES)
_MAX_FUNCTION_CHARS = 4000  # skip huge functions in the builtin data: they would only be truncated
_PROMPT_SENTINEL = "\x00PROMPT\x00"


class RecordError(ValueError):
    """A record is missing a field or has a wrong type (names the file and line or row)."""


@dataclass(frozen=True)
class Record:
    data: dict[str, Any]
    where: str
    """``"<file> line N"`` (JSONL), ``"<file> row N"`` (Parquet) or ``"<builtin> #N (<file>:<line>)"``."""


# ----------------------------------------------------------------------------- reading records


def _read_jsonl(uri: str) -> Iterator[Record]:
    data = storage.read_bytes(uri)
    for n, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordError(f"{uri} line {n}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise RecordError(f"{uri} line {n}: expected a JSON object, got {type(obj).__name__}")
        yield Record(obj, f"{uri} line {n}")


def _read_parquet(uri: str) -> Iterator[Record]:
    fs, path = storage.resolve(uri)
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
    except (pa.ArrowException, OSError) as e:
        raise RecordError(f"{uri}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield Record(obj, f"{uri} row {row}")
            row += 1


def read_records(source: str, max_records: int | None = None) -> Iterator[Record]:
    """Records of a source (see the module docstring), in order, at most ``max_records``."""
    if source == BUILTIN_SFT:
        it = stdlib_functions()
    elif source == BUILTIN_PREFERENCES:
        it = stdlib_preferences()
    elif source.startswith("builtin:"):
        raise RecordError(f"data: unknown builtin data set {source!r}; allowed: {', '.join(BUILTINS)}")
    else:
        from workers.data.corpus import CorpusError, expand

        try:
            files = expand(source)
        except CorpusError as e:
            raise RecordError(f"data: {e}") from None
        bad = [f.uri for f in files if f.format not in ("jsonl", "parquet")]
        if bad:
            raise RecordError(f"data: {bad[0]} is not a .jsonl or .parquet file (records need fields)")
        it = (r for f in files for r in (_read_jsonl(f.uri) if f.format == "jsonl" else _read_parquet(f.uri)))
    for n, r in enumerate(it):
        if max_records is not None and n >= max_records:
            return
        yield r


def field_str(record: Record, name: str, what: str) -> str:
    """``record[name]`` as a string, or a RecordError naming the file/line and the config field."""
    if name not in record.data or record.data[name] is None:
        raise RecordError(f"{record.where}: no field {name!r} (found: {sorted(record.data)}); "
                          f"set {what} to the field holding it")
    v = record.data[name]
    if not isinstance(v, str):
        raise RecordError(f"{record.where}: field {name!r} is {type(v).__name__}, not a string")
    return v


# ----------------------------------------------------------------------------- prompts


def format_prompt(prompt: str, *, prompt_template: str | None = None, chat_template: str | None = None,
                  eos_token: str = "") -> str:
    """A plain prompt as the model sees it: ``prompt_template.format(prompt=...)`` when given,
    else a single user message rendered by the chat template (the server's chat format)."""
    if prompt_template is not None:
        return prompt_template.format(prompt=prompt)
    from workers.data.chat import render_chat
    return render_chat([{"role": "user", "content": prompt}], chat_template, add_generation_prompt=True,
                       eos_token=eos_token)


def derive_prompt_template(chat_template: str | None, eos_token: str = "") -> str | None:
    """The ``{prompt}`` format string equal to the chat template applied to one user message
    (None if the template does not embed the message verbatim, exactly once)."""
    text = format_prompt(_PROMPT_SENTINEL, chat_template=chat_template, eos_token=eos_token)
    if text.count(_PROMPT_SENTINEL) != 1:
        return None
    return text.replace("{", "{{").replace("}", "}}").replace(_PROMPT_SENTINEL, "{prompt}")


def check_prompt_template(template: str, field: str = "prompt_template") -> None:
    try:
        template.format(prompt="x")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{field}: got {template!r}; must be a format string whose only field is "
                         f"{{prompt}} (literal braces doubled): {e!r}") from None
    if "{prompt}" not in template:
        raise ValueError(f"{field}: got {template!r}; must contain {{prompt}}")


def sft_pair(record: Record, *, prompt_field: str, response_field: str, messages_field: str,
             prompt_template: str | None, chat_template: str | None, eos_token: str = "") -> tuple[str, str]:
    """(rendered prompt, response) of an SFT record: prompt/response fields, or a messages list."""
    from workers.data.chat import ChatTemplateError, message_text, render_chat

    if messages_field in record.data and prompt_field not in record.data:
        messages = record.data[messages_field]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RecordError(f"{record.where}: field {messages_field!r} must be a non-empty list of "
                              "{role, content} objects")
        if messages[-1].get("role") != "assistant" or len(messages) < 2:
            raise RecordError(f"{record.where}: the last of {messages_field!r} must be an 'assistant' message "
                              f"after at least one other (got roles {[m.get('role') for m in messages]})")
        try:
            prompt = render_chat(messages[:-1], chat_template, add_generation_prompt=True, eos_token=eos_token)
            response = message_text(messages[-1].get("content"))
        except ChatTemplateError as e:
            raise RecordError(f"{record.where}: {e}") from None
        return prompt, response
    if prompt_field not in record.data and response_field in record.data:
        field_str(record, prompt_field, "prompt_field")
    if prompt_field not in record.data:
        raise RecordError(f"{record.where}: no field {prompt_field!r} (or {messages_field!r}) (found: "
                          f"{sorted(record.data)}); set prompt_field/response_field or messages_field")
    prompt = field_str(record, prompt_field, "prompt_field")
    response = field_str(record, response_field, "response_field")
    return format_prompt(prompt, prompt_template=prompt_template, chat_template=chat_template,
                         eos_token=eos_token), response


def preference(record: Record, *, prompt_field: str, chosen_field: str, rejected_field: str,
               margin_field: str | None) -> tuple[str, str, str, float]:
    """(raw prompt, chosen, rejected, margin) of a preference record; margin 0 when absent."""
    prompt = field_str(record, prompt_field, "prompt_field")
    chosen = field_str(record, chosen_field, "chosen_field")
    rejected = field_str(record, rejected_field, "rejected_field")
    margin = 0.0
    if margin_field is not None and record.data.get(margin_field) is not None:
        m = record.data[margin_field]
        if isinstance(m, bool) or not isinstance(m, (int, float)):
            raise RecordError(f"{record.where}: field {margin_field!r} is {m!r}, not a number")
        margin = float(m)
    return prompt, chosen, rejected, margin


def is_val(record: Record, index: int, seed: int, val_fraction: float) -> bool:
    """Held-out assignment from a hash of the record's place (file + line), not of its content."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}:{record.where}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") < val_fraction * 2.0**64


# ----------------------------------------------------------------------------- token rows


def encode_example(prompt_ids: list[int], response_ids: list[int], eos_id: int, block_size: int) -> tuple[list[int], int]:
    """(ids of at most block_size + 1 tokens, number of prompt tokens kept): prompt + response + EOS.

    Too long: the prompt keeps its last tokens (at least half the block, or all of it if shorter)
    and the response is cut on the right."""
    response = list(response_ids) + [eos_id]
    limit = block_size + 1
    prompt = list(prompt_ids)
    if len(prompt) + len(response) > limit:
        keep = min(len(prompt), max(limit - len(response), limit // 2))
        prompt = prompt[len(prompt) - keep:]
    ids = (prompt + response)[:limit]
    return ids, len(prompt)


def pad_rows(rows: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N, length) int32 right-padded with pad_id, lengths (N,) int32)."""
    out = np.full((len(rows), length), pad_id, dtype=np.int32)
    lengths = np.zeros(len(rows), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        lengths[i] = len(r)
    return out, lengths


def save_arrays(uri: str, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays as one .npz (no pickles), atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(uri, buf.getvalue())


def load_arrays(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class ExampleBatches:
    """One rank's share of step-indexed batches over fixed rows (``arrays``: name -> (N, ...)).

    Global batch at step ``s``: rows ``i`` in ``[0, G)`` take example ``perm_e[(s * G + i) % N]``
    where ``e`` is the epoch of that position and ``perm_e`` a permutation seeded by
    ``(seed, e)``; rank ``r`` of ``W`` takes rows ``i ≡ r (mod W)``. ``to_batch`` turns a dict of
    row arrays into the tensors the loss function wants.
    """

    def __init__(self, train: dict[str, np.ndarray], val: dict[str, np.ndarray] | None, *, batch_size: int,
                 grad_accum: int, rank: int, world: int, seed: int, eval_steps: int, to_batch,
                 device: str | torch.device = "cpu"):
        self.train_arrays, self.val_arrays = train, val or {}
        self.n = len(next(iter(train.values())))
        if self.n == 0:
            raise ValueError("no training examples")
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.global_rows = batch_size * grad_accum * world
        self.eval_steps, self.to_batch, self.device = eval_steps, to_batch, torch.device(device)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def _micro(self, arrays: dict[str, np.ndarray], index: np.ndarray) -> list[dict[str, torch.Tensor]]:
        out = []
        for k in range(0, len(index), self.batch_size):
            sel = index[k:k + self.batch_size]
            b = self.to_batch({name: a[sel] for name, a in arrays.items()})
            out.append({name: t.to(self.device, non_blocking=True) for name, t in b.items()})
        return out

    def train(self, step: int) -> list[dict[str, torch.Tensor]]:
        G = self.global_rows
        pos = [step * G + i for i in range(self.rank, G, self.world)]
        index = np.array([self._perm(p // self.n)[p % self.n] for p in pos], dtype=np.int64)
        return self._micro(self.train_arrays, index)

    def val(self) -> list[dict[str, torch.Tensor]]:
        if not self.val_arrays or self.eval_steps <= 0:
            return []
        n = len(next(iter(self.val_arrays.values())))
        rows = np.arange(self.rank, min(n, self.global_rows * self.eval_steps), self.world)
        return self._micro(self.val_arrays, rows) if len(rows) else []


# ----------------------------------------------------------------------------- builtin demo data


def _function_records() -> Iterator[tuple[str, str, str]]:
    """(prompt, body, "file:line") of every stdlib function with a docstring and a body."""
    from workers.data.corpus import BUILTIN_STDLIB, expand

    for f in expand(BUILTIN_STDLIB):
        try:
            source = storage.read_bytes(f.uri).decode("utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a few stdlib files are deliberately broken or in other encodings
        lines = source.splitlines()
        funcs = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
                       key=lambda n: n.lineno)  # source order (ast.walk is breadth-first)
        for node in funcs:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
                continue
            start = node.lineno - 1
            head = "\n".join(lines[start:doc.end_lineno])
            body = "\n".join(lines[doc.end_lineno:node.end_lineno])
            if not body.strip() or len(head) + len(body) > _MAX_FUNCTION_CHARS:
                continue
            # Dedent both parts by the def's own indentation (methods sit one level in).
            pad = node.col_offset

            def strip(text: str) -> str:
                return "\n".join(l[pad:] if not l[:pad].strip() else l.lstrip() for l in text.split("\n"))

            yield strip(head) + "\n", strip(body) + "\n", f"{f.key}:{node.lineno}"


def stdlib_functions() -> Iterator[Record]:
    """``builtin:stdlib-docstrings`` records: {prompt, response, source}."""
    for n, (prompt, body, where) in enumerate(_function_records()):
        yield Record({"prompt": prompt, "response": body, "source": where}, f"{BUILTIN_SFT} #{n} ({where})")


# What a small code model gets wrong, and what a reward model must learn to rank below the real
# body: looping, stopping mid-line, and stubbing the body out.
CORRUPTIONS = ("loop", "cut", "stub")
PREFERENCE_MARGIN = 0.5  # r_chosen must beat r_rejected by this much (a clearer separation)


def corrupt(body: str, key: str) -> str:
    """A deterministic, realistic but wrong version of a function body (its kind chosen by a
    hash of ``key``): ``loop`` keeps the first line then repeats a short piece of the body;
    ``cut`` stops in the middle of a line; ``stub`` replaces the body with pass/.../raise."""
    rng = random.Random(hashlib.blake2b(key.encode(), digest_size=8).digest())
    how = CORRUPTIONS[rng.randrange(len(CORRUPTIONS))]
    lines = body.rstrip("\n").split("\n")
    indent = lines[0][: len(lines[0]) - len(lines[0].lstrip())]
    if how == "loop":
        text = body.strip()
        i = rng.randrange(max(1, len(text) - 8))
        piece = text[i:i + rng.randint(2, 8)]
        return lines[0] + "\n" + indent + piece * max(4, len(body) // (2 * len(piece) or 1)) + "\n"
    if how == "cut" and len(body.strip()) > 12:
        lo = len(lines[0]) // 2 if len(lines) == 1 else len(lines[0]) + 1
        # within the first 300 characters: long bodies are cut on the right to fit the context
        cut = rng.randrange(lo, max(lo + 1, min(len(body.rstrip("\n")) - 2, lo + 300)))
        while cut < len(body) and body[cut - 1] in " \n":  # end on a character, mid-line
            cut += 1
        return body[:cut]
    return indent + rng.choice(("pass", "...", "raise NotImplementedError", "return None")) + "\n"


def stdlib_preferences() -> Iterator[Record]:
    """``builtin:stdlib-preferences`` records: {prompt, chosen, rejected, source}."""
    for n, (prompt, body, where) in enumerate(_function_records()):
        rejected = corrupt(body, where)
        if rejected == body:
            continue
        yield Record({"prompt": prompt, "chosen": body, "rejected": rejected, "margin": PREFERENCE_MARGIN,
                      "source": where}, f"{BUILTIN_PREFERENCES} #{n} ({where})")


# ----------------------------------------------------------------------------- synthetic (tests)

_LETTERS = "abcdefgh"


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 4))) for _ in range(n))


def synthetic_sft(n: int, seed: int = 0) -> list[dict[str, str]]:
    """A copy task: ``{"prompt": "copy: <words>", "response": "<words>"}``; a model learns it fast."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = _words(rng, rng.randint(2, 4))
        out.append({"prompt": f"copy: {w}", "response": w})
    return out


def synthetic_preferences(n: int, seed: int = 0, marker: str = "!!") -> list[dict[str, str]]:
    """Pairs whose chosen response ends with ``marker`` and whose rejected one does not (the
    words are otherwise drawn independently): a preference a tiny reward model learns."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append({"prompt": f"say: {_words(rng, 2)}",
                    "chosen": f"{_words(rng, rng.randint(1, 3))} {marker}",
                    "rejected": _words(rng, rng.randint(1, 3))})
    return out


def write_jsonl(path, records: list[dict]) -> str:
    """Write records as JSONL (tests, examples); returns the path as a string."""
    storage.write_bytes(str(path), "".join(json.dumps(r) + "\n" for r in records).encode())
    return str(path)


__all__ = ["BUILTIN_SFT", "BUILTIN_PREFERENCES", "RecordError", "Record", "read_records", "field_str",
           "format_prompt", "derive_prompt_template", "check_prompt_template", "sft_pair", "preference",
           "is_val", "encode_example", "pad_rows", "save_arrays", "load_arrays", "ExampleBatches",
           "stdlib_functions", "stdlib_preferences", "corrupt", "synthetic_sft", "synthetic_preferences",
           "write_jsonl"]
