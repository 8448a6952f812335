"""The stage graph: pure functions over ``needs`` (no Ray, no MLflow, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def find_cycle(needs: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle as a list of stage names (first repeated at the end), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in needs}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = GREY
        stack.append(n)
        for m in needs.get(n, ()):
            if m not in color:
                continue
            if color[m] == GREY:
                return stack[stack.index(m):] + [m]
            if color[m] == WHITE and (cycle := visit(m)):
                return cycle
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(needs):
        if color[n] == WHITE and (cycle := visit(n)):
            return cycle
    return None


def topological_order(needs: Mapping[str, Sequence[str]]) -> list[str]:
    """Stages in an order where each comes after what it needs (ties broken by name)."""
    remaining = {n: set(deps) for n, deps in needs.items()}
    order: list[str] = []
    while remaining:
        ready = sorted(n for n, deps in remaining.items() if not deps)
        if not ready:
            raise ValueError(f"cycle: {' -> '.join(find_cycle(needs) or [])}")
        for n in ready:
            order.append(n)
            del remaining[n]
        for deps in remaining.values():
            deps.difference_update(ready)
    return order


def downstream(needs: Mapping[str, Sequence[str]], start: str) -> set[str]:
    """Every stage that (transitively) needs ``start``."""
    out: set[str] = set()
    frontier = [start]
    while frontier:
        cur = frontier.pop()
        for n, deps in needs.items():
            if cur in deps and n not in out:
                out.add(n)
                frontier.append(n)
    return out


def depths(needs: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Longest path from a root, for drawing the DAG in layers."""
    depth: dict[str, int] = {}
    for n in topological_order(needs):
        depth[n] = 1 + max((depth[d] for d in needs[n]), default=-1)
    return depth
