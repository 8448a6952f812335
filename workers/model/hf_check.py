"""A Hugging Face checkpoint folder checked before anything is allocated for it.

``check_config`` checks config.json against a table keyed by ``model_type`` (the keys each
family requires, their types and bounds; a new family adds its rows to ``FAMILIES``) and the
limits below, so ``n_layer: 10000000`` or ``vocab_size: 1e11`` is one line, not minutes of
allocation. ``check_folder`` then checks the weights without loading them: the index's entries
stay inside the folder, every tensor is in exactly one file, each file's safetensors header is
sound and every shape equals what the config implies; and that the parameters fit in free
memory ("needs 38 GiB, 23 free"). Every failure is a ``CheckpointError``: one line naming the
folder, the file and the field.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "Key", "FAMILIES", "COMMON", "LIMITS", "check_config", "check_folder",
           "read_json_object", "free_bytes", "safetensors_header"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded, said in one line (folder, file, field, why)."""


# Sizes past the largest released models (Llama 3.1 405B: 126 layers, 16384 wide, 128 heads;
# Gemma: 256k vocabulary), with room to spare; above them a config is a mistake, not a model.
LIMITS = {"layers": 1024, "width": 65536, "intermediate": 524288, "heads": 1024, "vocab": 2**22,
          "positions": 2**21}


@dataclass(frozen=True)
class Key:
    """One config.json key: its JSON type ("int", "number", "bool", "str", "object") and bounds (inclusive;
    ``low_open``: the low bound is excluded); ``limit`` names a LIMITS entry as the high bound."""

    type: str
    low: float | None = None
    high: float | None = None
    limit: str | None = None
    low_open: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed, or None."""
        if self.type == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            return f"got {value!r}; expected an integer"
        if self.type == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"got {value!r}; expected a number"
            if not math.isfinite(value):
                return f"got {value!r}; expected a finite number"
        if self.type == "bool" and not isinstance(value, bool):
            return f"got {value!r}; expected true or false"
        if self.type == "str" and not isinstance(value, str):
            return f"got {value!r}; expected a string"
        if self.type == "object":
            return None if isinstance(value, dict) else f"got {value!r}; expected an object"
        high = LIMITS[self.limit] if self.limit else self.high
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"got {value!r}; must be {'>' if self.low_open else '>='} {self.low!r}"
        if high is not None and value > high:
            return f"got {value!r}; at most {high!r} is supported"
        return None


_POS = Key("int", 1)
LAYERS, WIDTH, HEADS = Key("int", 1, limit="layers"), Key("int", 1, limit="width"), Key("int", 1, limit="heads")
VOCAB, POSITIONS = Key("int", 1, limit="vocab"), Key("int", 1, limit="positions")
INTERMEDIATE = Key("int", 1, limit="intermediate")
EPS = Key("number", 0, 1, low_open=True)

# model_type -> (required keys, optional keys: checked when present and not null)
FAMILIES: dict[str, tuple[dict[str, Key], dict[str, Key]]] = {
    "gpt2": ({"vocab_size": VOCAB, "n_positions": POSITIONS, "n_layer": LAYERS, "n_head": HEADS, "n_embd": WIDTH},
             {"n_inner": INTERMEDIATE, "layer_norm_epsilon": EPS, "activation_function": Key("str")}),
}
_LLAMA = ({"vocab_size": VOCAB, "max_position_embeddings": POSITIONS, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "hidden_size": WIDTH, "intermediate_size": INTERMEDIATE},
          {"num_key_value_heads": HEADS, "head_dim": Key("int", 1, limit="width"), "rms_norm_eps": EPS,
           "rope_theta": Key("number", 0, low_open=True), "sliding_window": _POS, "hidden_act": Key("str"),
           "rope_parameters": Key("object"), "rope_scaling": Key("object")})
FAMILIES.update({"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA})
_BERT = ({"vocab_size": VOCAB, "max_position_embeddings": POSITIONS, "num_hidden_layers": LAYERS,
          "num_attention_heads": HEADS, "hidden_size": WIDTH, "intermediate_size": INTERMEDIATE},
         {"type_vocab_size": Key("int", 0, 1024), "layer_norm_eps": EPS, "hidden_act": Key("str"),
          "position_embedding_type": Key("str"), "is_decoder": Key("bool"), "add_cross_attention": Key("bool"),
          "pad_token_id": Key("int", 0, limit="vocab")})
FAMILIES.update({"bert": _BERT, "roberta": _BERT})
# Keys every family may carry, checked when present and not null.
COMMON: dict[str, Key] = {"tie_word_embeddings": Key("bool"), "torch_dtype": Key("str"), "dtype": Key("str"),
                          "model_type": Key("str")}


def _where(folder: Any) -> str:
    return f"checkpoint {str(folder)!r}"


def read_json_object(path: Path, where: str) -> dict:
    """A JSON file that must hold an object; a CheckpointError naming the file otherwise."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: {path.name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: {path.name}: not valid JSON ({e.msg} at line {e.lineno}, "
                              f"column {e.colno})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: {path.name}: nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: {path.name}: expected a JSON object, got {type(data).__name__}")
    return data


def check_config(hf: Any, where: str) -> None:
    """config.json against its family's row of ``FAMILIES`` and ``LIMITS``."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: config.json: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type", "gpt2")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise CheckpointError(f"{where}: config.json: model_type {model_type!r} is not supported; supported: "
                              f"{', '.join(FAMILIES)}")
    required, optional = FAMILIES[model_type]
    for key, spec in required.items():
        if key not in hf:
            raise CheckpointError(f"{where}: config.json: {key}: required for model_type {model_type!r} "
                                  "but missing")
    for key, spec in {**COMMON, **optional, **required}.items():
        if key in hf and (hf[key] is not None or key in required):
            if problem := spec.problem(hf[key]):
                raise CheckpointError(f"{where}: config.json: {key}: {problem}")


# ----------------------------------------------------------------------------- weights


def safetensors_header(path: Path, where: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors file's header, its data never read; the
    header's offsets checked against the file's size and each tensor's byte count."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{where}: {path.name}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{where}: {path.name}: header length {n} exceeds the file "
                                  f"({size} bytes) or {MAX_HEADER_BYTES} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{where}: {path.name}: corrupt safetensors header (not a JSON object)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: {path.name}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in _DTYPE_BYTES \
            and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list) \
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                    for d in [*entry["shape"], *entry["data_offsets"]]) and len(entry["data_offsets"]) == 2
        if not ok:
            raise CheckpointError(f"{where}: {path.name}: tensor {name!r}: corrupt header entry")
        begin, end = entry["data_offsets"]
        if not begin <= end <= data_bytes or end - begin != math.prod(entry["shape"]) * _DTYPE_BYTES[entry["dtype"]]:
            raise CheckpointError(f"{where}: {path.name}: tensor {name!r}: data offsets {[begin, end]} do not fit "
                                  f"its shape {entry['shape']} or the file (truncated?)")
        out[name] = (entry["dtype"], tuple(entry["shape"]))
    return out


def _index_files(folder: Path, where: str) -> dict[str, str]:
    """tensor name -> file, from model.safetensors.index.json; every file inside the folder."""
    try:
        index = json.loads((folder / INDEX).read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CheckpointError(f"{where}: {INDEX}: weight_map: {e.args[0]!r} is listed more than once") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{where}: {INDEX}: not valid JSON ({str(e).splitlines()[0]})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{where}: {INDEX}: weight_map: expected an object of tensor name -> file")
    root = folder.resolve()
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(f"{where}: {INDEX}: weight_map.{name}: got {file!r}; expected a file name")
        target = (folder / file).resolve()
        if Path(file).is_absolute() or ".." in Path(file).parts or target.parent != root:
            raise CheckpointError(f"{where}: {INDEX}: weight_map.{name}: {file!r} is outside the checkpoint "
                                  "folder; entries must name files in it")
        if not target.is_file():
            raise CheckpointError(f"{where}: {INDEX}: weight_map.{name}: names {file!r}, which is missing")
    return weight_map


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


def stored_tensors(folder: Path) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """name -> (file, dtype, shape) of every stored tensor, each in exactly one file."""
    where = _where(folder)
    if (folder / SINGLE).is_file():
        return {n: (SINGLE, *v) for n, v in safetensors_header(folder / SINGLE, where).items()}
    if not (folder / INDEX).is_file():
        raise FileNotFoundError(f"{where}: no {SINGLE} or {INDEX} (pickled pytorch_model.bin is not loaded, "
                              "by design)")
    weight_map = _index_files(folder, where)
    out: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for file in sorted(set(weight_map.values())):
        for name, (dtype, shape) in safetensors_header(folder / file, where).items():
            if name in out:
                raise CheckpointError(f"{where}: {file}: tensor {name!r} is also in {out[name][0]}; each tensor "
                                      "must be in exactly one file")
            if weight_map.get(name) != file:
                raise CheckpointError(f"{where}: {file}: tensor {name!r} is not listed for this file in {INDEX} "
                                      f"(listed: {weight_map.get(name)!r})")
            out[name] = (file, dtype, shape)
    for name, file in weight_map.items():
        if name not in out:
            raise CheckpointError(f"{where}: {INDEX}: weight_map.{name}: not in {file}")
    return out


def free_bytes(device: Any) -> int:
    """Memory free for new tensors on ``device``: CUDA's free memory, else the host's available
    memory (Linux's MemAvailable; elsewhere the free pages; unknown: no limit)."""
    import os

    import torch

    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def check_folder(folder, *, dtype=None, device=None, memory: bool = True):
    """Check the checkpoint ``folder`` as the module says; returns (config.json, GPTConfig)."""
    import torch

    from workers.model import hf as hf_io

    folder = Path(folder)
    where = _where(folder)
    hf = hf_io.read_config(folder)
    cfg = hf_io.read_model_config(folder)  # config.json's table and limits checked there
    model_type = hf.get("model_type", "gpt2")
    expected = hf_io.expected_shapes(cfg, model_type)
    stored = stored_tensors(folder)
    dtypes = {d for _, d, _ in stored.values()}
    unsupported = sorted(dtypes - set(hf_io.SAFETENSORS_DTYPES))
    if unsupported and dtype is None:
        raise CheckpointError(f"{where}: weights stored as {unsupported[0]}; supported: "
                              f"{', '.join(hf_io.SAFETENSORS_DTYPES)} (or pass dtype=)")
    if memory and stored:  # before the shapes: a model that cannot fit is the first thing to say
        first = next(iter(stored.values()))[1]  # as load_model: the first tensor's dtype
        itemsize = (dtype or hf_io.SAFETENSORS_DTYPES[first]).itemsize
        need = itemsize * sum(math.prod(s) for n, s in expected.items()
                              if not (cfg.tie_embeddings and n == "lm_head.weight"))
        free = free_bytes(device)
        if need > free:
            raise CheckpointError(f"{where}: config.json: the parameters need {_gib(need)}, {_gib(free)} free "
                                  f"on {torch.device('cpu' if device is None else device)}")
    seen: set[str] = set()
    for name, (file, _, shape) in stored.items():
        key = hf_io.normalized_name(name, model_type)
        if key not in expected:
            if not hf_io.ignored_weight(key):
                raise CheckpointError(f"{where}: {file}: tensor {name!r} is not a weight of model_type "
                                      f"{model_type!r} with this config.json")
            continue
        if key in seen:
            raise CheckpointError(f"{where}: {file}: tensor {name!r} is stored twice (with and without a prefix)")
        seen.add(key)
        if shape != expected[key]:
            raise CheckpointError(f"{where}: {file}: tensor {name!r} has shape {list(shape)}; config.json implies "
                                  f"{list(expected[key])}")
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{where}: weights: {len(missing)} tensors missing, e.g. {missing[0]!r}")
    return hf, cfg
