"""User functions named ``module:function``: import them, and find where their modules live (so
that Ray actors import them too). The bottom of ``workers.rl``: ``checks`` (the check registry)
and ``ranking`` (reward sources) both import it, and it imports neither."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

__all__ = ["ENTRYPOINT", "resolve_function", "import_root"]

ENTRYPOINT = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


def resolve_function(entrypoint: str) -> Callable:
    module_name, _, fn_name = entrypoint.partition(":")
    fn = getattr(importlib.import_module(module_name), fn_name, None)
    if not callable(fn):
        raise AttributeError(f"module {module_name!r} has no function {fn_name!r}")
    return fn


def import_root(module_name: str) -> str | None:
    """The sys.path entry the module was found under (so actors can import it too)."""
    spec = importlib.util.find_spec(module_name)
    origin = getattr(spec, "origin", None)
    if not origin or not os.path.isfile(origin):
        return None
    path = Path(origin)
    depth = module_name.count(".") + (1 if path.name == "__init__.py" else 0)
    return str(path.parents[depth])
