"""The on-disk feature cache in real runs: shared across runs and subsets, exact, never trusted blindly."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from vlprompt.orchestrator.config import load_config, resolve_paths
from vlprompt.orchestrator.loop import Keep, WorkerContext, run

pytestmark = pytest.mark.e2e  # runs the real loop in-process (seconds per test)

CPU = torch.device("cpu")
UNIT = str(Path(__file__).resolve().parents[1] / "assets" / "unit.yaml")


def _cfg(tmp_path, *overrides, method=("method.name=zeroshot",)):
    base = [
        *method,
        f"data.root={tmp_path / 'data'}",
        "data.generate_missing=true",
        "data.shots=4",
        "train.epochs=2",
        "train.batch_size=8",
        "sweep.space={}",
        f"data.feature_cache={tmp_path / 'cache'}",
    ]
    return resolve_paths(load_config(UNIT, [*base, *overrides]), tmp_path)


def _run(cfg):
    kept = Keep()
    metrics = run(cfg, WorkerContext(0, 1, CPU), None, kept)
    return metrics, kept.learned


def test_a_second_run_reads_every_test_feature_from_the_cache(tmp_path):
    first, _ = _run(_cfg(tmp_path))
    assert first["feature_cache_misses"] == 2 and first["feature_cache_hits"] == 0  # test, val
    second, _ = _run(_cfg(tmp_path))
    assert second["feature_cache_hits"] == 2 and second["feature_cache_misses"] == 0
    assert second["test_acc"] == first["test_acc"] and second["val_acc"] == first["val_acc"]
    assert second["feature_images_encoded"] == 0 and first["feature_images_encoded"] > 0
    files = sorted((tmp_path / "cache").glob("*.parquet"))
    assert len(files) == 1  # test and val: one family (synthetic's images, the test transform)
    table = pq.read_table(files[0])
    assert table.column_names == ["image", "stat", "feature"] and b"vlprompt_check" in table.schema.metadata
    assert all(i.startswith("synthetic/") for i in table.column("image").to_pylist())


def test_the_cache_does_not_move_a_training_run(tmp_path):
    """Same learned context with the cache off, cold and warm: hits skip the data loaders,
    and that must not shift the run's random stream (augmented views, shuffles)."""
    coop = (
        "method.name=coop",
        "method.n_ctx=4",
        "train.view_mode=cycled",
        "train.feature_views=2",
        "train.view_seed=null",
    )
    off, off_state = _run(_cfg(tmp_path, "data.feature_cache=null", method=coop))
    assert "feature_cache_hits" not in off
    cold, cold_state = _run(_cfg(tmp_path, method=coop))
    warm, warm_state = _run(_cfg(tmp_path, method=coop))
    assert warm["feature_cache_hits"] == 2
    assert torch.equal(off_state["ctx"], cold_state["ctx"]) and torch.equal(
        cold_state["ctx"], warm_state["ctx"]
    )
    assert off["test_acc"] == cold["test_acc"] == warm["test_acc"]


def test_a_damaged_entry_is_recomputed_not_trusted(tmp_path, capsys):
    first, _ = _run(_cfg(tmp_path))
    for path in (tmp_path / "cache").glob("*.parquet"):
        path.write_bytes(b"not parquet")
    again, _ = _run(_cfg(tmp_path))
    assert again["feature_cache_rejected"] == 1 and again["feature_cache_misses"] == 2  # one file: test+val
    assert again["test_acc"] == first["test_acc"]
    assert "feature cache: ignoring" in capsys.readouterr().err


SMALL = ("model.name=vlp-small", "model.pretrained=bundled")  # pretrained: seeds share features
SHARED = ("method.name=coop", "method.n_ctx=4", "train.view_mode=per_epoch", "train.view_seed=0")


def test_shared_views_and_overlapping_subsets_are_encoded_once(tmp_path):
    """Seed 2's few-shot subset overlaps seed 1's: it encodes only its new (image, epoch) pairs."""
    from vlprompt.orchestrator.data import prepare_data

    first, first_state = _run(_cfg(tmp_path, *SMALL, method=SHARED))
    again, again_state = _run(_cfg(tmp_path, *SMALL, method=SHARED))
    assert again["feature_images_encoded"] == 0 and torch.equal(first_state["ctx"], again_state["ctx"])
    off, off_state = _run(_cfg(tmp_path, *SMALL, "data.feature_cache=null", method=SHARED))
    assert torch.equal(off_state["ctx"], first_state["ctx"]) and off["test_acc"] == first["test_acc"]

    data = {seed: prepare_data(_cfg(tmp_path, f"seed={seed}")) for seed in (1, 2)}
    train = {seed: {d.path for d in data[seed].tasks["synthetic"].train} for seed in data}
    val = {seed: {d.path for d in data[seed].tasks["synthetic"].val} for seed in data}  # few-shot too
    new = len(train[2] - train[1])
    assert 0 < new < len(train[2])
    second, _ = _run(_cfg(tmp_path, *SMALL, "seed=2", method=SHARED))
    # two epochs of the new training images, the new val images; the test split all cached
    assert second["feature_images_encoded"] == 2 * new + len(val[2] - val[1])


def test_a_replaced_image_is_encoded_again(tmp_path):
    from vlprompt.orchestrator.data import prepare_data

    first, _ = _run(_cfg(tmp_path, *SMALL))
    assert first["feature_images_encoded"] > 1
    test = prepare_data(_cfg(tmp_path)).eval_sets[0].items
    Path(test[0].path).write_bytes(Path(test[1].path).read_bytes())  # new content, same name
    second, _ = _run(_cfg(tmp_path, *SMALL))
    assert second["feature_images_encoded"] == 1


def test_a_missing_planned_entry_names_the_file_and_the_node(tmp_path):
    import socket

    from vlprompt.orchestrator.features import MissingPlannedFeatures

    cfg = _cfg(tmp_path, *SMALL, "data.features_planned=true")
    with pytest.raises(MissingPlannedFeatures) as err:
        _run(cfg)
    message = str(err.value)
    assert str(tmp_path / "cache") in message and socket.gethostname() in message
    assert "data.feature_cache" in message
