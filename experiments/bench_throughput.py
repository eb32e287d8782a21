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

* ``epochs`` -- one CoOp epoch on images (the image tower run every step, ``view_mode=images``)
  against one epoch on cached per-epoch views (``view_mode=per_epoch``; the cold run encodes
  them, the warm run reads them) on a random-init ``--epoch-model`` (default ViT-B-16, 224 px),
  ``--shots`` × 10 classes, in this process (no Ray).
* ``views`` -- what K cycled views cost in accuracy against a fresh view per epoch (and the
  image path, the reference's statistics): CoOp on the small world's ``sw_shades`` with the
  bundled vlp-small, the quickstart's recipe, ``--seeds`` seeds each, in this process.

* ``encodes`` -- images encoded per sweep: a grid of CoOp / KgCoOp / zero-shot × 3 seeds on
  ``sw_shades`` (bundled vlp-small, per-epoch shared views) through the sweep's Ray Data
  pipeline; counted: what the pipeline encoded, what the trials encoded (goal 0), the distinct
  (image, view) pairs the trials read, and what the trials would encode each on its own.
* ``encoder`` -- the Ray Data pipeline's throughput against the in-trial encoder on the same
  images (a zero-shot run's test and val splits, random-init ``--epoch-model``), each into an
  empty cache.

* ``checkpoints`` -- what fault tolerance costs in a trial: one quickstart configuration as a
  one-trial sweep without checkpoints, with a checkpoint after every epoch
  (``train.checkpoint_min_interval_s=0``), and with the default; per checkpoint (Ray Train's
  ``report`` persisting the folder into the sweep's storage), and that the accuracies agree.

* ``test_time`` -- TPT, PromptAlign and PromptSync (``--tta-methods``) adapting one test image at
  a time against ``--tta-group`` images per AdamW step (stacked prompt copies,
  ``method.images_per_step``): images/s of each (the best of ``--tta-repeats`` alternating
  passes) and the largest logit difference between them, on a random-init ``--epoch-model``, in
  this process.

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


def _local_run(overrides: list[str]) -> dict[str, float]:
    """One run of the loop in this process (no Ray, no MLflow): its final metrics."""
    import torch

    from vlprompt.orchestrator.config import resolve_paths
    from vlprompt.orchestrator.loop import WorkerContext, run

    cfg = resolve_paths(load_config(None, ["sweep.space={}", *overrides]))
    return run(cfg, WorkerContext(0, 1, torch.device("cpu")), None, None)


def _random_model_on_synthetic(args: argparse.Namespace, work: Path) -> list[str]:
    """Overrides for the random-init ``--epoch-model`` on a generated ``synthetic`` copy of 10
    classes with ``--shots`` training images each (written under ``work``)."""
    from vlprompt import datasets as vds

    vds.generate_dataset("synthetic", work / "data", num_classes=10, images_per_class=2 * args.shots + 2)
    return [
        f"model.name={args.epoch_model}",
        "model.pretrained=null",
        "data.dataset=synthetic",
        f"data.root={work / 'data'}",
        f"data.shots={args.shots}",
    ]


def epochs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Epoch time on images vs on cached views; the cold cached run pays the encoding."""
    common = [
        *_random_model_on_synthetic(args, work),
        f"data.feature_cache={work / 'features'}",
        "method.name=coop",
        "method.n_ctx=4",
        f"train.epochs={args.epoch_count}",
        "train.batch_size=32",
    ]
    out: dict[str, Any] = {"model": args.epoch_model, "images_per_epoch": 10 * args.shots}
    for label, mode in (("images", "images"), ("cached_cold", "per_epoch"), ("cached_warm", "per_epoch")):
        metrics = _local_run([*common, f"train.view_mode={mode}"])
        out[label] = {
            "epoch_s": metrics["time_train_s"] / args.epoch_count,
            "setup_s": metrics["time_setup_s"],
            "images_encoded": metrics.get("feature_images_encoded", 0.0),
            "test_acc": metrics["test_acc"],
        }
        print(f"[bench] epochs {label}: {out[label]}", flush=True)
    out["epoch_ratio_images_over_warm"] = out["images"]["epoch_s"] / out["cached_warm"]["epoch_s"]
    out["cold_over_warm_total"] = (out["cached_cold"]["epoch_s"] + out["cached_cold"]["setup_s"]) / (
        out["cached_warm"]["epoch_s"] + out["cached_warm"]["setup_s"]
    )
    return out


def views(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Test accuracy of per-epoch views, K cycled views and images, over ``--seeds`` seeds."""
    recipe = [
        "model.name=vlp-small",
        "model.pretrained=bundled",
        "data.dataset=sw_shades",
        f"data.root={work / 'data'}",
        "data.generate_missing=true",
        "data.shots=16",
        f"data.feature_cache={work / 'features'}",
        "method.name=coop",
        "method.n_ctx=4",
        "method.ctx_init=a photo of a",
        f"train.epochs={args.views_epochs}",
        "train.lr=0.02",
        "train.crop_min_scale=0.9",
    ]
    modes = {
        "per_epoch": ["train.view_mode=per_epoch"],
        f"cycled_k{args.k}": ["train.view_mode=cycled", f"train.feature_views={args.k}"],
        "images": ["train.view_mode=images"],
    }
    out: dict[str, Any] = {"epochs": args.views_epochs, "seeds": args.seeds}
    for label, keys in modes.items():
        accs = [_local_run([*recipe, *keys, f"seed={seed}"])["test_acc"] for seed in range(1, args.seeds + 1)]
        out[label] = {"test_acc": accs, "mean": statistics.mean(accs), "std": statistics.pstdev(accs)}
        print(f"[bench] views {label}: {out[label]}", flush=True)
    out[f"cycled_k{args.k}_minus_per_epoch"] = out[f"cycled_k{args.k}"]["mean"] - out["per_epoch"]["mean"]
    return out


def encodes(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Each (image, view) once per sweep: counted, against every trial encoding its own."""
    from vlprompt.orchestrator.sweep import connect_ray, run_sweep

    cfg = load_config(
        "quickstart",
        [
            f"data.root={work / 'data'}",
            f"data.feature_cache={work / 'features'}",
            "train.view_mode=per_epoch",
            "train.view_seed=0",
            f"train.epochs={args.overhead_epochs}",
            "data.dataset=sw_shades",
            "data.shots=16",
            "sweep.space={method.name: {choice: [zeroshot, coop, kgcoop]}, seed: {choice: [1, 2, 3]}}",
            f"tracking.uri=sqlite:///{work}/mlflow.db",
            f"sweep.storage_path={work / 'ray_results'}",
            "sweep.name=encodes",
        ],
    )
    connect_ray()
    alone = _encodes_alone(cfg)
    outcome = run_sweep(cfg)
    in_trials = sum(r.get("feature_images_encoded", 0.0) for r in outcome.rows)
    report = outcome.features
    out = {
        "trials": len(outcome.rows),
        "pipeline_encoded": report.encoded if report else None,
        "pipeline_wall_s": report.wall_s if report else None,
        "trials_encoded": in_trials,
        "distinct_image_views": _rows_in_cache(work / "features"),
        "each_trial_alone": alone,
    }
    out["saving"] = alone / max(1.0, (out["pipeline_encoded"] or 0) + in_trials)
    return out


def _encodes_alone(cfg: Any) -> int:
    """What every planned trial would encode with no cache shared: its evaluation sets and views."""
    from vlprompt.orchestrator.config import resolve_paths
    from vlprompt.orchestrator.data import prepare_data
    from vlprompt.orchestrator.pipeline import planned_trials, reads_features, trial_needs

    trials = [t for t in planned_trials(resolve_paths(cfg)) if reads_features(t)]
    return sum(len(items) for t in trials for _, items, _, _ in trial_needs(t, prepare_data(t)))


def _rows_in_cache(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in folder.glob("*.parquet"))


def encoder(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Ray Data pipeline vs the in-trial encoder: the same images into an empty cache each."""
    import ray

    from vlprompt.orchestrator.config import resolve_paths
    from vlprompt.orchestrator.pipeline import fill_feature_cache
    from vlprompt.orchestrator.sweep import connect_ray, resource_plan

    common = [*_random_model_on_synthetic(args, work), "method.name=zeroshot"]
    started = time.perf_counter()
    metrics = _local_run([*common, f"data.feature_cache={work / 'in_trial'}"])
    in_trial_s = time.perf_counter() - started
    images = metrics["feature_images_encoded"]
    connect_ray()
    overrides = [*common, f"data.feature_cache={work / 'pipeline'}", "sweep.space={}"]
    cfg = resolve_paths(load_config(None, overrides))  # a writable copy: the pipeline marks it planned
    report = fill_feature_cache(cfg, [cfg], resource_plan(cfg, ray.cluster_resources(), 1))
    return {
        "model": args.epoch_model,
        "images": images,
        "in_trial_s": in_trial_s,
        "in_trial_images_per_s": images / in_trial_s,
        "pipeline_s": report.wall_s,
        "pipeline_images_per_s": report.encoded / report.wall_s,
        "pipeline_encoded": report.encoded,
        "pipeline_over_in_trial_throughput": (report.encoded / report.wall_s) / (images / in_trial_s),
    }


def checkpoints(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """What fault tolerance costs: one quickstart configuration (``--checkpoint-epochs`` epochs)
    as a one-trial sweep without checkpoints, with one after every epoch, and with the default
    (every epoch, at most one per ``train.checkpoint_min_interval_s``), on one local Ray."""
    from vlprompt.orchestrator.sweep import connect_ray, run_sweep

    base = [
        f"data.root={work / 'data'}",
        f"train.epochs={args.checkpoint_epochs}",
        "sweep.space={}",
        f"tracking.uri=sqlite:///{work}/mlflow.db",
        f"sweep.storage_path={work / 'ray_results'}",
    ]
    variants = {
        "none": ["train.checkpoint_every=0"],
        "every_epoch": ["train.checkpoint_every=1", "train.checkpoint_min_interval_s=0"],
        "default": [],
    }
    connect_ray()
    out: dict[str, Any] = {}
    for label, extra in variants.items():
        (row,) = run_sweep(load_config("quickstart", [*base, *extra, f"sweep.name=ckpt-{label}"])).rows
        out[label] = {"time_train_s": row["time_train_s"], "test_acc": row["test_acc"]}
    none, every = out["none"]["time_train_s"], out["every_epoch"]["time_train_s"]
    out["seconds_per_checkpoint"] = (every - none) / args.checkpoint_epochs
    out["identical_accuracies"] = len({v["test_acc"] for v in out.values() if isinstance(v, dict)}) == 1
    return out


def test_time(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Each of ``--tta-methods`` (TPT, PromptAlign, PromptSync) adapting one test image at a time
    against ``--tta-group`` images per AdamW step (``method.images_per_step``, ``methods/test_time.py``,
    ``methods/maple_stacked.py``): test images per second, and how far the two sets of logits are
    apart. ``--tta-images`` random images with ``--tta-views`` views each, ``--tta-classes``
    classes, on a random-init ``--epoch-model``, in this process; the aligning methods read
    statistics made from the same model over one random source image per class."""
    import torch

    from vlprompt.methods.base import Batch
    from vlprompt.methods.clip import load_backbone

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    backbone = load_backbone(args.epoch_model, None, device=device)
    size = backbone.image_size
    tasks = {"bench": [f"class {i}" for i in range(args.tta_classes)]}
    images = torch.randn(args.tta_images, 3, size, size, device=device)
    views = torch.randn(args.tta_images, args.tta_views, 3, size, size, device=device)
    batch = Batch("bench", images=images, views=views)
    out: dict[str, Any] = {"device": device, "model": args.epoch_model, "images": args.tta_images}
    for name in args.tta_methods:
        modes = {"per_image": 1, "batched": args.tta_group}
        built = {label: _tta_method(name, backbone, tasks, g, args, work) for label, g in modes.items()}
        logits, rates = {}, {label: 0.0 for label in modes}
        for method in built.values():
            method.predict(Batch("bench", images=images[:1], views=views[:1]))  # warm-up, caches
        for _ in range(args.tta_repeats):  # alternated, the best of each: a busy neighbour hits both
            for label, method in built.items():
                started = time.perf_counter()
                logits[label] = method.predict(batch).detach().cpu()
                if device == "cuda":
                    torch.cuda.synchronize()
                rates[label] = max(rates[label], args.tta_images / (time.perf_counter() - started))
        out[name] = {
            "images_per_s": {"per_image": rates["per_image"], f"batched_{args.tta_group}": rates["batched"]},
            "speed_ratio": rates["batched"] / rates["per_image"],
            "max_abs_logit_difference": float((logits["batched"] - logits["per_image"]).abs().max()),
            "same_predictions": bool(torch.equal(logits["batched"].argmax(1), logits["per_image"].argmax(1))),
        }
        print(f"[bench] test_time {name}: {out[name]}", flush=True)
    return out


def _tta_method(
    name: str, backbone: Any, tasks: dict, group: int, args: argparse.Namespace, work: Path
) -> Any:
    """``name`` built for the benchmark, with ``group`` images per step; PromptAlign and PromptSync
    with statistics of their own starting prompts (made once, reused by the second build)."""
    import torch

    from vlprompt.methods import build_method, capabilities

    options: dict[str, Any] = {"n_views": args.tta_views, "images_per_step": group}
    if capabilities(name).source_stats is None:
        return build_method(name, backbone, tasks, options)
    torch.manual_seed(0)  # the same starting prompts in every build: the statistics are theirs
    file = work / f"{name}-stats.safetensors"
    if not file.exists():
        _tta_statistics(build_method(name, backbone, tasks, options), len(tasks["bench"]), file)
    torch.manual_seed(0)
    return build_method(name, backbone, tasks, {**options, "source_stats": str(file)})


def _tta_statistics(method: Any, n_classes: int, file: Path) -> None:
    """The per-class statistics file of ``method`` over one random source image per class."""
    import torch

    from vlprompt.methods.source_stats import accumulate, save_stats

    size = method.backbone.image_size
    labels = torch.arange(n_classes, device=method.backbone.device)
    batches = [(torch.randn(len(c), 3, size, size, device=labels.device), c) for c in labels.split(32)]
    tensors, kept = accumulate(method, batches, n_classes, method.align_layers).tensors()
    source = {"dataset": "imagenet", "split": "train", "images_per_class": 0}
    names = [f"class {i}" for i in kept.tolist()]
    file.parent.mkdir(parents=True, exist_ok=True)
    save_stats(file, tensors, names, method.stats_fingerprint(), source)


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "overhead": overhead,
    "epochs": epochs,
    "views": views,
    "encodes": encodes,
    "encoder": encoder,
    "checkpoints": checkpoints,
    "test_time": test_time,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--overhead-epochs", type=int, default=5)
    parser.add_argument("--epoch-model", default="ViT-B-16", help="random-init model of the epochs section")
    parser.add_argument("--epoch-count", type=int, default=2)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--views-epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--checkpoint-epochs", type=int, default=30)
    parser.add_argument("--tta-images", type=int, default=16, help="test images of the test_time section")
    parser.add_argument("--tta-views", type=int, default=63)
    parser.add_argument("--tta-classes", type=int, default=100)
    parser.add_argument("--tta-group", type=int, default=8, help="images per step of the batched run")
    parser.add_argument("--tta-methods", nargs="+", default=["tpt", "promptalign", "promptsync"])
    parser.add_argument("--tta-repeats", type=int, default=3, help="alternating timed passes per mode")
    parser.add_argument("--k", type=int, default=4, help="cycled views per image in the views section")
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
