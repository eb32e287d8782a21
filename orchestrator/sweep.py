"""A sweep = Ray Tune + Optuna over the config's search space; one trial = one Ray Train run.

Shape (Ray Train V2 inside Tune, as in Ray's ``train_tune_interop`` example): the Tune
trainable is a plain function holding a token CPU; it creates the trial's MLflow child
run, launches a ``TorchTrainer`` whose workers run :func:`vlprompt.orchestrator.loop.train_loop`,
and marks the child run FINISHED or FAILED — so a run is never left RUNNING, even when
its workers die. A config without ``sweep.space`` is a sweep of one trial: one path for
everything.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlprompt.orchestrator import results, tracking
from vlprompt.orchestrator.config import ConfigError, flatten, resolve_paths, trial_config
from vlprompt.orchestrator.data import generated_datasets
from vlprompt.orchestrator.pipeline import fill_feature_cache, planned_trials
from vlprompt.orchestrator.preflight import preflight
from vlprompt.orchestrator.resources import TRIAL_CPU, ResourcePlan, plan_resources
from vlprompt.orchestrator.search_space import DefineByRun, as_optuna_point, grid_points


@dataclass
class SweepOutcome:
    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per trial
    wall_s: float = 0.0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("error")]


# --------------------------------------------------------------------------------------
# trial side


def run_name(cfg: DictConfig, trial_id: str) -> str:
    return f"{cfg.method.name}-{cfg.data.dataset}-{cfg.data.shots}shot-seed{cfg.seed}-{trial_id}"


def _trial(config: dict[str, Any]) -> None:
    """The Tune trainable: one MLflow child run around one TorchTrainer.fit()."""
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from vlprompt.orchestrator.loop import train_loop

    trial_id = ray.tune.get_context().get_trial_id()
    uri, plan = config["_tracking_uri"], config["_plan"]
    started = time.perf_counter()
    run_id: str | None = None
    try:
        cfg = trial_config(config)
        run_id = tracking.start_run(
            uri,
            config["_experiment_id"],
            run_name(cfg, trial_id),
            tags={"trial_id": trial_id, "sweep": cfg.sweep.name},
            parent_run_id=config["_parent_run_id"],
        )
        worker_config = {**OmegaConf.to_container(cfg, resolve=True), "_run_id": run_id}
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=worker_config,
            scaling_config=ScalingConfig(
                num_workers=plan["num_workers"],
                use_gpu=plan["use_gpu"],
                resources_per_worker=plan["resources_per_worker"],
            ),
            run_config=RunConfig(
                name=f"train-{trial_id}",
                storage_path=cfg.sweep.storage_path,
                callbacks=[TuneReportCallback()],
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        wall = time.perf_counter() - started
        worker = (result.metrics or {}).get("time_worker_s", float("nan"))
        tracking.log_metrics(uri, run_id, {"time_trial_s": wall, "ray_overhead_s": wall - worker})
        tracking.finish_run(uri, run_id)
    except BaseException as err:
        if run_id is not None:
            tracking.finish_run(uri, run_id, err)
        raise


# --------------------------------------------------------------------------------------
# driver side


def connect_ray(address: str | None = None) -> None:
    """Attach to ``address`` / ``$RAY_ADDRESS`` when given, else start Ray in this process."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(log_to_driver=True)


def _fresh_name(storage: Path, name: str, resume: bool) -> str:
    """Reuse ``name`` to resume; otherwise never write into an earlier sweep's folder."""
    if resume or not (storage / name).exists():
        return name
    n = 2
    while (storage / f"{name}-{n}").exists():
        n += 1
    return f"{name}-{n}"


def run_sweep(cfg: DictConfig, *, resume: bool = False, launch_dir: Path | None = None) -> SweepOutcome:
    """Run the whole sweep described by ``cfg`` and return one row per trial.

    Everything that can fail without Ray fails first: paths are made absolute and every dataset
    the sweep reads is checked (``preflight``) before Ray starts.
    """
    import ray

    cfg = resolve_paths(cfg, launch_dir)
    storage = Path(cfg.sweep.storage_path)
    cfg.sweep.name = _fresh_name(storage, cfg.sweep.name, resume)
    space = OmegaConf.to_container(cfg.sweep.space, resolve=True) or {}
    points = grid_points(space) if space and cfg.sweep.sampler == "grid" else []
    num_trials = len(points) if points else (cfg.sweep.num_samples if space else 1)
    preflight(cfg)

    connect_ray()
    r = cfg.resources
    plan = plan_resources(
        ray.cluster_resources(),
        num_workers=r.num_workers,
        use_gpu=r.use_gpu,
        cpus_per_worker=r.cpus_per_worker,
        gpus_per_worker=r.gpus_per_worker,
        max_concurrent_trials=r.max_concurrent_trials,
        num_trials=num_trials,
    )
    fill_feature_cache(cfg, planned_trials(cfg), plan)  # frozen image features, encoded once with Ray Data
    uri = cfg.tracking.uri
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    parent = _parent_run(cfg, storage, uri, experiment_id, resume, plan, num_trials)
    print(
        f"[vlprompt] sweep {cfg.sweep.name!r}: {num_trials} trial(s), "
        f"{plan.max_concurrent_trials} at a time, "
        f"{plan.num_workers} worker(s) × {plan.resources_per_worker} per trial; MLflow run {parent} at {uri}",
        flush=True,
    )
    outcome = SweepOutcome(cfg.sweep.name, uri, experiment_id, parent, str(storage))
    tuner = _tuner(cfg, storage, resume, plan, space, points, num_trials, (uri, experiment_id, parent))
    started = time.perf_counter()
    try:
        outcome.rows = [_row(r) for r in tuner.fit()]
    except BaseException as err:
        tracking.fail_unfinished_children(uri, experiment_id, parent, f"sweep aborted: {err!r}")
        tracking.finish_run(uri, parent, err)
        raise
    outcome.wall_s = time.perf_counter() - started
    _finish_parent(cfg, outcome)
    return outcome


def _tuner(
    cfg: DictConfig,
    storage: Path,
    resume: bool,
    plan: ResourcePlan,
    space: dict[str, Any],
    points: list[dict[str, Any]],
    num_trials: int,
    run: tuple[str, str, str],
) -> Any:
    """The Tune experiment: restored when resuming, else a new one searching ``space`` with Optuna."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    trainable = tune.with_resources(_trial, {"cpu": TRIAL_CPU})
    if resume and tune.Tuner.can_restore(str(storage / cfg.sweep.name)):
        return tune.Tuner.restore(str(storage / cfg.sweep.name), trainable, resume_errored=True)
    uri, experiment_id, parent = run
    param_space = {
        **OmegaConf.to_container(cfg, resolve=True),
        "_plan": {
            "num_workers": plan.num_workers,
            "use_gpu": plan.use_gpu,
            "resources_per_worker": plan.resources_per_worker,
        },
        "_tracking_uri": uri,
        "_experiment_id": experiment_id,
        "_parent_run_id": parent,
    }
    param_space["sweep"] = {**param_space["sweep"], "space": {}}  # the space lives in the searcher
    search_alg = None
    if space:
        searcher = OptunaSearch(
            space=DefineByRun(space),
            metric=cfg.sweep.metric,
            mode=cfg.sweep.mode,
            points_to_evaluate=[as_optuna_point(p) for p in points] or None,
            sampler=_sampler(cfg.sweep.sampler, cfg.seed),
        )
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=plan.max_concurrent_trials)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            num_samples=num_trials,
            max_concurrent_trials=plan.max_concurrent_trials,
            metric=cfg.sweep.metric,
            mode=cfg.sweep.mode,
        ),
        run_config=tune.RunConfig(name=cfg.sweep.name, storage_path=str(storage), verbose=1),
    )


def _sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _parent_run(
    cfg: DictConfig,
    storage: Path,
    uri: str,
    experiment_id: str,
    resume: bool,
    plan: ResourcePlan,
    num_trials: int,
) -> str:
    marker = storage / f".{cfg.sweep.name}.mlflow_parent_run"
    if resume and marker.exists():
        run_id = marker.read_text().strip()
        tracking.client(uri).update_run(run_id, status="RUNNING")
        return run_id
    run_id = tracking.start_run(
        uri, experiment_id, cfg.sweep.name, tags={"sweep": cfg.sweep.name, "kind": "sweep"}
    )
    tracking.log_params(
        uri,
        run_id,
        {
            **{k: v for k, v in flatten(cfg).items() if not k.startswith("sweep.space")},
            "sweep.num_trials": num_trials,
            "plan.num_workers": plan.num_workers,
            "plan.use_gpu": plan.use_gpu,
            "plan.resources_per_worker": json.dumps(plan.resources_per_worker),
            "plan.max_concurrent_trials": plan.max_concurrent_trials,
            **tracking.code_version(),
        },
    )
    tracking.log_artifact_files(
        uri,
        run_id,
        {
            "config.yaml": OmegaConf.to_yaml(cfg),
            "search_space.json": json.dumps(OmegaConf.to_container(cfg.sweep.space, resolve=True), indent=2),
        },
        "",
    )
    storage.mkdir(parents=True, exist_ok=True)
    marker.write_text(run_id)
    return run_id


def _row(result: Any) -> dict[str, Any]:
    """One results-table row from a Tune result: the swept coordinates and the metrics."""
    try:
        cfg = trial_config(result.config)
    except ConfigError as err:
        return {"error": str(err)}
    row: dict[str, Any] = {
        "method": cfg.method.name,
        "dataset": cfg.data.dataset,
        "data": "generated" if generated_datasets(cfg) else "real",
        "protocol": cfg.data.protocol,
        "shots": cfg.data.shots,
        "seed": cfg.seed,
        "model": cfg.model.name,
        "options": {k: v for k, v in cfg.method.items() if k != "name"},
    }
    row.update(
        {
            k: v
            for k, v in (result.metrics or {}).items()
            if k in results.METRIC_COLUMNS or k.startswith("target_acc/")
        }
    )
    if result.error is not None:
        row["error"] = error_summary(result.error)
    return row


def error_summary(error: BaseException) -> str:
    """The root cause of a trial's error in one line, whole (Ray wraps it in RayTaskErrors whose
    last line is the original ``Type: message``, which names the file or key and the fix)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def _finish_parent(cfg: DictConfig, outcome: SweepOutcome) -> None:
    uri, parent = outcome.tracking_uri, outcome.parent_run_id
    tracking.fail_unfinished_children(
        uri, outcome.experiment_id, parent, "trial ended without closing its run"
    )
    table = results.summarise(outcome.rows)
    tracking.log_artifact_files(
        uri,
        parent,
        {
            "results.md": results.to_markdown(table),
            "results.csv": results.to_csv(table),
            "trials.json": json.dumps(outcome.rows, indent=2, default=str),
        },
        "results",
    )
    finished = [r for r in outcome.rows if not r.get("error") and cfg.sweep.metric in r]
    metrics = {
        "num_trials": len(outcome.rows),
        "num_failed": len(outcome.failed),
        "sweep_wall_s": outcome.wall_s,
    }
    if finished:
        pick = max if cfg.sweep.mode == "max" else min
        metrics[f"best_{cfg.sweep.metric}"] = pick(r[cfg.sweep.metric] for r in finished)
    tracking.log_metrics(uri, parent, metrics)
    error = None
    if outcome.failed:
        error = f"{len(outcome.failed)} of {len(outcome.rows)} trials failed: " + "; ".join(
            r["error"] for r in outcome.failed[:5]
        )
    tracking.finish_run(uri, parent, error)
