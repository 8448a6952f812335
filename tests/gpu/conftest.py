"""GPU tests: every test under tests/gpu is marked ``gpu`` and skipped where CUDA is absent.

Each is a thin device switch of a CPU test elsewhere in tests/ (named in its docstring): the
same code path, on ``cuda``, with the GPU-only branches on (bf16 autocast, NCCL, FSDP mixed
precision and CPU offload, CUDA memory metrics). Run them on a GPU machine with
``python -m pytest tests/gpu -q -p no:cacheprovider``.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    here = str(config.rootpath / "tests" / "gpu")
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
