"""Tracking outages lose nothing: a real ``mlflow server`` is SIGKILLed (its whole process group)
and restarted on the same port with the same database while real writers use it.

1. A real sweep (``experiments/benchmark.py``, a subprocess in its own process group) whose
   server dies mid-training and comes back: the sweep exits 0 and every child run has every
   per-epoch ``train_loss``, its ``test_acc`` and FINISHED.
2. A real training run whose server stays down past the deadline: its writes are spooled, the run
   ends normally, and the replay command sends every write once the server is back.
3. In one process: writes queue behind the spooled ones and the first write after the server
   answers sends them in order; one stderr line per event, not one per write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, free_port, wait_for
from vlprompt.orchestrator import spool, tracking

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
UNIT = str(REPO / "tests" / "assets" / "unit.yaml")


class Server:
    """``mlflow server`` on a fixed port and database, killable and restartable (process group)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.starts = root, free_port(), 0
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.root / f"server{self.starts}.log"
        self.starts += 1
        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root}/mlflow.db",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
            )
        health = f"{self.uri}/health"
        wait_for(
            lambda: urllib.request.urlopen(health, timeout=2).status == 200,
            180,
            "mlflow server",
            self.proc,
            log,
        )

    def kill(self) -> None:
        """SIGKILL the server's whole process group (the CLI and its uvicorn worker)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        wait_for(lambda: not _answers(self.uri), 30, "the killed server's port to close")

    def ensure_up(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()


def _answers(uri: str) -> bool:
    try:
        return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("outage-mlflow"))
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(30)


@pytest.fixture
def settings():
    """Restore this process's spool settings after a test changed them."""
    saved = spool.Settings(**vars(spool.settings()))
    yield
    vars(spool.settings()).update(vars(saved))
    spool._own.clear()  # what the test spooled is its own: no replay attempt at exit


def _kill_strays(ray_tmp: str) -> None:
    """SIGKILL, by pid, any process of the sweep's own Ray that left its process group."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if ray_tmp.encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)


def _sweep(tmp_path: Path, uri: str, ray_tmp: str, epochs: int) -> subprocess.Popen:
    args = [
        sys.executable,
        str(REPO / "experiments" / "benchmark.py"),
        "--config",
        UNIT,
        f"data.root={tmp_path / 'data'}",
        f"train.epochs={epochs}",
        "sweep.space={seed: {choice: [1, 2]}}",
        "sweep.bundle_size=2",
        "data.pipeline=false",  # the trial encodes its few images itself: no Ray Data start-up
        "sweep.name=outage",
        f"tracking.uri={uri}",
        "tracking.experiment=outage",
        "tracking.retry_deadline_s=240",  # longer than a restart takes on a busy 2-core machine
        f"sweep.storage_path={tmp_path / 'ray_results'}",
    ]
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        args,
        cwd=tmp_path,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _first_loss(client: MlflowClient) -> dict[str, int]:
    """Per child run of the sweep, how many train_loss steps it has (once any has one)."""
    exp = client.get_experiment_by_name("outage")
    runs = client.search_runs([exp.experiment_id], "tags.config_digest != ''") if exp else []
    steps = {r.info.run_id: len(client.get_metric_history(r.info.run_id, "train_loss")) for r in runs}
    return steps if any(steps.values()) else {}


def test_a_sweep_survives_its_server_killed_and_restarted_and_loses_nothing(server, tmp_path):
    server.ensure_up()
    epochs = 30
    client = MlflowClient(server.uri)
    ray_tmp = tempfile.mkdtemp(prefix="vlpo", dir="/tmp")  # short: Ray's socket paths must fit
    driver = _sweep(tmp_path, server.uri, ray_tmp, epochs)
    log = tmp_path / "driver.log"
    try:
        at_kill: dict[str, int] = {}

        def training() -> bool:
            at_kill.update(_first_loss(client))
            return bool(at_kill)

        wait_for(training, 400, "the sweep's first logged epoch", driver, log)
        server.kill()
        time.sleep(2)  # the outage: every write and read meanwhile is refused
        server.start()
        assert driver.wait(400) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        _kill_strays(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = log.read_text()
    assert f"MLflow at {server.uri} is not answering" in text and "answers again" in text
    assert len(at_kill) < 2 or min(at_kill.values()) < epochs  # the kill landed mid-training

    exp = client.get_experiment_by_name("outage").experiment_id
    children = client.search_runs([exp], "tags.config_digest != ''")
    assert sorted(r.info.status for r in children) == ["FINISHED", "FINISHED"]
    for run in children:
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(epochs)), run.info.run_name
        assert 0.0 <= run.data.metrics["test_acc"] <= 100.0
        assert run.data.params["method.name"] == "coop"
    (parent,) = client.search_runs([exp], "tags.kind = 'sweep'")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["num_configurations"] == 2 and parent.data.metrics["num_failed"] == 0
    folder = tmp_path / "ray_results" / "outage" / tracking.SPOOL_FOLDER
    assert [p for p in folder.glob("*.jsonl") if spool.pending(p)] == []  # nothing left behind


WRITER = """
import sys
from pathlib import Path

import torch

from vlprompt.orchestrator import tracking
from vlprompt.orchestrator.config import load_config, resolve_paths
from vlprompt.orchestrator.loop import WorkerContext, run

unit, root, run_id, *overrides = sys.argv[1:]
cfg = resolve_paths(load_config(unit, overrides), Path(root))
tracking.configure(cfg)
metrics = run(cfg, WorkerContext(0, 1, torch.device("cpu")), run_id)
tracking.finish_run(cfg.tracking.uri, run_id)
print(f"test_acc={metrics['test_acc']!r}")
"""


def test_a_run_whose_server_stays_down_spools_and_the_replay_command_sends_it(server, tmp_path, settings):
    server.ensure_up()
    uri, folder, epochs = server.uri, tmp_path / "spool", 5
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "down"), "down-run")
    server.kill()
    overrides = [
        f"data.root={tmp_path / 'data'}",
        f"train.epochs={epochs}",
        "sweep.space={}",
        f"tracking.uri={uri}",
        "tracking.retry_deadline_s=2",
        f"tracking.spool_dir={folder}",
    ]
    writer = subprocess.run(
        [sys.executable, "-c", WRITER, UNIT, str(tmp_path), run_id, *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert writer.returncode == 0, writer.stderr[-4000:]  # the run did not die
    test_acc = float(writer.stdout.strip().splitlines()[-1].removeprefix("test_acc="))
    assert writer.stderr.count("is not answering") == 1 and writer.stderr.count("spooled to") == 1
    (path,) = folder.glob("*.jsonl")
    entries = spool.pending(path)
    assert [e["op"] for e in entries][-2:] == ["log_artifacts", "set_terminated"]

    server.start()
    replay = [sys.executable, "-m", "vlprompt.orchestrator.spool", "replay", str(folder)]
    sent = subprocess.run(replay, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert f"sent {len(entries)}, rejected 0, still pending 0" in sent.stdout
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == entries[-1]["end_time"]
    assert run.data.params["method.name"] == "coop" and run.data.params["trainable_params"] == "256"
    assert run.data.metrics["test_acc"] == pytest.approx(test_acc)
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(epochs))
    assert "learned/learned_prompt_words.txt" in [a.path for a in client.list_artifacts(run_id, "learned")]
    again = subprocess.run(replay, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "sent 0, rejected 0, still pending 0" in again.stdout


def test_writes_queue_behind_the_spool_and_the_first_write_after_recovery_sends_them(
    server, tmp_path, settings, capsys
):
    server.ensure_up()
    uri = server.uri
    spool.configure(retry_deadline_s=1, spool_dir=tmp_path / "spool")
    run_id = tracking.start_run(uri, tracking.ensure_experiment(uri, "queue"), "queued")
    tracking.log_metrics(uri, run_id, {"loss": 4.0}, step=0)  # sent
    server.kill()
    for step in (1, 2, 3):  # the first waits out the deadline, then all are spooled
        tracking.log_metrics(uri, run_id, {"loss": 4.0 - step}, step=step)
        tracking.set_tags(uri, run_id, {"phase": str(step)})  # a tag: the last write wins
    spooled_at = time.monotonic()
    server.start()
    # the next write probes the server again once PROBE_INTERVAL_S has passed (a wait, not a check)
    time.sleep(max(0.0, spool.PROBE_INTERVAL_S - (time.monotonic() - spooled_at)))
    tracking.log_metrics(uri, run_id, {"loss": 0.0}, step=4)  # sends the 6 spooled writes, then itself
    tracking.set_tags(uri, run_id, {"phase": "4"})
    tracking.finish_run(uri, run_id)

    client = MlflowClient(uri)
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(s, 4.0 - s) for s in range(5)]
    timestamps = [m.timestamp for m in history]
    assert timestamps == sorted(timestamps)  # each kept the time it was logged at, not replayed at
    run = client.get_run(run_id)
    assert run.data.tags["phase"] == "4"  # the spooled tags went first, in order; the new one last
    assert run.info.status == "FINISHED"
    (path,) = (tmp_path / "spool").glob("*.jsonl")
    assert spool.pending(path) == []
    err = capsys.readouterr().err
    for line in ("is not answering", "spooled to", "answers again", "replayed 6 spooled write(s)"):
        assert err.count(line) == 1, err


def test_a_search_sends_the_spooled_finished_first_so_a_resume_skips_that_configuration(
    server, tmp_path, settings
):
    server.ensure_up()
    uri = server.uri
    spool.configure(retry_deadline_s=1, spool_dir=tmp_path / "spool")
    exp = tracking.ensure_experiment(uri, "search")
    parent = tracking.start_run(uri, exp, "sweep", tags={"kind": "sweep"})
    tags = {"config_digest": "abc123", "trial_id": "t0"}
    child = tracking.start_run(uri, exp, "child", tags=tags, parent_run_id=parent)
    server.kill()
    tracking.log_metrics(uri, child, {"test_acc": 55.0})  # past the deadline: spooled
    tracking.finish_run(uri, child)
    server.start()
    # no write comes after the outage: the search itself sends what was spooled, then answers
    assert tracking.digest_states(uri, exp, parent, launch=1) == {"abc123": "finished"}
    assert tracking.fail_unfinished_children(uri, exp, parent, "sweep ended") == 0
    run = MlflowClient(uri).get_run(child)
    assert run.info.status == "FINISHED" and run.data.metrics["test_acc"] == 55.0
