"""Shared fixtures: small generated datasets, written once per session where read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlprompt.datasets import generate_dataset


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full synthetic dataset (16 classes x 10 images: 5/2/3), shared read-only."""
    root = tmp_path_factory.mktemp("data")
    generate_dataset("synthetic", root, images_per_class=10)
    return root


@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    """A private 3-class synthetic dataset (4 images per class: 2/1/1) that a test may break."""
    generate_dataset("synthetic", tmp_path, images_per_class=4, num_classes=3)
    return tmp_path
