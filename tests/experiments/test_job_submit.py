"""End to end through every layer with real components.

``ray start --head`` on loopback (token authentication on) → ``ray job submit`` of
``experiments/benchmark.py`` → Tune + Optuna → Ray Train → methods → a real
``mlflow server`` over HTTP. Afterwards the MLflow client must find the sweep's parent
run and one FINISHED child per trial with ``test_acc`` and the learned-context artifact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_ray_job_submit_runs_the_benchmark_and_logs_to_mlflow(ray_head, mlflow_server, tmp_path):
    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": mlflow_server.uri, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    }
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "experiments/benchmark.py",
        "--config",
        "tests/assets/e2e.yaml",
        f"data.root={tmp_path / 'data'}",
        f"sweep.storage_path={tmp_path / 'ray_results'}",
        "tracking.experiment=e2e",
    ]
    done = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "succeeded" in output, output[-3000:]
    assert "| coop |" in output and "| zeroshot |" in output, output[-3000:]

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("e2e")
    assert experiment is not None
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["num_configurations"] == 2 and parent.data.metrics["num_failed"] == 0
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.data.params["method.name"] for c in children) == ["coop", "zeroshot"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert 0.0 <= child.data.metrics["test_acc"] <= 100.0
        assert child.data.params["split_fingerprint"]
        assert child.data.params["source_sha256"]
        history = client.get_metric_history(child.info.run_id, "train_loss")
        if child.data.params["method.name"] == "coop":
            assert child.data.metrics["trainable_params"] == 4 * 64  # n_ctx × text width of vlp-tiny
            assert len(history) == 2  # one point per epoch
            artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "learned")}
            assert artifacts == {"learned/learned_state.pt", "learned/learned_prompt_words.txt"}
            words = client.download_artifacts(
                child.info.run_id, "learned/learned_prompt_words.txt", str(tmp_path)
            )
            assert "ctx as text:" in Path(words).read_text()
        else:
            assert child.data.metrics["trainable_params"] == 0
            assert history == []
    results = client.list_artifacts(parent.info.run_id, "results")
    assert {a.path for a in results} == {"results/results.md", "results/results.csv", "results/trials.json"}
