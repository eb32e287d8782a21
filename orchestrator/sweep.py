"""A sweep = Ray Tune + Optuna over the config's search space; one trial = one Ray Train run.

Shape (Ray Train V2 inside Tune, as in Ray's ``train_tune_interop`` example): the Tune trainable
(``orchestrator/trial.py``) is a plain function holding a token CPU that launches one Train run
for its *bundle* of configurations (``orchestrator/bundles.py``: grid points that share a model,
dataset and protocol run in turn in one Train run; an adaptive sampler's trial is a bundle of
one). Each configuration is its own MLflow child run and its own Tune result; the results table
is read back from the child runs, so a configuration finished in an earlier launch of a resumed
sweep keeps its row. A config without ``sweep.space`` is a sweep of one trial: one path for
everything.

Overhead is measured where it happens, boundary to boundary: the driver's :class:`TrialClock`
times each trial from the moment Tune starts it (actor start included) to its end, and logs
each configuration's share of what the trial spent outside the loop (``ray_overhead_s``).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlprompt.orchestrator import results, sweep_record, tracking
from vlprompt.orchestrator.bundles import config_digest, make_bundles
from vlprompt.orchestrator.config import ConfigError, apply_point, flatten, resolve_paths
from vlprompt.orchestrator.data import generated_datasets
from vlprompt.orchestrator.interrupts import Interrupt, graceful_stop
from vlprompt.orchestrator.pipeline import PipelineReport, fill_feature_cache, planned_trials
from vlprompt.orchestrator.preflight import preflight
from vlprompt.orchestrator.ray_env import SETUP_HOOK
from vlprompt.orchestrator.resources import TRIAL_CPU, ResourcePlan, plan_resources
from vlprompt.orchestrator.search_space import DefineByRun, grid_points
from vlprompt.orchestrator.sweep_record import SweepRecord
from vlprompt.orchestrator.trial import bundle_configs, plain_config, run_trial

#: Per-configuration metrics a results row carries (the table picks its columns from them).
ROW_METRICS = (*results.METRIC_COLUMNS, "ray_overhead_s", "time_trial_s", "feature_images_encoded")


@dataclass
class SweepOutcome:
    name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    features: PipelineReport | None = None  # what the feature pipeline encoded before the trials
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per configuration
    wall_s: float = 0.0
    overhead_per_configuration_s: float | None = None  # see slot_overhead
    interrupted: Interrupt | None = None  # stopped by SIGINT/SIGTERM: resumable, runs KILLED

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("error")]

    @property
    def stopped(self) -> list[dict[str, Any]]:
        """Rows of configurations a scheduler stopped early, or a signal interrupted."""
        return [r for r in self.rows if r.get("stopped")]


# --------------------------------------------------------------------------------------
# driver side


def connect_ray(cfg: DictConfig | None = None, address: str | None = None) -> None:
    """Attach to ``address`` / ``$RAY_ADDRESS`` when given, else start Ray in this process
    (with its dashboard only when ``resources.local_dashboard`` asks for it)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        dashboard = bool(cfg.resources.local_dashboard) if cfg is not None else False
        hook = {"worker_process_setup_hook": SETUP_HOOK}  # its processes know which Ray is theirs
        ray.init(log_to_driver=True, include_dashboard=dashboard, runtime_env=hook)


def choose_sweep(cfg: DictConfig, storage: Path, resume: bool | str) -> SweepRecord | None:
    """Name the sweep this launch runs (``cfg.sweep.name``); the record of the one it resumes.

    New: never an earlier sweep's name. ``resume``: True for the latest unfinished sweep of this
    name and config, a name for that sweep (``orchestrator/sweep_record.py``)."""
    base = cfg.sweep.name
    if not resume:
        cfg.sweep.name = sweep_record.fresh_name(storage, base)
        return None
    named = resume if isinstance(resume, str) else None
    record = sweep_record.resume_target(storage, base, flatten(cfg), named)
    cfg.sweep.name = record.name
    return record


def run_sweep(cfg: DictConfig, *, resume: bool | str = False, launch_dir: Path | None = None) -> SweepOutcome:
    """Run the whole sweep described by ``cfg`` and return one row per configuration.

    Everything that can fail without Ray fails first: paths are made absolute, the sweep to
    resume is found and its config compared, and every dataset the sweep reads is checked
    (``preflight``) before Ray starts. SIGINT/SIGTERM stop it resumably (``interrupts.py``).
    """
    import ray

    cfg = resolve_paths(cfg, launch_dir)
    storage = Path(cfg.sweep.storage_path)
    record = choose_sweep(cfg, storage, resume)
    tracking.configure(cfg)  # retry deadline and spool folder (orchestrator/spool.py)
    space = OmegaConf.to_container(cfg.sweep.space, resolve=True) or {}
    points = grid_points(space) if space and cfg.sweep.sampler == "grid" else []
    num_configs = len(points) if points else (cfg.sweep.num_samples if space else 1)
    preflight(cfg)

    connect_ray(cfg)
    plan = resource_plan(cfg, ray.cluster_resources(), num_configs)
    bundles = _bundles(cfg, points, plan.max_concurrent_trials)
    features = fill_feature_cache(cfg, planned_trials(cfg), plan)  # encoded once, with Ray Data
    uri = cfg.tracking.uri
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    parent = _parent_run(cfg, storage, uri, experiment_id, record, plan, num_configs)
    print(
        f"[vlprompt] sweep {cfg.sweep.name!r}{' (resumed)' if record else ''}: {num_configs} "
        f"configuration(s) in {len(bundles) if points else num_configs} trial(s), "
        f"{plan.max_concurrent_trials} at a time, {plan.num_workers} worker(s) × "
        f"{plan.resources_per_worker} per trial; MLflow run {parent} at {uri}",
        flush=True,
    )
    outcome = SweepOutcome(cfg.sweep.name, uri, experiment_id, parent, str(storage), features=features)
    from vlprompt.orchestrator.trial_clock import TrialClock  # imports ray.tune

    clock = TrialClock(uri, plan.max_concurrent_trials)
    run = (uri, experiment_id, parent)
    tuner = _tuner(cfg, storage, record is not None, plan, space, bundles, num_configs, run, clock)
    started, launched_ms = time.perf_counter(), int(time.time() * 1000)
    grid = _fit(tuner, outcome, storage)
    outcome.wall_s = time.perf_counter() - started
    if outcome.interrupted is None:
        _close_stopped_trials(outcome, grid)
    children = tracking.sweep_children(uri, experiment_id, parent)
    outcome.rows = _rows(list(grid), children)
    if outcome.interrupted is not None:
        return outcome
    slots = min(plan.max_concurrent_trials, len(bundles) if points else num_configs)
    outcome.overhead_per_configuration_s = slot_overhead(children, launched_ms, outcome.wall_s, slots)
    _finish_parent(cfg, outcome)
    return outcome


def _fit(tuner: Any, outcome: SweepOutcome, storage: Path) -> Any:
    """``tuner.fit()``; a signal ends the sweep's running runs KILLED, an error FAILED."""
    uri, experiment_id, parent = outcome.tracking_uri, outcome.experiment_id, outcome.parent_run_id
    with graceful_stop() as interrupt:
        try:
            grid = tuner.fit()
        except BaseException as err:
            if isinstance(err, KeyboardInterrupt):
                _stop(outcome, storage, interrupt if interrupt.signal else Interrupt(signal.SIGINT))
                raise
            tracking.fail_unfinished_children(uri, experiment_id, parent, f"sweep aborted: {err!r}")
            tracking.finish_run(uri, parent, err)
            sweep_record.set_state(storage, outcome.name, "failed")
            raise
    if interrupt.signal is not None:
        _stop(outcome, storage, interrupt)
    return grid


def _stop(outcome: SweepOutcome, storage: Path, interrupt: Interrupt) -> None:
    """A signal stopped the sweep: what ran is KILLED (not FAILED), and the sweep resumable."""
    uri = outcome.tracking_uri
    reason = f"interrupted by {interrupt.name}; continue with --resume {outcome.name}"
    tracking.kill_unfinished_children(uri, outcome.experiment_id, outcome.parent_run_id, reason)
    tracking.kill_run(uri, outcome.parent_run_id, reason)
    sweep_record.set_state(storage, outcome.name, "interrupted")
    outcome.interrupted = interrupt


def _close_stopped_trials(outcome: SweepOutcome, grid: Any) -> None:
    """Runs of trials Tune ended without an error while they trained: stopped early by the
    scheduler (``sweep.scheduler``). They end KILLED with the reason, not FAILED."""
    stopped = {r.metrics.get("trial_id") for r in grid if r.error is None and r.metrics}
    uri = outcome.tracking_uri
    for child in tracking.sweep_children(uri, outcome.experiment_id, outcome.parent_run_id):
        tags, status = child.data.tags, child.info.status
        # RUNNING, or FAILED by the death of its Train run (not by its own error: failed_launch)
        cut_short = status == "RUNNING" or (status == "FAILED" and "failed_launch" not in tags)
        if tags.get("trial_id") in stopped and cut_short:
            tracking.kill_run(uri, child.info.run_id, "stopped early by the sweep's scheduler")


def slot_overhead(children: list[Any], launched_ms: int, wall_s: float, slots: int) -> float | None:
    """Orchestration cost per configuration, boundary to boundary: of the time the sweep's
    ``slots`` concurrent trial slots were open (``wall_s`` each), what the configurations run in
    this launch did not spend in their loop (``time_worker_s``), per configuration. Includes
    everything a per-trial clock cannot see: Tune scheduling, actor starts, gaps between trials."""
    ran = [
        c for c in children if (c.info.start_time or 0) >= launched_ms and "time_worker_s" in c.data.metrics
    ]
    if not ran:
        return None
    worker = sum(c.data.metrics["time_worker_s"] for c in ran)
    return max(0.0, wall_s * slots - worker) / len(ran)


def resource_plan(cfg: DictConfig, cluster: dict[str, float], num_configs: int) -> ResourcePlan:
    r = cfg.resources
    return plan_resources(
        cluster,
        num_workers=r.num_workers,
        use_gpu=r.use_gpu,
        cpus_per_worker=r.cpus_per_worker,
        gpus_per_worker=r.gpus_per_worker,
        max_concurrent_trials=r.max_concurrent_trials,
        num_trials=num_configs,
    )


def _bundles(cfg: DictConfig, points: list[dict[str, Any]], slots: int) -> list[list[dict[str, Any]]]:
    """The grid's points in bundles (``orchestrator/bundles.py``); no grid: none."""
    if not points:
        return []
    plain = OmegaConf.to_container(cfg, resolve=True)
    configs = [apply_point(plain, point) for point in points]
    # an early-stopping scheduler stops trials: a trial must be one configuration
    size = 1 if cfg.sweep.scheduler != "none" else cfg.sweep.bundle_size
    return make_bundles(configs, points, slots, size)


def _tuner(
    cfg: DictConfig,
    storage: Path,
    resume: bool,
    plan: ResourcePlan,
    space: dict[str, Any],
    bundles: list[list[dict[str, Any]]],
    num_configs: int,
    run: tuple[str, str, str],
    clock: Any,
) -> Any:
    """The Tune experiment: restored when resuming, else a new one over the grid's bundles
    (``tune.grid_search``) or searching ``space`` with Optuna (trials of one configuration)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    trainable = tune.with_resources(run_trial, {"cpu": TRIAL_CPU})
    run_config = tune.RunConfig(
        name=cfg.sweep.name,
        storage_path=str(storage),
        verbose=1,
        callbacks=[clock],
        failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
    )
    if resume and tune.Tuner.can_restore(str(storage / cfg.sweep.name)):
        # the restored experiment keeps its pickled run config, TrialClock included
        return tune.Tuner.restore(str(storage / cfg.sweep.name), trainable, resume_errored=True)
    param_space = _param_space(cfg, plan, run)
    search_alg, num_samples = None, num_configs
    if bundles:
        param_space["_bundle"] = tune.grid_search(bundles)
        num_samples = 1  # grid_search repeats the grid num_samples times
    elif space:
        searcher = OptunaSearch(
            space=DefineByRun(space),
            metric=cfg.sweep.metric,
            mode=cfg.sweep.mode,
            sampler=_sampler(cfg.sweep.sampler, cfg.seed),
        )
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=plan.max_concurrent_trials)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=_scheduler(cfg),
            num_samples=num_samples,
            max_concurrent_trials=plan.max_concurrent_trials,
            metric=cfg.sweep.metric,
            mode=cfg.sweep.mode,
        ),
        run_config=run_config,
    )


def _param_space(cfg: DictConfig, plan: ResourcePlan, run: tuple[str, str, str]) -> dict[str, Any]:
    """The trial's config: the preset (space removed: it lives in the searcher or the bundles)
    plus what the trial needs to know about the sweep (private ``_`` keys)."""
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
        "_health_check_interval_s": cfg.resources.health_check_interval_s,
    }
    param_space["sweep"] = {**param_space["sweep"], "space": {}}
    return param_space


def _scheduler(cfg: DictConfig) -> Any:
    """Tune's early-stopping scheduler over the per-epoch ``epoch`` / val metric reports."""
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    s = cfg.sweep
    # max_t one past the last epoch: ASHA stops a trial whose report reaches max_t, and the last
    # epoch's report comes before the configuration's final evaluation, which must still run
    if s.scheduler == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.train.epochs + 1,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
    if s.scheduler == "median":
        return MedianStoppingRule(time_attr="epoch", grace_period=s.grace_period, min_samples_required=2)
    return None


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
    record: SweepRecord | None,
    plan: ResourcePlan,
    num_trials: int,
) -> str:
    """The sweep's MLflow parent run: the resumed sweep's, RUNNING again, or a new one."""
    if record is not None:
        run_id = record.parent_run_id
        launch = int(tracking.reopen_run(uri, run_id).get("launch", "1")) + 1
        tracking.set_tags(uri, run_id, {"launch": str(launch)})
        sweep_record.set_state(storage, record.name, "running")
        return run_id
    run_id = tracking.start_run(
        uri, experiment_id, cfg.sweep.name, tags={"sweep": cfg.sweep.name, "kind": "sweep", "launch": "1"}
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
    sweep_record.write(storage, sweep_record.new_record(cfg.sweep.name, flatten(cfg), run_id))
    return run_id


def _rows(results: list[Any], children: list[Any]) -> list[dict[str, Any]]:
    """One results-table row per configuration of every trial's bundle, its metrics read from
    the configuration's child run (a FINISHED one if any: resumed sweeps keep earlier rows)."""
    runs: dict[str, list[Any]] = {}
    for run in sorted(children, key=lambda r: r.info.start_time or 0):
        runs.setdefault(run.data.tags.get("config_digest", ""), []).append(run)
    rows = []
    for result in results:
        if not result.config:  # a trial Tune never started
            continue
        try:
            cfgs = bundle_configs(result.config)
        except ConfigError as err:
            rows.append({"error": str(err)})
            continue
        for cfg in cfgs:
            rows.append(_row(cfg, runs.get(config_digest(plain_config(cfg)), []), result.error))
    return rows


def _row(cfg: DictConfig, runs: list[Any], trial_error: BaseException | None) -> dict[str, Any]:
    """The swept coordinates and the metrics of one configuration (its child runs, oldest first);
    plain values (a list option, PromptAlign's ``align_layers``, is a list, never a ListConfig:
    the results table serialises the options to group rows)."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    row: dict[str, Any] = {
        "method": cfg.method.name,
        "dataset": cfg.data.dataset,
        "data": "generated" if generated_datasets(cfg) else "real",
        "protocol": cfg.data.protocol,
        "shots": cfg.data.shots,
        "seed": cfg.seed,
        "model": cfg.model.name,
        "options": {k: v for k, v in method.items() if k != "name"},
    }
    finished = [r for r in runs if r.info.status == "FINISHED"]
    run = finished[-1] if finished else (runs[-1] if runs else None)
    if run is not None:
        row["run_id"] = run.info.run_id
        metrics = run.data.metrics.items()
        row.update({k: v for k, v in metrics if k in ROW_METRICS or k.startswith("target_acc/")})
    if finished:
        return row
    if run is not None and "stopped" in run.data.tags:
        row["stopped"] = run.data.tags["stopped"]
    elif run is not None and "error" in run.data.tags:
        row["error"] = error_summary(run.data.tags["error"])
    elif trial_error is not None:
        row["error"] = "not run: its trial failed first: " + error_summary(trial_error)
    else:
        row["error"] = "not run (the trial ended before this configuration started)"
    return row


def error_summary(error: BaseException | str) -> str:
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
    overheads = sorted(r["ray_overhead_s"] for r in outcome.rows if "ray_overhead_s" in r)
    metrics = {
        "num_configurations": len(outcome.rows),
        "num_failed": len(outcome.failed),
        "sweep_wall_s": outcome.wall_s,
    }
    if overheads:
        metrics["median_ray_overhead_s"] = statistics.median(overheads)
    if outcome.overhead_per_configuration_s is not None:
        metrics["overhead_per_configuration_s"] = outcome.overhead_per_configuration_s
    if finished:
        pick = max if cfg.sweep.mode == "max" else min
        metrics[f"best_{cfg.sweep.metric}"] = pick(r[cfg.sweep.metric] for r in finished)
    tracking.log_metrics(uri, parent, metrics)
    error = None
    if outcome.failed:
        error = f"{len(outcome.failed)} of {len(outcome.rows)} configurations failed: " + "; ".join(
            r["error"] for r in outcome.failed[:5]
        )
    tracking.finish_run(uri, parent, error)
    sweep_record.set_state(Path(outcome.storage_path), outcome.name, "failed" if error else "finished")
