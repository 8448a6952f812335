"""The base of every model that validates what a user wrote (each stage kind's config and its
parts; ``orchestrator.spec``'s pipeline file builds on it too): unknown fields refused, and every
number finite and bounded, so ``.inf``, ``.nan`` or ``1e300`` is an error naming the field, not a
stage that retries forever or a tensor sized from it. A field's own ``ge``/``le`` narrow the range
further; ``MAX_MAGNITUDE`` is the bound every number has when its field gives none.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["StrictConfig", "MAX_MAGNITUDE"]

MAX_MAGNITUDE = 1e12
"""No count, size, rate or duration of ours is this large (a trillion steps, tokens or seconds)."""


def _bounded(value: Any) -> Any:
    """``value`` if it is no number, or a list of numbers, past ``MAX_MAGNITUDE`` (a free-form
    mapping, as a python stage's ``params``, is the user's own)."""
    if isinstance(value, (list, tuple)):
        for v in value:
            _bounded(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_MAGNITUDE:
        raise ValueError(f"must be at most {MAX_MAGNITUDE:g} in magnitude")
    return value


class StrictConfig(BaseModel):
    """Unknown fields refused; numbers finite (``allow_inf_nan=False``) and within ``MAX_MAGNITUDE``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _numbers_bounded(cls, value: Any) -> Any:
        return _bounded(value) if not isinstance(value, BaseModel) else value
