"""Orchestration throughput, every number a ratio measured side by side in this one invocation.

    python experiments/bench_throughput.py                       # every section, CPU-sized
    python experiments/bench_throughput.py --sections overhead   # one section
    python experiments/bench_throughput.py --json out.json       # also write the numbers

Sections (issue 9's benchmark):

* ``overhead`` -- a quickstart-sized sweep (the quickstart preset's 18 configurations, epochs
  cut to ``--overhead-epochs``) run twice on one local Ray: one configuration per trial
  (``sweep.bundle_size=1``, the old shape) and bundled (``sweep.bundle_size=0``). Reported: the
  sweep's orchestration overhead per configuration (slot time boundary to boundary minus the
  loop's own time, ``overhead_per_configuration_s``), the median per-configuration
  ``ray_overhead_s``, the sweep wall times, and that the two give identical accuracies.

Machines here are shared and noisy: compare the ratios, not the absolute seconds, across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlprompt.orchestrator.config import load_config


def overhead(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One configuration per trial vs bundles, on the same sweep, one Ray."""
    from vlprompt.orchestrator.sweep import connect_ray, run_sweep

    base = [
        f"data.root={work / 'data'}",
        f"train.epochs={args.overhead_epochs}",
        f"tracking.uri=sqlite:///{work}/mlflow.db",
        f"sweep.storage_path={work / 'ray_results'}",
    ]
    connect_ray()
    out: dict[str, Any] = {}
    accuracies = {}
    for label, size in (("per_trial", 1), ("bundled", 0)):
        cfg = load_config("quickstart", [*base, f"sweep.name=overhead-{label}", f"sweep.bundle_size={size}"])
        started = time.perf_counter()
        outcome = run_sweep(cfg)
        wall = time.perf_counter() - started
        if outcome.failed:
            raise RuntimeError(f"{label}: {len(outcome.failed)} configurations failed: {outcome.failed[0]}")
        accuracies[label] = sorted(
            (r["method"], r["dataset"], r["shots"], r["seed"], r["test_acc"]) for r in outcome.rows
        )
        out[label] = {
            "configurations": len(outcome.rows),
            "overhead_per_configuration_s": outcome.overhead_per_configuration_s,
            "median_ray_overhead_s": statistics.median(r["ray_overhead_s"] for r in outcome.rows),
            "median_time_worker_s": statistics.median(r["time_worker_s"] for r in outcome.rows),
            "sweep_wall_s": wall,
        }
    out["identical_accuracies"] = accuracies["per_trial"] == accuracies["bundled"]
    per, bun = out["per_trial"], out["bundled"]
    out["overhead_ratio"] = per["overhead_per_configuration_s"] / bun["overhead_per_configuration_s"]
    out["wall_ratio"] = per["sweep_wall_s"] / bun["sweep_wall_s"]
    return out


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {"overhead": overhead}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--overhead-epochs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vlp-bench-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        numbers = {name: SECTIONS[name](args, work / name) for name in args.sections}
    print(f"\n$ python experiments/bench_throughput.py {' '.join(argv or sys.argv[1:])}")
    print(json.dumps(numbers, indent=2))
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
