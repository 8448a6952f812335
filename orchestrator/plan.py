"""The plan: an immutable DAG of stages with their fingerprints (pure: no Ray, MLflow or I/O)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from . import graph
from .errors import SpecError
from .fingerprint import Components
from .spec import Pipeline, Policy, Resources


@dataclass(frozen=True)
class PlannedStage:
    name: str
    kind: str
    needs: tuple[str, ...]
    config: dict[str, Any] = field(hash=False, compare=False)
    resources: Resources = field(hash=False, compare=False)
    policy: Policy = field(hash=False, compare=False)
    enabled: bool
    distributed: bool
    components: Components = field(hash=False, compare=False)
    fingerprint: str


@dataclass(frozen=True)
class Plan:
    pipeline: str
    stages: tuple[PlannedStage, ...]  # topological order

    def __getitem__(self, name: str) -> PlannedStage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def needs(self) -> dict[str, tuple[str, ...]]:
        return {s.name: s.needs for s in self.stages}

    def downstream(self, name: str) -> set[str]:
        return graph.downstream(self.needs, name)


def check_graph(p: Pipeline) -> list[str]:
    """Problems with ``needs``: unknown stages and cycles."""
    problems = []
    names = list(p.stages)
    for name, stage in p.stages.items():
        for i, dep in enumerate(stage.needs):
            if dep == name:
                problems.append(f"stages.{name}.needs[{i}]: a stage cannot need itself ({dep!r})")
            elif dep not in p.stages:
                close = difflib.get_close_matches(dep, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(f"stages.{name}.needs[{i}]: unknown stage {dep!r}{hint} (stages: {', '.join(names)})")
    if not problems:
        cycle = graph.find_cycle({n: s.needs for n, s in p.stages.items()})
        if cycle:
            problems.append(f"stages: cycle in needs: {' -> '.join(cycle)} (a pipeline must be a DAG)")
    return problems


def build_plan(p: Pipeline, resolved: dict[str, dict[str, Any]]) -> Plan:
    """The plan for a validated pipeline; ``resolved`` comes from ``spec.check_stages``."""
    problems = check_graph(p)
    if problems:
        raise SpecError(problems)
    needs = {n: tuple(s.needs) for n, s in p.stages.items()}
    fps: dict[str, str] = {}
    planned = []
    for name in graph.topological_order(needs):
        s, r = p.stages[name], resolved[name]
        parts = Components(s.kind, r["config"], r["code"], r["inputs"], {d: fps[d] for d in needs[name]},
                           env=r.get("env", {}), versions=r.get("versions", {}))
        fps[name] = fp = parts.digest()
        planned.append(PlannedStage(
            name=name, kind=s.kind, needs=needs[name], config=r["config"], resources=s.resources,
            policy=p.policy(name) if r.get("cacheable", True) else p.policy(name).model_copy(update={"cache": False}),
            enabled=s.enabled, distributed=r["distributed"],
            components=parts, fingerprint=fp,
        ))
    return Plan(pipeline=p.name, stages=tuple(planned))
