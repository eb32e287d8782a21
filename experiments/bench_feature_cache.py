"""How much a run's set-up saves when its frozen image features come from the feature cache.

    python experiments/bench_feature_cache.py                        # quickstart model, sw_shades
    python experiments/bench_feature_cache.py --config cross_dataset data.root=/data ...

Runs the same zero-shot configuration three times in this process (vlprompt's one loop, no
Ray): with the cache off, cold (empty cache folder: encode and write) and warm (read), and
prints each run's set-up time (data, backbone, features) and the ratios, all measured in this
one invocation. Accuracy must be identical in the three runs; the script fails otherwise.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from vlprompt.orchestrator.config import load_config, resolve_paths
from vlprompt.orchestrator.loop import WorkerContext, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="quickstart", help="preset name or YAML path")
    parser.add_argument("--root", default="data", help="data root (generated when missing)")
    parser.add_argument("--dataset", default="sw_shades")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        timings = {}
        accuracy = {}
        for label, folder in (("off", "null"), ("cold", cache), ("warm", cache)):
            cfg = load_config(
                args.config,
                [
                    "method.name=zeroshot",
                    f"data.dataset={args.dataset}",
                    f"data.root={args.root}",
                    "data.generate_missing=true",
                    "sweep.space={}",
                    f"data.feature_cache={folder}",
                    *args.overrides,
                ],
            )
            metrics = run(resolve_paths(cfg), WorkerContext(0, 1, torch.device("cpu")), None, None)
            timings[label] = metrics["time_setup_s"]
            accuracy[label] = (metrics["test_acc"], metrics.get("val_acc"))
            hits = metrics.get("feature_cache_hits", 0)
            print(
                f"{label:>4}: set-up {timings[label]:.2f} s, cache hits {hits:.0f}, "
                f"test_acc {metrics['test_acc']:.2f}"
            )
    if len(set(accuracy.values())) != 1:
        raise SystemExit(f"accuracy differs between the runs: {accuracy}")
    print(
        f"set-up time warm / off = {timings['warm'] / timings['off']:.3f}, "
        f"cold / off = {timings['cold'] / timings['off']:.3f} (same accuracy in all three)"
    )


if __name__ == "__main__":
    main()
