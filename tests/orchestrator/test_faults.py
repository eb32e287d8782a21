"""Faults injected into real sweeps (Ray Train + Tune + MLflow, the front door in a subprocess).

* A Train worker, then the Train controller, then the Tune trial actor SIGKILLed mid-run: Ray
  Train restarts the worker group / Tune retries the trial, the run resumes from its last
  checkpoint under the same MLflow child run (``restarts`` = 3) and ends with the numbers and
  learned state of an unbroken run.
* ASHA stops a hopeless trial early; the rest finish.
* A driver stopped by SIGINT, then SIGKILLed while resuming, then resumed again: the in-flight
  configuration continues from its checkpoints under its one child run, nothing finished is
  repeated, states are KILLED (not FAILED/RUNNING) after the signal, nothing is RUNNING at the
  end, no configuration has two FINISHED runs, and no Ray process outlives its driver.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from vlprompt.orchestrator.config import load_config, resolve_paths
from vlprompt.orchestrator.loop import Keep, WorkerContext, run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
UNIT = str(REPO / "tests" / "assets" / "unit.yaml")
COMPARED = ("test_acc", "val_acc", "final_train_loss")


class Driver:
    """``experiments/benchmark.py`` in its own process group, with a private Ray temp folder."""

    def __init__(
        self, tmp_path: Path, ray_tmp: str, overrides: list[str], label: str, *flags: str, config: str = UNIT
    ) -> None:
        self.log = tmp_path / f"{label}.log"
        self.ray_tmp = ray_tmp
        args = [
            sys.executable,
            str(REPO / "experiments" / "benchmark.py"),
            "--config",
            config,
            *flags,
            *overrides,
        ]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                args,
                cwd=tmp_path,
                env={**os.environ, "RAY_TMPDIR": ray_tmp},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, check: Callable[[str], bool], timeout: float, what: str) -> float:
        started = time.time()
        while time.time() - started < timeout:
            if check(self.text()):
                return time.time()
            assert self.proc.poll() is None, f"driver ended before {what}:\n{self.text()[-4000:]}"
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.text()[-4000:]}")

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def ray_processes(ray_tmp: str) -> list[int]:
    """Live processes of a Ray whose ``RAY_TMPDIR`` is ``ray_tmp`` (by command line or environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().split()[2] == "Z":
                continue
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"RAY_TMPDIR={ray_tmp}".encode() in blob or f"{ray_tmp}/".encode() in blob:
            found.append(int(entry.name))
    return found


def ray_processes_after(ray_tmp: str, timeout: float) -> list[int]:
    """The processes of that Ray still alive after waiting up to ``timeout`` s for them to end."""
    started = time.time()
    while (left := ray_processes(ray_tmp)) and time.time() - started < timeout:
        time.sleep(0.5)
    return left


def _commands(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            out.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}")
    return out


def ray_actor_pid(ray_tmp: str, title: str) -> int:
    """The pid of the (one) Ray process titled ``ray::<title>...`` of this Ray."""
    for pid in ray_processes(ray_tmp):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"ray::{title}".encode()):
                return pid
    raise AssertionError(f"no ray::{title} process found")


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ray_tmp():
    path = tempfile.mkdtemp(prefix="vlpf", dir="/tmp")  # short: Ray's socket paths must fit
    yield path
    kill_all(ray_processes(path))
    shutil.rmtree(path, ignore_errors=True)


def _overrides(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        f"data.root={tmp_path / 'data'}",
        f"data.feature_cache={tmp_path / 'features'}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"sweep.storage_path={tmp_path / 'ray_results'}",
        f"sweep.name={name}",
        "train.checkpoint_every=1",
        "train.checkpoint_min_interval_s=0",
        "data.pipeline=false",  # each trial encodes its few images itself: no Ray Data start-up per launch
        *extra,
    ]


def _unbroken(tmp_path: Path, overrides: list[str]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The same configuration run in-process, start to end (the features come from the same cache)."""
    kept = Keep()
    cfg = resolve_paths(load_config(UNIT, [*overrides, "sweep.space={}"]), tmp_path)
    metrics = run(cfg, WorkerContext(0, 1, torch.device("cpu")), None, kept)
    return metrics, kept.learned


def _learned(client: MlflowClient, run_id: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    path = client.download_artifacts(run_id, "learned/learned_state.pt", str(tmp_path / run_id))
    return torch.load(path, weights_only=True)


def _children(client: MlflowClient, parent: str) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def _parent_id(text: str) -> str:
    return re.search(r"MLflow run (\w+) at", text).group(1)


def _epoch_line(n: int) -> Callable[[str], bool]:
    return lambda text: re.search(rf"epoch {n}/\d+ loss", text) is not None


def _nth_resume(text: str, n: int) -> tuple[int, int]:
    """Where the ``n``-th "resumed after epoch k" line ends, and the epoch to kill at next (k + 2)."""
    found = list(re.finditer(r"resumed after epoch (\d+)", text))[n - 1]
    return found.end(), int(found.group(1)) + 2


#: The processes of a trial, each SIGKILLed in turn: the Train worker (Ray Train restarts the
#: worker group), the Train controller and the Tune trial actor (Tune retries the trial; its new
#: Train run restores the old one's checkpoints by name).
VICTIMS = ("RayTrainWorker", "TrainController", "ImplicitFunc")


def test_killed_trial_processes_resume_from_their_checkpoint_with_the_same_numbers(tmp_path, ray_tmp):
    overrides = _overrides(tmp_path, "worker-kill", "train.epochs=30", "resources.max_failures=2")
    driver = Driver(tmp_path, ray_tmp, overrides, "driver")
    epoch, since, recoveries = 4, 0, []
    for n, title in enumerate(VICTIMS, start=1):  # each kill lands two epochs after the last resume
        driver.wait_for(lambda t, e=epoch, i=since: f"epoch {e}/30 loss" in t[i:], 240, f"epoch {epoch}")
        os.kill(ray_actor_pid(ray_tmp, title), signal.SIGKILL)
        killed_at = time.time()
        resumed = driver.wait_for(lambda t, n=n: t.count("resumed after epoch") >= n, 180, f"resume {n}")
        recoveries.append(resumed - killed_at)
        # Look for the next epoch from the resume line on, not from the end of the log: Ray forwards
        # worker output in bursts, so epochs after the resume may arrive in the same read as it.
        since, epoch = _nth_resume(driver.text(), n)
    assert driver.finish() == 0, driver.text()[-4000:]
    print(
        "\n[faults] "
        + ", ".join(f"{t} killed: resumed {s:.1f} s later" for t, s in zip(VICTIMS, recoveries, strict=True))
    )

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (child,) = _children(client, _parent_id(driver.text()))  # one child run, not a second one
    assert child.info.status == "FINISHED" and child.data.tags["restarts"] == "3"
    assert child.data.metrics["restarts"] == 3 and "previous_error" in child.data.tags
    history = client.get_metric_history(child.info.run_id, "train_loss")
    assert {m.step for m in history} == set(range(30))

    expected, learned = _unbroken(tmp_path, overrides)
    assert {k: child.data.metrics[k] for k in COMPARED} == {k: expected[k] for k in COMPARED}
    got = _learned(client, child.info.run_id, tmp_path)
    assert got.keys() == learned.keys() and all(torch.equal(got[k], learned[k]) for k in learned)


def _seed(run) -> int:
    """From the run's name: a run stopped right after it opened has no params yet."""
    return int(re.search(r"-seed(\d+)-", run.info.run_name).group(1))


def _states(client: MlflowClient, parent: str) -> dict[int, list[str]]:
    """seed → the statuses of its configuration's child runs."""
    out: dict[int, list[str]] = {}
    for child in _children(client, parent):
        out.setdefault(_seed(child), []).append(child.info.status)
    return out


def test_a_stopped_then_killed_driver_resumes_to_a_complete_sweep(tmp_path, ray_tmp):
    overrides = _overrides(
        tmp_path,
        "driver-faults",
        "train.epochs=20",
        "sweep.space={seed: {choice: [1, 2, 3]}}",
        "sweep.bundle_size=3",
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    # 1. SIGINT while the second configuration trains: what ran ends KILLED, resumable
    first = Driver(tmp_path, ray_tmp, overrides, "launch1")
    first.wait_for(lambda t: "seed 2: epoch 3/20" in t, 240, "seed 2's third epoch")
    first.proc.send_signal(signal.SIGINT)
    assert first.finish(120) == 130, first.text()[-4000:]
    assert "continue with: python experiments/benchmark.py" in first.text(), first.text()[-4000:]
    client = MlflowClient(uri)
    parent = _parent_id(first.text())
    assert client.get_run(parent).info.status == "KILLED"
    assert "interrupted by SIGINT" in client.get_run(parent).data.tags["stopped"]
    states = _states(client, parent)  # Tune ends the trial a few seconds after the signal
    killed = [seed for seed, s in states.items() if s == ["KILLED"]]
    assert len(killed) == 1 and states[1] == ["FINISHED"], states
    assert all(s in (["FINISHED"], ["KILLED"]) for s in states.values()), states
    inflight = killed[0]

    # a changed config is refused before Ray starts, naming the key
    changed = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "benchmark.py"),
            "--config",
            UNIT,
            "--resume",
            *overrides,
            "train.epochs=21",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert changed.returncode == 2 and "train.epochs: 20 → 21" in changed.stderr, changed.stderr

    # 2. resumed, then SIGKILLed (the whole process group) while seed 2 trains on
    second = Driver(tmp_path, ray_tmp, overrides, "launch2", "--resume")
    started = f"seed {inflight}: epoch "
    second.wait_for(lambda t: started in t, 240, "the in-flight configuration")
    found = re.search(rf"seed{inflight}-\S+: resumed after epoch (\d+)", second.text())
    resumed_epoch = int(found.group(1)) if found else 0  # none if it was stopped before a checkpoint
    more = f"seed {inflight}: epoch {resumed_epoch + 2}/20"
    second.wait_for(lambda t: more in t, 120, "two more epochs")
    second.kill()
    killed_at, orphans = time.time(), len(ray_processes(ray_tmp))
    left = ray_processes_after(ray_tmp, 90)
    print(
        f"\n[faults] driver SIGKILLed: {orphans} Ray processes outlived it, {len(left)} still alive after "
        f"{time.time() - killed_at:.1f} s"
    )
    assert not left, "a killed driver's Ray processes must end by themselves (Ray's fate sharing)"
    assert client.get_run(parent).info.status == "RUNNING"  # nobody could close it: the next launch does

    # 3. resumed again: the sweep completes, each configuration once
    third = Driver(tmp_path, ray_tmp, overrides, "launch3", "--resume")
    assert third.finish() == 0, third.text()[-4000:]
    left = ray_processes_after(ray_tmp, 30)  # its Ray ends with it, the last processes a moment later
    assert not left, f"processes of a finished driver's Ray are left: {_commands(left)}"
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags["launch"] == "3"
    assert _states(client, parent) == {1: ["FINISHED"], 2: ["FINISHED"], 3: ["FINISHED"]}
    children = {_seed(c): c for c in _children(client, parent)}
    assert children[1].data.tags.get("restarts") is None  # finished in launch 1, never run again
    assert int(children[inflight].data.tags["restarts"]) >= 2
    assert "| coop" in third.text() and "1,2,3" in third.text()  # the table has every seed

    # the configuration stopped twice ends as an unbroken run of it does
    expected, learned = _unbroken(tmp_path, [*overrides, f"seed={inflight}"])
    assert {k: children[inflight].data.metrics[k] for k in COMPARED} == {k: expected[k] for k in COMPARED}
    got = _learned(client, children[inflight].info.run_id, tmp_path)
    assert all(torch.equal(got[k], learned[k]) for k in learned)


def test_asha_stops_a_hopeless_trial_early_and_the_rest_finish(tmp_path, ray_tmp):
    """Per-epoch val_acc reaches Tune; ASHA stops the trial that cannot learn (lr 1e-9 from a
    random prompt) at its first rung; the one that learns runs all its epochs. Stopped is not
    failed: the sweep exits 0, the stopped configuration's run is KILLED with the reason."""
    epochs = 6
    overrides = [
        f"data.root={tmp_path / 'data'}",
        f"data.feature_cache={tmp_path / 'features'}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"sweep.storage_path={tmp_path / 'ray_results'}",
        "data.shots=4",
        "method.ctx_init=''",  # a random prompt
        f"train.epochs={epochs}",
        "train.warmup_epochs=0",
        "sweep.space={train.lr: {choice: [0.02, 1e-9]}}",
        "sweep.scheduler=asha",
        "sweep.metric=val_acc",
        "sweep.grace_period=2",
        "resources.max_concurrent_trials=1",  # the learner sets the rung's bar first
        "data.pipeline=false",
    ]
    driver = Driver(tmp_path, ray_tmp, overrides, "asha", config="quickstart")
    assert driver.finish() == 0, driver.text()[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = {float(c.data.params["train.lr"]): c for c in _children(client, _parent_id(driver.text()))}
    learner, hopeless = runs[0.02], runs[1e-9]
    # the epochs validated (steps 0..epochs-1; the final val_acc is logged at step `epochs`)
    steps = {
        lr: {m.step for m in client.get_metric_history(r.info.run_id, "val_acc") if m.step < epochs}
        for lr, r in runs.items()
    }
    assert learner.info.status == "FINISHED" and steps[0.02] == set(range(epochs))
    assert hopeless.info.status == "KILLED" and "stopped early" in hopeless.data.tags["stopped"]
    assert "error" not in hopeless.data.tags  # stopped, not failed (nor marked so by its dying trial)
    assert 2 <= len(steps[1e-9]) < epochs and "test_acc" not in hopeless.data.metrics
    assert "STOPPED:" in driver.text()
