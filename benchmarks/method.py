"""The measuring method every benchmark here shares.

- Ours and the reference run on the same work in the same process run, **interleaved**: each
  round runs every contender once, in alternating order (A B, B A, ...), so a drift in the
  machine's load hits both sides alike.
- Warm-up rounds first (discarded), then ``>= 5`` measured rounds; a benchmark reports the
  **median and the spread** (min..max) of each contender and the median of the per-round
  ratios against the reference. Never the best run.
- The **load average** is recorded before and after; a warning is printed when the machine was
  not idle, because then the figures measure contention more than code.

Use::

    from benchmarks import method

    with method.Load(uses_cpus=2) as load:
        runs = method.interleave({"plain": run_plain, "stage": run_stage}, repeats=5, warmup=1)
    method.print_table(runs, reference="plain", unit="ms/step", lower_is_better=True)
    print(load.line())

Each contender is a callable taking no argument and returning one figure of its run (seconds,
ms per step, tokens/s: the caller decides, ``print_table`` is told the unit and direction).
"""

from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

__all__ = ["Summary", "summarize", "interleave", "ratios", "print_table", "Load", "MIN_REPEATS"]

MIN_REPEATS = 5
IDLE_LOAD = 0.5
"""A 1-minute load average above this before a run means the machine was not idle."""


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    n: int

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative width of what was seen."""
        return (self.high - self.low) / self.median if self.median else float("nan")

    def __str__(self) -> str:
        return f"{self.median:,.4g} [{self.low:,.4g}..{self.high:,.4g}] (n={self.n}, spread {self.spread:.0%})"


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("summarize: no values")
    return Summary(statistics.median(values), min(values), max(values), len(values))


def interleave(contenders: Mapping[str, Callable[[], float]], repeats: int = MIN_REPEATS, warmup: int = 1,
               *, verbose: bool = True) -> dict[str, list[float]]:
    """Run ``warmup`` then ``repeats`` rounds; each round calls every contender once, the order
    reversed every other round. Returns the measured figures per contender, in round order."""
    if repeats < MIN_REPEATS:
        print(f"WARNING: {repeats} repeats; the method asks for >= {MIN_REPEATS} (a quick check, not a figure)",
              file=sys.stderr)
    names = list(contenders)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            value = contenders[name]()
            if r >= warmup:
                out[name].append(value)
            if verbose:
                tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{repeats}"
                print(f"  [{tag}] {name}: {value:,.4g}", flush=True)
    return out


def ratios(runs: Mapping[str, Sequence[float]], name: str, reference: str, lower_is_better: bool) -> list[float]:
    """Per-round speed of ``name`` relative to ``reference`` (> 1: ``name`` is faster)."""
    pairs = zip(runs[name], runs[reference])
    return [(ref / x if lower_is_better else x / ref) for x, ref in pairs]


def print_table(runs: Mapping[str, Sequence[float]], *, reference: str, unit: str, lower_is_better: bool,
                title: str = "") -> dict[str, Summary]:
    """Median [min..max] per contender and the median of its per-round ratios to ``reference``."""
    if title:
        print(title)
    width = max(len(n) for n in runs) + 2
    print(f"{'contender':{width}} {'median ' + unit:>18} {'min..max':>23} {'vs ' + reference + ' (median of rounds)':>34}")
    out = {}
    for name, values in runs.items():
        s = out[name] = summarize(values)
        if name == reference:
            rel = "1.00x (reference)"
        else:
            q = summarize(ratios(runs, name, reference, lower_is_better))
            rel = f"{q.median:.3f}x [{q.low:.3f}..{q.high:.3f}]"
        print(f"{name:{width}} {s.median:18,.4g} {f'{s.low:,.4g}..{s.high:,.4g}':>23} {rel:>34}")
    return out


class Load:
    """Records the load average around a measurement and says whether the machine was idle.

    ``uses_cpus``: how many cores the benchmark itself keeps busy, which the load after the run
    includes (so it is not counted as foreign load)."""

    def __init__(self, uses_cpus: float = 1) -> None:
        self.uses_cpus = uses_cpus
        self.before: tuple[float, float, float] | None = None
        self.after: tuple[float, float, float] | None = None

    def __enter__(self) -> "Load":
        self.before = os.getloadavg()
        print(f"load average before: {self.before[0]:.2f} {self.before[1]:.2f} {self.before[2]:.2f} "
              f"({os.cpu_count()} CPUs)", flush=True)
        if self.before[0] > IDLE_LOAD:
            print(f"WARNING: the machine is not idle (1-minute load {self.before[0]:.2f} > {IDLE_LOAD}): "
                  "the figures will measure contention as much as code; re-run on an idle machine", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.after = os.getloadavg()
        print(self.line(), flush=True)
        if not self.idle:
            print(f"WARNING: not an idle-machine figure (load {self.before[0]:.2f} before, {self.after[0]:.2f} "
                  f"after; this benchmark alone accounts for ~{self.uses_cpus:g})", flush=True)

    @property
    def idle(self) -> bool:
        assert self.before is not None and self.after is not None
        return self.before[0] <= IDLE_LOAD and self.after[0] <= self.uses_cpus + IDLE_LOAD + 0.5

    def line(self) -> str:
        b, a = self.before or (float("nan"),) * 3, self.after or (float("nan"),) * 3
        return f"load average (1 min) before {b[0]:.2f}, after {a[0]:.2f}; {os.cpu_count()} CPUs"
