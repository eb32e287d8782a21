"""One Tune trial: a bundle of configurations (``orchestrator/bundles.py``) in one Ray Train run.

Torch-free on purpose: the Tune trial actor only launches the Train run and never trains, so
it must not pay for importing torch, torchvision and open_clip (seconds of CPU per trial on a
small machine). The Train workers import the loop (:func:`worker_entry` does it lazily).
A one-worker run needs no torch process group, so it runs on Ray Train's plain
``DataParallelTrainer`` (no torch import at all); several workers run on ``TorchTrainer``,
whose backend sets up the process group the exact gradient all-reduce uses.

Who closes which MLflow run: rank 0 of the workers opens each configuration's child run when
the configuration starts -- or reopens the one an earlier attempt left (``bundle_worker.py``)
-- and ends it FINISHED (or FAILED with its error) when it ends; the trial function marks
whatever its bundle left RUNNING as FAILED when the Train run dies for good (its restarts,
``resources.max_failures``, spent); the driver marks what a signal or a scheduler stopped as
KILLED. A configuration whose child run FINISHED in an earlier launch of the sweep is skipped
(exact per-configuration ``--resume``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlprompt.orchestrator import tracking
from vlprompt.orchestrator.bundles import bundle_points, config_digest
from vlprompt.orchestrator.config import apply_point, trial_config

#: Ray Train's controller polls its workers this often (Ray's default: 2 s, which a trial of a
#: few seconds waits out at its end). Propagated from the trial process to the controller.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
#: Ray Train re-routes a worker's ``print`` through its logger, which the driver then shows next
#: to the worker's plain stdout: every progress line twice. Off: once.
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
#: Ray Train's loggers that announce every persisted checkpoint and every report.
QUIET_LOGGERS = ("ray.train.v2._internal.execution.storage", "ray.train.v2._internal.execution.context")


def run_name(cfg: DictConfig, trial_id: str) -> str:
    return f"{cfg.method.name}-{cfg.data.dataset}-{cfg.data.shots}shot-seed{cfg.seed}-{trial_id}"


def bundle_configs(config: Mapping[str, Any]) -> list[DictConfig]:
    """The validated experiment config of every configuration in a trial's bundle, in order."""
    plain = {k: v for k, v in config.items() if not k.startswith("_")}
    return [trial_config(apply_point(plain, point)) for point in bundle_points(config)]


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _run_spec(cfg: DictConfig, trial_id: str) -> dict[str, Any]:
    """What a worker needs to run one configuration: its plain config, digest, run name and tags."""
    plain = plain_config(cfg)
    digest = config_digest(plain)
    return {
        "config": plain,
        "digest": digest,
        "name": run_name(cfg, trial_id),
        "tags": {"trial_id": trial_id, "sweep": cfg.sweep.name, "config_digest": digest},
    }


class ConfigurationsFailed(RuntimeError):
    """Configurations of the trial's bundle raised in this launch of the sweep (their child runs
    say why); the trial ends in error, so the next ``--resume`` runs them again."""


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: the bundle's configurations still to run, in one Train run.

    Skipped: configurations FINISHED in any launch of the sweep, and those that raised in this
    launch (``failed_launch`` tag) -- a Tune retry of this trial (after a process of it died)
    must not run an error again, while a later ``--resume`` (the next launch) does.
    """
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    tracking.configure(config)  # retry deadline and spool folder (orchestrator/spool.py)
    uri, experiment_id, parent = config["_tracking_uri"], config["_experiment_id"], config["_parent_run_id"]
    launch = tracking.launch_number(uri, parent)
    specs = [_run_spec(cfg, trial_id) for cfg in bundle_configs(config)]
    state = tracking.digest_states(uri, experiment_id, parent, launch)
    runs = [spec for spec in specs if state.get(spec["digest"]) not in ("finished", "failed")]
    if runs:
        trainer = _trainer(config, runs, trial_id, launch)
        try:
            result = trainer.fit()
            if result.error is not None:
                raise result.error
        except BaseException as err:
            if not stopped_by_tune(err):  # a stopped trial's runs are the driver's to close (KILLED)
                tracking.fail_unfinished_children(uri, experiment_id, parent, err, trial_id=trial_id)
            raise
        state = tracking.digest_states(uri, experiment_id, parent, launch)
    failed = [spec["name"] for spec in specs if state.get(spec["digest"]) == "failed"]
    if failed:
        raise ConfigurationsFailed(
            f"{len(failed)} of {len(specs)} configurations of trial {trial_id} failed: {', '.join(failed)}"
        )


def stopped_by_tune(err: BaseException) -> bool:
    """Whether the Train run ended because Tune stopped this trial (a scheduler, a signal): Ray
    then ends the Train controller on purpose (``INTENDED_*`` exit), or the controller dies with
    the process that owns it ("its owner has died") while this function still runs -- seen when a
    SIGINT stops a bundle between two configurations. A controller killed on its own is a
    ``SYSTEM_ERROR``: this trial's runs are then marked FAILED (a Tune retry reopens them).

    Only a living trial can mark anything: when the owner death is its own, nothing is written,
    and the driver closes the runs (KILLED after a signal, FAILED if the trial is never retried)."""
    from ray.exceptions import ActorDiedError

    text = str(err)
    return isinstance(err, ActorDiedError) and (
        "Worker exit type: INTENDED" in text or "because its owner has died" in text
    )


def _trainer(config: dict[str, Any], runs: list[dict[str, Any]], trial_id: str, launch: int) -> Any:
    """The trial's Train run, named after the trial, so a retried or resumed trial's new Train
    run restores the checkpoints of the one before it (Ray Train restores by name)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    plan, first = config["_plan"], bundle_configs(config)[0]
    os.environ.setdefault(HEALTH_CHECK_ENV, str(config["_health_check_interval_s"]))
    os.environ.setdefault(PRINT_PATCH_ENV, "0")
    return _trainer_class(plan["num_workers"])(
        worker_entry,
        train_loop_config={
            "runs": runs,
            "tracking_uri": config["_tracking_uri"],
            "experiment_id": config["_experiment_id"],
            "parent_run_id": config["_parent_run_id"],
            "launch": launch,
        },
        scaling_config=ScalingConfig(
            num_workers=plan["num_workers"],
            use_gpu=plan["use_gpu"],
            resources_per_worker=plan["resources_per_worker"],
        ),
        run_config=RunConfig(
            name=f"train-{trial_id}",
            storage_path=first.sweep.storage_path,
            callbacks=[_forward_to_tune(first.sweep.metric)],
            failure_config=FailureConfig(max_failures=first.resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def _forward_to_tune(metric: str) -> Any:
    """Ray Train's reports that carry the sweep metric, passed on to Tune.

    A checkpoint's report without it (mid-training, no early-stopping scheduler) stays with
    Ray Train: Tune refuses results that lack the metric its searcher or scheduler reads.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardToTune(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ForwardToTune()


def _trainer_class(num_workers: int) -> type:
    if num_workers > 1:
        from ray.train.torch import TorchTrainer

        return TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return DataParallelTrainer


def worker_entry(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker: the loop, imported here, where it trains."""
    import logging

    from vlprompt.orchestrator.bundle_worker import train_bundle

    for name in QUIET_LOGGERS:  # two INFO lines per checkpoint, every epoch, would drown the progress lines
        logging.getLogger(name).setLevel(logging.WARNING)

    train_bundle(config)
