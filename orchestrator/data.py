"""The data phase of a run: which images it trains on and which evaluation sets it scores.

Reads the dataset (or every task of a task group), samples the few-shot subset, applies the
protocol's class split and builds the evaluation sets the protocol declares
(``orchestrator/protocols.py``). Nothing here knows a protocol by name.

Generated data is honest: ``data.generate_missing`` writes a missing folder only for datasets
that are procedural by nature (``synthetic``, the small world ``sw_*``); a procedural *stand-in*
for a real benchmark (a few drawn shapes in EuroSAT's layout) is written only when the user asks
for it with ``data.generate_stand_ins``. Every dataset read from a generated folder is listed in
:attr:`RunData.generated`, which the run logs (``data.generated`` tag and param) and the results
table shows.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from vlprompt import datasets as vds
from vlprompt.datasets.files import MARKER_FILE
from vlprompt.orchestrator.protocols import get_protocol


@dataclass(frozen=True)
class EvalSet:
    """A split to score, and over which classes.

    ``classes`` is ``None`` for the training tasks' own test/val splits (scored by the trained
    method); otherwise the split brings its own classes and template (base-to-novel's novel half,
    a transfer target), and the learned state is moved into a method built for them.
    """

    key: str  # "test/<task>", "val/<task>", "novel", "target/<dataset>"
    role: str  # "test" | "val" | "novel" | "target"
    task: str  # the task the method is asked about (``Batch.task``)
    items: tuple[vds.Datum, ...]
    classes: vds.DatasetSplits | None = None

    @property
    def name(self) -> str:
        """What the metrics call it: the task or the target dataset."""
        return self.key.split("/", 1)[-1]


@dataclass(frozen=True)
class RunData:
    """The splits one run trains on and the sets it evaluates."""

    tasks: dict[str, vds.DatasetSplits]  # task → its (few-shot) splits; base classes for base-to-novel
    eval_sets: tuple[EvalSet, ...]  # test sets, then val sets, then novel, then targets
    fingerprint: str
    skipped_images: tuple[str, ...] = ()  # unreadable images dropped (data.skip_bad_images)
    generated: tuple[str, ...] = ()  # datasets read from folders the generator wrote


def datasets_read(cfg: DictConfig) -> tuple[str, ...]:
    """Every catalog dataset a run of ``cfg`` reads: the task source's members, then the targets."""
    return (*vds.task_names(cfg.data.dataset), *cfg.data.eval_targets)


def ensure_datasets(cfg: DictConfig) -> None:
    """Generate the missing dataset folders the config allows to be generated."""
    root = Path(cfg.data.root)
    for name in dict.fromkeys(datasets_read(cfg)):
        entry = vds.get_entry(name)
        allowed = cfg.data.generate_stand_ins or (cfg.data.generate_missing and entry.procedural)
        if allowed and not (root / entry.folder).exists():
            vds.generate_dataset(name, root, seed=0)


def generated_datasets(cfg: DictConfig) -> tuple[str, ...]:
    """The datasets ``cfg`` reads from folders the generator wrote (now or earlier)."""
    root = Path(cfg.data.root)
    return tuple(
        name
        for name in dict.fromkeys(datasets_read(cfg))
        if (root / vds.get_entry(name).folder / MARKER_FILE).is_file()
    )


def prepare_data(cfg: DictConfig) -> RunData:
    """Read the task source and targets, sample the few-shot subset, split base/novel classes."""
    protocol = get_protocol(cfg.data.protocol)
    ensure_datasets(cfg)
    generated = generated_datasets(cfg)
    root, make_split = Path(cfg.data.root), cfg.data.make_missing_splits
    loaded = vds.load_tasks(cfg.data.dataset, root, make_missing_split=make_split)
    sources = {key: (task.splits, task.cache_dir) for key, task in loaded.items()}
    targets = {
        name: vds.load_dataset(name, root, make_missing_split=make_split) for name in cfg.data.eval_targets
    }
    skipped: list[str] = []
    if cfg.data.skip_bad_images:
        sources = {key: (_drop_unreadable(s, skipped), d) for key, (s, d) in sources.items()}
        targets = {name: _drop_unreadable(s, skipped) for name, s in targets.items()}
    if protocol.fewshot:
        tasks = {key: vds.cached_fewshot(s, cfg.data.shots, cfg.seed, d) for key, (s, d) in sources.items()}
    else:
        tasks = {key: splits for key, (splits, _) in sources.items()}
    fingerprint = _fingerprint(tasks)
    novel = None
    if protocol.base_to_novel and protocol.transductive:
        ((key, splits),) = tasks.items()
        eval_sets = _transductive_sets(key, splits, protocol.evaluate_val)
        return RunData(tasks, eval_sets, fingerprint, tuple(skipped), generated)
    if protocol.base_to_novel:
        ((key, fewshot),) = tasks.items()
        tasks, novel = {key: vds.subsample_classes(fewshot, "base")}, vds.subsample_classes(fewshot, "new")
    eval_sets = _eval_sets(tasks, protocol.evaluate_val, novel, targets)
    return RunData(tasks, eval_sets, fingerprint, tuple(skipped), generated)


def _transductive_sets(task: str, splits: vds.DatasetSplits, with_val: bool) -> tuple[EvalSet, ...]:
    """Transductive base-to-novel (PromptKD): the method trains on every class, so each set brings
    its own classes -- base test (and val) over the base half, novel test over the novel half --
    and is scored by the learned state moved into a method built for those classes."""
    base, novel = vds.subsample_classes(splits, "base"), vds.subsample_classes(splits, "new")
    sets = [EvalSet(f"test/{task}", "test", task, base.test, base)]
    if with_val:
        sets.append(EvalSet(f"val/{task}", "val", task, base.val, base))
    sets.append(EvalSet("novel", "novel", task, novel.test, novel))
    return tuple(sets)


def _eval_sets(
    tasks: Mapping[str, vds.DatasetSplits],
    with_val: bool,
    novel: vds.DatasetSplits | None,
    targets: Mapping[str, vds.DatasetSplits],
) -> tuple[EvalSet, ...]:
    sets = [EvalSet(f"test/{task}", "test", task, splits.test) for task, splits in tasks.items()]
    if with_val:
        sets += [EvalSet(f"val/{task}", "val", task, splits.val) for task, splits in tasks.items()]
    first = next(iter(tasks))  # transfer protocols train on one task
    if novel is not None:
        sets.append(EvalSet("novel", "novel", first, novel.test, novel))
    sets += [EvalSet(f"target/{name}", "target", first, s.test, s) for name, s in targets.items()]
    return tuple(sets)


def _drop_unreadable(splits: vds.DatasetSplits, skipped: list[str]) -> vds.DatasetSplits:
    kept = {}
    for name in vds.SPLIT_NAMES:
        kept[name], bad = vds.drop_unreadable(splits.split(name))
        skipped.extend(bad)
    return dataclasses.replace(splits, **kept)


def _fingerprint(tasks: Mapping[str, vds.DatasetSplits]) -> str:
    """One task: its split fingerprint. Several: a hash over every task's, in task order."""
    if len(tasks) == 1:
        return vds.split_fingerprint(next(iter(tasks.values())))
    lines = "".join(f"{key} {vds.split_fingerprint(s)}\n" for key, s in tasks.items())
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()
