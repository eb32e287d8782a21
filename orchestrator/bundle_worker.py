"""A Ray Train worker's side of a trial: its bundle's runs in turn, checkpointed, restartable.

``trial.worker_entry`` calls :func:`train_bundle` on every worker of the trial's Train run. Each
configuration of the bundle is one :func:`vlprompt.orchestrator.loop.run`; :class:`TrainSession`
is what the loop hears from Ray Train:

* every ``train.checkpoint_every`` epochs a checkpoint (``orchestrator/checkpoints.py``) is
  reported (rank 0 writes it; ``ray.train.report`` is a barrier every rank calls alike);
* with an early-stopping scheduler (``sweep.scheduler``) every epoch reports ``val_acc`` to
  Tune, which may stop the trial there;
* the end of a configuration reports its final metrics with its learned state.

When a worker dies, Ray Train (``FailureConfig``) starts a new worker group that calls
:func:`train_bundle` again: the latest checkpoint says which configurations are done (skipped)
and where the one in flight stood (resumed, so it ends with the numbers an unbroken run has).
Rank 0 reopens that configuration's MLflow child run instead of creating another
(``tracking.open_child_run``), so a configuration has one run, with its restart count.

A configuration that raises on a one-worker run ends its child run FAILED with the error and
the bundle goes on with the next one: an error in the code or the data would only repeat if
Ray Train retried it. With several workers the error is raised (a rank that stops alone would
leave the others waiting in a collective), and Ray Train retries the worker group.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vlprompt.orchestrator import checkpoints, tracking
from vlprompt.orchestrator.checkpoints import Progress
from vlprompt.orchestrator.loop import Session, run
from vlprompt.orchestrator.worker import WorkerContext, broadcast_flag


def train_bundle(config: dict[str, Any]) -> None:
    """Entry of every Ray Train worker: the bundle's configurations that are not done yet.

    ``config["runs"]``: per configuration its plain config, ``config_digest``, run name and
    tags. Every configuration reports once at its end (one Tune result each).
    """
    progress = checkpoints.latest_progress()
    for spec in config["runs"]:
        if spec["digest"] in progress.done:
            continue
        run_configuration(spec, config, progress)


def run_configuration(spec: Mapping[str, Any], config: Mapping[str, Any], progress: Progress) -> None:
    """One configuration: its child run (rank 0) around the loop, resumed if it was in flight."""
    import ray.train

    context = ray.train.get_context()
    cfg = OmegaConf.create(dict(spec["config"]))
    tracking.configure(cfg)  # retry deadline and spool folder (orchestrator/spool.py)
    ctx = worker_context(cfg, context.get_world_rank(), context.get_world_size())
    uri = config["tracking_uri"]
    run_id, restarts = None, 0
    if ctx.is_main:
        run_id, restarts = tracking.open_child_run(
            uri, config["experiment_id"], config["parent_run_id"], spec["name"], spec["tags"]
        )
    resume = progress.state if progress.current == spec["digest"] else None
    session = TrainSession(cfg, ctx, spec, run_id, progress, resume, reopened=restarts > 0)
    if resume is not None and ctx.is_main:
        where = f"resumed after epoch {resume.epoch} (restart {restarts})"
        print(f"[vlprompt] {spec['name']}: {where}", flush=True)
    try:
        run(cfg, ctx, run_id, session)
    except Exception as err:
        if run_id is not None:
            tracking.set_tags(uri, run_id, {"failed_launch": str(config["launch"])})
            tracking.finish_run(uri, run_id, err)
        if ctx.world_size > 1:
            raise
        print(f"[vlprompt] {spec['name']} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        progress.done.append(spec["digest"])
        progress.current, progress.state = None, None
        return


class TrainSession(Session):
    """The loop's link to Ray Train: checkpoints, reports to Tune, the state to resume from."""

    def __init__(
        self,
        cfg: DictConfig,
        ctx: WorkerContext,
        spec: Mapping[str, Any],
        run_id: str | None,
        progress: Progress,
        resume: checkpoints.TrainState | None,
        *,
        reopened: bool,
    ) -> None:
        self.cfg, self.ctx, self.digest, self.progress = cfg, ctx, spec["digest"], progress
        self.resume, self.reopened, self.run_id = resume, reopened, run_id
        self.extra = {"config_digest": spec["digest"], "run_id": run_id or ""}
        self.scheduled = cfg.sweep.scheduler != "none"
        self.last_checkpoint = time.monotonic()

    def validates(self, epoch: int) -> bool:
        return self.scheduled

    def epoch_end(
        self, epoch: int, method: nn.Module, optimizer: torch.optim.Optimizer, stats: dict[str, float]
    ) -> None:
        due = self._checkpoint_due(epoch)
        if not (due or self.scheduled):
            return
        metrics = {**stats, "epoch": epoch + 1, **self.extra}
        if not due:
            self._report(metrics, None)
            return
        state = checkpoints.capture(method, optimizer, epoch + 1, stats) if self.ctx.is_main else None
        self._report(metrics, Progress(list(self.progress.done), self.digest, state))

    def _checkpoint_due(self, epoch: int) -> bool:
        """Every ``checkpoint_every`` epochs, once ``checkpoint_min_interval_s`` passed since the
        last one (a report costs ~0.1-0.2 s: tiny epochs would spend most of their time on it).
        Rank 0's clock decides, for every rank: ``report`` is a barrier all ranks call alike."""
        t = self.cfg.train
        due = t.checkpoint_every > 0 and (epoch + 1) % t.checkpoint_every == 0
        due = due and time.monotonic() - self.last_checkpoint >= t.checkpoint_min_interval_s
        if self.ctx.world_size > 1:
            due = broadcast_flag(due, self.ctx)
        if due:
            self.last_checkpoint = time.monotonic()
        return due

    def finish(self, metrics: dict[str, float], learned: dict[str, Tensor]) -> None:
        """The child run ends FINISHED, then the checkpoint says the configuration is done: a
        worker dying in between re-runs the end of the configuration under the same run."""
        if self.run_id is not None:
            tracking.finish_run(self.cfg.tracking.uri, self.run_id)
        self.progress.done.append(self.digest)
        self.progress.current, self.progress.state = None, None
        final = {**metrics, "epoch": self.cfg.train.epochs, **self.extra}
        self._report(final, Progress(list(self.progress.done)), learned)

    def _report(
        self, metrics: dict[str, Any], progress: Progress | None, learned: dict[str, Tensor] | None = None
    ) -> None:
        """``ray.train.report`` on every rank; rank 0 attaches the checkpoint folder."""
        import ray.train

        if progress is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.ctx.is_main:
                checkpoints.write(Path(tmp), progress, learned)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def worker_context(cfg: DictConfig, rank: int, world_size: int) -> WorkerContext:
    """This worker's rank and device (``train.device``; auto: the GPU Ray gave it, if any)."""
    torch.set_num_threads(max(1, round(cfg.resources.cpus_per_worker)))
    if cfg.train.device == "cpu":
        return WorkerContext(rank, world_size, torch.device("cpu"))
    import ray.train.torch

    device = ray.train.torch.get_device()
    if cfg.train.device == "cuda" and device.type != "cuda":
        raise RuntimeError("train.device=cuda but this worker has no GPU; set resources.use_gpu=true")
    return WorkerContext(rank, world_size, device)
