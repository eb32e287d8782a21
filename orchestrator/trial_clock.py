"""What a trial costs beyond its loop, timed by the driver from the moment Tune starts it.

A clock inside the trial starts after its process started and imported what it imports, so it
reads low; the driver sees the whole trial: Tune asking for the actor, the actor starting, the
Train controller and workers starting, the configurations running, the shutdown. The clock takes
that wall time, subtracts what the loop itself took in each configuration (``time_worker_s``) and
logs every configuration's equal share of the rest as ``ray_overhead_s`` into its child run
(``time_trial_s`` = its own loop time + that share; ``bundle_size`` = configurations the trial ran).
"""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from vlprompt.orchestrator import tracking


class TrialClock(Callback):
    """Driver-side Tune callback: per trial, start time and each configuration's report."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.started: dict[str, float] = {}
        self.reports: dict[str, list[tuple[str, float]]] = {}  # trial → (run id, time_worker_s)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.perf_counter()
        self.reports[trial.trial_id] = []

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("run_id") and "time_worker_s" in result:
            self.reports.setdefault(trial.trial_id, []).append((result["run_id"], result["time_worker_s"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._settle(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._settle(trial.trial_id)

    def _settle(self, trial_id: str) -> None:
        started, reports = self.started.pop(trial_id, None), self.reports.pop(trial_id, [])
        if started is None or not reports:
            return
        wall = time.perf_counter() - started
        share = max(0.0, wall - sum(worker for _, worker in reports)) / len(reports)
        for run_id, worker in reports:
            tracking.log_metrics(
                self.uri,
                run_id,
                {"ray_overhead_s": share, "time_trial_s": worker + share, "bundle_size": len(reports)},
            )
