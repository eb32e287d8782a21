"""The resource plan never asks for more than the cluster has (the nested-resources deadlock)."""

from __future__ import annotations

import itertools

import pytest

from vlprompt.orchestrator.resources import TRIAL_CPU, ResourceError, plan_resources


def _plan(cluster, **kw):
    args = dict(
        num_workers=1,
        use_gpu="auto",
        cpus_per_worker=1.0,
        gpus_per_worker=1.0,
        max_concurrent_trials=0,
        num_trials=100,
    )
    args.update(kw)
    return plan_resources(cluster, **args)


@pytest.mark.parametrize(
    ("cluster", "workers", "cpw", "gpw"),
    list(
        itertools.product(
            [
                {"CPU": 2.0},
                {"CPU": 16.0},
                {"CPU": 8.0, "GPU": 1.0},
                {"CPU": 48.0, "GPU": 8.0},
                {"CPU": 4.0, "GPU": 4.0},
            ],
            [1, 2, 4],
            [0.5, 1.0, 4.0],
            [0.25, 1.0],
        )
    ),
)
def test_concurrent_trials_always_fit(cluster, workers, cpw, gpw):
    try:
        plan = _plan(cluster, num_workers=workers, cpus_per_worker=cpw, gpus_per_worker=gpw)
    except ResourceError:
        assert workers * gpw > cluster.get("GPU", 0) > 0  # only GPU shortfalls may be refused
        return
    need = plan.per_trial
    for key, have in cluster.items():
        assert need.get(key, 0.0) * plan.max_concurrent_trials <= have + 1e-9, (plan, cluster)
    assert plan.use_gpu == ("GPU" in cluster)
    assert plan.max_concurrent_trials >= 1


def test_laptop_two_cpus_runs_two_single_worker_trials():
    plan = _plan({"CPU": 2.0})
    assert not plan.use_gpu
    assert plan.resources_per_worker == {"CPU": 1.0}
    assert plan.max_concurrent_trials == 1  # 2 × (1 + 0.01) > 2: one at a time, never a deadlock
    assert plan.per_trial["CPU"] == pytest.approx(1.0 + TRIAL_CPU)


def test_gpu_preset_shrinks_cpus_on_a_small_machine():
    plan = _plan({"CPU": 2.0}, cpus_per_worker=4.0)
    assert plan.resources_per_worker["CPU"] <= 2.0 - TRIAL_CPU


def test_gpu_cluster_runs_one_trial_per_gpu():
    plan = _plan({"CPU": 64.0, "GPU": 8.0}, cpus_per_worker=4.0)
    assert plan.use_gpu and plan.resources_per_worker == {"CPU": 4.0, "GPU": 1.0}
    assert plan.max_concurrent_trials == 8


def test_limits_and_explicit_choices():
    assert _plan({"CPU": 64.0}, max_concurrent_trials=3).max_concurrent_trials == 3
    assert _plan({"CPU": 64.0}, num_trials=2).max_concurrent_trials == 2
    assert not _plan({"CPU": 8.0, "GPU": 2.0}, use_gpu="false").use_gpu
    # autoscaling cluster with no GPU node yet: ask anyway, one trial at a time
    plan = _plan({"CPU": 4.0}, use_gpu="true")
    assert plan.use_gpu and plan.max_concurrent_trials == 1
    with pytest.raises(ResourceError, match="needs 4 GPUs"):
        _plan({"CPU": 32.0, "GPU": 2.0}, num_workers=4)


def test_autoscaling_cluster_without_gpus_yet_runs_as_many_trials_as_allowed():
    # the GPU nodes the autoscaler adds bring their own CPUs: the head's 2 CPUs do not cap the
    # trials (4 × 1.01 CPUs would not fit on them), resources.max_concurrent_trials does
    plan = _plan({"CPU": 2.0}, use_gpu="true", max_concurrent_trials=4)
    assert plan.use_gpu and plan.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    assert plan.max_concurrent_trials == 4
    fewer = _plan({"CPU": 2.0}, use_gpu="true", max_concurrent_trials=4, num_trials=2)
    assert fewer.max_concurrent_trials == 2
    # a head with no CPUs for tasks at all (KubeRay's usual num-cpus: 0) plans the same way
    assert _plan({}, use_gpu="true", max_concurrent_trials=3).max_concurrent_trials == 3
    assert _plan({"CPU": 8.0}, use_gpu="true").max_concurrent_trials == 1  # unset: one at a time
