"""Every cluster launcher config passes Ray's own autoscaler schema and defaults filling."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHERS = sorted(p for p in CLUSTER.glob("*.yaml") if "available_node_types" in p.read_text())


def test_there_is_a_cloud_gpu_launcher():
    assert any("aws" in p.name for p in LAUNCHERS)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_is_valid_for_this_ray(path):
    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)  # raises jsonschema.ValidationError / ValueError on a bad config
    nodes = config["available_node_types"]
    gpu_types = [n for n, spec in nodes.items() if spec["resources"].get("GPU", 0) > 0]
    assert gpu_types, "the launcher must offer GPU worker nodes"
    assert all(nodes[n].get("min_workers", 0) == 0 for n in gpu_types), "GPU nodes scale from zero"
    assert nodes[config["head_node_type"]]["resources"].get("GPU", 0) == 0
