"""Stage kinds and the model code they share.

``KINDS`` maps a stage ``kind`` to the module implementing it (see ``workers.stage`` for the
contract). Modules are imported lazily, so validating a pipeline does not import torch or Ray.
"""

from __future__ import annotations

import importlib
from types import ModuleType

KINDS: dict[str, str] = {
    "python": "workers.python",
    "tokenize": "workers.tokenize",
    "pretrain": "workers.pretrain",
    "finetune": "workers.finetune",
    "reward": "workers.reward",
    "serve": "workers.serve",
    "rlhf": "workers.rlhf",
    "evaluate": "workers.evaluate",
}


def load_kind(kind: str) -> ModuleType:
    """The module implementing stage kind ``kind`` (KeyError if unknown)."""
    return importlib.import_module(KINDS[kind])


__all__ = ["KINDS", "load_kind"]
