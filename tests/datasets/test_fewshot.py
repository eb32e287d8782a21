"""Few-shot sampling (Dassl semantics) and the base/novel class split (CoOp semantics)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from vlprompt.datasets import (
    DatasetSplits,
    Datum,
    get_entry,
    sample_fewshot,
    split_fingerprint,
    subsample_classes,
)


def make_splits(
    n_classes: int = 3,
    train: int = 5,
    val: int = 3,
    test: int = 2,
    order: Sequence[int] | None = None,
    classnames: Sequence[str] | None = None,
) -> DatasetSplits:
    """Items interleaved across classes (class order ``order``), paths naming split/class/index."""
    order = list(range(n_classes)) if order is None else list(order)
    names = tuple(classnames or (f"class {c}" for c in range(n_classes)))

    def items(split: str, per_class: int) -> tuple[Datum, ...]:
        return tuple(
            Datum(f"/data/{split}/{c}_{i}.png", c, names[c]) for i in range(per_class) for c in order
        )

    return DatasetSplits(
        name="toy",
        classnames=names,
        template="a photo of a {}.",
        train=items("train", train),
        val=items("val", val),
        test=items("test", test),
    )


def of_class(items: Sequence[Datum], label: int) -> list[Datum]:
    return [d for d in items if d.label == label]


def test_matches_hand_computed_reference_sampling() -> None:
    """One Random(seed), classes in first-appearance order, train first, then val."""
    splits = make_splits(train=5, val=3, order=(2, 0, 1))
    out = sample_fewshot(splits, 2, seed=7)
    rng = random.Random(7)
    expected_train = [d for c in (2, 0, 1) for d in rng.sample(of_class(splits.train, c), 2)]
    expected_val = [d for c in (2, 0, 1) for d in rng.sample(of_class(splits.val, c), 2)]
    assert out.train == tuple(expected_train)
    assert out.val == tuple(expected_val)


def test_golden_indices_for_seed_1() -> None:
    """Pinned picks, so a change of algorithm (or of the stdlib's) cannot pass unnoticed."""
    out = sample_fewshot(make_splits(train=5, val=3), 2, seed=1)
    assert [d.path for d in out.train] == [
        "/data/train/0_1.png",
        "/data/train/0_0.png",
        "/data/train/1_2.png",
        "/data/train/1_0.png",
        "/data/train/2_3.png",
        "/data/train/2_4.png",
    ]
    assert [d.path for d in out.val] == [
        "/data/val/0_1.png",
        "/data/val/0_2.png",
        "/data/val/1_0.png",
        "/data/val/1_2.png",
        "/data/val/2_1.png",
        "/data/val/2_0.png",
    ]


def test_deterministic_and_seed_dependent() -> None:
    splits = make_splits(train=10, val=10)
    assert sample_fewshot(splits, 4, seed=1) == sample_fewshot(splits, 4, seed=1)
    trains = {sample_fewshot(splits, 4, seed).train for seed in (1, 2, 3)}
    assert len(trains) == 3


@pytest.mark.parametrize(("shots", "val_shots"), [(1, 1), (2, 2), (4, 4), (8, 4), (16, 4)])
def test_exact_counts_and_test_untouched(shots: int, val_shots: int) -> None:
    splits = make_splits(n_classes=4, train=16, val=6, test=5)
    out = sample_fewshot(splits, shots, seed=3)
    assert Counter(d.label for d in out.train) == dict.fromkeys(range(4), shots)
    assert Counter(d.label for d in out.val) == dict.fromkeys(range(4), val_shots)
    assert out.test == splits.test
    assert set(out.train) <= set(splits.train)
    assert len(set(out.train)) == len(out.train)  # no repeats
    assert (out.classnames, out.name, out.template) == (splits.classnames, splits.name, splits.template)


@pytest.mark.parametrize("shots", [0, -1])
def test_non_positive_shots_means_all_images(shots: int) -> None:
    splits = make_splits()
    assert sample_fewshot(splits, shots, seed=1) == splits


def test_too_few_training_images_is_an_error() -> None:
    splits = make_splits(train=5)
    splits = DatasetSplits(**{**splits.__dict__, "train": splits.train[:-1]})  # class 2 has 4 left
    with pytest.raises(ValueError) as err:
        sample_fewshot(splits, 5, seed=1)
    message = str(err.value)
    assert "'toy'" in message
    assert "'class 2'" in message
    assert "4 training images" in message
    assert "shots=5" in message


def test_small_val_class_keeps_all_without_drawing() -> None:
    """Reference behaviour: fewer than min(K, 4) val images → all kept, rng untouched."""
    base = make_splits(n_classes=2, train=4, val=5)
    val = (*(d for d in base.val if d.label == 1), Datum("/data/val/only0.png", 0, "class 0"))
    splits = DatasetSplits(**{**base.__dict__, "val": val})
    out = sample_fewshot(splits, 4, seed=5)
    rng = random.Random(5)
    for c in (0, 1):
        rng.sample(of_class(splits.train, c), 4)
    expected_val = [*rng.sample(of_class(val, 1), 4), val[-1]]
    assert out.val == tuple(expected_val)


def test_base_and_new_halves_of_ten_classes() -> None:
    names = [f"c{c}" for c in range(10)]
    splits = make_splits(n_classes=10, train=2, val=1, test=3, classnames=names)
    base = subsample_classes(splits, "base")
    new = subsample_classes(splits, "new")
    assert base.classnames == ("c0", "c1", "c2", "c3", "c4")
    assert new.classnames == ("c5", "c6", "c7", "c8", "c9")
    for part, offset in ((base, 0), (new, 5)):
        for split, per_class in (("train", 2), ("val", 1), ("test", 3)):
            items = part.split(split)
            assert Counter(d.label for d in items) == dict.fromkeys(range(5), per_class)
            for d in items:  # relabelled 0..4; the path still says the original class
                assert d.path.split("/")[-1].startswith(f"{d.label + offset}_")
                assert d.classname == part.classnames[d.label] == f"c{d.label + offset}"
    assert subsample_classes(splits, "all") is splits


def test_odd_class_count_gives_base_the_extra_class() -> None:
    pets = get_entry("oxford_pets").classnames
    splits = make_splits(n_classes=37, train=1, val=1, test=1, classnames=pets)
    base = subsample_classes(splits, "base")
    new = subsample_classes(splits, "new")
    assert (base.num_classes, new.num_classes) == (19, 18)
    assert base.classnames == pets[:19]
    assert new.classnames == pets[19:]
    assert (base.classnames[-1], new.classnames[0]) == ("keeshond", "leonberger")
    assert {d.label for d in new.test} == set(range(18))


def test_classes_are_chosen_from_train_labels() -> None:
    """CoOp takes the sorted labels present in *train*; a test-only class is dropped."""
    splits = make_splits(n_classes=5, train=2)
    splits = DatasetSplits(**{**splits.__dict__, "train": tuple(d for d in splits.train if d.label != 4)})
    base = subsample_classes(splits, "base")
    new = subsample_classes(splits, "new")
    assert base.classnames == ("class 0", "class 1")
    assert new.classnames == ("class 2", "class 3")
    assert all(d.path.split("/")[-1][0] in "23" for d in new.test)


def test_subsample_after_fewshot_and_fingerprint() -> None:
    splits = make_splits(n_classes=6, train=8, val=4)
    fewshot = sample_fewshot(splits, 4, seed=2)
    base = subsample_classes(fewshot, "base")
    assert Counter(d.label for d in base.train) == dict.fromkeys(range(3), 4)
    assert split_fingerprint(base) != split_fingerprint(subsample_classes(fewshot, "new"))
    assert split_fingerprint(base) == split_fingerprint(subsample_classes(fewshot, "base"))


def test_unknown_subsample_is_rejected() -> None:
    with pytest.raises(ValueError, match="all, base, new"):
        subsample_classes(make_splits(), "novel")
