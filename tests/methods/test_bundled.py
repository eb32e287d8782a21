"""The bundled small CLIP: loads offline, is what its checksum says, and prompts can beat it."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch

from vlprompt.methods import clip
from vlprompt.methods.clip import WEIGHTS_DIR, load_backbone

WEIGHTS = WEIGHTS_DIR / "vlp-small.safetensors"


def test_bundled_weights_are_small_and_match_their_checksum() -> None:
    assert WEIGHTS.is_file()
    assert WEIGHTS.stat().st_size < 12 * 2**20
    recorded = (WEIGHTS_DIR / "vlp-small.safetensors.sha256").read_text().split()[0]
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == recorded


def test_bundled_checkpoint_loads_offline() -> None:
    backbone = load_backbone("vlp-small", "bundled")
    state = backbone.model.state_dict()
    from safetensors.torch import load_file

    saved = load_file(str(WEIGHTS))
    assert set(saved) == set(state)
    key = "text_projection"
    assert torch.equal(state[key], saved[key].float())  # the weights were loaded, not random
    assert backbone.image_size == 32 and backbone.context_length == 32


def test_corrupted_copy_is_refused_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for f in WEIGHTS_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    copy = tmp_path / WEIGHTS.name
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(clip, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(copy))}.*corrupt"):
        load_backbone("vlp-small", "bundled")
    copy.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(copy))):
        load_backbone("vlp-small", "bundled")


def test_model_without_bundled_weights_is_refused() -> None:
    with pytest.raises(ValueError, match=r"vlp-tiny has no bundled weights.*vlp-small"):
        load_backbone("vlp-tiny", "bundled")


# --- prompts on the bundled model, through vlprompt's one loop (in-process, no Ray) ---------
# Measured with the smallworld preset (experiments/configs/smallworld.yaml, seed 1):
# sw_textures zero-shot 45.8 % (chance 12.5 %); sw_counting zero-shot 37.5 %, CoOp 49.2 %.


def _run(root: Path, task: str, method: str, *overrides: str) -> dict:
    from vlprompt.orchestrator.config import load_config, resolve_paths
    from vlprompt.orchestrator.loop import WorkerContext, run

    base = [
        f"data.root={root}",
        "data.generate_missing=true",
        f"data.dataset={task}",
        "data.shots=16",
        "model.name=vlp-small",
        "model.pretrained=bundled",
        f"method.name={method}",
        "seed=1",
        "sweep.space={}",
        f"tracking.uri=sqlite:///{root}/mlflow.db",
    ]
    cfg = resolve_paths(load_config("quickstart", [*base, *overrides]), root)
    return run(cfg, WorkerContext(0, 1, torch.device("cpu")), None, None)


def test_zero_shot_is_well_above_chance(tmp_path: Path) -> None:
    from vlprompt.datasets import generate_dataset, get_entry

    generate_dataset("sw_textures", tmp_path, images_per_class=40, seed=0)
    chance = 100.0 / len(get_entry("sw_textures").classnames)
    assert _run(tmp_path, "sw_textures", "zeroshot")["test_acc"] > 2 * chance


@pytest.mark.e2e  # two whole runs of the loop
def test_short_coop_run_beats_zero_shot(tmp_path: Path) -> None:
    """The first test that tells a working prompt learner from a broken one on a real model."""
    task = "sw_counting"  # the hand-written "a photo of {} objects." is not enough
    zero_shot = _run(tmp_path, task, "zeroshot")["test_acc"]
    coop = _run(
        tmp_path,
        task,
        "coop",
        "method.n_ctx=4",
        "method.ctx_init=a photo of a",
        "train.epochs=30",
        "train.batch_size=32",
        "train.lr=0.02",
        "train.view_mode=cycled",
        "train.feature_views=4",
        "train.view_seed=null",
        "train.crop_min_scale=0.9",
    )["test_acc"]
    assert coop > zero_shot + 3.0, (coop, zero_shot)
