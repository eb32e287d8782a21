"""Bundled trials (several configurations in one Train run) against one configuration per trial.

Real Tune + Train + MLflow. A bundle must give every configuration exactly the metrics and the
learned state it gets in a trial of its own, each in its own FINISHED child run. (A bundle whose
driver is stopped and killed mid-bundle, then resumed: ``test_faults.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vlprompt.orchestrator.config import load_config
from vlprompt.orchestrator.sweep import run_sweep

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
UNIT = str(REPO / "tests" / "assets" / "unit.yaml")
SPACE = "sweep.space={seed: {choice: [1, 2]}, data.shots: {choice: [2, 4], when: {seed: 2}}}"


def _children(client: MlflowClient, experiment_id: str, parent: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def _by_digest(runs: list) -> dict[str, dict[str, float]]:
    keep = ("test_acc", "val_acc", "final_train_loss", "trainable_params")
    return {r.data.tags["config_digest"]: {k: r.data.metrics[k] for k in keep} for r in runs}


def test_a_bundle_gives_each_configuration_its_own_trials_numbers(local_ray, tmp_path):
    common = [
        f"data.root={tmp_path / 'data'}",
        "train.epochs=3",
        SPACE,
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"sweep.storage_path={tmp_path / 'ray_results'}",
    ]
    bundled = run_sweep(load_config(UNIT, [*common, "sweep.name=bundled", "sweep.bundle_size=3"]))
    single = run_sweep(load_config(UNIT, [*common, "sweep.name=single", "sweep.bundle_size=1"]))
    client = MlflowClient(bundled.tracking_uri)
    runs_b = _children(client, bundled.experiment_id, bundled.parent_run_id)
    runs_s = _children(client, single.experiment_id, single.parent_run_id)
    assert sorted(r.info.status for r in runs_b + runs_s) == ["FINISHED"] * 6
    assert len({r.data.tags["trial_id"] for r in runs_b}) == 1  # 3 configurations, one Train run
    assert len({r.data.tags["trial_id"] for r in runs_s}) == 3
    assert {r.data.metrics["bundle_size"] for r in runs_b} == {3.0}
    assert _by_digest(runs_b) == _by_digest(runs_s)  # exactly, metric by metric
    learned = [
        {
            r.data.tags["config_digest"]: Path(
                client.download_artifacts(
                    r.info.run_id, "learned/learned_state.pt", str(tmp_path / r.info.run_id)
                )
            ).read_bytes()
            for r in runs
        }
        for runs in (runs_b, runs_s)
    ]
    assert learned[0] == learned[1]
    rows = {(r["seed"], r["shots"]): r for r in bundled.rows}
    assert sorted(rows) == [(1, 4), (2, 2), (2, 4)] and not bundled.failed
    assert all(r["ray_overhead_s"] >= 0 and r["time_trial_s"] > r["time_worker_s"] for r in bundled.rows)
    parent = client.get_run(bundled.parent_run_id).data.metrics
    assert parent["num_configurations"] == 3 and parent["overhead_per_configuration_s"] > 0
