"""Zero-shot vs CoOp on the small-world tasks with the bundled ``vlp-small`` CLIP, no Ray.

    python experiments/smallworld_eval.py --root /tmp/smallworld --seeds 1 2 3 --epochs 10
    python experiments/smallworld_eval.py --tasks sw_shades --base-to-novel sw_shades

Each run is vlprompt's one loop (``orchestrator.loop.run``) in this process, on the CPU,
with a config from the ``quickstart`` preset plus overrides; missing task data is
generated under ``--root``. Prints a table: task, classes, chance, zero-shot and CoOp
accuracy (mean ± std over seeds), then base/novel/HM for the base-to-novel tasks.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from vlprompt.datasets.catalog import SMALLWORLD_SHIFTS, SMALLWORLD_TASKS, get_entry
from vlprompt.orchestrator.config import load_config, resolve_paths
from vlprompt.orchestrator.loop import WorkerContext, run


def run_one(root: Path, task: str, method: str, seed: int, args: argparse.Namespace, protocol: str) -> dict:
    overrides = [
        f"data.root={root}",
        "data.generate_missing=true",
        f"data.dataset={task}",
        f"data.shots={args.shots}",
        f"data.protocol={protocol}",
        "model.name=vlp-small",
        "model.pretrained=bundled",
        f"seed={seed}",
        f"method.name={method}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        f"train.feature_views={args.feature_views}",
        f"train.crop_min_scale={args.crop_scale}",
        "sweep.space={}",
        f"tracking.uri=sqlite:///{root}/mlflow.db",
    ]
    if method == "coop":
        init = args.ctx_init or "''"  # '' (quoted for the dotlist): random init
        overrides += [f"method.n_ctx={args.n_ctx}", f"method.ctx_init={init}"]
    cfg = resolve_paths(load_config("quickstart", overrides), root)
    return run(cfg, WorkerContext(0, 1, torch.device("cpu")), None, None)


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:5.1f}"
    return f"{statistics.mean(values):5.1f} ± {statistics.stdev(values):4.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/smallworld"))
    p.add_argument("--tasks", nargs="*", default=[*SMALLWORLD_TASKS, *SMALLWORLD_SHIFTS])
    p.add_argument("--base-to-novel", nargs="*", default=["sw_shades"])
    p.add_argument("--seeds", nargs="*", type=int, default=[1])
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--feature-views", type=int, default=4)
    p.add_argument("--n-ctx", type=int, default=4)
    p.add_argument("--ctx-init", default="a photo of a")
    p.add_argument(
        "--crop-scale",
        type=float,
        default=0.08,
        help="smallest RandomResizedCrop area for training views (train.crop_min_scale; Dassl's 0.08 "
        "which at 32x32 px can crop away the counted objects, the texture or the majority land use)",
    )
    args = p.parse_args(argv)
    root = args.root.resolve()
    torch.set_num_threads(2)
    start = time.time()

    print(f"{'task':<22}{'classes':>8}{'chance':>8}{'zero-shot':>11}{'CoOp':>15}{'gain':>8}")
    gains = []
    for task in args.tasks:
        n = len(get_entry(task).classnames)
        zs = run_one(root, task, "zeroshot", args.seeds[0], args, "few_shot")["test_acc"]
        coop = [run_one(root, task, "coop", s, args, "few_shot")["test_acc"] for s in args.seeds]
        gains.append(statistics.mean(coop) - zs)
        print(f"{task:<22}{n:>8}{100 / n:>8.1f}{zs:>11.1f}{_fmt(coop):>15}{gains[-1]:>+8.1f}", flush=True)
    if gains:
        print(f"{'mean gain':<57}{statistics.mean(gains):>+8.1f}")

    if args.base_to_novel:
        print(f"\n{'base-to-novel':<22}{'method':>10}{'base':>15}{'novel':>15}{'HM':>15}")
    for task in args.base_to_novel:
        for method in ("zeroshot", "coop"):
            seeds = args.seeds[:1] if method == "zeroshot" else args.seeds
            ms = [run_one(root, task, method, s, args, "base_to_novel") for s in seeds]
            cols = "".join(f"{_fmt([m[k] for m in ms]):>15}" for k in ("base_acc", "novel_acc", "hm"))
            print(f"{task:<22}{method:>10}{cols}", flush=True)
    print(f"\n{time.time() - start:.0f} s; seeds {args.seeds}, {args.shots} shots, {args.epochs} epochs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
