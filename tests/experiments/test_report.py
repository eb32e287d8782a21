"""experiments/report.py on a real SQLite MLflow store: tables, paired comparison, artifacts on the parent."""

from __future__ import annotations

import csv
import io
import math
import time

import pytest
from mlflow.tracking import MlflowClient

from vlprompt.experiments import report
from vlprompt.orchestrator import tracking


def _child(uri, exp, parent, method, dataset, seed, acc, status="FINISHED"):
    run_id = tracking.start_run(uri, exp, f"{method}-{dataset}-{seed}", parent_run_id=parent)
    params = {"method.name": method, "data.dataset": dataset, "data.shots": 4, "data.protocol": "few_shot"}
    if method == "coop":
        params["method.n_ctx"] = 4
    tracking.log_params(uri, run_id, {**params, "seed": seed})
    if acc is not None:
        tracking.log_metrics(uri, run_id, {"test_acc": acc, "trainable_params": 2048.0}, step=3)
    if status == "FINISHED":
        tracking.finish_run(uri, run_id)
    elif status == "FAILED":
        tracking.finish_run(uri, run_id, "boom")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module (creating a SQLite store's schema takes seconds)."""
    tmp_path = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)  # the SQLite store's default artifact root is relative to the cwd
        yield _fill(f"sqlite:///{tmp_path}/mlflow.db")


def _fill(uri):
    exp = tracking.ensure_experiment(uri, "report-test")
    old = tracking.start_run(uri, exp, "mysweep", tags={"kind": "sweep", "sweep": "mysweep"})
    _child(uri, exp, old, "coop", "eurosat", 1, 10.0)  # an older sweep of the same name: not read
    time.sleep(0.05)
    parent = tracking.start_run(uri, exp, "mysweep", tags={"kind": "sweep", "sweep": "mysweep"})
    for seed, (coop, bias) in enumerate([(70.0, 71.0), (72.0, 74.0), (74.0, 77.0)], start=1):
        _child(uri, exp, parent, "coop", "eurosat", seed, coop)
        _child(uri, exp, parent, "bias_tuning", "eurosat", seed, bias)
    _child(uri, exp, parent, "coop", "dtd", 1, 50.0)
    _child(uri, exp, parent, "bias_tuning", "dtd", 1, 55.0)
    _child(uri, exp, parent, "coop", "dtd", 2, 52.0)  # finished, no partner
    _child(uri, exp, parent, "bias_tuning", "dtd", 2, 99.0, status="FAILED")
    _child(uri, exp, parent, "bias_tuning", "dtd", 3, None, status="RUNNING")
    tracking.finish_run(uri, parent)
    return uri, parent


def _csv(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_report_tables_numbers_and_artifacts_on_the_parent_run(store, tmp_path, capsys):
    uri, parent = store
    out = tmp_path / "out"
    argv = ["--tracking-uri", uri, "--sweep", "mysweep", "--out", str(out)]
    assert report.main([*argv, "--a", "method=coop", "--b", "method=bias_tuning"]) == 0
    printed = capsys.readouterr().out
    assert "9 finished child run(s); skipped 2 (1 FAILED, 1 RUNNING)" in printed
    assert "4 pair(s); dropped 1: 1 A without B" in printed

    summary = {(r["method"], r["dataset"]): r for r in _csv(out / "summary.csv")}
    assert float(summary["coop", "eurosat"]["test_acc_mean"]) == 72.0
    assert float(summary["coop", "eurosat"]["test_acc_std"]) == 2.0
    assert summary["coop", "dtd"]["seeds"] == "1,2" and float(summary["coop", "dtd"]["test_acc_mean"]) == 51.0
    assert float(summary["bias_tuning", "dtd"]["test_acc_n"]) == 1  # the FAILED 99.0 is not counted

    rows = {r["dataset"]: r for r in _csv(out / "compare.csv")}
    eurosat, dtd = rows["eurosat"], rows["dtd"]
    assert (eurosat["n"], float(eurosat["a_mean"]), float(eurosat["b_mean"])) == ("3", 72.0, 74.0)
    assert float(eurosat["diff_mean"]) == 2.0  # diffs 1, 2, 3
    assert float(eurosat["ci_half_width"]) == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)
    assert (dtd["n"], float(dtd["diff_mean"]), dtd["ci_low"]) == ("1", 5.0, "")
    assert "undefined (n=1)" in (out / "compare.md").read_text()
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")}
    assert logged == {
        f"report/{n}" for n in ("summary.md", "summary.csv", "compare.md", "compare.csv", "compare.png")
    }


def test_report_by_run_id_with_compare_shorthand_and_bad_input(store, tmp_path):
    uri, parent = store
    out = tmp_path / "by_id"
    argv = ["--tracking-uri", uri, "--run-id", parent, "--out", str(out), "--pair-by", "dataset,seed"]
    assert report.main([*argv, "--compare", "method.n_ctx=4", "method.name=bias_tuning"]) == 0
    assert {r["dataset"]: r["n"] for r in _csv(out / "compare.csv")} == {"eurosat": "3", "dtd": "1"}
    assert report.main(["--tracking-uri", uri, "--sweep", "no-such-sweep", "--out", str(out)]) == 2
    with pytest.raises(SystemExit):
        report.main([*argv, "--a", "method=coop"])  # --b missing


def test_versus_table_per_dataset_with_the_mean_gain(store, tmp_path):
    """Unpaired A against B per dataset: the shape of the README's small-world table."""
    uri, _ = store
    out = tmp_path / "versus"
    argv = ["--tracking-uri", uri, "--sweep", "mysweep", "--out", str(out)]
    assert report.main([*argv, "--versus", "method=coop", "method=bias_tuning"]) == 0
    text = (out / "versus.md").read_text()
    # eurosat: coop 70/72/74 = 72.0, bias 71/74/77 = 74.0 ± 3.0 (3); dtd: coop 51.0, bias 55.0 (1)
    assert "| few_shot | eurosat | - | - | 72.0 | 74.0 ± 3.0 (3) | +2.0 |" in text
    assert "| few_shot | dtd | - | - | 51.0 | 55.0 ± 0.0 (1) | +4.0 |" in text
    assert "few_shot: mean gain B − A over 2 dataset(s): +3.0 points." in text
