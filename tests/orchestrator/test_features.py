"""The on-disk feature cache: shared across runs, exact, and never trusted blindly."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from vlprompt.orchestrator.config import load_config, resolve_paths
from vlprompt.orchestrator.features import FeatureStore, backbone_identity, digest, feature_key
from vlprompt.orchestrator.loop import WorkerContext, run

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
    out = {}
    metrics = run(
        cfg,
        WorkerContext(0, 1, CPU),
        None,
        lambda m, d: out.update(state=torch.load(Path(d) / "learned_state.pt")) if d else None,
    )
    return metrics, out.get("state", {})


def test_a_second_run_reads_every_test_feature_from_the_cache(tmp_path):
    first, _ = _run(_cfg(tmp_path))
    assert first["feature_cache_misses"] == 2 and first["feature_cache_hits"] == 0  # test, val
    second, _ = _run(_cfg(tmp_path))
    assert second["feature_cache_hits"] == 2 and second["feature_cache_misses"] == 0
    assert second["test_acc"] == first["test_acc"] and second["val_acc"] == first["val_acc"]
    files = sorted((tmp_path / "cache").glob("*.parquet"))
    assert len(files) == 2
    table = pq.read_table(files[0])
    assert table.column_names == ["feature"] and b"vlprompt" in table.schema.metadata


def test_the_cache_does_not_move_a_training_run(tmp_path):
    """Same learned context with the cache off, cold and warm: hits skip the data loaders,
    and that must not shift the run's random stream (augmented views, shuffles)."""
    coop = ("method.name=coop", "method.n_ctx=4", "train.feature_views=2")
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
    assert again["feature_cache_rejected"] == 2 and again["feature_cache_misses"] == 2
    assert again["test_acc"] == first["test_acc"]
    assert "feature cache: ignoring" in capsys.readouterr().err


def test_the_key_changes_with_everything_the_features_depend_on(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"one")
    ident = backbone_identity("vlp-tiny", None, seed=1)

    def key(**change):
        args = {
            "backbone": ident,
            "precision": "fp32",
            "device": "cpu",
            "transform": "T",
            "paths": [str(image)],
        }
        args.update(change)
        return digest(feature_key(**args))

    base = key()
    assert key() == base
    assert key(backbone=backbone_identity("vlp-tiny", None, seed=2)) != base  # random init differs
    assert key(precision="fp16") != base and key(device="cuda") != base and key(transform="U") != base
    image.write_bytes(b"replaced")  # same path, new content
    assert key() != base
    # a pretrained tag does not depend on the seed; a checkpoint file is named by its stat
    assert backbone_identity("ViT-B-16", "openai", 1) == backbone_identity("ViT-B-16", "openai", 2)
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"w")
    assert backbone_identity("x", str(ckpt), 1)["size"] == 1


def test_an_unwritable_cache_folder_is_not_an_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    store = FeatureStore(blocker / "cache")
    out = store.get_or_compute({"images": 2}, lambda: torch.ones(2, 3))
    assert torch.equal(out, torch.ones(2, 3)) and store.misses == 1
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("width", [1, 7])
def test_features_come_back_bit_identical(tmp_path, width):
    store = FeatureStore(tmp_path)
    values = torch.randn(5, width) * 1e3
    key = {"images": 5, "what": width}
    store.get_or_compute(key, lambda: values)
    again = FeatureStore(tmp_path).get_or_compute(key, lambda: pytest.fail("should hit"))
    assert torch.equal(again, values)
