"""A real Tune + Optuna sweep over Ray Train trials (in-process Ray), tracked in MLflow.

One trial succeeds and one fails on purpose (a corrupt image that only decoding finds, inside
the trial): the failure must end FAILED with its message, the sweep must go on, and the parent
run must say which trial failed — nothing left RUNNING. What can be found before Ray starts
(more shots than a class has) is refused before the sweep starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vlprompt import datasets as vds
from vlprompt.orchestrator import results
from vlprompt.orchestrator.config import ConfigError, load_config
from vlprompt.orchestrator.sweep import run_sweep

pytestmark = pytest.mark.slow
UNIT = str(Path(__file__).resolve().parents[1] / "assets" / "unit.yaml")


def _corrupt_one_test_image(root: Path, name: str) -> str:
    vds.generate_dataset(name, root, num_classes=4, images_per_class=10)
    bad = vds.load_dataset(name, root).test[0].path
    Path(bad).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return bad


def test_sweep_tracks_success_and_failure(local_ray, tmp_path, monkeypatch):
    bad_image = _corrupt_one_test_image(tmp_path / "data", "sw_counting")
    cfg = load_config(
        UNIT,
        [
            f"data.root={tmp_path / 'data'}",
            "train.epochs=2",
            "data.shots=2",
            "method.name=coop",
            "sweep.space={data.dataset: {choice: [synthetic, sw_counting]}}",
            "sweep.name=unit-sweep",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "tracking.experiment=unit",
            # the trials encode their own features: the sweep's pipeline would find the corrupt
            # image before any trial starts (tests/orchestrator/test_pipeline.py checks that)
            "data.pipeline=false",
        ],
    )
    outcome = run_sweep(cfg, launch_dir=tmp_path)
    assert len(outcome.rows) == 2
    ok = [r for r in outcome.rows if not r.get("error")]
    failed = outcome.failed
    assert len(ok) == 1 and ok[0]["dataset"] == "synthetic" and 0 <= ok[0]["test_acc"] <= 100
    assert len(failed) == 1 and bad_image in failed[0]["error"]  # the whole message, path included
    assert ok[0]["data"] == "generated"

    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FAILED"
    assert "1 of 2 configurations failed" in parent.data.tags["error"]
    children = client.search_runs(
        [outcome.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'"
    )
    status = {c.data.params.get("data.dataset", c.info.run_name): c.info.status for c in children}
    assert sorted(status.values()) == ["FAILED", "FINISHED"]
    bad = next(c for c in children if c.info.status == "FAILED")
    assert bad_image in bad.data.tags["error"]
    good = next(c for c in children if c.info.status == "FINISHED")
    assert good.data.metrics["ray_overhead_s"] >= 0
    assert good.data.metrics["time_trial_s"] > good.data.metrics["time_worker_s"]

    # --resume continues the same sweep: the finished configuration is not run again, the failed
    # one is -- under its own child run, reopened (one run per configuration, restarts counted)
    resumed = run_sweep(cfg, resume=True, launch_dir=tmp_path)
    assert resumed.name == "unit-sweep" and resumed.parent_run_id == outcome.parent_run_id
    assert len(resumed.rows) == 2 and len(resumed.failed) == 1
    children = client.search_runs(
        [outcome.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'"
    )
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    again_failed = next(c for c in children if c.info.status == "FAILED")
    assert again_failed.info.run_id == bad.info.run_id and again_failed.data.tags["restarts"] == "1"
    assert bad_image in again_failed.data.tags["error"]
    assert client.get_run(outcome.parent_run_id).data.tags["launch"] == "2"

    # a driver that fails after Tune (here: at the results table) ends the sweep's run FAILED with
    # the error, never RUNNING, and the sweep can be resumed again
    def broken_table(rows):
        raise RuntimeError("the table broke")

    monkeypatch.setattr(results, "summarise", broken_table)
    with pytest.raises(RuntimeError, match="the table broke"):
        run_sweep(cfg, resume=True, launch_dir=tmp_path)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FAILED" and "the table broke" in parent.data.tags["error"]
    record = json.loads((tmp_path / "ray_results" / ".unit-sweep.sweep.json").read_text())
    assert record["state"] == "failed"

    # (a second launch with the same name gets a fresh one: tests/orchestrator/test_sweep_record.py)


def test_what_the_driver_can_check_is_refused_before_the_sweep_starts(tmp_path):
    """More shots than a class has: one ConfigError from run_sweep, no parent run, no Ray."""
    import ray

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(
        UNIT,
        [
            f"data.root={tmp_path / 'data'}",
            "sweep.space={data.shots: {choice: [2, 500]}}",
            f"tracking.uri={uri}",
        ],
    )
    started = ray.is_initialized()
    with pytest.raises(ConfigError, match="shots=500"):
        run_sweep(cfg, launch_dir=tmp_path)
    assert ray.is_initialized() == started
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was made
