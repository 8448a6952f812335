"""The ``python`` stage kind: call a user function ``module:function(ctx, **params)``."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from pydantic import ConfigDict, Field

from workers.config import StrictConfig
from workers.cpu import normal_priority
from workers.stage import StageContext


class Config(StrictConfig):
    model_config = ConfigDict(extra="forbid")

    entrypoint: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                            description="The function to call, as module:function; it gets (ctx, **params) "
                                        "and returns a JSON-serialisable dict of outputs.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the function.")


def resolve(entrypoint: str) -> Callable[..., Any]:
    module_name, _, func_name = entrypoint.partition(":")
    module = importlib.import_module(module_name)
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise AttributeError(f"module {module_name!r} has no function {func_name!r}")
    return fn


def check(config: Config) -> None:
    """Fail at validation time, not mid-run, when the entrypoint cannot be imported."""
    try:
        resolve(config.entrypoint)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to see
        raise ValueError(f"entrypoint: cannot import {config.entrypoint!r}: {type(e).__name__}: {e}") from None


def modules(config: Config) -> list[str]:
    """The user's module: it and the local modules it imports join the fingerprint."""
    return [config.entrypoint.partition(":")[0]]


def run(ctx: StageContext, config: Config) -> dict[str, Any]:
    normal_priority()  # the user's function computes here, in a Ray worker (niceness 15)
    out = resolve(config.entrypoint)(ctx, **config.params)
    return {} if out is None else out
