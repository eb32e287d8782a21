"""The bias-vs-prompt study end to end on generated data: the preset's sweep (IVLP and its
parameter-matched bias tuning, paired by dataset × shots × seed) through Ray Tune/Train, then
``experiments/report.py`` turning the MLflow runs into the paired table and plot."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vlprompt.experiments import report
from vlprompt.orchestrator.config import load_config
from vlprompt.orchestrator.sweep import run_sweep

pytestmark = pytest.mark.slow

SPEC = "ivlp n_ctx_text=2 n_ctx_vision=2 depth_text=2 depth_vision=2"


def test_study_runs_matched_pairs_and_reports_them(local_ray, tmp_path):
    cfg = load_config(
        "bias_vs_prompt",
        [
            "model.name=vlp-tiny",
            "model.pretrained=null",
            f"data.root={tmp_path / 'data'}",
            "data.generate_missing=true",
            "method.depth_text=2",
            "method.depth_vision=2",
            "train.epochs=1",
            "resources.cpus_per_worker=0.9",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "tracking.experiment=study",
            "sweep.space={method.name: {choice: [ivlp, bias_tuning]}, "
            f"method.match: {{choice: ['{SPEC}'], when: {{method.name: bias_tuning}}}}, "
            "data.dataset: {choice: [synthetic]}, data.shots: {choice: [2]}, seed: {choice: [1, 2]}}",
        ],
    )
    outcome = run_sweep(cfg, launch_dir=tmp_path)
    assert not outcome.failed, outcome.failed
    params = {(r["method"], r["seed"]): r["trainable_params"] for r in outcome.rows}
    assert len(params) == 4
    for seed in (1, 2):  # parameter-matched: the same number of trainable parameters
        assert params[("ivlp", seed)] == params[("bias_tuning", seed)] > 0

    out = tmp_path / "report"
    assert (
        report.main(
            [
                "--tracking-uri",
                outcome.tracking_uri,
                "--run-id",
                outcome.parent_run_id,
                "--compare",
                "method=ivlp",
                "method=bias_tuning",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert len(rows) == 1 and rows[0]["dataset"] == "synthetic" and rows[0]["n"] == "2"
    by_seed = {(r["method"], r["seed"]): r["test_acc"] for r in outcome.rows}
    expected = sum(by_seed[("bias_tuning", s)] - by_seed[("ivlp", s)] for s in (1, 2)) / 2
    assert float(rows[0]["diff_mean"]) == pytest.approx(expected, abs=1e-6)
    client = MlflowClient(outcome.tracking_uri)
    logged = {a.path for a in client.list_artifacts(outcome.parent_run_id, "report")}
    assert {"report/compare.md", "report/compare.png"} <= logged
    assert Path(out / "compare.png").stat().st_size > 1000
