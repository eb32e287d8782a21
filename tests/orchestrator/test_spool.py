"""The tracking spool (orchestrator/spool.py): what is retried, what is spooled, in which order,
and that a replay sends every write exactly once -- against a real ``mlflow server``.

"Down" here is a real closed port (connection refused); the entries it spooled are then replayed
to the live server with ``uri=``. Killing and restarting the server itself is
``test_tracking_outage.py``'s job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from tests.conftest import free_port
from vlprompt.orchestrator import spool, tracking


@pytest.fixture
def folder(tmp_path):
    """A private spool folder and a short deadline; the process's settings restored afterwards."""
    saved = spool.Settings(**vars(spool.settings()))
    spool.configure(retry_deadline_s=0.5, spool_dir=tmp_path / "spool")
    yield tmp_path / "spool"
    vars(spool.settings()).update(vars(saved))
    spool._own.clear()  # what the test spooled is its own: no replay attempt at exit


def _dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


def _lines(folder: Path) -> list[dict]:
    (path,) = folder.glob("*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_unreachable_server_is_retried_until_the_deadline_then_named(folder):
    dead, attempts = _dead_uri(), []

    def create():
        attempts.append(1)
        return spool.client(dead).create_run("0")

    with pytest.raises(spool.TrackingUnavailable) as err:
        spool.call(dead, "create run", create, deadline_s=1.5)
    # MLflow's own HTTP retries are off, so each attempt fails fast and ours repeat it; with
    # its default 7 retries (backoff factor 2) the first attempt alone would outlast the deadline
    assert len(attempts) >= 2
    assert spool.transient(err.value.__cause__)
    message = str(err.value)
    assert dead in message and "Connection refused" in message
    assert f"python -m vlprompt.orchestrator.spool replay {folder}" in message


def test_a_write_past_the_deadline_is_spooled_and_does_not_raise(folder):
    dead = _dead_uri()
    tracking.log_metrics(dead, "r" * 32, {"loss": 1.5}, step=3)
    tracking.finish_run(dead, "r" * 32)
    lines = _lines(folder)
    assert [(r["op"], r["seq"]) for r in lines] == [("log_batch", 0), ("set_terminated", 1)]
    assert lines[0]["metrics"][0][:2] == ["loss", 1.5] and lines[0]["metrics"][0][3] == 3
    assert lines[1]["status"] == "FINISHED" and {r["uri"] for r in lines} == {dead}


@pytest.mark.slow
def test_an_answer_that_is_an_error_raises_at_once_and_is_not_spooled(mlflow_server, folder):
    uri, attempts = mlflow_server.uri, []

    def get():
        attempts.append(1)
        return spool.client(uri).get_run("0" * 32)

    with pytest.raises(MlflowException) as err:
        spool.call(uri, "get run", get, deadline_s=30)
    assert attempts == [1] and err.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert not spool.transient(err.value)

    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "spool"), "params")
    tracking.log_params(uri, run_id, {"lr": 0.1})
    tracking.log_params(uri, run_id, {"lr": 0.1})  # the same value again (a replay): accepted
    with pytest.raises(MlflowException) as changed:
        tracking.log_params(uri, run_id, {"lr": 0.2})
    assert changed.value.error_code == "INVALID_PARAMETER_VALUE"
    assert not folder.exists()  # nothing was spooled


@pytest.mark.slow
def test_a_spool_replays_in_order_once_with_artifacts_and_its_original_times(mlflow_server, folder):
    uri, dead = mlflow_server.uri, _dead_uri()
    mlflow = spool.client(uri)
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "spool"), "spooled")
    tracking.log_params(dead, run_id, {"method.name": "coop", "shots": 4})
    for step in range(5):
        tracking.log_metrics(dead, run_id, {"train_loss": 3.0 - step / 2}, step=step)
    files = {"prompt.txt": "a photo of a", "state.bin": b"\x00\x01"}
    tracking.log_artifact_files(dead, run_id, files, "learned")
    tracking.finish_run(dead, run_id)
    lines = _lines(folder)
    assert [r["op"] for r in lines] == ["log_batch"] * 6 + ["log_artifacts", "set_terminated"]
    assert [r["seq"] for r in lines] == list(range(8))
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # nothing reached the server yet

    first = spool.replay_folder(folder, uri=uri)
    assert (first.sent, first.rejected, first.left) == (8, 0, 0)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.end_time == lines[-1]["end_time"]  # when it ended, not when it was replayed
    assert run.data.params == {"method.name": "coop", "shots": "4"}
    history = mlflow.get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 3.0 - s / 2) for s in range(5)]
    assert [m.timestamp for m in sorted(history, key=lambda m: m.step)] == [
        r["metrics"][0][2] for r in lines[1:6]
    ]
    local = Path(mlflow.download_artifacts(run_id, "learned", str(folder.parent / "dl")))
    assert (local / "prompt.txt").read_text() == "a photo of a"
    assert (local / "state.bin").read_bytes() == b"\x00\x01"

    again = spool.replay_folder(folder, uri=uri)
    assert (again.sent, again.rejected) == (0, 0)  # every entry is marked done

    # a crash between sending and marking: the marks are lost, the replay sends everything again
    (path,) = folder.glob("*.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    crashed = spool.replay_folder(folder, uri=uri)
    assert (crashed.sent, crashed.rejected) == (8, 0)  # the same params again: accepted
    assert len(mlflow.get_metric_history(run_id, "train_loss")) == 5  # same metrics: deduplicated
    assert mlflow.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_an_entry_the_server_refuses_is_marked_and_does_not_block_the_rest(mlflow_server, folder):
    uri, dead = mlflow_server.uri, _dead_uri()
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "spool"), "refused")
    tracking.log_params(uri, run_id, {"lr": 0.1})
    tracking.log_params(dead, run_id, {"lr": 0.5})  # a changed param: MLflow will say no
    tracking.log_metrics(dead, run_id, {"test_acc": 71.0})
    tracking.finish_run(dead, run_id)
    done = spool.replay_folder(folder, uri=uri)
    assert (done.sent, done.rejected, done.left) == (2, 1, 0)
    run = spool.client(uri).get_run(run_id)
    assert run.data.params["lr"] == "0.1" and run.data.metrics["test_acc"] == 71.0
    assert run.info.status == "FINISHED"
    marks = [r for r in _lines(folder) if "done" in r]
    assert [m["done"] for m in marks] == [0, 1, 2]
    assert "INVALID_PARAMETER_VALUE" in marks[0]["rejected"]


def test_a_torn_last_line_is_skipped_and_the_next_entry_starts_on_its_own_line(folder):
    dead = _dead_uri()
    tracking.log_metrics(dead, "t" * 32, {"a": 1.0})
    (path,) = folder.glob("*.jsonl")
    with path.open("a") as f:
        f.write('{"op": "log_batch", "run_id": "tttt')  # a crash mid-write
    tracking.log_metrics(dead, "t" * 32, {"a": 2.0})
    assert [r["metrics"][0][1] for r in spool.pending(path)] == [1.0, 2.0]
