"""The small world: deterministic scenes, captions that say what the pixels show, tasks in the catalog."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from vlprompt.datasets import CATALOG, generate_dataset, load_dataset
from vlprompt.datasets import smallworld as sw
from vlprompt.datasets.catalog import SMALLWORLD_SHIFTS, SMALLWORLD_TASKS


def test_same_seed_gives_identical_pixels_and_captions() -> None:
    a_img, a_cap = sw.pretraining_batch(np.random.default_rng(7), 24)
    b_img, b_cap = sw.pretraining_batch(np.random.default_rng(7), 24)
    c_img, c_cap = sw.pretraining_batch(np.random.default_rng(8), 24)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap
    assert a_img.shape == (24, 32, 32, 3) and a_img.dtype == np.uint8


def test_captions_vary_and_fit_the_context() -> None:
    _, caps = sw.pretraining_batch(np.random.default_rng(0), 200)
    assert len(set(caps)) > 150
    assert max(len(c.split()) for c in caps) < 20  # well inside vlp-small's 32 tokens


@pytest.mark.parametrize("hue", sw.CHROMATIC)
def test_colour_named_in_the_caption_is_the_colour_drawn(hue: str) -> None:
    """Read the object's colour back from the pixels: the nearest hue must be the one captioned."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        thing = sw.Thing(shape="square", hue=hue, size="large")
        scene = sw.Scene(thing=thing, background="plain", bg_hue="white")
        text = sw.caption(scene, rng)
        pixels = np.asarray(sw.render(scene, rng)).reshape(-1, 3).astype(float)
        ink = np.median(pixels[np.abs(pixels - 245).sum(1) > 60], axis=0)  # not the white background
        nearest = min(sw.HUES, key=lambda h: float(((sw.rgb(h) - ink) ** 2).sum()))
        assert nearest == hue
        assert text.endswith("square") or "background" in text


def test_count_in_caption_matches_objects_drawn() -> None:
    rng = np.random.default_rng(5)
    for count in range(1, 6):
        scene = sw.Scene(thing=sw.Thing("circle", "blue", count=count), background="plain", bg_hue="white")
        if count > 1:
            assert sw.COUNT_WORDS[count - 1] in sw.caption(scene, rng)
        mask = np.abs(np.asarray(sw.render(scene, rng, size=64)).astype(float) - 245).sum(-1) > 60
        assert _components(mask) == count


def _components(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask)
    n = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        n += 1
        stack = [(y, x)]
        while stack:
            i, j = stack.pop()
            if 0 <= i < mask.shape[0] and 0 <= j < mask.shape[1] and mask[i, j] and not seen[i, j]:
                seen[i, j] = True
                stack += [(i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)]
    return n


def test_inverted_style_inverts() -> None:
    scene = sw.Scene(thing=sw.Thing("star", "red"), background="striped", bg_hue="yellow", bg_hue2="blue")
    photo = np.asarray(sw.render(replace(scene, style="photo"), np.random.default_rng(1))).astype(int)
    inverted = np.asarray(sw.render(replace(scene, style="inverted"), np.random.default_rng(1))).astype(int)
    assert np.abs((255 - inverted) - photo).mean() < 6  # same scene; only the photo noise differs


def test_every_task_is_a_catalog_entry_with_a_template() -> None:
    names = set(SMALLWORLD_TASKS) | set(SMALLWORLD_SHIFTS)
    assert names <= set(CATALOG)
    assert {CATALOG[n].world for n in names} == set(sw.TASKS)
    for n in names:
        assert CATALOG[n].classnames == sw.TASKS[CATALOG[n].world].classnames
        assert "{}" in CATALOG[n].template


def test_generated_task_loads_through_the_split_file(tmp_path) -> None:
    generate_dataset("sw_counting", tmp_path, images_per_class=8, seed=3)
    splits = load_dataset("sw_counting", tmp_path)
    assert splits.classnames == sw.COUNT_WORDS
    assert splits.template == "a photo of {} objects."
    assert len(splits.train) == 5 * 4 and len(splits.test) == 5 * 2
