"""The resource plan: how many Train workers per trial, what each asks for, how many trials at once.

Derived from what the cluster actually has (``ray.cluster_resources()``), so one preset
runs on a 2-CPU laptop and on a GPU cluster without edits. The rules avoid the nested
Tune-trial/Train-worker deadlock (ray #54305): the trial function itself holds only a
token CPU, and the number of concurrent trials is capped so that every running trial's
workers fit at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

#: What the Tune trial function (which only launches the TorchTrainer) asks for.
TRIAL_CPU = 0.01


class ResourceError(RuntimeError):
    """The requested workers cannot fit on this cluster at all."""


@dataclass(frozen=True)
class ResourcePlan:
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    max_concurrent_trials: int

    @property
    def per_trial(self) -> dict[str, float]:
        """Everything one running trial holds: its own token CPU plus its workers."""
        total = {k: v * self.num_workers for k, v in self.resources_per_worker.items()}
        total["CPU"] = total.get("CPU", 0.0) + TRIAL_CPU
        return total


def plan_resources(
    cluster: Mapping[str, float],
    *,
    num_workers: int,
    use_gpu: str | bool,
    cpus_per_worker: float,
    gpus_per_worker: float,
    max_concurrent_trials: int,
    num_trials: int,
) -> ResourcePlan:
    """Fit ``num_workers`` workers per trial onto ``cluster`` and decide the trial concurrency.

    ``cluster`` is what Ray reports (keys ``CPU``/``GPU``). On an autoscaling cluster the
    GPUs may not exist yet; pass ``use_gpu=true`` explicitly there and the autoscaler
    adds nodes for the requested resources, as many trials at once as
    ``max_concurrent_trials`` allows (0: one), whatever the head's own CPUs.
    """
    cpus = float(cluster.get("CPU", 0.0))
    gpus = float(cluster.get("GPU", 0.0))
    want_gpu = str(use_gpu).lower()
    gpu = gpus > 0 if want_gpu == "auto" else want_gpu == "true"
    per_worker: dict[str, float] = {"CPU": float(cpus_per_worker)}
    if gpu:
        per_worker["GPU"] = float(gpus_per_worker)

    # Never ask one worker for more CPUs than the machine has: shrink to fit (a 2-CPU
    # laptop with cpus_per_worker=4 in a GPU preset still runs).
    if cpus > 0 and per_worker["CPU"] * num_workers + TRIAL_CPU > cpus:
        per_worker["CPU"] = max(0.1, math.floor((cpus - TRIAL_CPU) / num_workers * 10) / 10)
        if per_worker["CPU"] * num_workers + TRIAL_CPU > cpus:
            raise ResourceError(
                f"{num_workers} workers cannot fit on {cpus:g} CPUs; lower resources.num_workers"
            )
    plan = ResourcePlan(num_workers, gpu, per_worker, 1)
    need = plan.per_trial
    fits = [math.floor(cpus / need["CPU"] + 1e-9)] if cpus > 0 else [1]
    if gpu and gpus > 0:
        if need["GPU"] > gpus:
            raise ResourceError(
                f"a trial needs {need['GPU']:g} GPUs ({num_workers} workers × {per_worker['GPU']:g}) "
                f"but the cluster has {gpus:g}; lower resources.num_workers or gpus_per_worker"
            )
        fits.append(math.floor(gpus / need["GPU"] + 1e-9))
    elif gpu:
        # No GPU node yet: an autoscaling cluster adds GPU nodes, with their own CPUs, for the
        # trials that wait for them, so today's (head) CPUs do not bound the concurrency; how many
        # nodes it may add is the autoscaler's config, which the plan cannot see:
        # resources.max_concurrent_trials says it (unset: one trial at a time).
        fits = [max_concurrent_trials if max_concurrent_trials > 0 else 1]
    concurrent = max(1, min(fits))
    if max_concurrent_trials > 0:
        concurrent = min(concurrent, max_concurrent_trials)
    concurrent = max(1, min(concurrent, max(num_trials, 1)))
    return ResourcePlan(num_workers, gpu, per_worker, concurrent)
