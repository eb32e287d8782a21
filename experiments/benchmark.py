"""vlprompt's front door: run a preset (a single run or a sweep) and print the results table.

    python experiments/benchmark.py                                  # the quickstart preset, Ray in-process
    python experiments/benchmark.py --config coop_fewshot data.root=/data data.shots=4
    RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token \\
        ray job submit --working-dir . -- python experiments/benchmark.py --config quickstart

Overrides are OmegaConf dotlist entries (``section.key=value``). Every key and value, every
point of the search space and every dataset the sweep reads is checked before Ray starts; a
problem is one line on stderr naming the key or file and the fix, and exit status 2. Ray,
MLflow and torch are imported only once the config is known to be good.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vlprompt.orchestrator.config import ConfigError, load_config


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default="quickstart",
        help="preset name in experiments/configs/ or a YAML path (default: quickstart)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="NAME",
        help="continue the latest unfinished sweep of this config (or the sweep NAME): "
        "finished configurations are not repeated, interrupted ones continue from their checkpoints",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume:  # `--resume a.b=c`: an override, no name
        args.overrides.insert(0, args.resume)
        args.resume = True
    return args


def _warn_if_results_would_vanish(cfg: DictConfig) -> None:
    """A Ray job runs in a temporary copy of the working directory: a default SQLite store there is lost."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and not (
        cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    ):
        print(
            "[vlprompt] warning: running as a Ray job without MLFLOW_TRACKING_URI: results go to "
            f"{Path.cwd() / 'mlflow.db'}, inside the job's temporary working directory. Pass "
            '--runtime-env-json \'{"env_vars": {"MLFLOW_TRACKING_URI": "http://HOST:5000"}}\'.',
            file=sys.stderr,
        )


def _print_outcome(outcome: Any, seconds: float) -> None:
    from vlprompt.orchestrator import results

    print()
    print(
        f"Results of sweep {outcome.name!r} ({len(outcome.rows)} configurations, "
        f"{seconds:.0f} s; accuracy in %, mean ± std over seeds):"
    )
    print(results.to_markdown(results.summarise(outcome.rows)))
    for row in outcome.stopped:
        print(
            f"STOPPED: {row.get('method')} {row.get('dataset')} shots={row.get('shots')} "
            f"seed={row.get('seed')}: {row['stopped']}"
        )
    for row in outcome.failed:
        print(
            f"FAILED: {row.get('method')} {row.get('dataset')} shots={row.get('shots')} "
            f"seed={row.get('seed')}: {row['error']}",
            file=sys.stderr,
        )
    if outcome.overhead_per_configuration_s is not None:
        print(f"Orchestration overhead: {outcome.overhead_per_configuration_s:.1f} s per configuration")
    print(
        f"MLflow: tracking URI {outcome.tracking_uri}, experiment id {outcome.experiment_id}, "
        f"sweep (parent) run {outcome.parent_run_id}"
    )
    if outcome.tracking_uri.startswith("sqlite:"):
        print(f"  browse with: {mlflow_command()} ui --backend-store-uri {outcome.tracking_uri}")


def mlflow_command() -> str:
    """The ``mlflow`` of this Python's environment, by path when one sits beside the interpreter
    (a bare ``mlflow`` fails in a shell where the project's venv is not activated)."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.exists() else "mlflow"


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    _warn_if_results_would_vanish(cfg)

    import ray

    from vlprompt.orchestrator.sweep import run_sweep

    started = time.perf_counter()
    try:
        outcome = run_sweep(cfg, resume=args.resume)
    except ConfigError as err:  # the data checks that run before Ray starts
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second signal, or one before Tune's loop ran: no graceful stop
        print(
            "[vlprompt] stopped at once; what ran is KILLED; continue with: python experiments/benchmark.py "
            f"--config {args.config} --resume",
            file=sys.stderr,
        )
        return 130
    ray.shutdown()  # flush the workers' streamed logs before the table, so the table prints last
    _print_outcome(outcome, time.perf_counter() - started)
    if outcome.interrupted is not None:
        done = sum(1 for r in outcome.rows if not r.get("error") and not r.get("stopped"))
        print(
            f"[vlprompt] sweep {outcome.name!r} interrupted by {outcome.interrupted.name}: {done} of "
            f"{len(outcome.rows)} configurations finished; continue with: "
            f"python experiments/benchmark.py --config {args.config} --resume {outcome.name}",
            file=sys.stderr,
        )
        return outcome.interrupted.exit_code
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
