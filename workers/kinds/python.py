"""The ``python`` stage kind: call a user function ``module:function(ctx, **params)``."""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable

from pydantic import ConfigDict, Field, field_validator

from workers.config import StrictConfig
from workers.cpu import normal_priority
from workers.stage import StageContext


class Config(StrictConfig):
    model_config = ConfigDict(extra="forbid")

    entrypoint: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                            description="The function to call, as module:function; it gets (ctx, **params) "
                                        "and returns a JSON-serialisable dict of outputs.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the function.")
    inputs: list[str] = Field(default_factory=list,
                              description="More files, folders, globs or storage URIs the function reads that no "
                                          "config string names (paths built in code): their contents join the cache "
                                          "key. Paths named in params are inputs already.")
    untracked: list[str] = Field(default_factory=list,
                                 description="Keys under config (e.g. params.log_dir) whose paths are not inputs: "
                                             "folders or files the function only writes to or signals through. "
                                             "Their contents stay out of the cache key (the values stay in).")
    env: list[str] = Field(default_factory=list,
                           description="Environment variables the function reads: their values (as the driver "
                                       "sees them; hashed, never stored) join the cache key. Other variables "
                                       "are not part of it.")

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: list[str]) -> list[str]:
        bad = [n for n in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
        if bad:
            raise ValueError(f"not an environment variable name: {bad[0]!r} (letters, digits and _, "
                             "not starting with a digit)")
        return v


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


def inputs(config: Config) -> list[str]:
    """Inputs the params cannot show (kept in the key even while missing)."""
    return config.inputs


def env(config: Config) -> list[str]:
    return config.env


def untracked(config: Config) -> list[str]:
    return config.untracked


def run(ctx: StageContext, config: Config) -> dict[str, Any]:
    normal_priority()  # the user's function computes here, in a Ray worker (niceness 15)
    out = resolve(config.entrypoint)(ctx, **config.params)
    return {} if out is None else out
