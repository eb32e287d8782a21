"""Suite-wide settings, the real servers the integration tests need, and a proxy-folder writer.

Everything a test starts it stops by process group (never ``ray stop``, which would hit
every Ray process on the machine), and every server listens on loopback only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Ray resolves "localhost" to the machine's network address unless told it runs as a
# single-machine cluster; keep all of the tests' Ray traffic on 127.0.0.1.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)  # unit tests must never attach to someone's cluster
# Token auth on for every Ray the tests start or reach (ray.init, `ray start`, job submits), even
# when the caller's shell exported RAY_AUTH_MODE=disabled: the tests run what users run.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.pop("MLFLOW_TRACKING_URI", None)
# The fault and outage tests read a driver's log while it runs and act on what it says (kill at
# epoch k). A Python writing to a file buffers 8 KB at a time: without this, lines arrive in bursts
# seconds late and a kill lands after the run ended -- which a shell exporting it would hide.
os.environ["PYTHONUNBUFFERED"] = "1"


def write_class_folders(folder: Path, classnames: Sequence[str], per_class: int = 1, size: int = 32) -> Path:
    """A proxy source as a researcher lays one out (``datasets/classfolders.py``): one folder per
    distinct class name, spaces written as ``_``; a name no folder can have (ImageNet's "baluster
    / handrail") in a numbered folder that ``classnames.txt`` names. ``per_class`` noise images each."""
    rng = np.random.default_rng(0)
    listed = []
    for i, name in enumerate(dict.fromkeys(classnames)):
        sub = name.replace(" ", "_") if "/" not in name else f"class{i:04d}"
        if "/" in name:
            listed.append(f"{sub} {name}")
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / sub / f"{k}.png")
    if listed:
        (folder / "classnames.txt").write_text("\n".join(listed) + "\n", encoding="utf-8")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group we started, then SIGKILL whatever is left of it."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            if not _group_alive(pgid):
                proc.poll()
                return
            time.sleep(0.2)
    proc.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies keep the group "alive" until reaped; count only live members
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def ray_processes(ray_tmp: str, wait: float) -> list[int]:
    """Live processes whose command line names ``ray_tmp``: the Ray a subprocess started with
    ``RAY_TMPDIR=ray_tmp``, waited for up to ``wait`` seconds to be gone."""
    deadline = time.time() + wait
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                except OSError:
                    continue
                if ray_tmp.encode() in cmdline and state != "Z":
                    found.append(int(entry.name))
        if not found or time.time() >= deadline:
            return found
        time.sleep(0.5)


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if check():
                return
        except Exception as err:
            last = err
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    if proc is not None and proc.returncode is not None:
        raise RuntimeError(f"{what} exited with code {proc.returncode} before it came up\n{tail}")
    raise RuntimeError(f"{what} did not come up in {timeout:.0f}s (last error: {last!r})\n{tail}")


@dataclass
class MlflowServer:
    uri: str
    proc: subprocess.Popen


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` over HTTP on loopback, SQLite backend, local artifact store."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = root / "server.log"
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200,
            120,
            "mlflow server",
            proc,
            log,
        )
        yield MlflowServer(uri, proc)
    finally:
        stop_group(proc)


def _worker_port_band() -> int:
    """First port of a 100-port band below the ephemeral range, varied by process id."""
    try:
        ephemeral_lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_lo = 32768
    bands = max(1, (ephemeral_lo - 10100) // 100)
    return 10000 + (os.getpid() % bands) * 100


@dataclass
class RayHead:
    dashboard: str  # Jobs API address
    env: dict[str, str]  # environment for `ray job submit`
    proc: subprocess.Popen
    temp_dir: Path


#: Every port of a Ray head's components (``ray start`` flags): a test head owns them all.
HEAD_PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


def head_ports() -> tuple[dict[str, int], int]:
    """A free port for every head component, none inside the head's worker-port band.

    Worker ports come from a band below the kernel's ephemeral range, so no port that
    free_port() hands out (always ephemeral) can land inside it; Ray refuses to start
    when two of its components share a port.
    """
    worker_lo = _worker_port_band()
    ports: dict[str, int] = {}
    for name in HEAD_PORT_FLAGS:
        port = free_port()
        while port in ports.values() or worker_lo <= port <= worker_lo + 99:
            port = free_port()
        ports[name] = port
    return ports, worker_lo


def head_command(temp_dir: Path, ports: dict[str, int], worker_lo: int, *extra: str) -> list[str]:
    """``ray start --head`` on loopback with 2 CPUs, no GPU, these ports and ``extra`` flags."""
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0", *extra]
    cmd += ["--dashboard-host", "127.0.0.1", "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    cmd += ["--min-worker-port", str(worker_lo), "--max-worker-port", str(worker_lo + 99)]
    return cmd + [arg for name, port in ports.items() for arg in (f"--{name}", str(port))]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> Iterator[RayHead]:
    """A real ``ray start --head`` on loopback with token auth on, every port our own."""
    temp_dir = Path(f"/tmp/vlp-ray-{os.getpid()}")  # short: Ray's socket paths must stay < 108 chars
    temp_dir.mkdir(exist_ok=True)
    log = tmp_path_factory.mktemp("ray") / "head.log"
    ports, worker_lo = head_ports()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    cmd = head_command(temp_dir, ports, worker_lo)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    submit_env = {**env, "RAY_ADDRESS": dashboard}

    def jobs_api_ready() -> bool:
        done = subprocess.run(
            [str(BIN / "ray"), "job", "list"], env=submit_env, capture_output=True, timeout=60
        )
        return done.returncode == 0

    try:
        wait_for(jobs_api_ready, 180, "ray head (Jobs API)", proc, log)
        yield RayHead(dashboard, submit_env, proc, temp_dir)
    finally:
        stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def local_ray():
    """One in-process Ray instance for the whole run (Tune/Train integration tests).

    Session-wide on purpose: a second ``ray.init`` in the same process after a shutdown
    left the interpreter to crash at exit (a segfault after every test had passed).
    """
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024**2,
        runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
