"""The feature store by itself: per-image families, merges, row-group reads, integrity checks."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vlprompt.orchestrator.features import (
    TEST_VIEW,
    FeatureStore,
    backbone_identity,
    dataset_of,
    digest,
    family_key,
    file_stat,
    image_id,
    seeded_view,
)


def _key(**change):
    args = {
        "backbone": backbone_identity("vlp-tiny", None, seed=1),
        "precision": "fp32",
        "device": "cpu",
        "transform": "T",
        "view": TEST_VIEW,
        "dataset": "synthetic",
    }
    args.update(change)
    return family_key(**args)


def test_the_key_changes_with_everything_the_features_depend_on(tmp_path):
    base = digest(_key())
    assert digest(_key()) == base
    assert digest(_key(backbone=backbone_identity("vlp-tiny", None, seed=2))) != base  # random init differs
    for change in ({"precision": "fp16"}, {"device": "cuda"}, {"transform": "U"}, {"dataset": "eurosat"}):
        assert digest(_key(**change)) != base, change
    assert digest(_key(view=seeded_view(0, 1))) not in (base, digest(_key(view=seeded_view(0, 2))))
    assert digest(_key(view=seeded_view(0, 1))) != digest(_key(view=seeded_view(1, 1)))
    # a pretrained tag does not depend on the seed; a checkpoint file is named by its stat
    assert backbone_identity("ViT-B-16", "openai", 1) == backbone_identity("ViT-B-16", "openai", 2)
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"w")
    assert backbone_identity("x", str(ckpt), 1)["size"] == 1


def test_images_are_named_relative_to_the_data_root(tmp_path):
    inside = tmp_path / "data" / "eurosat" / "images" / "a.png"
    assert image_id(str(inside), tmp_path / "data") == "eurosat/images/a.png"
    assert dataset_of("eurosat/images/a.png") == "eurosat"
    outside = tmp_path / "elsewhere" / "b.png"
    assert image_id(str(outside), tmp_path / "data") == str(outside)
    assert dataset_of(str(outside)) == str(outside.parent)
    assert file_stat(str(outside)) == "missing"


def _rows(n, width=3, offset=0):
    ids = [f"synthetic/{i + offset:05d}.png" for i in range(n)]
    values = np.arange(n * width, dtype=np.float32).reshape(n, width) + offset
    return ids, [f"{i}:1" for i in range(n)], values


def test_entries_merge_and_return_exactly_the_requested_rows(tmp_path):
    store = FeatureStore(tmp_path)
    key = _key()
    ids, stats, values = _rows(5)
    store.merge(key, ids[:3], stats[:3], values[:3])
    entry = store.entry(key)
    assert store.missing(entry, ids, stats) == [3, 4]
    store.merge(key, ids[3:], stats[3:], values[3:])
    again = FeatureStore(tmp_path)
    entry = again.entry(key)
    assert again.missing(entry, ids, stats) == []
    order = [ids[4], ids[0], ids[2]]
    assert np.array_equal(again.read(entry, order), values[[4, 0, 2]])  # in the requested order
    # a replaced image (another size:mtime) is missing again, never served stale
    assert again.missing(entry, ids[:2], ["0:1", "999:2"]) == [1]


def test_a_rank_reads_only_the_row_groups_of_its_items(tmp_path, monkeypatch):
    from vlprompt.orchestrator import features

    monkeypatch.setattr(features, "ROW_GROUP", 4)
    store = FeatureStore(tmp_path)
    ids, stats, values = _rows(10)
    store.merge(_key(), ids, stats, values)
    read_groups = []
    original = pq.ParquetFile.read_row_group

    def spy(self, group, **kw):
        read_groups.append(group)
        return original(self, group, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    entry = store.entry(_key())
    assert np.array_equal(store.read(entry, [ids[1], ids[9]]), values[[1, 9]])
    assert read_groups == [0, 2]  # rows 4..7 (group 1) are never read


@pytest.mark.parametrize("damage", ["truncate", "garbage", "feature_bytes"])
def test_a_partial_or_corrupt_entry_is_rejected(tmp_path, capsys, damage):
    store = FeatureStore(tmp_path)
    ids, stats, values = _rows(6, width=2000)  # large enough that the feature bytes are easy to hit
    store.merge(_key(), ids, stats, values)
    path = store.path(_key())
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "garbage":
        path.write_bytes(b"not parquet")
    else:  # same size, one value changed inside the feature column's pages
        needle = np.float32(values[3, 1000]).tobytes()
        at = bytes(data).find(needle)
        assert at > 0
        data[at : at + 4] = np.float32(-1.0).tobytes()
        path.write_bytes(bytes(data))
    reader = FeatureStore(tmp_path)
    entry = reader.entry(_key())
    got = None if entry is None else reader.read(entry, ids)
    assert got is None and reader.rejected == [str(path)]
    assert "feature cache: ignoring" in capsys.readouterr().err
    reader.merge(_key(), ids, stats, values)  # recomputed: a clean file replaces it
    assert np.array_equal(FeatureStore(tmp_path).read(FeatureStore(tmp_path).entry(_key()), ids), values)


def test_an_unwritable_cache_folder_is_not_an_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    store = FeatureStore(blocker / "cache")
    ids, stats, values = _rows(2)
    store.merge(_key(), ids, stats, values)
    assert store.entry(_key()) is None
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("width", [1, 7])
def test_features_come_back_bit_identical(tmp_path, width):
    values = (torch.randn(5, width) * 1e3).numpy()
    ids = [f"synthetic/{i}.png" for i in range(5)]
    FeatureStore(tmp_path).merge(_key(), ids, ["s"] * 5, values)
    store = FeatureStore(tmp_path)
    assert np.array_equal(store.read(store.entry(_key()), ids), values)
