"""A run checkpointed after epoch k and resumed from it ends exactly where an unbroken run ends.

In-process (no Ray): a session that checkpoints every epoch (``orchestrator/checkpoints.py``,
the same ``capture``/``write``/``read`` Ray Train workers use) and "dies" after epoch k; a new
run resumed from that folder must give the unbroken run's metrics and learned state to the bit.
Random crops drawn from the global generator (``view_mode=images``, ``view_seed=null``) check
that the RNG streams come back too; a resume that loses the optimiser's momentum must not match
(the comparison can fail).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from vlprompt.orchestrator import checkpoints
from vlprompt.orchestrator.checkpoints import Progress
from vlprompt.orchestrator.config import load_config, resolve_paths
from vlprompt.orchestrator.loop import Session, WorkerContext, run

pytestmark = pytest.mark.e2e
UNIT = str(Path(__file__).resolve().parents[1] / "assets" / "unit.yaml")
CPU = torch.device("cpu")
EPOCHS, DIES_AFTER = 4, 2


class Died(RuntimeError):
    pass


class Checkpointing(Session):
    """Checkpoints into ``folder/epoch-N`` after each epoch; raises after ``dies_after`` epochs."""

    def __init__(self, folder: Path, dies_after: int | None = None, resume=None) -> None:
        self.folder, self.dies_after, self.resume = folder, dies_after, resume
        self.learned: dict[str, torch.Tensor] = {}

    def epoch_end(self, epoch, method, optimizer, stats) -> None:
        target = self.folder / f"epoch-{epoch + 1}"
        target.mkdir(parents=True)
        state = checkpoints.capture(method, optimizer, epoch + 1, stats)
        checkpoints.write(target, Progress(["earlier"], "this", state))
        if self.dies_after == epoch + 1:
            raise Died

    def finish(self, metrics, learned) -> None:
        self.learned = learned


def _cfg(tmp_path: Path, *overrides: str):
    base = [
        f"data.root={tmp_path / 'data'}",
        f"data.feature_cache={tmp_path / 'features'}",
        f"train.epochs={EPOCHS}",
        "train.batch_size=8",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    return resolve_paths(load_config(UNIT, [*base, *overrides]), tmp_path)


def _numbers(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith("time_") and "feature" not in k}


def test_a_run_resumed_from_its_checkpoint_ends_as_the_unbroken_run(tmp_path):
    # random crops drawn from the global generator: the RNG streams must come back too
    cfg = _cfg(tmp_path, "train.view_mode=images", "train.view_seed=null", "data.shots=2")
    ctx = WorkerContext(0, 1, CPU)
    unbroken = Checkpointing(tmp_path / "unbroken")
    expected = run(cfg, ctx, None, unbroken)

    with pytest.raises(Died):
        run(cfg, ctx, None, Checkpointing(tmp_path / "died", dies_after=DIES_AFTER))
    progress = checkpoints.read(tmp_path / "died" / f"epoch-{DIES_AFTER}")
    assert progress.done == ["earlier"] and progress.current == "this" and progress.state.epoch == DIES_AFTER
    resumed = Checkpointing(tmp_path / "resumed", resume=progress.state)
    got = run(cfg, ctx, None, resumed)

    assert _numbers(got) == _numbers(expected)
    assert resumed.learned.keys() == unbroken.learned.keys()
    assert all(torch.equal(resumed.learned[k], unbroken.learned[k]) for k in unbroken.learned)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [
        f"epoch-{e}" for e in range(DIES_AFTER + 1, EPOCHS + 1)
    ]

    # the comparison can fail: the same resume without the optimiser's momentum ends elsewhere
    state = checkpoints.read(tmp_path / "died" / f"epoch-{DIES_AFTER}").state
    for buffers in state.optimizer["state"].values():
        buffers["momentum_buffer"].zero_()
    forgetful = Checkpointing(tmp_path / "forgetful", resume=state)
    run(cfg, ctx, None, forgetful)
    assert not all(torch.equal(forgetful.learned[k], unbroken.learned[k]) for k in unbroken.learned)


def test_rng_streams_round_trip_through_a_checkpoint_folder(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    module = torch.nn.Module()
    module.p = param
    checkpoints.write(
        tmp_path, Progress([], "d", checkpoints.capture(module, optimizer, 1, {"train_loss": 1.0}))
    )
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = checkpoints.read(tmp_path).state
    checkpoints.set_rng_state(state.rng)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws
    assert state.stats == {"train_loss": 1.0} and state.epoch == 1


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading a checkpoint",))


def test_a_checkpoint_that_holds_code_is_refused(tmp_path):
    """Loads are ``weights_only``: a pickled callable in train_state.pt is an error, not a call."""
    checkpoints.write(tmp_path, Progress([], "d"))
    torch.save(
        {"params": {}, "optimizer": _Payload(), "rng": {}, "stats": {}}, tmp_path / checkpoints.STATE_FILE
    )
    (tmp_path / checkpoints.PROGRESS_FILE).write_text(
        '{"done": [], "current": "d", "epoch": 1, "rng": {"python": [], "numpy": []}}'
    )
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported global"):
        checkpoints.read(tmp_path)


def test_a_promptsrc_run_resumed_mid_aggregation_ends_as_the_unbroken_run(tmp_path):
    """PromptSRC's running prompt aggregate (a persistent buffer) travels in the checkpoint: a
    run that dies after epoch k and resumes ends with the unbroken run's aggregated prompts."""
    gpa = ("method.name=promptsrc", "method.gpa_mean=2.5", "method.gpa_std=1.5")  # weight on every epoch
    cfg = _cfg(tmp_path, *gpa, "data.shots=2")
    ctx = WorkerContext(0, 1, CPU)
    unbroken = Checkpointing(tmp_path / "unbroken")
    expected = run(cfg, ctx, None, unbroken)

    with pytest.raises(Died):
        run(cfg, ctx, None, Checkpointing(tmp_path / "died", dies_after=DIES_AFTER))
    state = checkpoints.read(tmp_path / "died" / f"epoch-{DIES_AFTER}").state
    assert float(state.params["gpa_aggregate"].abs().max()) > 0  # two epochs' weighted prompts
    resumed = Checkpointing(tmp_path / "resumed", resume=state)
    got = run(cfg, ctx, None, resumed)
    assert _numbers(got) == _numbers(expected)
    assert resumed.learned.keys() == unbroken.learned.keys()
    assert all(torch.equal(resumed.learned[k], unbroken.learned[k]) for k in unbroken.learned)

    # the comparison can fail: the same resume with the aggregate lost ends elsewhere
    state.params["gpa_aggregate"].zero_()
    forgetful = Checkpointing(tmp_path / "forgetful", resume=state)
    run(cfg, ctx, None, forgetful)
    assert not all(torch.equal(forgetful.learned[k], unbroken.learned[k]) for k in unbroken.learned)
