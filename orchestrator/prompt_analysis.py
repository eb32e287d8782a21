"""Why prompts work, on a finished run: the command ``experiments/analyse_prompts.py``.

    python experiments/analyse_prompts.py --run-id RUN [--tracking-uri URI] [--split test] \\
        [--max-images N] [--towers text,vision] [--out DIR] [section.key=value ...]

Reads the run from MLflow (``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``): its params are its
resolved config (``loop.log_run``), ``learned/learned_state.pt`` what it learned (``loop.finish``).
Before anything heavy loads it refuses a run id the store does not know, a run whose method puts
no prompts into the towers' blocks (the ``block_prompts`` capability: CoOp, zero-shot, bias tuning
...), a run that did not finish and one without a learned state -- each named. It then rebuilds
the run's data, backbone and method with the loop's own set-up (``data.prepare_data``,
``loop.set_up``, seeded as ``loop.run`` seeds them, so even a random-init backbone comes out the
same), checks the rebuilt method against the run's logged parameter count and split fingerprint,
loads the learned state, and on each task's split (``--split``, the test split by default; at most
``--max-images`` images per task, evenly spaced) runs the analysis of ``methods/attention.py``:

1. **statistics** -- per tower and block, on the tower's own dataset (text: the class prompts,
   once per task; image tower: the images): the share of attention the [cls]/EOT query puts on
   the prompts, the norms of the prompt-value term and of the token term, how much the prompt
   term depends on the input (spread across images or classes over its mean's norm; 0 is a fixed
   bias), and each block's per-position means for the ablations. The image pass also scores the
   trained model (the explicit attention maths, equal to its ``predict``).
2. **ablations** -- the trained model evaluated with every block of the ablated towers
   (``--towers``, default every prompted one) changed as :data:`methods.attention.ABLATIONS` says:
   (a) ``mean_bias``, (b) ``zero``, (c) ``keys_only``, (d) ``mean_values``; next to zero-shot
   CLIP with the dataset's template on the same backbone and images. Accuracy is the mean over
   tasks, as the run's ``test_acc`` (which the unablated model reproduces on the full test
   split). Only the training tasks' own splits are scored, over the classes the method was built
   for: evaluation sets that bring their own classes (base-to-novel's novel half, transfer
   targets, the transductive protocol's base/novel sets) are not analysed.

Artifacts of the run under ``analysis/`` (through ``orchestrator/tracking.py``; ``--out`` also
writes them to a folder): ``layers.md|csv``, ``ablation.md|csv``, ``attention_share.png``,
``prompt_norm.png``, ``ablation.png`` and ``summary.json``. Exit status 2 for a run that cannot be
analysed (the message says why and what to do).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vlprompt.methods import capabilities, methods_with
from vlprompt.orchestrator import tracking
from vlprompt.orchestrator.config import config_from_params, method_options, tracking_uri

LEARNED = "learned/learned_state.pt"
FOLDER = "analysis"
SPLITS = ("test", "val", "train")
#: The rows of the ablation table, in order: the two references, then the ablations.
VARIANTS = ("zeroshot", "prompted", "mean_bias", "zero", "keys_only", "mean_values")
ABLATED = VARIANTS[2:]

Say = Callable[[str], None]


def _say(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------ the run, torch-free


@dataclass(frozen=True)
class RunToAnalyse:
    """A finished run that can be analysed: its config rebuilt from its params."""

    uri: str
    run_id: str
    method: str
    cfg: DictConfig
    params: dict[str, str]
    metrics: dict[str, float]


def check_analysable(method: str) -> None:
    """``ValueError`` naming ``method`` unless it declares prompts in the blocks."""
    if capabilities(method).block_prompts is None:  # its runs have nothing to analyse
        raise ValueError(
            f"method {method!r} puts no prompts into the blocks of either tower (no block_prompts "
            "capability in methods/__init__.py), so there is no prompt attention to analyse; runs "
            f"of {', '.join(methods_with('block_prompts'))} can be analysed"
        )


def open_run(uri: str, run_id: str, overrides: Sequence[str] = ()) -> RunToAnalyse:
    """The run ``run_id``, checked to be analysable, with its config; nothing heavy is loaded."""
    run = tracking.get_run(uri, run_id)
    params = dict(run.data.params)
    method = params.get("method.name")
    if not method:
        raise ValueError(f"run {run_id} logged no method.name param: not a run of vlprompt's loop")
    check_analysable(method)
    if run.info.status != "FINISHED":
        raise ValueError(
            f"run {run_id} ({method}) is {run.info.status}, not FINISHED: a run logs its learned "
            "state when it ends; analyse a finished run"
        )
    if LEARNED not in tracking.artifact_paths(uri, run_id, "learned"):
        raise ValueError(
            f"run {run_id} ({method}) has no {LEARNED} artifact: nothing learned to analyse "
            "(was it logged by a vlprompt run that finished?)"
        )
    cfg = config_from_params(params, overrides)
    return RunToAnalyse(uri, run_id, method, cfg, params, dict(run.data.metrics))


def read_learned(run: RunToAnalyse) -> dict[str, Any]:
    """The run's learned tensors, read without running code (``weights_only``)."""
    import torch

    data = tracking.read_artifact(run.uri, run.run_id, LEARNED)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------ the analysis


@dataclass
class Analysis:
    """What the analysis found: the per-block rows of every prompted tower, and the accuracies."""

    method: str
    dataset: str
    split: str
    images: int
    classes: int
    towers: tuple[str, ...]
    """The towers the ablations were applied to."""
    layers: list[dict[str, Any]]
    accuracy: dict[str, float]
    """:data:`VARIANTS` → accuracy in percent (mean over tasks)."""
    notes: list[str]


def analyse(
    cfg: DictConfig,
    learned: Mapping[str, Any],
    *,
    split: str = "test",
    max_images: int = 0,
    towers: Sequence[str] = (),
    logged: Mapping[str, str] | None = None,
    say: Say = _say,
) -> Analysis:
    """Rebuild the run's model from ``cfg`` with the loop's set-up, load ``learned``, and run the
    statistics pass and every ablation (module docstring). ``logged``: the run's params, to check
    the rebuilt method and data against (parameter count, split fingerprint)."""
    import torch

    from vlprompt.methods.attention import prompt_slots
    from vlprompt.orchestrator.data import prepare_data
    from vlprompt.orchestrator.loop import set_up
    from vlprompt.orchestrator.source_stats import device_of
    from vlprompt.orchestrator.worker import WorkerContext, seed_everything

    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    ctx = WorkerContext(0, 1, torch.device(device_of(cfg)))
    seed_everything(cfg.seed)  # as loop.run: a random-init backbone is drawn the same
    data = prepare_data(cfg)
    setup = set_up(cfg, ctx, data)
    notes = _check_rebuild(setup, data, logged or {}, say)
    load_learned(setup.method, learned, setup.method_name)
    setup.method.eval()
    slots = prompt_slots(setup.backbone, setup.caps.block_prompts(method_options(cfg.method)[1]))
    chosen = _towers(towers, slots)
    sources = _sources(cfg, data, setup, split, max_images)
    say(
        f"[vlprompt] analysis of {setup.method_name} on {cfg.data.dataset} ({split}, "
        f"{sum(len(s) for s in sources.values())} images): prompts in the {', '.join(slots)} tower(s)"
    )
    with torch.no_grad():
        stats, prompted = _observe(cfg, setup, sources, slots, ctx, say)
        accuracy = {"zeroshot": _zero_shot(cfg, setup, data, sources, ctx, say), "prompted": prompted}
        accuracy.update(_ablations(cfg, setup, sources, slots, stats, chosen, ctx, say))
    return Analysis(
        method=setup.method_name,
        dataset=str(cfg.data.dataset),
        split=split,
        images=sum(len(s) for s in sources.values()),
        classes=sum(len(s.classnames) for s in data.tasks.values()),
        towers=chosen,
        layers=[row for tower in slots for row in stats[tower].rows()],
        accuracy=accuracy,
        notes=notes,
    )


def load_learned(method: Any, learned: Mapping[str, Any], name: str) -> None:
    """``learned`` into ``method``; ``ValueError`` naming the keys that do not fit."""
    try:
        result = method.load_state_dict(dict(learned), strict=False)
        bad = [
            *(f"missing {k}" for k in result.missing_keys),
            *(f"unexpected {k}" for k in result.unexpected_keys),
        ]
    except RuntimeError as err:  # a shape that differs
        bad = [str(err).splitlines()[-1].strip()]
    if bad:
        raise ValueError(
            f"the run's learned state does not fit {name} as its logged config builds it ({'; '.join(bad)}); "
            "was the config overridden with other method options?"
        )


def _check_rebuild(setup: Any, data: Any, logged: Mapping[str, str], say: Say) -> list[str]:
    """The rebuilt method has the run's trainable-parameter count (else ``ValueError``); a split
    fingerprint that differs (other files under ``data.root``) is a note, said and recorded."""
    from vlprompt.methods.base import count_trainable

    notes = []
    count = count_trainable(setup.method)
    if "trainable_params" in logged and str(count) != logged["trainable_params"]:
        raise ValueError(
            f"the rebuilt {setup.method_name} has {count} trainable parameters, the run logged "
            f"{logged['trainable_params']}: the config does not rebuild the run's method"
        )
    if "split_fingerprint" in logged and logged["split_fingerprint"] != data.fingerprint:
        notes.append(
            f"the data read now (split fingerprint {data.fingerprint[:12]}) is not the run's "
            f"({logged['split_fingerprint'][:12]}): data.root holds other files than when it ran"
        )
        say(f"[vlprompt] warning: {notes[-1]}")
    return notes


def _towers(wanted: Sequence[str], slots: Mapping[str, Any]) -> tuple[str, ...]:
    if not wanted:
        return tuple(slots)
    unknown = [t for t in wanted if t not in slots]
    if unknown:
        raise ValueError(f"--towers {','.join(unknown)}: this method has prompts in {', '.join(slots)} only")
    return tuple(dict.fromkeys(wanted))


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """At most ``n`` items, evenly spaced over the split (splits are often ordered by class)."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def _sources(cfg: DictConfig, data: Any, setup: Any, split: str, max_images: int) -> dict[str, Any]:
    """Task → the batches of its ``split`` under the run's test transform (``batching.Source``)."""
    from vlprompt.orchestrator.batching import Source

    out = {}
    for task, splits in data.tasks.items():
        items = spread(getattr(splits, split), max_images)
        if not items:
            raise ValueError(f"task {task!r} has no images in its {split} split; choose another --split")
        out[task] = Source({task: items}, setup.transforms.test, cfg.data.loader_workers)
    return out


class _Progress:
    """A method whose ``predict`` says, about every tenth of a pass, how far the pass is (the
    loop's ``evaluate`` calls nothing else)."""

    def __init__(self, method: Any, total: int, label: str, say: Say) -> None:
        self.method, self.total, self.label, self.say = method, total, label, say
        self.done, self.every, self.started = 0, max(1, total // 10), time.perf_counter()

    def predict(self, batch: Any) -> Any:
        out = self.method.predict(batch)
        before, self.done = self.done, self.done + len(batch)
        if self.done // self.every > before // self.every or self.done == self.total:
            rate = self.done / max(time.perf_counter() - self.started, 1e-9)
            self.say(f"[vlprompt]   {self.label}: {self.done}/{self.total} images ({rate:.1f}/s)")
        return out


def _accuracy(
    method: Any,
    sources: Mapping[str, Any],
    cfg: DictConfig,
    ctx: Any,
    hooks: Mapping[str, Any],
    label: str,
    say: Say,
) -> float:
    """The loop's ``evaluate`` of every task under the scoped block hooks; the mean over tasks."""
    from vlprompt.orchestrator.evaluation import evaluate

    watched = _Progress(method, sum(len(s) for s in sources.values()), label, say)
    with method.backbone.scoped_block_hooks(**hooks):
        scores = [evaluate(watched, source, cfg.train.eval_batch_size, ctx) for source in sources.values()]  # type: ignore[arg-type]
    accuracy = sum(scores) / len(scores)
    say(f"[vlprompt] {label}: accuracy {accuracy:.2f}%")
    return accuracy


def _observe(
    cfg: DictConfig, setup: Any, sources: Mapping[str, Any], slots: Mapping[str, Any], ctx: Any, say: Say
) -> tuple[dict[str, Any], float]:
    """The statistics pass: the text tower once per task (one image's ``predict`` encodes every
    class of the task), the image tower over every image -- which also scores the trained model."""
    from vlprompt.methods.attention import TowerStats, attention_hook
    from vlprompt.methods.clip import BlockHooks
    from vlprompt.orchestrator.batching import Source

    stats = {tower: TowerStats(s) for tower, s in slots.items()}

    def observing(tower: str) -> dict[str, Any]:
        return {tower: BlockHooks(attention=attention_hook(slots[tower], observe=stats[tower].observe))}

    if "text" in slots:
        firsts = {t: Source({t: s.items[:1]}, setup.transforms.test, 0) for t, s in sources.items()}
        _accuracy(
            setup.method, firsts, cfg, ctx, observing("text"), "text-tower statistics (the classes)", say
        )
    hooks = observing("vision") if "vision" in slots else {}
    prompted = _accuracy(
        setup.method, sources, cfg, ctx, hooks, "trained model (image-tower statistics)", say
    )
    return stats, prompted


def _zero_shot(
    cfg: DictConfig, setup: Any, data: Any, sources: Mapping[str, Any], ctx: Any, say: Say
) -> float:
    """Zero-shot CLIP on the same backbone and images, each task's hand-crafted template."""
    from vlprompt.methods import build_method

    classes = {t: list(s.classnames) for t, s in data.tasks.items()}
    templates = {t: s.template for t, s in data.tasks.items()}
    zero_shot = build_method("zeroshot", setup.backbone, classes, {}, templates=templates)
    return _accuracy(zero_shot.to(ctx.device).eval(), sources, cfg, ctx, {}, "zero-shot CLIP", say)


def _ablations(
    cfg: DictConfig,
    setup: Any,
    sources: Mapping[str, Any],
    slots: Mapping[str, Any],
    stats: Mapping[str, Any],
    towers: Sequence[str],
    ctx: Any,
    say: Say,
) -> dict[str, float]:
    """The accuracy under each ablation of :data:`ABLATED`, applied to every block of ``towers``."""
    from vlprompt.methods.attention import attention_hook
    from vlprompt.methods.clip import BlockHooks

    means = {tower: stats[tower].means() for tower in towers}
    out = {}
    for ablation in ABLATED:
        hooks = {t: BlockHooks(attention=attention_hook(slots[t], ablation, means[t])) for t in towers}
        out[ablation] = _accuracy(setup.method, sources, cfg, ctx, hooks, f"ablation {ablation}", say)
    return out


# ------------------------------------------------------------------------------ tables and plots

LAYER_COLUMNS = {
    "tower": "tower",
    "block": "block",
    "fresh": "fresh prompt",
    "share_readout": "prompt share, [cls]/EOT query",
    "share_all": "prompt share, input queries",
    "prompt_norm_readout": "‖prompt term‖ [cls]/EOT",
    "token_norm_readout": "‖token term‖ [cls]/EOT",
    "prompt_norm_all": "‖prompt term‖ inputs",
    "token_norm_all": "‖token term‖ inputs",
    "dependence_readout": "input dependence [cls]/EOT",
    "dependence_all": "input dependence inputs",
    "sequences": "sequences",
}
ABLATION_COLUMNS = {
    "variant": "variant",
    "what": "what",
    "accuracy": "accuracy %",
    "gain": "gain over zero-shot",
    "gain_kept": "share of the trained gain",
}


def ablation_rows(accuracy: Mapping[str, float]) -> list[dict[str, Any]]:
    """One row per variant: accuracy, gain over zero-shot, and the share of the trained model's
    gain it keeps (NaN when training gained nothing over zero-shot: no gain to share)."""
    from vlprompt.methods.attention import ABLATIONS

    what = {
        "zeroshot": "zero-shot CLIP, the dataset's template",
        "prompted": "the trained model",
        **ABLATIONS,
    }
    zero_shot, trained = accuracy["zeroshot"], accuracy["prompted"]
    rows = []
    for variant in VARIANTS:
        gain = accuracy[variant] - zero_shot
        kept = gain / (trained - zero_shot) + 0.0 if trained > zero_shot else math.nan
        rows.append(
            {
                "variant": variant,
                "what": what[variant],
                "accuracy": accuracy[variant],
                "gain": gain,
                "gain_kept": kept,
            }
        )
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def to_markdown(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> str:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([row[c] for c in columns] for row in rows)
    return out.getvalue()


def _per_tower_plot(
    rows: Sequence[Mapping[str, Any]], series: Mapping[str, str], ylabel: str, title: str
) -> bytes:
    """One panel per tower: each of ``series`` (row key → legend) against the block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    towers = list(dict.fromkeys(r["tower"] for r in rows))
    fig, axes = plt.subplots(1, len(towers), figsize=(4.8 * len(towers), 3.6), squeeze=False)
    for ax, tower in zip(axes[0], towers, strict=True):
        mine = [r for r in rows if r["tower"] == tower]
        for key, label in series.items():
            ax.plot([r["block"] for r in mine], [r[key] for r in mine], marker="o", label=label)
        ax.set(title=f"{tower} tower", xlabel="block", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def _ablation_plot(rows: Sequence[Mapping[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    colours = ["C7", "C0", "C2", "C3", "C1", "C4"]
    ax.bar([r["variant"] for r in rows], [r["accuracy"] for r in rows], color=colours[: len(rows)])
    ax.axhline(rows[0]["accuracy"], color="C7", linestyle="--", linewidth=1, label="zero-shot")
    ax.set(ylabel="accuracy %", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def artifacts(result: Analysis, run_id: str = "") -> dict[str, bytes | str]:
    """The files logged under ``analysis/``: tables (Markdown, CSV), plots (PNG), a summary."""
    ablation = ablation_rows(result.accuracy)
    where = f"{result.method} on {result.dataset} ({result.split}, {result.images} images)"
    header = f"Prompt analysis of run {run_id}: {where}\n\n" if run_id else f"Prompt analysis: {where}\n\n"
    share = {"share_readout": "[cls]/EOT query", "share_all": "input queries"}
    norms = {
        "prompt_norm_readout": "prompt term, [cls]/EOT",
        "token_norm_readout": "token term, [cls]/EOT",
        "prompt_norm_all": "prompt term, inputs",
        "token_norm_all": "token term, inputs",
    }
    summary = {**asdict(result), "run_id": run_id, "ablation": ablation}
    return {
        "layers.md": header + to_markdown(result.layers, LAYER_COLUMNS),
        "layers.csv": to_csv(result.layers, list(LAYER_COLUMNS)),
        "ablation.md": header
        + f"Ablated towers: {', '.join(result.towers)}\n\n"
        + to_markdown(ablation, ABLATION_COLUMNS),
        "ablation.csv": to_csv(ablation, list(ABLATION_COLUMNS)),
        "attention_share.png": _per_tower_plot(result.layers, share, "attention on the prompts", where),
        "prompt_norm.png": _per_tower_plot(result.layers, norms, "mean norm", where),
        "ablation.png": _ablation_plot(ablation, where),
        "summary.json": json.dumps(summary, indent=2, default=str) + "\n",
    }


# ------------------------------------------------------------------------------ the command


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-id", required=True, help="the MLflow run id of a finished run")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI")
    parser.add_argument("--split", choices=SPLITS, default="test", help="each task's split (default test)")
    parser.add_argument("--max-images", type=int, default=0, help="at most this many per task (0: all)")
    parser.add_argument(
        "--towers", default="", help="towers to ablate, e.g. vision (default: every prompted one)"
    )
    parser.add_argument("--out", default=None, help="also write the files to this folder")
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value over the run's config (data.root=...)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``experiments/analyse_prompts.py``'s body; exit status 2 for a run that cannot be analysed."""
    args = _arguments(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print("error: give --tracking-uri or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    uri = tracking_uri(uri, Path.cwd())
    towers = [t.strip() for t in args.towers.split(",") if t.strip()]
    try:
        run = open_run(uri, args.run_id, args.overrides)
        declared = capabilities(run.method).block_prompts(method_options(run.cfg.method)[1])
        _towers(towers, declared.towers)  # before anything loads
        _say(f"[vlprompt] run {run.run_id}: {run.method} on {run.cfg.data.dataset}; loading its model")
        result = analyse(
            run.cfg,
            read_learned(run),
            split=args.split,
            max_images=args.max_images,
            towers=towers,
            logged=run.params,
        )
    except ValueError as err:  # ConfigError is one
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = artifacts(result, run.run_id)
    tracking.log_artifact_files(uri, run.run_id, files, FOLDER)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (out / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    print(files["ablation.md"], end="")
    logged = run.metrics.get("test_acc")
    if logged is not None and args.split == "test" and not args.max_images:
        here = result.accuracy["prompted"]
        print(f"(the run logged test_acc {logged:.2f}%; the trained model scores {here:.2f}% here)")
    _say(f"[vlprompt] logged {', '.join(files)} under {FOLDER}/ of run {run.run_id}")
    return 0
