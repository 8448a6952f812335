"""Independent checks of completions: functions of (prompt, completion) that no stage trained
against, so they can tell a policy that learned from one that learned to please its judge.

A check returns a float per completion; ``evaluate`` logs the mean for each model. Built in:

- ``python_syntax`` (1 good, 0 bad): the prompt (a ``def`` line and docstring) plus the
  completion parses as Python, and the completion adds at least one real statement to the
  prompt's function; a blank body, a docstring, ``pass`` or ``...`` alone do not count. A
  completion that ended by length (``max_tokens`` cut it, finish reason "length") is judged
  without its unfinished last line; one that ended itself (EOS, a stop) is judged whole.
- ``degeneracy`` (0 good, 1 bad): the share of the completion's tokens that repeat an n-gram
  seen earlier in it (``self._._._._.`` is nearly all repeats); an empty completion is 1.

A user's check is ``module:function(prompt, completion) -> float``, higher is better. A
built-in check may also take the completion's finish reason (``Check.takes_finish``): callers
pass ``finish_reasons`` ("stop" | "length") beside the texts, and a user's check never sees them.

This module is the check registry; it imports only ``workers.rl.functions`` (user functions), so
``workers.rl.ranking`` (reward sources with check terms) sits above it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from workers.rl.functions import resolve_function

__all__ = ["Check", "BUILTIN_CHECKS", "resolve_check", "python_syntax", "degeneracy"]


@dataclass(frozen=True)
class Check:
    name: str                                  # metric names: check_<name>, baseline_check_<name>
    fn: Callable[..., float]
    higher_is_better: bool = True
    takes_finish: bool = False                 # fn(prompt, completion, finish_reason)

    def __call__(self, prompts: list[str], completions: list[str],
                 finish_reasons: Sequence[str | None] | None = None) -> list[float]:
        """One value per completion; ``finish_reasons`` (None: unknown, judged as ended by itself)."""
        reasons = list(finish_reasons) if finish_reasons is not None else [None] * len(completions)
        out = []
        for p, c, r in zip(prompts, completions, reasons):
            v = self.fn(p, c, r) if self.takes_finish else self.fn(p, c)
            if isinstance(v, bool):
                v = float(v)
            if not isinstance(v, (int, float)):
                raise TypeError(f"check {self.name!r} returned {v!r} ({type(v).__name__}); it must return a float")
            out.append(float(v))
        return out


def _is_filler(stmt: ast.stmt) -> bool:
    """A statement that adds nothing: pass, ..., or a bare constant (a docstring)."""
    return isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))


def _parses_with_body(source: str) -> bool:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    fn = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    return fn is not None and any(not _is_filler(s) for s in fn.body)


def python_syntax(prompt: str, completion: str, finish_reason: str | None = None) -> float:
    if _parses_with_body(prompt + completion):
        return 1.0
    if finish_reason != "length":  # it ended itself: a junk last line is its own
        return 0.0
    head, sep, _ = completion.rpartition("\n")  # cut by max_tokens: drop the unfinished line
    return float(bool(sep) and _parses_with_body(prompt + head + "\n"))


_TOKEN = re.compile(r"\w+|[^\w\s]")


def degeneracy(prompt: str, completion: str, n: int = 4) -> float:
    tokens = _TOKEN.findall(completion)
    if not tokens:
        return 1.0
    seen: set[tuple[str, ...]] = set()
    repeated = [False] * len(tokens)
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            repeated[i:i + n] = [True] * n
        seen.add(gram)
    return sum(repeated) / len(tokens)


BUILTIN_CHECKS = {"python_syntax": Check("python_syntax", python_syntax, takes_finish=True),
                  "degeneracy": Check("degeneracy", degeneracy, higher_is_better=False)}


def resolve_check(ref: str, field: str = "checks") -> Check:
    """A built-in check by name, or a user's ``module:function`` (its name is the function's)."""
    if ref in BUILTIN_CHECKS:
        return BUILTIN_CHECKS[ref]
    if ":" not in ref:
        raise ValueError(f"{field}: got {ref!r}; allowed: {', '.join(BUILTIN_CHECKS)} or module:function")
    try:
        fn = resolve_function(ref)
    except Exception as e:  # noqa: BLE001 - the user's module: report why it failed
        raise ValueError(f"{field}: cannot import {ref!r}: {type(e).__name__}: {e}") from None
    return Check(ref.partition(":")[2], fn)
