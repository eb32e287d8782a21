"""What a trial costs beyond its loop, timed by the driver, boundary to boundary.

A clock inside the trial starts after its process started and imported what it imports, so it
reads low; so does Tune's ``on_trial_start``, which fires once the trial's actor is up. The
driver's clock therefore times each trial from the moment its *slot* became free -- the sweep's
start for the first ``slots`` trials, the end of the trial it replaces for the others -- to its
end: Tune scheduling it, its actor starting, the Train controller and workers starting, the
configurations running, the shutdown. The clock takes that wall time, subtracts what the loop
itself took in each configuration (``time_worker_s``) and logs every configuration's equal share
of the rest as ``ray_overhead_s`` into its child run (``time_trial_s`` = its own loop time + that
share; ``bundle_size`` = configurations the trial ran).
"""

from __future__ import annotations

import heapq
import time
from typing import Any

from ray.tune import Callback

from vlprompt.orchestrator import tracking


class TrialClock(Callback):
    """Driver-side Tune callback: per trial, start time and each configuration's report."""

    def __init__(self, uri: str, slots: int) -> None:
        self.uri, self.slots = uri, max(1, slots)
        self.free: list[float] = []  # when each concurrent-trial slot became free (a heap)
        self.started: dict[str, float] = {}
        self.reports: dict[str, list[tuple[str, float]]] = {}  # trial → (run id, time_worker_s)

    def setup(self, **info: Any) -> None:
        """The experiment starts (or is restored): every slot is free now."""
        self.free = [time.perf_counter()] * self.slots

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        now = time.perf_counter()
        self.started[trial.trial_id] = heapq.heappop(self.free) if self.free else now
        self.reports[trial.trial_id] = []

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get("run_id") and "time_worker_s" in result:
            self.reports.setdefault(trial.trial_id, []).append((result["run_id"], result["time_worker_s"]))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._settle(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._settle(trial.trial_id)

    def _settle(self, trial_id: str) -> None:
        ended = time.perf_counter()
        heapq.heappush(self.free, ended)
        started, reports = self.started.pop(trial_id, None), self.reports.pop(trial_id, [])
        if started is None or not reports:
            return
        wall = ended - started
        share = max(0.0, wall - sum(worker for _, worker in reports)) / len(reports)
        for run_id, worker in reports:
            tracking.log_metrics(
                self.uri,
                run_id,
                {"ray_overhead_s": share, "time_trial_s": worker + share, "bundle_size": len(reports)},
            )
