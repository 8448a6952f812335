"""What the Ray cluster has in all, and can grow to: for a stage that holds several groups of
actors at once (``rlhf``: rollout, ranking and learner actors; ``evaluate``: a rollout pool and
the ranking pool), which would otherwise wait forever, its last actors pending, on a cluster too
small to hold them all (Ray only logs that they cannot be scheduled).

``check_fits`` fails before any actor starts when the stage needs more at once than the cluster
can ever have. A need above what is *free* now is not an error: other stages may hold the rest.

How large a cluster can grow, Ray says only through the autoscaler's cluster config in the GCS
(node groups and their most nodes; ``ray._private.state``, no public API, read by Ray Train's own
pre-check too). Ray 2.60's v1 autoscaler (``ray up``, ``cluster.yaml``) reports none, and a
worker cannot cheaply tell its head apart from a fixed one: so without a config the check runs
only on a cluster whose nodes all share one host (the local Ray ``orchestrator run`` starts with
``ray.num_cpus``, or ``ray.cluster_utils.Cluster``), taken as fixed; elsewhere it is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ActorGroup", "ClusterTooSmall", "check_fits", "count_of", "most_resources", "scalable_node_shapes"]


def _autoscaler_config():
    """The autoscaler's cluster config (node groups, their resources and most nodes), or None."""
    try:
        from ray._private.state import state  # no public API for the autoscaler's node types

        return state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler, or an older Ray
        return None


def scalable_node_shapes() -> list[dict]:
    """Node shapes an autoscaling cluster can still start (its config's worker types): a GPU
    stage on a cluster whose GPU workers scale from zero is feasible, not failed."""
    config = _autoscaler_config()
    if config is None:
        return []
    return [dict(g.resources) for g in config.node_group_configs if g.max_count != 0]


def most_resources() -> dict[str, float] | None:
    """The most of each resource (``CPU``, ``GPU``) the cluster can ever have in all, or None
    where that is unknown (a multi-host cluster without an autoscaler config: see the module)."""
    import ray

    live = {k: float(v) for k, v in ray.cluster_resources().items()}
    if _autoscaler_config() is not None:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()  # sys.maxsize where unbounded
        if not most:
            return None
        return {k: max(float(most.get(k, 0)), live.get(k, 0.0)) for k in {*most, *live}}
    hosts = {n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}
    return live if len(hosts) <= 1 else None


@dataclass(frozen=True)
class ActorGroup:
    """``count`` actors of one kind that a stage holds at the same time, each with ``cpus`` and
    ``gpus``; ``count_field`` and ``resources_field`` (its ``.cpus``/``.gpus``) are the settings
    that give them, as the error names them."""

    what: str              # "rollout actor"
    count: int
    count_field: str       # "config.rollout_workers"
    cpus: float
    gpus: float
    resources_field: str   # "resources" or "config.reward"


class ClusterTooSmall(ValueError):
    """The stage needs more at once than the cluster can ever have."""


def count_of(*fields: tuple[str, int | None], default: int = 1) -> tuple[int, str]:
    """The first set (name, value) of ``fields`` as (value, name); none set: ``default`` and the
    first name with the default said."""
    for name, value in fields:
        if value:
            return value, name
    return default, f"{fields[0][0]}, default {default}"


def check_fits(stage: str, groups: list[ActorGroup]) -> None:
    """Raise ``ClusterTooSmall`` when ``groups`` together need more CPUs or GPUs than the
    cluster can ever have, naming each group's settings and the numbers."""
    most = most_resources()
    if most is None:
        return
    errors = []
    for key, unit, per in (("CPU", "cpus", lambda g: g.cpus), ("GPU", "gpus", lambda g: g.gpus)):
        need = sum(g.count * per(g) for g in groups)
        have = most.get(key, 0.0)
        if need <= have:
            continue
        terms = " + ".join(f"{_n(g.count, g.what)} ({_path(stage, g.count_field)}) x {_n(per(g), key)} "
                           f"({_path(stage, g.resources_field)}.{unit})" for g in groups if per(g))
        more = "raise ray.num_cpus (the local Ray's CPUs) or run on a larger cluster" if key == "CPU" \
            else "run on a cluster with more GPUs"
        errors.append(f"stage {stage!r} needs {_n(need, key)} at once, the cluster has {have:g} in all: {terms}; "
                      f"lower these to at most {_n(have, key)} together, or {more}")
    if errors:
        raise ClusterTooSmall("; ".join(errors))


def _n(x: float, unit: str) -> str:
    return f"{x:g} {unit}{'' if x == 1 else 's'}"


def _path(stage: str, field: str) -> str:
    """A setting's YAML path in the pipeline."""
    return f"stages.{stage}.{field}"
