"""Checks against the file system, once, in the driver, before Ray starts.

``config`` checks what a config says; this checks that what it names is there. For every distinct
data setup the sweep's trials will read (dataset or task group, targets, protocol, shots), the
driver writes the procedural data the config allows to be generated (once, not in every trial
at once), reads every dataset through the real readers -- split files, class folders, listed
images -- and checks that each class has the shots asked for. A wrong ``data.root``, a missing
split file or ``data.shots=16`` on a class with 10 training images is then one error naming the
path or the class and the fix, before any trial starts, instead of one failure per trial
minutes in. A method's source-statistics file is checked from its header: made for this
architecture, blocks and source, and -- where the method reads per-class rows (PromptSync) --
holding every class the run scores. Nothing here imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from vlprompt import datasets as vds
from vlprompt.methods import capabilities, stats_file
from vlprompt.orchestrator.config import ConfigError, method_options, space_trials
from vlprompt.orchestrator.data import ensure_datasets
from vlprompt.orchestrator.protocols import get_protocol


def preflight(cfg: DictConfig) -> None:
    """Generate what may be generated, then read every dataset the sweep needs; ``ConfigError``.

    Trials that read the same datasets the same way are read once, and their shot counts are
    checked against that one reading (a sweep over 5 shot counts lists ImageNet once, not 5 times).
    """
    readings: dict[tuple, list[DictConfig]] = {}
    for trial in space_trials(cfg):
        check_source_stats(trial)
        d = trial.data
        key = (d.root, d.dataset, tuple(d.eval_targets), d.generate_missing, d.generate_stand_ins,
               d.make_missing_splits)  # fmt: skip
        readings.setdefault(key, []).append(trial)
    for trials in readings.values():
        tasks, targets = read_data(trials[0])
        scored = [c for task in tasks.values() for c in task.splits.classnames]
        scored += [c for splits in targets.values() for c in splits.classnames]
        for trial in trials:
            check_source_classes(trial, scored)
        shots = {t.data.shots for t in trials if get_protocol(t.data.protocol).fewshot}
        for count in sorted(shots):
            check_shots(tasks, count)


def read_data(cfg: DictConfig) -> tuple[dict[str, vds.TaskData], dict[str, vds.DatasetSplits]]:
    """The task source and targets of ``cfg``, generated where allowed, read by the real readers."""
    ensure_datasets(cfg)
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise ConfigError(
            f"data.root={root} does not exist: point it at the folder that holds the dataset folders "
            f"(check one with `python -m vlprompt.datasets doctor --root DIR`)" + _generate_hint(cfg)
        )
    print(f"[vlprompt] checking data: {cfg.data.dataset} under {root}", file=sys.stderr, flush=True)
    make_split = cfg.data.make_missing_splits
    try:
        tasks = vds.load_tasks(cfg.data.dataset, root, make_missing_split=make_split)
        targets = {
            name: vds.load_dataset(name, root, make_missing_split=make_split)
            for name in cfg.data.eval_targets
        }
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.dataset={cfg.data.dataset}: {err}{_generate_hint(cfg)}") from None
    return tasks, targets


def check_source_stats(cfg: DictConfig) -> None:
    """A method that aligns to offline source statistics (capability ``source_stats``) names a
    whole statistics file made for this architecture, blocks and source (``methods/stats_file.py``;
    the weights and starting prompts are checked where torch runs, when the method loads it)."""
    name, typed = method_options(cfg.method)
    wanted = capabilities(name).source_stats
    spec = wanted(typed) if wanted else None
    if spec is None or not (spec.required or spec.file):
        return
    key = f"method.{spec.option}"
    if not spec.file:
        raise ConfigError(
            f"{key} is empty, but method.name={name} aligns to source statistics: make the file with "
            f"`{stats_file.MAKE_COMMAND}` (the same config and overrides) and set {key} to it"
        )
    try:
        metadata, _ = stats_file.read_header(spec.file)
        stats_file.check_without_torch(metadata, spec.file, cfg.model.name, spec.blocks, spec.source())
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None


def check_source_classes(cfg: DictConfig, scored: list[str]) -> None:
    """A method that reads per-class rows (PromptSync's prototypes) finds every class the run
    scores -- its tasks' and its targets' -- in the file's class list (its header: no torch).
    The method checks again when it is built for each evaluation set, but on real data that is
    hours in: after the whole ImageNet test split, at ImageNet-V2's 1000 names."""
    name, typed = method_options(cfg.method)
    wanted = capabilities(name).source_stats
    spec = wanted(typed) if wanted else None
    if spec is None or not (spec.per_class and spec.file):
        return
    try:
        metadata, _ = stats_file.read_header(spec.file)
        stats_file.check_classes(metadata, spec.file, scored)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"method.{spec.option}: {err}") from None


def check_shots(tasks: dict[str, vds.TaskData], shots: int) -> None:
    """Every class of every task has ``shots`` training images (the sampler's own check)."""
    for task in tasks.values():
        try:
            vds.sample_fewshot(task.splits, shots, seed=1)
        except ValueError as err:
            raise ConfigError(f"data.shots={shots}: {err}") from None


def _generate_hint(cfg: DictConfig) -> str:
    procedural = [n for n in vds.task_names(cfg.data.dataset) if vds.get_entry(n).procedural]
    if procedural and not cfg.data.generate_missing:
        return " (procedural datasets are written on first use with data.generate_missing=true)"
    if not cfg.data.generate_stand_ins:
        return (
            " (to try the platform without the real data, data.generate_stand_ins=true writes small "
            "procedural stand-ins in the real layouts; such runs are tagged data.generated)"
        )
    return ""
