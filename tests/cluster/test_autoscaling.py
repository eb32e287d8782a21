"""A sweep on a cluster that scales itself: nodes come for the trials and go when they are done.

``cluster/local-autoscale.yaml`` through Ray's fake multi-node provider (each "node" a raylet of
its own on this machine, with fake GPUs), started as ``RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=...`` with autoscaler v2, the head has no GPU and no worker node. A real
``experiments/benchmark.py`` sweep whose trials ask for a GPU must make the autoscaler add a GPU
node, run its Train workers there, finish with results, and the idle node must go away again.

Nothing here talks to the cluster through an in-process ``ray.init`` (other tests in the same
run own this process's Ray): nodes and actors are read from the dashboard's state API over HTTP
with the cluster's own token.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import head_command, head_ports, stop_group, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: The fake provider's fixed id for the head; its workers are ...00001, ...00002, ...
HEAD_ID = "f" * 51 + "00000"


@dataclass
class FakeCluster:
    gcs: str  # what a driver's RAY_ADDRESS is
    dashboard: str  # state API
    token: str
    env: dict[str, str]  # for drivers: token auth, this cluster's address
    proc: subprocess.Popen
    log: Path

    def state(self, resource: str) -> list[dict]:
        """``/api/v0/<resource>`` of the state API (nodes, actors), dead ones included."""
        request = urllib.request.Request(
            f"{self.dashboard}/api/v0/{resource}?limit=10000&detail=1",
            headers={"authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.load(reply)["data"]["result"]["result"]

    def alive_nodes(self) -> list[str]:
        return sorted(n["node_id"] for n in self.state("nodes") if n["state"] == "ALIVE")


def _autoscaling_config(path: Path, gcs: str) -> Path:
    """The committed config with this head's GCS address (the provider defaults to port 6379)."""
    config = yaml.safe_load((REPO / "cluster" / "local-autoscale.yaml").read_text())
    config["provider"]["gcs_address"] = gcs
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def fake_cluster(tmp_path) -> Iterator[FakeCluster]:
    """The autoscaling head, alone; stopped with everything it started by its process group."""
    temp_dir = Path(tempfile.mkdtemp(prefix="vlp-as-", dir="/tmp"))  # short: socket paths < 108 chars
    ports, worker_lo = head_ports()
    gcs = f"127.0.0.1:{ports['port']}"
    token = secrets.token_hex(32)  # this cluster's own token, never the shared ~/.ray/auth_token
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env = {
        **os.environ,
        **auth,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_enable_autoscaler_v2": "1",  # the autoscaler KubeRay runs (cluster/kuberay.yaml)
        "RAY_CLOUD_INSTANCE_ID": HEAD_ID,  # v2 matches the head to the provider's node by these
        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": HEAD_ID,
    }
    autoscaling = str(_autoscaling_config(tmp_path / "autoscale.yaml", gcs))
    cmd = head_command(temp_dir, ports, worker_lo, "--autoscaling-config", autoscaling)
    log = tmp_path / "head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    cluster = FakeCluster(
        gcs, f"http://127.0.0.1:{ports['dashboard-port']}", token, {**env, "RAY_ADDRESS": gcs}, proc, log
    )
    try:
        wait_for(lambda: cluster.alive_nodes() == [HEAD_ID], 180, "autoscaling ray head", proc, log)
        yield cluster
    finally:
        stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class NodeWatch:
    """Polls the cluster's alive nodes in a thread and keeps every change, with its time."""

    cluster: FakeCluster
    changes: list[tuple[float, list[str]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> NodeWatch:
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                nodes = self.cluster.alive_nodes()
            except (OSError, ValueError, KeyError):  # the dashboard is busy or starting: again
                nodes = None
            if nodes is not None and (not self.changes or self.changes[-1][1] != nodes):
                self.changes.append((time.monotonic() - self.t0, nodes))
            self.stop.wait(0.5)

    def first(self, predicate) -> float | None:
        return next((t for t, nodes in self.changes if predicate(nodes)), None)


def _sweep(cluster: FakeCluster, tmp_path: Path) -> subprocess.CompletedProcess:
    """The benchmark's front door on this cluster: two configurations (zero-shot, CoOp) in one
    trial whose Train worker asks for a (fake) GPU -- torch itself runs on the CPU."""
    cmd = [
        sys.executable,
        str(REPO / "experiments" / "benchmark.py"),
        "--config",
        str(REPO / "tests" / "assets" / "e2e.yaml"),
        "resources.use_gpu=true",
        "train.device=cpu",
        "resources.cpus_per_worker=0.5",  # a GPU node has 1 CPU
        "data.pipeline=false",  # the trial encodes its features on the GPU node itself
        f"data.root={tmp_path / 'data'}",
        f"data.feature_cache={tmp_path / 'feature_cache'}",
        f"sweep.storage_path={tmp_path / 'ray_results'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    return subprocess.run(cmd, env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_a_gpu_sweep_scales_the_cluster_up_and_back_down(fake_cluster, tmp_path):
    watch = NodeWatch(fake_cluster).start()
    try:
        done = _sweep(fake_cluster, tmp_path)
        swept_s = time.monotonic() - watch.t0
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-6000:]
        assert "| coop |" in output and "| zeroshot |" in output, output[-3000:]
        wait_for(lambda: fake_cluster.alive_nodes() == [HEAD_ID], 120, "scale-down to the head alone")
        down_s = time.monotonic() - watch.t0
    finally:
        watch.stop.set()
        watch.thread.join()

    nodes = {n["node_id"]: n for n in fake_cluster.state("nodes")}
    added = sorted(set(nodes) - {HEAD_ID})
    assert added, f"no node was added: {watch.changes}"
    assert all(nodes[n]["resources_total"].get("GPU") == 1 for n in added), "added nodes are gpu_worker"
    assert max(len(alive) for _, alive in watch.changes) > 1, watch.changes
    # the Train workers ran on the added GPU nodes, never on the (GPU-less) head
    workers = [a for a in fake_cluster.state("actors") if a["class_name"] == "RayTrainWorker"]
    assert workers, "no Ray Train worker ran"
    assert {a["node_id"] for a in workers} <= set(added), [a["node_id"] for a in workers]
    assert all(nodes[n]["state"] == "DEAD" for n in added)  # removed after the idle timeout

    up_s = watch.first(lambda alive: len(alive) > 1)
    peak = max(len(alive) for _, alive in watch.changes)
    print(
        f"\n[autoscaling] nodes 1 -> {peak} -> 1: {len(added)} added, "
        f"{sum(nodes[n]['state'] == 'DEAD' for n in added)} removed; first GPU node alive {up_s:.1f} s "
        f"after the sweep started, sweep done at {swept_s:.1f} s, head alone again at {down_s:.1f} s "
        f"(scale-down {down_s - swept_s:.1f} s after the sweep); Train workers ran on "
        f"{sorted({a['node_id'][-5:] for a in workers})}"
    )
