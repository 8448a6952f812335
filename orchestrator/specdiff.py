"""What differs between two pipeline specs, as YAML paths with old -> new values (what
``orchestrator resume`` shows when the file changed since the run started). Values under
secret-looking keys, credentials in URIs and token-looking strings are shown as ``***``."""

from __future__ import annotations

import json
import re
from typing import Any

from .spec import redact

ABSENT = "(absent)"
# A key naming a secret (``hf_token``, ``api_key``, ``password``; not ``tokenizer`` or ``max_tokens``).
_SECRET_KEY = re.compile(r"(^|[_-])(secret|password|passwd|token|api[_-]?key|credentials?|private[_-]?key|auth)([_-]|$)",
                         re.IGNORECASE)
# Strings that are keys whatever field holds them: OpenAI/Anthropic, Hugging Face, GitHub, AWS access keys.
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_-]{12,}|hf_[A-Za-z0-9]{12,}|gh[pousr]_[A-Za-z0-9]{12,}|AKIA[A-Z0-9]{12,})")
_MAX = 80


def diff(old: Any, new: Any, path: str = "") -> list[str]:
    """``path: old -> new`` for every leaf that differs (mappings compared key by key, lists
    item by item), in the order of ``old`` then the keys only ``new`` has."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in [*old, *(k for k in new if k not in old)]:
            out += diff(old.get(k, _Absent), new.get(k, _Absent), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [line for i, (a, b) in enumerate(zip(old, new)) for line in diff(a, b, f"{path}[{i}]")]
    if old == new and type(old) is type(new):
        return []
    secret = any(_SECRET_KEY.search(part) for part in re.split(r"[.\[\]]", path))
    return [f"{path}: {_show(old, secret)} -> {_show(new, secret)}"]


class _Absent:
    pass


def _show(v: Any, secret: bool) -> str:
    if v is _Absent:
        return ABSENT
    if secret:
        return "***"
    text = redact(json.dumps(v, default=str, ensure_ascii=False))
    text = _SECRET_VALUE.sub("***", text)
    return text if len(text) <= _MAX else text[:_MAX - 3] + "..."
