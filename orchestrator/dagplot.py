"""A picture of the DAG: one box per stage, coloured by state, with its duration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .graph import depths
from .state import StageRecord

COLORS = {
    "PENDING": "#d0d0d0", "RUNNING": "#8ecae6", "RETRYING": "#ffd166", "SUCCEEDED": "#90be6d",
    "CACHED": "#b5e48c", "FAILED": "#f94144", "SKIPPED": "#eeeeee", "CANCELLED": "#f8961e",
}


def layout(needs: Mapping[str, Sequence[str]]) -> dict[str, tuple[float, float]]:
    """(x, y) per stage: x = layer (longest path from a root), y = slot within the layer."""
    d = depths(needs)
    layers: dict[int, list[str]] = {}
    for n in sorted(d, key=lambda n: (d[n], n)):
        layers.setdefault(d[n], []).append(n)
    pos = {}
    for x, names in layers.items():
        for i, n in enumerate(names):
            pos[n] = (float(x), (len(names) - 1) / 2.0 - i)
    return pos


def draw_dag(needs: Mapping[str, Sequence[str]], records: Mapping[str, StageRecord], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    pos = layout(needs)
    width = max(x for x, _ in pos.values()) + 1
    height = max(abs(y) for _, y in pos.values()) * 2 + 1
    fig, ax = plt.subplots(figsize=(max(4.0, 2.6 * width), max(2.2, 1.3 * height + 0.6)))
    for n, deps in needs.items():
        for d in deps:
            (x0, y0), (x1, y1) = pos[d], pos[n]
            ax.annotate("", xy=(x1 - 0.36, y1), xytext=(x0 + 0.36, y0),
                        arrowprops=dict(arrowstyle="->", color="#555", lw=1.2))
    for n, (x, y) in pos.items():
        rec = records.get(n)
        state = rec.state.value if rec else "PENDING"
        box = FancyBboxPatch((x - 0.36, y - 0.28), 0.72, 0.56, boxstyle="round,pad=0.02",
                             fc=COLORS.get(state, "#ccc"), ec="#333", lw=1)
        ax.add_patch(box)
        elapsed = f"{rec.elapsed:.1f}s" if rec and rec.elapsed is not None else ""
        kind = rec.kind if rec else ""
        ax.text(x, y + 0.1, n, ha="center", va="center", fontsize=9, weight="bold")
        ax.text(x, y - 0.12, f"{kind} · {state}\n{elapsed}", ha="center", va="center", fontsize=7)
    ax.set_xlim(-0.6, width - 0.4)
    ax.set_ylim(-height / 2 - 0.1, height / 2 + 0.1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
