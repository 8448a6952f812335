"""What the user sees in the terminal: a live table of stages, or one line per transition
when output is not a terminal (CI logs, pipes)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .state import RunRecord, StageRecord

STYLE = {"RUNNING": "cyan", "RETRYING": "yellow", "SUCCEEDED": "green", "CACHED": "green", "FAILED": "bold red",
         "SKIPPED": "dim", "CANCELLED": "magenta", "PENDING": "dim"}


def _progress(rec: StageRecord) -> str:
    p = rec.progress
    if not p:
        return ""
    done, total, unit = p.get("done"), p.get("total"), p.get("unit", "")
    parts = []
    if done is not None:
        parts.append(f"{done:,.0f}/{total:,.0f} {unit} ({100 * done / total:.0f}%)" if total else f"{done:,.0f} {unit}")
    if not rec.state.terminal:  # a finished stage's result column says the rest
        parts += [f"{k} {v:.4g}" for k, v in (p.get("metrics") or {}).items()]
        if p.get("checkpoint") is not None:
            parts.append(f"checkpoint @ {p['checkpoint']:,}")
    return ", ".join(parts)


# Outputs worth a glance in the summary, in the order shown.
HEADLINE = (("final_val_loss", "val loss"), ("final_train_loss", "loss"), ("accuracy", "accuracy"),
            ("mean_reward_end", "reward"), ("kl", "KL"), ("perplexity", "ppl"), ("win_rate", "win rate"),
            ("mean_reward", "reward"), ("train_tokens", "tokens"), ("endpoint", "endpoint"))


def headline(rec: StageRecord) -> str:
    out = rec.outputs or {}
    parts = []
    for key, label in HEADLINE:
        v = out.get(key)
        if isinstance(v, float):
            parts.append(f"{label} {v:.4g}")
        elif isinstance(v, (int, str)) and not isinstance(v, bool):
            parts.append(f"{label} {v:,}" if isinstance(v, int) else f"{label} {v}")
    return ", ".join(parts[:3])


def stage_table(record: RunRecord, order: list[str]) -> Table:
    t = Table(title=f"{record.pipeline}  run {record.run_id}  {record.state.value}", title_justify="left")
    for col in ("stage", "kind", "state", "attempt", "elapsed", "progress", "result"):
        t.add_column(col)
    for name in order:
        r = record.stages[name]
        elapsed = f"{r.elapsed:.1f}s" if r.elapsed is not None else ""
        state = r.state.value
        result = headline(r) if r.state.done else (r.error or "")[:60]
        t.add_row(name, r.kind, f"[{STYLE.get(r.state.value, '')}]{state}[/]", str(r.attempts or ""), elapsed,
                  _progress(r), result)
    return t


def traceback_tail(tb: str | None, lines: int = 6) -> str:
    """The last lines of a stage's traceback: where it failed and why."""
    rows = [l for l in (tb or "").rstrip().splitlines() if l.strip()]
    return "\n".join("    " + l for l in rows[-lines:])


def _value(row: dict[str, float], metric: str) -> str:
    if metric not in row:
        return ""
    se = row.get(f"{metric}_se")
    return f"{row[metric]:.3g}" + (f" ± {se:.2g}" if se is not None else "")


def verdict(record: RunRecord, order: list[str]) -> tuple[Table, str] | None:
    """The models an `evaluate` stage compared, side by side, and a line on its win rate's
    judge and the KL estimate."""
    for name in order:
        out = record.stages[name].outputs or {}
        comparison = out.get("comparison") if record.stages[name].kind == "evaluate" else None
        if not comparison:
            continue
        metrics = list(dict.fromkeys(m for row in comparison.values() for m in row if not m.endswith("_se")))
        t = Table(title=f"{name}: the same held-out prompts, each model", title_justify="left")
        t.add_column("metric")
        for label in comparison:
            t.add_column(label, justify="right")
        trained = out.get("checks_trained_against") or []
        for m in metrics:
            check = m.removeprefix("check_")
            kind = "" if check == m else " (trained against)" if check in trained else " (check)"
            t.add_row(check + kind, *(_value(row, m) for row in comparison.values()))
        notes = []
        if "samples_per_model" in out:
            notes.append(f"{out['samples_per_model']} completions a model ({out['prompts_per_model']} prompts); "
                         "± is the standard error over prompts")
        if trained:
            notes.append(f"{', '.join(trained)}: part of the evaluated model's reward, so not an independent check of it")
        if "win_rate" in out:
            notes.append(f"win rate {out['win_rate']:.2f} over the baseline, judged by {out.get('win_rate_judge', 'the reward')}")
        if "kl" in out:
            notes.append(f"KL(evaluated || baseline) ~ {out['kl']:.3g} nats per completion")
        return t, "; ".join(notes)
    return None


def warnings(record: RunRecord) -> list[str]:
    return [f"{r.name}: {w}" for r in record.stages.values() for w in (r.outputs or {}).get("warnings") or []
            if r.state.done]


class StageDisplay:
    """Live table on a TTY; transition lines otherwise. Call ``update`` often, it is cheap."""

    def __init__(self, record: RunRecord, order: list[str], stream: TextIO | None = None, live: bool | None = None):
        self.record, self.order = record, order
        self.stream = stream or sys.stderr
        self.live_mode = self.stream.isatty() if live is None else live
        # logs and pipes get a wide table rather than rich's 80-column fallback
        self.console = Console(file=self.stream, highlight=False, width=None if self.live_mode else 140)
        self._live: Live | None = None
        self._last_states: dict[str, str] = {}
        self._last_refresh = 0.0

    def __enter__(self) -> StageDisplay:
        if self.live_mode:
            # Rich's Live routes sys.stdout/sys.stderr through the table by default. When the table
            # writes to a copy of the terminal (quiet runs: fds 1 and 2 go to ray.log), that would put
            # what the driver's Ray threads print to sys.stdout (the raylet's "N PYTHON worker
            # processes have been started" warning, relayed by Ray's error listener) back on it.
            own = self.stream in (sys.stdout, sys.stderr)
            # Redrawn once a second: the table changes once per event drain (the executor's
            # _DRAIN_EVERY_S), and each redraw runs on the cores the stages use.
            self._live = Live(stage_table(self.record, self.order), console=self.console, refresh_per_second=1,
                              redirect_stdout=own, redirect_stderr=own)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(stage_table(self.record, self.order))
            self._live.__exit__(*exc)

    def update(self) -> None:
        for name in self.order:
            r = self.record.stages[name]
            key = f"{r.state.value}/{r.attempts}"
            if self._last_states.get(name) == key:
                continue
            self._last_states[name] = key
            failed = r.state.value in ("FAILED", "RETRYING")
            if self._live is None:
                extra = f" attempt {r.attempts}" if r.state.value in ("RUNNING", "RETRYING") else ""
                err = f": {r.error}" if r.error and r.state.value in ("FAILED", "RETRYING", "SKIPPED") else ""
                self.console.print(f"[{STYLE.get(r.state.value, '')}]{name:<16} {r.state.value}{extra}[/]{err}",
                                   markup=True, soft_wrap=True)
            elif failed:
                self.console.print(f"[{STYLE[r.state.value]}]{name} {r.state.value}[/]: {r.error}", soft_wrap=True)
            if failed and r.traceback:
                self.console.print(traceback_tail(r.traceback), markup=False, highlight=False, soft_wrap=True)
        if self._live is not None:
            now = time.monotonic()
            if now - self._last_refresh > 0.25:
                self._live.update(stage_table(self.record, self.order))
                self._last_refresh = now

    def summary(self, ui_hint: str) -> None:
        self.console.print(stage_table(self.record, self.order))
        if (v := verdict(self.record, self.order)) is not None:
            self.console.print(v[0])
            if v[1]:
                self.console.print(v[1], soft_wrap=True)
        for w in warnings(self.record):
            self.console.print(f"[bold yellow]warning:[/] {w}", soft_wrap=True)
        self.console.print(ui_hint, soft_wrap=True)
