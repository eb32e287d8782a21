"""The test-time study on the small world, through the platform's own commands, end to end.

    python experiments/smallworld_test_time.py --work /tmp/sw-tta          # every stage, 3 seeds
    python experiments/smallworld_test_time.py --work /tmp/sw-tta --seeds 1  # a quicker look

The small world's stand-in for ImageNet → V2/Sketch/A/R: ``sw_objects`` → its shifted renderings
(``sw_objects_sketch``, ``_cartoon``, ``_noisy``, ``_inverted``), with the bundled ``vlp-small``.
The stages are exactly what a researcher runs with the presets (their headers give the same
commands), with the small world's model and data as overrides:

1. ``benchmark.py --config domain_generalisation method.name=maple`` -- the MaPLe PromptAlign and
   PromptSync start from (n_ctx 2, depth 3), trained on 16 shots of ``sw_objects`` per seed, with
   the small world's recipe (the ``smallworld`` preset's: 30 epochs, batch 32, lr 0.02, crops of
   at least 90 %), chosen before any test-time number was seen;
2. ``source_stats.py --config promptsync`` per seed -- per-class statistics of ``sw_objects``'
   train split under that seed's MaPLe (PromptAlign reads the same file's global rows);
3. ``benchmark.py --config test_time`` (zero-shot, TPT), ``--config promptalign`` (β = 0: TPT on
   MaPLe; β = 100/3: PromptAlign) and ``--config promptsync`` (γ = 0 and 1) per seed, every
   option at its preset's value, 63 views per image; ``--images-per-step`` G adapts G images at
   once (the same numbers as one at a time, ``methods/maple_stacked.py``; it pays on a GPU, not on
   2 CPU cores with vlp-small, where ``bench_throughput.py --sections test_time`` measured 0.7x).

``--stages`` runs some of them (``maple``, ``baselines``, ``aligned``; ``--stages`` alone: none,
only the table of what the store holds).

Everything lands in one MLflow store (``<work>/mlflow.db``); the last stage prints one table,
test accuracy per method and target, mean ± std over the seeds. Nothing here is tuned: the
presets' test-time settings are the reference's ImageNet ones.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGETS = ["sw_objects_sketch", "sw_objects_cartoon", "sw_objects_noisy", "sw_objects_inverted"]
MAPLE = ["method.name=maple", "method.n_ctx=2", "method.prompt_depth=3", "method.ctx_init=a photo of a"]
RECIPE = ["train.epochs=30", "train.batch_size=32", "train.lr=0.02", "train.crop_min_scale=0.9"]
SOURCE = "method.source_dataset=sw_objects"


def common(work: Path) -> list[str]:
    """The small world's model, data and storage: the overrides every stage shares."""
    return [
        "model.name=vlp-small",
        "model.pretrained=bundled",
        f"data.root={work / 'data'}",
        "data.generate_missing=true",
        "data.dataset=sw_objects",
        f"data.eval_targets=[{','.join(TARGETS)}]",
        f"data.feature_cache={work / 'feature_cache'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.experiment=smallworld_test_time",
        f"sweep.storage_path={work / 'ray_results'}",
        "resources.cpus_per_worker=0.9",
    ]


def sh(args: Sequence[str]) -> str:
    """Run one platform command, its output shown; its stdout's last line back."""
    print("\n$ " + " ".join(args), flush=True)
    done = subprocess.run([sys.executable, *args], stdout=subprocess.PIPE, text=True, check=False)
    print(done.stdout[-3000:], flush=True)
    if done.returncode != 0:
        raise SystemExit(f"stage failed (exit {done.returncode}): {' '.join(args)}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def benchmark(config: str, *overrides: str) -> None:
    sh([str(HERE / "benchmark.py"), "--config", config, *overrides])


def learned_state(work: Path, seed: int) -> Path:
    """The seed's MaPLe ``learned_state.pt``, fetched from its MLflow run."""
    from vlprompt.orchestrator import tracking

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = tracking.client(uri)
    exp = client.get_experiment_by_name("smallworld_test_time")
    query = f"params.`method.name` = 'maple' and params.seed = '{seed}' and attributes.status = 'FINISHED'"
    runs = client.search_runs(
        [exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"]
    )
    if not runs:
        raise SystemExit(f"no finished maple run of seed {seed} in {uri}")
    out = work / "maple" / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(runs[0].info.run_id, "learned/learned_state.pt", str(out)))


STAGES = ("maple", "baselines", "aligned")


def stages(work: Path, seeds: Sequence[int], which: Sequence[str], group: int) -> None:
    """The study's ``which`` stages (:data:`STAGES`); the aligned methods adapt ``group`` test
    images at once (``method.images_per_step``: the same numbers as one at a time, faster)."""
    base = common(work)
    seed_axis = f"seed: {{choice: [{', '.join(map(str, seeds))}]}}"
    if "maple" in which:
        benchmark("domain_generalisation", *base, *MAPLE, *RECIPE, f"sweep.space={{{seed_axis}}}")
    if "baselines" in which:
        benchmark(
            "test_time", *base, f"sweep.space={{method.name: {{choice: [zeroshot, tpt]}}, {seed_axis}}}"
        )
    if "aligned" not in which:
        return
    for seed in seeds:
        start = [f"seed={seed}", f"method.init_state={learned_state(work, seed)}"]
        out = ["--out-dir", str(work / "source_stats")]
        stats = sh([str(HERE / "source_stats.py"), "--config", "promptsync", *out, *base, *start, SOURCE])
        assert stats.startswith("method.source_stats="), stats
        for preset in ("promptalign", "promptsync"):
            benchmark(preset, *base, *start, SOURCE, stats, f"method.images_per_step={group}")


def table(work: Path) -> str:
    """Test accuracy per method (with the swept weight) and evaluation set, mean ± std over seeds."""
    from vlprompt.orchestrator import tracking

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = tracking.client(uri)
    exp = client.get_experiment_by_name("smallworld_test_time")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'")
    cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if "tags.mlflow.parentRunId" not in {f"tags.{k}" for k in run.data.tags}:
            continue  # a sweep's parent run
        label = _label(run.data.params)
        metrics = run.data.metrics
        cells[label]["sw_objects"].append(metrics["test_acc"])
        for target in TARGETS:
            cells[label][target].append(metrics[f"target_acc/{target}"])
        cells[label]["shifted mean"].append(statistics.mean(metrics[f"target_acc/{t}"] for t in TARGETS))
    columns = ["sw_objects", *TARGETS, "shifted mean"]
    lines = [
        "| method | seeds | " + " | ".join(c.removeprefix("sw_objects_") for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for label in sorted(cells):
        row = cells[label]
        lines.append(
            f"| {label} | {len(row['sw_objects'])} | " + " | ".join(_cell(row[c]) for c in columns) + " |"
        )
    return "\n".join(lines)


def _label(params: dict[str, Any]) -> str:
    name = params["method.name"]
    if name == "promptalign":
        return "PromptAlign" if float(params["method.align_weight"]) > 0 else "TPT on MaPLe (PromptAlign β=0)"
    if name == "promptsync":
        gamma = float(params["method.discrimination_weight"])
        return "PromptSync" if gamma > 0 else "PromptSync γ=0 (class-aware alignment only)"
    return {"zeroshot": "zero-shot CLIP", "tpt": "TPT", "maple": "MaPLe (no adaptation)"}.get(name, name)


def _cell(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "–"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="data, MLflow store, caches")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--stages", nargs="*", choices=STAGES, default=list(STAGES), help="default: all")
    parser.add_argument(
        "--images-per-step", type=int, default=1, help="the aligned methods' group size (same numbers; GPU)"
    )
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages(work, args.seeds, args.stages, args.images_per_step)
    print(table(work))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
