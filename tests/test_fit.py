"""A stage that holds several groups of actors at once (rlhf, evaluate) fails before any actor
starts when they need more than the cluster can ever have, naming the settings and numbers,
instead of waiting forever; a need above what is only *free* now still waits. On the session's
real local Ray (4 logical CPUs)."""

from __future__ import annotations

import threading

import pytest

from test_rlhf import REWARD, make_policy, make_prompts
from workers.cluster import ActorGroup, ClusterTooSmall, check_fits, most_resources
from workers.kinds import evaluate, rlhf
from workers.stage import Resources, local_context

WAIT_S = 120  # without the check, the call never returns: its last actors stay pending


def call_within(fn, *args):
    """fn(*args)'s exception (or None) if it ends within WAIT_S; fails the test if it does not."""
    box: dict = {}

    def target():
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(WAIT_S)
    if t.is_alive():
        pytest.fail(f"{fn.__module__}.{fn.__name__} still waiting after {WAIT_S} s: actors the cluster cannot hold")
    return box.get("error")


def test_rlhf_that_can_never_fit_fails_at_once_naming_the_fields(ray_session, tmp_path):
    ck = make_policy(tmp_path / "policy")
    cfg = rlhf.Config.model_validate(dict(policy=str(ck), reward={"function": REWARD, "num_actors": 2},
                                          prompts={"source": make_prompts(8, 0)}, eval_prompts=0,
                                          learner_workers=2, iterations=1))
    ctx = local_context(tmp_path, "rlhf", resources=Resources(cpus=1, workers=2))
    err = call_within(rlhf.run, ctx, cfg)
    assert isinstance(err, ClusterTooSmall), err
    msg = str(err)
    assert "stage 'rlhf' needs 6 CPUs at once, the cluster has 4 in all" in msg
    assert "2 rollout actors (stages.rlhf.resources.workers) x 1 CPU (stages.rlhf.resources.cpus)" in msg
    assert "2 ranking actors (stages.rlhf.config.reward.num_actors) x 1 CPU (stages.rlhf.config.reward.cpus)" in msg
    assert "2 learners (stages.rlhf.config.learner_workers) x 1 CPU (stages.rlhf.resources.cpus)" in msg
    assert "at most 4 CPUs together, or raise ray.num_cpus" in msg
    assert not ctx.sink.events  # failed before anything ran


def test_evaluate_that_can_never_fit_fails_at_once(ray_session, tmp_path):
    ck = make_policy(tmp_path / "policy")
    cfg = evaluate.Config(checkpoint=str(ck), reward={"function": REWARD, "num_actors": 1, "cpus": 2},
                          prompts={"source": make_prompts(4, 1)}, workers=3)
    err = call_within(evaluate.run, local_context(tmp_path, "eval"), cfg)
    assert isinstance(err, ClusterTooSmall), err
    assert ("stage 'eval' needs 5 CPUs at once, the cluster has 4 in all: 3 rollout actors "
            "(stages.eval.config.workers) x 1 CPU (stages.eval.resources.cpus) + 1 ranking actor "
            "(stages.eval.config.reward.num_actors) x 2 CPUs (stages.eval.config.reward.cpus)") in str(err)


def test_a_need_above_what_is_free_now_is_no_error_and_gpus_count_too(ray_session):
    @ray_session.remote(num_cpus=3)
    class Busy:  # another stage's actor
        def ping(self) -> int:
            return 1

    busy = Busy.remote()
    try:
        ray_session.get(busy.ping.remote())  # 3 of the 4 CPUs held now
        check_fits("s", [ActorGroup("actor", 4, "config.n", 1, 0, "resources")])  # fits the total: waits, not fails
        with pytest.raises(ClusterTooSmall, match=r"needs 1 GPU at once, the cluster has 0 in all: 1 actor "
                                                  r"\(stages.s.config.n\) x 1 GPU \(stages.s.resources.gpus\)"):
            check_fits("s", [ActorGroup("actor", 1, "config.n", 1, 1, "resources")])
    finally:
        ray_session.kill(busy)


def test_an_autoscaler_config_raises_the_limit(ray_session):
    """Where an autoscaler reported its node groups, the limit is what they can grow to."""
    from ray._private.worker import global_worker
    from ray.core.generated import autoscaler_pb2

    group = autoscaler_pb2.NodeGroupConfig(name="cpu", max_count=3)
    group.resources["CPU"] = 8
    config = autoscaler_pb2.ClusterConfig(node_group_configs=[group])
    global_worker.gcs_client.report_cluster_config(config.SerializeToString())
    try:
        assert most_resources()["CPU"] == 24
        check_fits("s", [ActorGroup("actor", 20, "config.n", 1, 0, "resources")])
        with pytest.raises(ClusterTooSmall, match="needs 25 CPUs at once, the cluster has 24 in all"):
            check_fits("s", [ActorGroup("actor", 25, "config.n", 1, 0, "resources")])
    finally:  # the session's Ray is shared: back to no autoscaler
        global_worker.gcs_client.report_cluster_config(autoscaler_pb2.ClusterConfig().SerializeToString())
    assert most_resources()["CPU"] == 4
