"""Stage kinds and the code they share, in folders that read as the architecture:

- ``kinds/``     one module per stage kind (``KINDS`` below); the contract is ``stage.py``
- ``training/``  the training loop every training kind runs on Ray Train workers, the shared
                 optimizer knobs and parameter groups (``params``), and what the kinds that train
                 on records share (``supervised``)
- ``rl/``        rollout and reward-ranking actor pools
- ``serving/``   the OpenAI protocol, the serving engine and HTTP app
- ``data/``      corpus, tokenizers, token shards, prompt/response records, chat templates
- ``model/``     the model (plain PyTorch, at the ground): transformer, sampling, LoRA, reward head
- ``checkpoints.py`` the one checkpoint concept: ``open_checkpoint`` opens ours or a Hugging Face
                 folder, local or stored (model, tokenizer, chat template, stop ids, generation
                 defaults); ``stage.StageContext.upstream`` is how a kind takes an upstream's output
- ``storage.py`` local paths and object stores behind one interface

Dependencies run one way: kinds -> training/rl/serving -> checkpoints -> data -> model; nothing
here imports ``orchestrator``, and no kind imports another kind.

``KINDS`` maps a stage ``kind`` to the module implementing it (see ``workers.stage`` for the
contract). Modules are imported lazily, so validating a pipeline does not import torch or Ray.
"""

from __future__ import annotations

import importlib
from types import ModuleType

KINDS: dict[str, str] = {
    "python": "workers.kinds.python",
    "tokenize": "workers.kinds.tokenize",
    "pretrain": "workers.kinds.pretrain",
    "finetune": "workers.kinds.finetune",
    "reward": "workers.kinds.reward",
    "serve": "workers.kinds.serve",
    "rlhf": "workers.kinds.rlhf",
    "evaluate": "workers.kinds.evaluate",
}


def load_kind(kind: str) -> ModuleType:
    """The module implementing stage kind ``kind`` (KeyError if unknown)."""
    return importlib.import_module(KINDS[kind])


__all__ = ["KINDS", "load_kind"]
