"""One Tune trial: a bundle of configurations (``orchestrator/bundles.py``) in one Ray Train run.

Torch-free on purpose: the Tune trial actor only launches the Train run and never trains, so
it must not pay for importing torch, torchvision and open_clip (seconds of CPU per trial on a
small machine). The Train workers import the loop (:func:`worker_entry` does it lazily).
A one-worker run needs no torch process group, so it runs on Ray Train's plain
``DataParallelTrainer`` (no torch import at all); several workers run on ``TorchTrainer``,
whose backend sets up the process group the exact gradient all-reduce uses.

Who closes which MLflow run: rank 0 of the workers creates each configuration's child run when
the configuration starts and ends it FINISHED (or FAILED with its error) when it ends; the
trial function marks whatever its bundle left RUNNING as FAILED when the Train run dies (a
killed worker cannot close its own run). A configuration whose child run FINISHED in an earlier
launch of the sweep is skipped (exact per-configuration ``--resume``).
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


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: the bundle's unfinished configurations, in one Train run."""
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    uri, plan = config["_tracking_uri"], config["_plan"]
    cfgs = bundle_configs(config)
    tracking.configure(config)  # retry deadline and spool folder (orchestrator/spool.py)
    done = tracking.finished_digests(uri, config["_experiment_id"], config["_parent_run_id"])
    runs = [spec for spec in (_run_spec(cfg, trial_id) for cfg in cfgs) if spec["digest"] not in done]
    if not runs:
        return
    os.environ.setdefault(HEALTH_CHECK_ENV, str(config["_health_check_interval_s"]))
    os.environ.setdefault(PRINT_PATCH_ENV, "0")
    trainer_class = _trainer_class(plan["num_workers"])
    trainer = trainer_class(
        worker_entry,
        train_loop_config={
            "runs": runs,
            "tracking_uri": uri,
            "experiment_id": config["_experiment_id"],
            "parent_run_id": config["_parent_run_id"],
        },
        scaling_config=ScalingConfig(
            num_workers=plan["num_workers"],
            use_gpu=plan["use_gpu"],
            resources_per_worker=plan["resources_per_worker"],
        ),
        run_config=RunConfig(
            name=f"train-{trial_id}",
            storage_path=cfgs[0].sweep.storage_path,
            callbacks=[TuneReportCallback()],
        ),
    )
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
    except BaseException as err:
        tracking.fail_unfinished_children(
            uri, config["_experiment_id"], config["_parent_run_id"], err, trial_id=trial_id
        )
        raise


def _trainer_class(num_workers: int) -> type:
    if num_workers > 1:
        from ray.train.torch import TorchTrainer

        return TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return DataParallelTrainer


def worker_entry(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker: the loop, imported here, where it trains."""
    from vlprompt.orchestrator.loop import train_bundle

    train_bundle(config)
