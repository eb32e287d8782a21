"""Shared training views: the same crop of an image in every trial and process, and the config rules."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlprompt import datasets as vds
from vlprompt.datasets.images import train_transform
from vlprompt.methods import capabilities
from vlprompt.orchestrator.batching import SeededViews
from vlprompt.orchestrator.config import ConfigError, load_config
from vlprompt.orchestrator.features import image_id
from vlprompt.orchestrator.protocols import get_protocol
from vlprompt.orchestrator.views import TrainViews, train_views, view_seed

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[vds.Datum]]:
    root = tmp_path_factory.mktemp("views-data")
    vds.generate_dataset("synthetic", root, seed=0, num_classes=2, images_per_class=6)
    return root, list(vds.load_dataset("synthetic", root).train[:4])


def _views(root: Path, items, index: int, seed: int = 0) -> torch.Tensor:
    transform = train_transform(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.3)
    ids = [image_id(item.path, root) for item in items]
    dataset = SeededViews(items, ids, transform, index, seed)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _digest(views: torch.Tensor) -> str:
    return hashlib.sha256(views.numpy().tobytes()).hexdigest()


def test_a_view_is_the_same_in_every_trial_and_leaves_the_run_stream_alone(images):
    root, items = images
    torch.manual_seed(1)
    first = _views(root, items, index=3)
    after_first = torch.rand(3)
    torch.manual_seed(2)  # another trial: another seed and stream
    torch.rand(100)
    second = _views(root, items, index=3)
    assert torch.equal(first, second)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_first)  # drawing views did not move the stream
    assert not torch.equal(first, _views(root, items, index=4))  # another epoch / view
    assert not torch.equal(first, _views(root, items, index=3, seed=1))  # another view_seed
    assert not torch.equal(first[0], first[1])


@pytest.mark.e2e  # a second interpreter importing torch and open_clip: seconds
def test_a_view_is_the_same_in_another_process(images):
    root, items = images
    script = (
        "import hashlib, sys, torch\n"
        "from pathlib import Path\n"
        "from vlprompt import datasets as vds\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from test_views import _views, _digest\n"
        "root = Path(sys.argv[1])\n"
        "items = list(vds.load_dataset('synthetic', root).train[:4])\n"
        "torch.manual_seed(12345)\n"
        "print(_digest(_views(root, items, index=3)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(root), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == _digest(_views(root, items, index=3))


def test_the_view_seed_is_a_stable_hash():
    assert view_seed("synthetic/images/a.png", 0, 0) == view_seed("synthetic/images/a.png", 0, 0)
    assert len({view_seed("a", i, s) for i in range(3) for s in range(3)}) == 9
    assert 0 <= view_seed("a", 1, 2) < 2**63


def _train(**kw):
    base = {"view_mode": "per_epoch", "epochs": 5, "feature_views": 2, "view_seed": 0}
    return type("Train", (), {**base, **kw})


@pytest.mark.parametrize(
    ("method", "protocol", "train", "want"),
    [
        ("coop", "few_shot", _train(), TrainViews("per_epoch", 5, 0)),
        ("coop", "few_shot", _train(view_mode="cycled"), TrainViews("cycled", 2, 0)),
        ("coop", "few_shot", _train(view_seed=None), TrainViews("per_epoch", 5, None)),
        ("coop", "few_shot", _train(view_mode="images"), None),
        ("ivlp", "few_shot", _train(), None),  # its image tower trains: images
        ("linear_probe", "few_shot", _train(), None),  # a full-batch fit on test-transform features
        ("zeroshot", "few_shot", _train(), None),  # learns nothing
    ],
)
def test_which_runs_train_on_views(method, protocol, train, want):
    assert train_views(train, capabilities(method), get_protocol(protocol)) == want


def test_view_config_is_checked_before_anything_starts():
    with pytest.raises(ConfigError, match=r"train\.feature_views=0: train\.view_mode=cycled"):
        load_config(None, ["train.view_mode=cycled", "train.feature_views=0"])
    with pytest.raises(ConfigError, match=r"train\.view_mode='every'"):
        load_config(None, ["train.view_mode=every"])
    with pytest.raises(ConfigError, match=r"data\.encode_batch_size must be >= 1"):
        load_config(None, ["data.encode_batch_size=0"])
    with pytest.raises(ConfigError, match=r"data\.encode_actors must be >= 0"):
        load_config(None, ["data.encode_actors=-1"])
    cfg = load_config(None, [])
    assert cfg.train.view_mode == "per_epoch" and cfg.train.view_seed == 0 and cfg.data.pipeline
    assert load_config(None, ["train.view_seed=null"]).train.view_seed is None
