"""Which grid points share a Train run, and what identifies a configuration across launches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vlprompt.orchestrator.bundles import bundle_key, config_digest, make_bundles
from vlprompt.orchestrator.config import apply_point, load_config
from vlprompt.orchestrator.search_space import grid_points
from vlprompt.orchestrator.trial import bundle_configs

UNIT = str(Path(__file__).resolve().parents[1] / "assets" / "unit.yaml")
SPACE = (
    "sweep.space={method.name: {choice: [zeroshot, coop]}, data.dataset: {choice: [synthetic, sw_counting]},"
    " seed: {choice: [1, 2, 3]}, data.shots: {choice: [2, 4]}}"
)


def _grid(*overrides: str) -> tuple[dict, list[dict], list[dict]]:
    cfg = load_config(UNIT, [SPACE, *overrides])
    plain = OmegaConf.to_container(cfg, resolve=True)
    points = grid_points(plain["sweep"]["space"])
    plain["sweep"]["space"] = {}
    return plain, points, [apply_point(plain, p) for p in points]


def test_bundles_never_mix_datasets_and_keep_every_point_once_in_grid_order():
    _, points, configs = _grid()
    bundles = make_bundles(configs, points, slots=2, max_size=0)
    assert len(points) == 24
    assert [len(b) for b in bundles] == [12, 12]  # as large as two busy slots allow
    for bundle in bundles:
        assert len({p["data.dataset"] for p in bundle}) == 1
    flat = [p for b in bundles for p in b]
    assert sorted(map(str, flat)) == sorted(map(str, points))
    for bundle in bundles:  # grid order inside a bundle
        assert bundle == [p for p in points if p in bundle]


def test_bundle_size_caps_and_one_means_one_configuration_per_trial():
    _, points, configs = _grid()
    assert [len(b) for b in make_bundles(configs, points, slots=2, max_size=5)] == [5, 5, 2, 5, 5, 2]
    assert all(len(b) == 1 for b in make_bundles(configs, points, slots=2, max_size=1))
    many_slots = make_bundles(configs, points, slots=24, max_size=0)
    assert len(many_slots) == 24  # a big cluster: every configuration its own trial


def test_what_a_train_run_sets_up_once_splits_bundles():
    plain, _, _ = _grid()
    other_model = apply_point(plain, {"model.name": "vlp-small"})
    other_workers = apply_point(plain, {"resources.num_workers": 2})
    other_seed = apply_point(plain, {"seed": 7, "data.shots": 1, "method.name": "coop"})
    assert bundle_key(other_model) != bundle_key(plain)
    assert bundle_key(other_workers) != bundle_key(plain)
    assert bundle_key(other_seed) == bundle_key(plain)


def test_config_digest_ignores_the_sweep_section_and_sees_every_other_key():
    plain, _, _ = _grid()
    renamed = apply_point(plain, {"sweep.name": "another-launch", "sweep.bundle_size": 3})
    assert config_digest(renamed) == config_digest(plain)
    assert config_digest(apply_point(plain, {"train.lr": 0.003})) != config_digest(plain)
    assert config_digest({**plain, "_tracking_uri": "x"}) == config_digest(plain)


def test_a_trial_config_expands_to_its_bundles_validated_configurations():
    plain, points, _ = _grid()
    cfgs = bundle_configs({**plain, "_bundle": points[:3], "_plan": {}})
    assert [(c.method.name, c.data.dataset, c.seed) for c in cfgs] == [
        (p["method.name"], p["data.dataset"], p.get("seed", 1)) for p in points[:3]
    ]
    (single,) = bundle_configs(plain)  # an adaptive sampler's trial: itself
    assert single.method.name == plain["method"]["name"]


@pytest.mark.slow  # a fresh interpreter importing Ray: seconds
def test_the_trial_actor_imports_neither_torch_nor_open_clip():
    """The Tune trial process only launches a Train run; torch is the Train workers' import."""
    code = (
        "import sys; import ray.tune, ray.train; from vlprompt.orchestrator import trial, trial_clock; "
        "trial._trainer_class(1); "
        "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
