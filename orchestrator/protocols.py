"""Evaluation protocols as data: what a run trains on, what it evaluates, what it reports.

One :class:`Protocol` per protocol, in one registry. Everything else reads these declarations:
``config`` takes its choices, its metric checks and its rules about targets and task groups
from them, the data phase of a run (``orchestrator/data.py``) builds the evaluation sets they
ask for, and the summary turns the accuracies of those sets into the protocol's metrics. The
loop itself never asks which protocol it runs.

Evaluation sets are uniform: each is "a split to score, and the classes to score it over".
The test and val splits of the training tasks are scored with the trained method; base-to-
novel's novel half and every transfer target bring their *own* classes, so the learned state is
moved into a method built for them first. Base-to-novel's novel half and a cross-dataset target
are therefore the same kind of thing.

Adding a protocol = one entry here + a preset in ``experiments/configs/`` (CONTRIBUTING.md).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol (the CoOp/CoCoOp/TPT/SoftCPT papers' setups)."""

    summary: str
    trains: bool = True
    """False: nothing is trained before evaluation; only methods that learn nothing, or adapt to
    each test image on its own (TPT), run under it."""
    fewshot: bool = True
    """Train on K shots per class (``data.shots``, seeded); False: the splits as they are."""
    task_source: bool = False
    """``data.dataset`` may name several tasks (a task group such as ``general10``, or a
    multi-task dataset such as ``fashion20``): one method is trained on all of them at once."""
    base_to_novel: bool = False
    """Train on the first half of the classes (base); the second half (novel) is an evaluation
    set with its own classes."""
    targets: str = "none"
    """``data.eval_targets``: ``"required"`` (transfer: every target is an evaluation set with its
    own classes), ``"optional"``, or ``"none"``."""
    evaluate_val: bool = True
    """Also score the val split of every task (``val_acc``)."""
    transductive: bool = False
    """Train on the *unlabelled* training images of every class (with ``base_to_novel``: base and
    novel alike), labels withheld from the method; the test and val sets are scored over their own
    classes. Only methods that learn without labels (capability ``unlabelled``) run under it."""

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics a run of this protocol reports (what ``sweep.metric`` may name)."""
        names = ["test_acc"]
        if self.evaluate_val:
            names.append("val_acc")
        if self.base_to_novel:
            names += ["base_acc", "novel_acc", "hm"]
        if self.targets != "none":
            names.append("target_acc_mean")
        return tuple(names)


TRANSFER = Protocol(
    "train on data.dataset, then score the learned state on every data.eval_targets dataset's test "
    "split with that dataset's own classes and template",
    targets="required",
)
"""Cross-dataset transfer and domain generalisation are the same protocol with other targets
(ImageNet → the other ten datasets; ImageNet → V2 / Sketch / A / R)."""

PROTOCOLS: dict[str, Protocol] = {
    "few_shot": Protocol("K shots of every class; test_acc on the test split"),
    "base_to_novel": Protocol(
        "K shots of the first half of the classes; base_acc, novel_acc and their harmonic mean hm",
        base_to_novel=True,
    ),
    "transductive_base_to_novel": Protocol(
        "PromptKD's protocol: distil on the unlabelled train split of every class (base and novel, "
        "labels withheld); base_acc on the base classes' test split, novel_acc on the novel classes', "
        "hm; val_acc on the base classes' val split (never the test split: PromptKD's best_val "
        "selects on base test)",
        fewshot=False,
        base_to_novel=True,
        transductive=True,
    ),
    "cross_dataset": TRANSFER,
    "domain_generalisation": TRANSFER,
    "multi_task": Protocol(
        "every task of a group at once, K shots per class of each; task_acc/<task> and their mean",
        task_source=True,
    ),
    "test_time": Protocol(
        "nothing trained; each test image classified on its own, labels withheld (TPT adapts on its views)",
        trains=False,
        fewshot=False,
        targets="optional",
        evaluate_val=False,
    ),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; ``ValueError`` listing the known ones otherwise."""
    if name in PROTOCOLS:
        return PROTOCOLS[name]
    close = difflib.get_close_matches(str(name), list(PROTOCOLS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown protocol {name!r}{hint}; protocols: {', '.join(PROTOCOLS)}")


def harmonic_mean(a: float, b: float) -> float:
    """The base-to-novel ``hm`` (0 when both are 0)."""
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)
