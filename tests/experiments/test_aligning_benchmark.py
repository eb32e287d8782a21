"""The aligning presets (promptalign, promptsync) through the front door, as a user runs them.

Two commands, each a real process: ``experiments/source_stats.py`` with the run's overrides
makes the statistics, then ``experiments/benchmark.py --config <preset>`` runs the preset's own
sweep (its two configurations, bundled in one trial: Ray Tune → Ray Train → the test-time loop)
on generated stand-ins with the tiny model, into a SQLite MLflow store in the test's folder.
Afterwards each child run must hold the protocol's metrics and say which statistics file it
aligned to (``run_inputs``: ``source_stats.file``, ``source_stats.fingerprint``). PromptSync's
per-class prototypes cover every class the run scores -- ImageNet-V2 scores all 1000 ImageNet
names -- so its statistics come from a folder of images per class name (``method.source_folder``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, ray_processes, stop_group, write_class_folders
from vlprompt import datasets as vds
from vlprompt.methods import stats_file
from vlprompt.orchestrator.config import load_config

pytestmark = pytest.mark.slow  # Ray Tune + Train in a subprocess (about a minute each)

SWEPT = {"promptalign": "method.align_weight", "promptsync": "method.discrimination_weight"}


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """A command in its own process group, stopped with the group whatever happens."""
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        stop_group(proc)
    return subprocess.CompletedProcess(args, proc.returncode, out, "")


@pytest.mark.parametrize("preset", sorted(SWEPT))
def test_the_aligning_preset_runs_through_the_benchmark_and_logs_its_statistics(preset, tmp_path):
    preset_cfg = load_config(preset)
    datasets = (preset_cfg.data.dataset, *preset_cfg.data.eval_targets)
    for name in datasets:
        vds.generate_dataset(name, tmp_path / "data", num_classes=3, images_per_class=4)
    common = [
        "model.name=vlp-tiny",
        "model.pretrained=null",
        f"data.root={tmp_path / 'data'}",
        "method.n_views=3",
        "method.selection_p=0.34",
    ]
    if preset == "promptsync":  # per-class rows of every class scored (see the module docstring)
        classes = [c for name in datasets for c in vds.load_dataset(name, tmp_path / "data").classnames]
        common.append(f"method.source_folder={write_class_folders(tmp_path / 'proxy', classes)}")
    ray_tmp = tempfile.mkdtemp(prefix="vlpb", dir="/tmp")  # short: Ray's socket paths must fit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    try:
        stats = [
            sys.executable,
            str(REPO / "experiments" / "source_stats.py"),
            "--config",
            preset,
            "--no-ray",
        ]
        made = _run([*stats, "--out-dir", str(tmp_path / "stats"), *common], tmp_path, env, 300)
        assert made.returncode == 0, made.stdout[-3000:]
        override = made.stdout.strip().splitlines()[-1]
        file = Path(override.removeprefix("method.source_stats="))
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        bench = [
            sys.executable,
            str(REPO / "experiments" / "benchmark.py"),
            "--config",
            preset,
            *common,
            override,
        ]
        more = [f"tracking.uri={uri}", "tracking.experiment=aligning", "resources.cpus_per_worker=1"]
        more.append(f"sweep.storage_path={tmp_path / 'ray_results'}")
        done = _run([*bench, *more], tmp_path, env, 900)
        assert done.returncode == 0, done.stdout[-6000:]
        assert ray_processes(ray_tmp, wait=30) == []  # the driver stopped the Ray it started
    finally:
        for pid in ray_processes(ray_tmp, wait=0):
            os.kill(pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("aligning").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.kind = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["num_failed"] == 0
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    swept = preset_cfg.sweep.space[SWEPT[preset]]["choice"]
    assert sorted(float(c.data.params[SWEPT[preset]]) for c in children) == sorted(swept)
    fingerprint = stats_file.read_header(file)[0]["fingerprint"]
    for child in children:
        metrics, params = child.data.metrics, child.data.params
        assert child.info.status == "FINISHED"
        assert 0.0 <= metrics["test_acc"] <= 100.0
        targets = [metrics[f"target_acc/{t}"] for t in preset_cfg.data.eval_targets]
        assert all(0.0 <= acc <= 100.0 for acc in targets)
        assert metrics["target_acc_mean"] == pytest.approx(sum(targets) / len(targets))
        assert params["source_stats.file"] == str(file)
        assert params["source_stats.fingerprint"] == fingerprint
