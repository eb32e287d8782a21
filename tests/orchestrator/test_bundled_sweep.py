"""Bundled trials (several configurations in one Train run) against one configuration per trial.

Real Tune + Train + MLflow. A bundle must give every configuration exactly the metrics and the
learned state it gets in a trial of its own, each in its own FINISHED child run; a driver killed
mid-bundle (SIGKILL of its whole process group) and resumed must not repeat a configuration that
finished, and must finish the rest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
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


def _benchmark(tmp_path: Path, ray_tmp: str, *extra: str) -> subprocess.Popen:
    args = [
        sys.executable,
        str(REPO / "experiments" / "benchmark.py"),
        "--config",
        UNIT,
        f"data.root={tmp_path / 'data'}",
        "train.epochs=40",
        "sweep.space={seed: {choice: [1, 2, 3]}}",
        "sweep.bundle_size=3",
        "sweep.name=killed",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"sweep.storage_path={tmp_path / 'ray_results'}",
        *extra,
    ]
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    log = open(tmp_path / f"driver{len(extra)}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _kill_strays(ray_tmp: str) -> None:
    """SIGKILL any process of the killed driver's Ray that left its process group (by pid)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if ray_tmp.encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)


def test_a_killed_bundled_sweep_resumes_without_repeating_a_finished_configuration(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="vlpk", dir="/tmp")  # short: Ray's socket paths must fit
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    driver = _benchmark(tmp_path, ray_tmp)
    try:
        client = None
        deadline = time.time() + 240
        log = tmp_path / "driver0.log"
        while time.time() < deadline and driver.poll() is None:
            # the driver migrates a fresh store first; a second client racing it breaks the migration
            if "[vlprompt] sweep 'killed'" in log.read_text():
                client = client or MlflowClient(uri)
                runs = client.search_runs(
                    [e.experiment_id for e in client.search_experiments()],
                    filter_string="attributes.status = 'FINISHED' and tags.config_digest != ''",
                )
                if runs:
                    break
            time.sleep(0.2)
        assert driver.poll() is None, (tmp_path / "driver0.log").read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        _kill_strays(ray_tmp)
    experiment = client.get_experiment_by_name("vlprompt").experiment_id
    before = client.search_runs([experiment], filter_string="tags.config_digest != ''")
    finished_before = {r.data.tags["config_digest"] for r in before if r.info.status == "FINISHED"}
    assert 1 <= len(finished_before) < 3, "the kill must land mid-bundle"

    resumed = _benchmark(tmp_path, ray_tmp, "--resume")
    try:
        assert resumed.wait(300) == 0, (tmp_path / "driver1.log").read_text()[-3000:]
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
        _kill_strays(ray_tmp)
    after = client.search_runs([experiment], filter_string="tags.config_digest != ''")
    finished = [r.data.tags["config_digest"] for r in after if r.info.status == "FINISHED"]
    assert len(finished) == len(set(finished)) == 3  # every configuration once, none twice
    for digest in finished_before:  # a configuration that finished was not run again
        assert [r.info.status for r in after if r.data.tags["config_digest"] == digest] == ["FINISHED"]
    assert not [r for r in after if r.info.status == "RUNNING"]
