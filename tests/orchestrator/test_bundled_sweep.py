"""Bundled trials (several configurations in one Train run) against one configuration per trial.

Real Tune + Train + MLflow. A bundle must give every configuration exactly the metrics and the
learned state it gets on its own, each in its own FINISHED child run. (A bundle whose
driver is stopped and killed mid-bundle, then resumed: ``test_faults.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from vlprompt.orchestrator.config import load_config, resolve_paths
from vlprompt.orchestrator.loop import Keep, WorkerContext, run
from vlprompt.orchestrator.sweep import run_sweep

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
UNIT = str(REPO / "tests" / "assets" / "unit.yaml")
SPACE = "sweep.space={seed: {choice: [1, 2]}, data.shots: {choice: [2, 4], when: {seed: 2}}}"


def _children(client: MlflowClient, experiment_id: str, parent: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


KEEP = ("test_acc", "val_acc", "final_train_loss", "trainable_params")


def test_a_bundle_gives_each_configuration_its_own_trials_numbers(local_ray, tmp_path):
    """The reference for each configuration is the loop run on its own, in this process: the
    number a trial of its own gets (``test_faults.py`` checks Ray runs against it to the bit)."""
    common = [
        f"data.root={tmp_path / 'data'}",
        f"data.feature_cache={tmp_path / 'features'}",
        "train.epochs=3",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"sweep.storage_path={tmp_path / 'ray_results'}",
    ]
    bundled = run_sweep(load_config(UNIT, [*common, SPACE, "sweep.name=bundled", "sweep.bundle_size=3"]))
    client = MlflowClient(bundled.tracking_uri)
    runs = _children(client, bundled.experiment_id, bundled.parent_run_id)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3
    assert len({r.data.tags["trial_id"] for r in runs}) == 1  # 3 configurations, one Train run
    assert {r.data.metrics["bundle_size"] for r in runs} == {3.0}
    for r in runs:
        seed, shots = r.data.params["seed"], r.data.params["data.shots"]
        kept = Keep()
        cfg = resolve_paths(
            load_config(UNIT, [*common, "sweep.space={}", f"seed={seed}", f"data.shots={shots}"])
        )
        alone = run(cfg, WorkerContext(0, 1, torch.device("cpu")), None, kept)
        assert {k: r.data.metrics[k] for k in KEEP} == {k: alone[k] for k in KEEP}  # exactly
        path = client.download_artifacts(
            r.info.run_id, "learned/learned_state.pt", str(tmp_path / r.info.run_id)
        )
        learned = torch.load(path, weights_only=True)
        assert learned.keys() == kept.learned.keys()
        assert all(torch.equal(learned[k], kept.learned[k]) for k in learned)
    rows = {(r["seed"], r["shots"]): r for r in bundled.rows}
    assert sorted(rows) == [(1, 4), (2, 2), (2, 4)] and not bundled.failed
    assert all(r["ray_overhead_s"] >= 0 and r["time_trial_s"] > r["time_worker_s"] for r in bundled.rows)
    parent = client.get_run(bundled.parent_run_id).data.metrics
    assert parent["num_configurations"] == 3 and parent["overhead_per_configuration_s"] > 0
