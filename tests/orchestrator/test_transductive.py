"""PromptKD's transductive base-to-novel protocol: unlabelled training on every class, base and
novel scored over their own classes, labelled methods refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlprompt import datasets as vds
from vlprompt.methods import promptkd
from vlprompt.orchestrator.config import ConfigError, load_config, resolve_paths
from vlprompt.orchestrator.data import prepare_data
from vlprompt.orchestrator.loop import Keep, WorkerContext, run

UNIT = str(Path(__file__).resolve().parents[1] / "assets" / "unit.yaml")
PROMPTKD = (
    "method.name=promptkd",
    "method.teacher_model=vlp-tiny",
    "method.teacher_pretrained=null",
    "method.depth_vision=1",
    "method.kd_weight=1.0",
)


def _cfg(tmp_path, *overrides, method=PROMPTKD):
    base = [
        *method,
        f"data.root={tmp_path / 'data'}",
        "data.generate_missing=true",
        "data.dataset=synthetic",
        "data.protocol=transductive_base_to_novel",
        "train.epochs=1",
        "train.batch_size=8",
        "sweep.space={}",
        "sweep.metric=hm",
    ]
    return resolve_paths(load_config(UNIT, [*base, *overrides]), tmp_path)


def test_it_trains_on_every_class_and_scores_base_and_novel_over_their_own_classes(tmp_path):
    data = prepare_data(_cfg(tmp_path))
    ((task, splits),) = data.tasks.items()
    full = vds.load_dataset("synthetic", tmp_path / "data")
    # the whole train split of all classes (no shots), base and novel alike
    assert {d.path for d in splits.train} == {d.path for d in full.train}
    assert tuple(splits.classnames) == tuple(full.classnames)
    half = (len(full.classnames) + 1) // 2
    by_key = {es.key: es for es in data.eval_sets}
    assert set(by_key) == {f"test/{task}", f"val/{task}", "novel"}
    base_names, novel_names = tuple(full.classnames[:half]), tuple(full.classnames[half:])
    for key, names, split in ((f"test/{task}", base_names, "test"), (f"val/{task}", base_names, "val")):
        assert tuple(by_key[key].classes.classnames) == names
        assert {d.label for d in by_key[key].items} == set(range(len(names)))
        assert len(by_key[key].items) == sum(d.label < half for d in full.split(split))
    assert tuple(by_key["novel"].classes.classnames) == novel_names
    assert len(by_key["novel"].items) == sum(d.label >= half for d in full.test)


@pytest.mark.e2e
def test_the_student_never_sees_a_label_and_reports_base_novel_hm(tmp_path, monkeypatch):
    seen = []
    original = promptkd.PromptKD.training_loss

    def recording(self, batch):
        seen.append(batch.labels)
        return original(self, batch)

    monkeypatch.setattr(promptkd.PromptKD, "training_loss", recording)
    keep = Keep()
    metrics = run(_cfg(tmp_path), WorkerContext(0, 1, torch.device("cpu")), None, keep)
    assert seen and all(labels is None for labels in seen)
    assert metrics["base_acc"] == metrics["test_acc"]
    base, novel = metrics["base_acc"], metrics["novel_acc"]
    assert metrics["hm"] == pytest.approx(2 * base * novel / (base + novel))
    assert "val_acc" in metrics


def test_a_method_that_needs_labels_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"transductive_base_to_novel.*needs labels.*promptkd"):
        _cfg(tmp_path, method=("method.name=coop",))
