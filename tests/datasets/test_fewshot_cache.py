"""The few-shot cache: a readable record of which images a (K, seed) subset holds."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from vlprompt.datasets import generate_dataset, load_dataset, sample_fewshot, split_fingerprint
from vlprompt.datasets.fewshot_cache import cache_path, cached_fewshot


@pytest.fixture
def data(tmp_path: Path):
    generate_dataset("synthetic", tmp_path, images_per_class=10, num_classes=4)
    return load_dataset("synthetic", tmp_path), tmp_path / "synthetic"


def test_first_run_writes_the_subset_and_later_runs_reuse_it(data):
    splits, folder = data
    first = cached_fewshot(splits, 2, 1, folder)
    assert first == sample_fewshot(splits, 2, 1)
    record = json.loads(cache_path(folder, 2, 1).read_text())
    assert record["fingerprint"] == split_fingerprint(first)
    assert record["source_fingerprint"] == split_fingerprint(splits)
    assert len(record["train"]) == 4 * 2 and len(record["val"]) == 4 * 2
    assert all(not os.path.isabs(rel) for rel, _, _ in record["train"])
    assert cached_fewshot(splits, 2, 1, folder) == first


def test_the_record_is_authoritative_while_the_full_split_is_unchanged(data):
    """Two machines sharing the folder use the recorded images, whatever their sampler does."""
    splits, folder = data
    cached_fewshot(splits, 2, 1, folder)
    path = cache_path(folder, 2, 1)
    record = json.loads(path.read_text())
    other = sample_fewshot(splits, 2, 99)
    record["train"] = [
        [Path(os.path.relpath(d.path, splits.image_root)).as_posix(), d.label, d.classname]
        for d in other.train
    ]
    record["fingerprint"] = split_fingerprint(
        replace(splits, train=other.train, val=sample_fewshot(splits, 2, 1).val)
    )
    path.write_text(json.dumps(record))
    assert cached_fewshot(splits, 2, 1, folder).train == other.train


def test_a_changed_full_split_redraws_and_a_tampered_record_is_named(data):
    splits, folder = data
    cached_fewshot(splits, 2, 1, folder)
    path = cache_path(folder, 2, 1)
    shrunk = replace(splits, train=splits.train[:-1])  # the split file changed
    redrawn = cached_fewshot(shrunk, 2, 1, folder)
    assert redrawn == sample_fewshot(shrunk, 2, 1)
    assert json.loads(path.read_text())["source_fingerprint"] == split_fingerprint(shrunk)
    record = json.loads(path.read_text())
    record["train"][0][1] = (record["train"][0][1] + 1) % 4  # a label edited by hand
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=str(path)):
        cached_fewshot(shrunk, 2, 1, folder)


def test_an_unwritable_cache_location_is_not_an_error(data):
    """Shared data folders are often read-only; the seeded draw is reproducible without the file."""
    splits, folder = data
    (folder / "split_fewshot").write_text("not a folder")  # mkdir fails even for root
    assert cached_fewshot(splits, 2, 1, folder) == sample_fewshot(splits, 2, 1)
    assert (folder / "split_fewshot").read_text() == "not a folder"


def test_all_shots_are_not_cached(data):
    splits, folder = data
    assert cached_fewshot(splits, 0, 1, folder) == splits
    assert not (folder / "split_fewshot").exists()
