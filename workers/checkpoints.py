"""One checkpoint concept: open any checkpoint, ours or one `transformers` wrote, local or stored.

A checkpoint is a folder in the Hugging Face layout::

    config.json                   the architecture (model_type ...) + eos/bos ids; ours add
                                  ``prompt_template`` and, for a reward model, ``reward_model: true``
    model.safetensors             or shards + model.safetensors.index.json (weights; never pickles)
    tokenizer.json                the `tokenizers` tokenizer (added tokens included)
    tokenizer_config.json         special tokens (bos/eos/pad/unk), added_tokens_decoder, maybe
                                  ``chat_template`` (older transformers put it here)
    chat_template.jinja           the chat template, where transformers 5 writes it (wins over the above)
    generation_config.json        eos id(s) that end a generation, sampling defaults
    reward_head.safetensors       reward models only (``workers.model.reward_head``)

``open_checkpoint(uri)`` reads all of it and returns a :class:`Checkpoint`: model, tokenizer,
chat template, special tokens, stop ids and generation defaults. A storage URI (``s3://...``) is
downloaded into a temporary folder that is removed before it returns (everything is loaded by
then), or into ``cache_dir`` when the caller wants to keep and reuse the files.

``Checkpoint.write_tokenizer(folder)`` writes the tokenizer side (tokenizer.json,
tokenizer_config.json, chat_template.jinja, generation_config.json) the way transformers 5
does, so every checkpoint a stage derives from this one loads in ``AutoTokenizer`` with its chat
template. This is shared code above the model: the model package stays free of storage.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workers import storage

__all__ = ["Checkpoint", "GenerationDefaults", "open_checkpoint", "check_checkpoint", "local_folder", "context_length",
           "write_tokenizer_files", "copy_model_files", "cast_model_files", "MODEL_FILES", "TRAINING_FILES"]

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
MODEL_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json")
"""What a model writer puts in a folder (weights and architecture); copied when publishing."""
TRAINING_FILES = ("optimizer.pt", "trainer_state.json", "state.json", "lora_adapter.safetensors")
"""Resume state a training checkpoint holds beside the model; never part of a published one."""
CARRIED_CONFIG = ("eos_token_id", "bos_token_id", "pad_token_id", "prompt_template")
"""config.json keys a derived checkpoint inherits (the architecture is rewritten by the model writer)."""


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults from generation_config.json (None: not set there)."""

    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None

    @classmethod
    def from_dict(cls, gen: dict) -> "GenerationDefaults":
        return cls(**{k: gen.get(k) for k in cls.__dataclass_fields__})

    def sampling_kwargs(self) -> dict[str, Any]:
        """The set defaults as ``workers.model.sampling.SamplingParams`` fields (do_sample=false: greedy)."""
        out: dict[str, Any] = {}
        if self.do_sample is False:
            out["temperature"] = 0.0
        elif self.temperature is not None:
            out["temperature"] = float(self.temperature)
        for ours, theirs in (("top_k", "top_k"), ("top_p", "top_p"), ("repetition_penalty", "repetition_penalty"),
                             ("max_tokens", "max_new_tokens")):
            if getattr(self, theirs) is not None:
                out[ours] = getattr(self, theirs)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Checkpoint:
    """An opened checkpoint. ``model`` is None when opened with ``load=None``."""

    uri: str
    """Where it was opened from (path or storage URI)."""
    name: str
    """The folder's name (the default model id when served)."""
    config: dict
    """config.json as stored."""
    model: Any
    """The model (``workers.model``), or a ``RewardModel`` with ``load="reward"``, or None."""
    tokenizer: Any
    """A ``tokenizers.Tokenizer`` (from tokenizer.json)."""
    tokenizer_config: dict
    """tokenizer_config.json as stored ({} when absent)."""
    chat_template: str | None
    """Jinja chat template: chat_template.jinja, else tokenizer_config.json, else config.json (older ours)."""
    prompt_template: str | None
    """Our ``{prompt}`` format string for plain prompts (config.json), if any."""
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    """The primary end-of-text id (the one written after a training example)."""
    stop_token_ids: tuple[int, ...]
    """Every id that ends a generation (config.json, generation_config.json, tokenizer's eos)."""
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    context: int = 0
    """Longest sequence the model takes (n_positions / max_position_embeddings)."""
    created: int = 0
    """Unix time the checkpoint was written (its config.json's mtime; 0 if unknown)."""
    local_dir: Path | None = None
    """The local folder, when it outlives the call (a local checkpoint, or ``cache_dir``)."""
    tokenizer_json: str = ""

    @property
    def is_reward_model(self) -> bool:
        return bool(self.config.get("reward_model"))

    @property
    def stored_dtype(self) -> str | None:
        """The weights' dtype as config.json names it ("bfloat16", "float32", ...), if it does."""
        return self.config.get("dtype") or self.config.get("torch_dtype")

    def carried_config(self) -> dict[str, Any]:
        """config.json keys a checkpoint derived from this one keeps (ids, prompt template)."""
        out = {k: self.config[k] for k in CARRIED_CONFIG if self.config.get(k) is not None}
        if self.eos_token_id is not None:
            out.setdefault("eos_token_id", self.eos_token_id)
        if self.bos_token_id is not None:
            out.setdefault("bos_token_id", self.bos_token_id)
        return out

    def format_prompt(self, prompt: str) -> str:
        """The text this checkpoint expects before its answer to a plain prompt, as `finetune` and
        `reward` train it (``prompt_template``, else the chat template); a checkpoint with neither
        (pretrained only) gets the bare prompt."""
        if self.prompt_template is None and self.chat_template is None:
            return prompt
        from workers.data.records import format_prompt
        return format_prompt(prompt, prompt_template=self.prompt_template, chat_template=self.chat_template,
                             eos_token=self.eos_token or "")

    def write_tokenizer(self, folder: str | Path, *, chat_template: str | None = None) -> None:
        """Write this checkpoint's tokenizer side into ``folder`` (``chat_template`` replaces its own)."""
        write_tokenizer_files(folder, self.tokenizer_json, tokenizer_config=self.tokenizer_config,
                              chat_template=chat_template or self.chat_template, bos_token=self.bos_token,
                              eos_token=self.eos_token, pad_token=self.pad_token)
        gen = {**self.generation.to_dict(), "eos_token_id": list(self.stop_token_ids) or None,
               "bos_token_id": self.bos_token_id, "pad_token_id": self._pad_id()}
        storage.write_json(str(Path(folder) / GENERATION_CONFIG), {k: v for k, v in gen.items() if v is not None})

    def _pad_id(self) -> int | None:
        return self.tokenizer.token_to_id(self.pad_token) if self.pad_token else None


# ----------------------------------------------------------------------------- reading


@contextlib.contextmanager
def local_folder(uri: str, cache_dir: str | Path | None = None) -> Iterator[Path]:
    """A local folder holding the checkpoint at ``uri``: the folder itself when local; else a
    download into ``cache_dir`` (kept, reused when already there) or into a temporary folder
    removed when the block ends."""
    if storage.is_local(uri):
        yield Path(storage.resolve(uri)[1])
        return
    if cache_dir is not None:
        dest = Path(cache_dir)
        if not (dest / CONFIG).is_file():
            storage.download_dir(uri, dest)
        yield dest
        return
    tmp = Path(tempfile.mkdtemp(prefix="checkpoint-"))
    try:
        yield storage.download_dir(uri, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(*values: Any) -> list[int]:
    out: list[int] = []
    for v in values:
        for i in (v if isinstance(v, list) else [v]):
            if isinstance(i, int) and not isinstance(i, bool) and i not in out:
                out.append(i)
    return out


def _chat_template(local: Path, tok_cfg: dict, config: dict) -> str | None:
    if (local / CHAT_TEMPLATE_FILE).is_file():
        return (local / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # several named templates: [{"name", "template"}]; the default one
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else config.get("chat_template")


def context_length(config: dict) -> int:
    """The longest sequence a model of this config.json takes (0 if it does not say)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return 0


def _read_json(path: Path, field_name: str, uri: str) -> dict:
    from workers.model.hf_check import read_json_object

    return read_json_object(path, f"{field_name} {uri!r}")


def _read_tokenizer(text: str, field_name: str, uri: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for any bad file
        from workers.model.hf_check import CheckpointError

        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{field_name} {uri!r}: {TOKENIZER}: not a tokenizer the `tokenizers` library "
                              f"reads ({why})") from None


def _check_side(config: dict, tok_cfg: dict, template: Any, field_name: str, uri: str) -> None:
    """The tokenizer side's fields that are used as given: a wrong type is one line, not a traceback later."""
    from workers.model.hf_check import CheckpointError

    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{field_name} {uri!r}: chat_template: expected a string, got {type(template).__name__}")
    for key in ("bos_token", "eos_token", "pad_token"):
        v = tok_cfg.get(key)
        if v is not None and not isinstance(v, (str, dict)):
            raise CheckpointError(f"{field_name} {uri!r}: {TOKENIZER_CONFIG}: {key}: got {v!r}; expected a string")
    if config.get("prompt_template") is not None and not isinstance(config["prompt_template"], str):
        raise CheckpointError(f"{field_name} {uri!r}: {CONFIG}: prompt_template: expected a string")


def check_checkpoint(uri: str | Path, *, device=None, memory: bool = True, field: str = "checkpoint") -> None:
    """Everything ``open_checkpoint`` checks, and the weights' headers, shapes and size against
    free memory on ``device`` (``workers.model.hf_check``), with nothing loaded: a caller about to
    start a cluster or a server fails first, in one line. A remote checkpoint is not downloaded
    for this: it is checked the same way where it is loaded."""
    uri = str(uri)
    if storage.is_local(uri):
        from workers.model.hf_check import check_folder

        open_checkpoint(uri, load=None, field=field)
        check_folder(Path(storage.resolve(uri)[1]), device=device, memory=memory)


def _load_model(local: Path, config: dict, *, load: str, device, dtype):
    from workers.model.hf import load_model
    from workers.model.reward_head import RewardModel, load_reward_model

    if load == "reward" and config.get("reward_model"):
        model = load_reward_model(local, map_location=device)
        return model.to(dtype) if dtype is not None else model
    model = load_model(local, dtype=dtype, device=device)  # memory-mapped, straight into its dtype
    if load == "reward":
        model = RewardModel.from_gpt(model).to(device=device, dtype=next(model.parameters()).dtype)
    return model


def open_checkpoint(uri: str | Path, *, load: Literal["lm", "reward"] | None = "lm", device=None, dtype=None,
                    cache_dir: str | Path | None = None, field: str = "checkpoint") -> Checkpoint:
    """Open the checkpoint folder at ``uri`` (local path or storage URI).

    ``load``: "lm" the language model; "reward" a ``RewardModel`` (its trained head when the folder
    is a reward model, else a fresh head on the trunk); None only the tokenizer side and configs.
    ``device``: where the model goes (default: CUDA when present); ``dtype``: cast to it (default:
    as stored). ``cache_dir``: keep a remote checkpoint's download there. Errors name ``field``.
    """
    from workers.data import tokenizer as toks

    uri = str(uri)
    if storage.is_local(uri):  # absolute: workers (Ray Train, actors) open it from other folders
        uri = storage.resolve(uri)[1]
    if not storage.exists(storage.join(uri, CONFIG)):
        raise ValueError(f"{field}: got {uri!r}; no config.json there (expected a checkpoint folder: config.json, "
                         "safetensors weights, tokenizer.json)")
    with local_folder(uri, cache_dir) as local:
        if not (local / TOKENIZER).is_file():
            raise ValueError(f"{field}: {uri!r} has no tokenizer.json (a checkpoint carries its tokenizer in the "
                             "Hugging Face layout)")
        config = _read_json(local / CONFIG, field, uri)
        tok_cfg = _read_json(local / TOKENIZER_CONFIG, field, uri) if (local / TOKENIZER_CONFIG).is_file() else {}
        gen = _read_json(local / GENERATION_CONFIG, field, uri) if (local / GENERATION_CONFIG).is_file() else {}
        try:
            tokenizer_json = (local / TOKENIZER).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            from workers.model.hf_check import CheckpointError

            raise CheckpointError(f"{field} {uri!r}: {TOKENIZER}: not UTF-8 text (byte {e.start})") from None
        tokenizer = _read_tokenizer(tokenizer_json, field, uri)  # before the model: a bad file costs nothing
        template = _chat_template(local, tok_cfg, config)
        _check_side(config, tok_cfg, template, field, uri)
        model = None
        if load is not None:
            if device is None:
                from workers.model.transformer import default_device
                device = default_device()
            model = _load_model(local, config, load=load, device=device, dtype=dtype).eval()
        created = int((local / CONFIG).stat().st_mtime)
        kept = local if (storage.is_local(uri) or cache_dir is not None) else None

    bos, eos, pad = (_token_str(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token"))

    def tid(token: str | None) -> int | None:
        return tokenizer.token_to_id(token) if token else None

    stops = _ids(config.get("eos_token_id"), gen.get("eos_token_id"), tid(eos))
    if not stops and tokenizer.token_to_id(toks.EOS_TOKEN) is not None:  # our tokenizers' end-of-text
        stops = [tokenizer.token_to_id(toks.EOS_TOKEN)]
    eos_id = stops[0] if stops else None
    if eos is None and eos_id is not None:
        eos = tokenizer.id_to_token(eos_id)
    bos_ids = _ids(config.get("bos_token_id"), gen.get("bos_token_id"), tid(bos))
    return Checkpoint(
        uri=uri, name=Path(uri.rstrip("/")).name or "model", config=config, model=model, tokenizer=tokenizer,
        tokenizer_config=tok_cfg, chat_template=template, prompt_template=config.get("prompt_template"),
        bos_token=bos, eos_token=eos, pad_token=pad, bos_token_id=bos_ids[0] if bos_ids else None,
        eos_token_id=eos_id, stop_token_ids=tuple(stops), generation=GenerationDefaults.from_dict(gen),
        context=context_length(config), created=created, local_dir=kept, tokenizer_json=tokenizer_json)


# ----------------------------------------------------------------------------- writing


def write_tokenizer_files(folder: str | Path, tokenizer_json: str, *, tokenizer_config: dict | None = None,
                          chat_template: str | None = None, bos_token: str | None = None,
                          eos_token: str | None = None, pad_token: str | None = None) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja as transformers 5 writes them
    (the template in its own file, not in tokenizer_config.json). ``tokenizer_config`` is the
    base (kept keys: added tokens, model_max_length ...); the given special tokens replace its."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in (tokenizer_config or {}).items() if k != "chat_template"}
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    cfg.setdefault("clean_up_tokenization_spaces", False)
    for key, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
        if token is not None:
            cfg[key] = token
    storage.write_bytes(str(folder / TOKENIZER), tokenizer_json.encode())
    storage.write_json(str(folder / TOKENIZER_CONFIG), cfg)
    template = folder / CHAT_TEMPLATE_FILE
    if chat_template is not None:
        storage.write_bytes(str(template), chat_template.encode())
    elif template.exists():
        template.unlink()


def cast_model_files(folder: str | Path, dtype: str) -> None:
    """Rewrite a (non-reward) model folder's weights in ``dtype`` ("bfloat16", ...), its other
    config.json keys kept: a stage trains in fp32 and publishes in its base's stored dtype."""
    import torch

    from workers.model.hf import load_model, save_model

    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text())
    if config.get("reward_model") or (config.get("dtype") or config.get("torch_dtype")) == dtype:
        return
    save_model(load_model(folder, dtype=getattr(torch, dtype)), folder, extra=config)


def copy_model_files(src: str | Path, dest: str | Path) -> None:
    """Copy the model files (config.json, safetensors weights and index) of a training checkpoint
    folder into ``dest``, leaving its resume state (optimizer, trainer state, raw adapters) behind."""
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in TRAINING_FILES and any(p.match(g) for g in MODEL_FILES):
            shutil.copy2(p, dest / p.name)
