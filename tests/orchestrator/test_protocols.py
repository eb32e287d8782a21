"""The multi-task and test-time protocols and the bad-image option, through the real loop
(in-process, tiny model, generated data in the real layouts)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from vlprompt import datasets as vds
from vlprompt.datasets import tasks as vtasks
from vlprompt.datasets.images import test_transform
from vlprompt.methods import build_method
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import load_backbone
from vlprompt.methods.common import cosine_logits, image_features
from vlprompt.orchestrator.batching import Encoder, Source
from vlprompt.orchestrator.config import ConfigError, load_config, resolve_paths
from vlprompt.orchestrator.loop import Keep, WorkerContext, run
from vlprompt.orchestrator.training import train_epoch

pytestmark = pytest.mark.e2e  # runs the real loop in-process (seconds per test)

CPU = torch.device("cpu")
UNIT = str(Path(__file__).resolve().parents[1] / "assets" / "unit.yaml")


@pytest.fixture
def pair_group(monkeypatch):
    """A two-task group of cheap generated datasets, registered like general10."""
    monkeypatch.setitem(vtasks.GROUPS, "pair", ("synthetic", "eurosat"))
    return "pair"


def _cfg(tmp_path, *overrides, method=("method.name=coop", "method.n_ctx=4")):
    base = [
        *method,
        f"data.root={tmp_path / 'data'}",
        "data.generate_missing=true",
        "data.generate_stand_ins=true",  # eurosat's procedural stand-in, asked for explicitly
        "data.shots=4",
        "train.epochs=2",
        "train.batch_size=8",
        "train.view_mode=cycled",
        "train.feature_views=2",
        "sweep.space={}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    return resolve_paths(load_config(UNIT, [*base, *overrides]), tmp_path)


def _run(cfg):
    return run(cfg, WorkerContext(0, 1, CPU), None, None)


# --- multi-task -------------------------------------------------------------------------------


def test_multi_task_reports_each_task_and_their_mean(tmp_path, pair_group):
    cfg = _cfg(tmp_path, "data.protocol=multi_task", f"data.dataset={pair_group}")
    metrics = _run(cfg)
    per_task = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("task_acc/")}
    assert set(per_task) == {"synthetic", "eurosat"}
    assert metrics["test_acc"] == pytest.approx(sum(per_task.values()) / 2)
    assert metrics["trainable_params"] == 4 * 64  # one context shared by both tasks (CoOp-MT)
    # each task is scored over its own classes only: zero-shot multi-task = zero-shot per dataset
    zs = ("method.name=zeroshot",)
    multi = _run(_cfg(tmp_path, "data.protocol=multi_task", f"data.dataset={pair_group}", method=zs))
    for name in ("synthetic", "eurosat"):
        single = _run(_cfg(tmp_path, f"data.dataset={name}", method=zs))
        assert multi[f"task_acc/{name}"] == pytest.approx(single["test_acc"])


def test_a_multi_task_step_minimises_the_summed_loss_over_the_batch(tmp_path):
    """One step on a batch mixing two tasks = one SGD step on (sum of every sample's CE) / B."""
    root = tmp_path / "data"
    splits = {}
    for name in ("synthetic", "eurosat"):
        vds.generate_dataset(name, root, seed=0, num_classes=4, images_per_class=10)
        splits[name] = vds.sample_fewshot(vds.load_dataset(name, root), 2, 1)
    torch.manual_seed(0)  # the random-init backbone
    backbone = load_backbone("vlp-tiny", None)
    classes = {name: list(s.classnames) for name, s in splits.items()}

    def coop():
        torch.manual_seed(0)
        return build_method("coop", backbone, classes, {"n_ctx": 2})

    tf = test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
    source = Source({name: s.train for name, s in splits.items()}, tf, 0)
    source.cache_views(Encoder(backbone, CPU, 64, {}), 1)
    cfg = OmegaConf.create({"seed": 1, "train": {"batch_size": len(source)}})

    method = coop()
    start = method.ctx.detach().clone()
    optimizer = torch.optim.SGD(method.parameters(), lr=1.0)
    train_epoch(
        method,
        source,
        optimizer,
        batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        epoch=0,
        ctx=WorkerContext(0, 1, CPU),
    )

    manual = coop()
    assert torch.equal(manual.ctx, start)
    loss = 0.0
    for i, task in enumerate(source.tasks):
        mask = source.task_ids == i
        batch = Batch(task, features=source.features[0][mask], labels=source.labels[mask])
        logits = cosine_logits(
            image_features(backbone, batch), manual.text_features(task), backbone.logit_scale
        )
        loss = loss + F.cross_entropy(logits, source.labels[mask], reduction="sum")
    (loss / len(source)).backward()
    update = method.ctx.detach() - start  # lr 1, no momentum: minus the gradient
    assert update.abs().max() > 1e-3
    torch.testing.assert_close(update, -manual.ctx.grad, rtol=1e-4, atol=1e-6)


def test_linear_probe_fits_each_task_of_a_group(tmp_path, pair_group):
    cfg = _cfg(
        tmp_path,
        "data.protocol=multi_task",
        f"data.dataset={pair_group}",
        method=("method.name=linear_probe", "method.search_steps=2"),
    )
    metrics = _run(cfg)
    assert {"task_acc/synthetic", "task_acc/eurosat"} <= set(metrics)
    assert metrics["trainable_params"] == 64 * (16 + 10) + 16 + 10  # one head per task


def test_multi_task_config_errors_name_the_key(pair_group):
    with pytest.raises(ConfigError, match=r"data\.protocol=multi_task"):
        load_config(UNIT, [f"data.dataset={pair_group}"])
    with pytest.raises(ConfigError, match=r"data\.dataset"):
        load_config(UNIT, ["data.protocol=multi_task", "data.dataset=general11"])
    with pytest.raises(ConfigError, match="eval_targets"):
        load_config(UNIT, ["data.protocol=multi_task", "data.dataset=pair", "data.eval_targets=[eurosat]"])


# --- test-time -------------------------------------------------------------------------------


def test_test_time_zero_shot_equals_zero_shot_after_training_nothing(tmp_path):
    zs = ("method.name=zeroshot",)
    per_sample = _run(_cfg(tmp_path, "data.protocol=test_time", method=zs))
    batched = _run(_cfg(tmp_path, method=zs))
    assert per_sample["test_acc"] == pytest.approx(batched["test_acc"])
    assert "val_acc" not in per_sample


def test_tpt_without_a_step_is_zero_shot_and_with_steps_is_reproducible(tmp_path, capsys):
    tpt = ("method.name=tpt", "method.n_views=9")
    still = _run(_cfg(tmp_path, "data.protocol=test_time", method=(*tpt, "method.steps=0")))
    zs = _run(_cfg(tmp_path, "data.protocol=test_time", method=("method.name=zeroshot",)))
    assert still["test_acc"] == pytest.approx(zs["test_acc"])  # "a photo of a {}." either way
    capsys.readouterr()
    first = _run(_cfg(tmp_path, "data.protocol=test_time", method=tpt))
    assert "test-time synthetic:" in capsys.readouterr().out  # progress while adapting
    second = _run(_cfg(tmp_path, "data.protocol=test_time", method=tpt))
    assert first["test_acc"] == second["test_acc"]  # views are seeded per sample
    together = _run(_cfg(tmp_path, "data.protocol=test_time", method=(*tpt, "method.images_per_step=4")))
    assert together["test_acc"] == first["test_acc"]  # four images per predict call, same answers


def test_maple_test_time_methods_give_the_same_answers_images_at_once(tmp_path):
    # PromptSync as TPT on MaPLe (no statistics: β = γ = 0; PromptAlign's episode and batching are
    # the same code), one image per predict call against three
    method = ("method.name=promptsync", "method.n_views=5", "method.selection_p=0.34")
    method = (*method, "method.align_weight=0", "method.discrimination_weight=0")
    alone = _run(_cfg(tmp_path, "data.protocol=test_time", method=method))
    together = _run(_cfg(tmp_path, "data.protocol=test_time", method=(*method, "method.images_per_step=3")))
    assert together["test_acc"] == alone["test_acc"]


def test_test_time_refuses_a_method_it_would_leave_untrained(tmp_path):
    with pytest.raises(ValueError, match="untrained"):
        _run(_cfg(tmp_path, "data.protocol=test_time"))


def test_test_time_scores_its_targets(tmp_path):
    cfg = _cfg(
        tmp_path,
        "data.protocol=test_time",
        "data.eval_targets=[eurosat]",
        "sweep.metric=target_acc_mean",
        method=("method.name=zeroshot",),
    )
    metrics = _run(cfg)
    direct = _run(_cfg(tmp_path, "data.dataset=eurosat", method=("method.name=zeroshot",)))
    assert metrics["target_acc/eurosat"] == pytest.approx(direct["test_acc"])
    assert metrics["target_acc_mean"] == metrics["target_acc/eurosat"]


# --- bad images -------------------------------------------------------------------------------


def test_a_corrupt_image_stops_the_run_unless_skipping_is_asked_for(tmp_path):
    zs = ("method.name=zeroshot",)
    cfg = _cfg(tmp_path, method=zs)
    clean = _run(cfg)
    bad = vds.load_dataset("synthetic", cfg.data.root).test[0].path
    Path(bad).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(OSError, match=re.escape(Path(bad).name)):
        _run(cfg)
    skipped = _run(_cfg(tmp_path, "data.skip_bad_images=true", method=zs))
    assert skipped["bad_images_skipped"] == 1.0
    assert clean["bad_images_skipped"] == 0.0


def test_softcpt_trains_one_generator_for_every_task_of_a_group(tmp_path, pair_group):
    cfg = _cfg(
        tmp_path,
        "data.protocol=multi_task",
        f"data.dataset={pair_group}",
        method=("method.name=softcpt", "method.n_ctx=4"),
    )
    kept = Keep()
    metrics = run(cfg, WorkerContext(0, 1, CPU), None, kept)
    assert {"task_acc/synthetic", "task_acc/eurosat"} <= set(metrics)
    state = kept.learned
    assert set(state) == {"task_ctx", "proj"}
    assert metrics["trainable_params"] == state["task_ctx"].numel() + state["proj"].numel()
    assert state["proj"].shape[1] == 4 * state["task_ctx"].shape[1]  # n_ctx x text width
