"""What a run checkpoints, so that a restarted worker group ends exactly where an unbroken run does.

A bundle's Train run reports a checkpoint (``ray.train.report(..., checkpoint=...)``, rank 0
writes, Ray Train copies it into the sweep's storage) at the end of every ``train.checkpoint_every``
epochs and at the end of each configuration. A checkpoint folder holds:

* ``progress.json`` -- which configurations of the bundle are done (they are skipped after a
  restart) and which one is in flight, with its completed epochs and the RNG streams that are
  not tensors (Python's ``random``, NumPy's legacy global generator);
* ``train_state.pt`` -- the in-flight configuration's trainable parameters and the method's
  persistent buffers (what it keeps between epochs besides parameters: PromptSRC's running
  prompt aggregate, PromptKD's BatchNorm statistics), the optimiser's
  state (momentum buffers, learning rates), torch's CPU and CUDA generator states, and the last
  epoch's statistics (the run's ``final_train_loss`` when it restarts after its last epoch);
* ``learned_state.pt`` -- a finished configuration's learned state (what the Tune result points to).

Loads use ``torch.load(weights_only=True)``: a checkpoint is data, never code. Everything the
loop draws from afterwards (epoch order, shared views) is seeded per epoch, and the global
generators are restored, so the epochs after a restart are the same epochs -- bit for bit on CPU
(``tests/orchestrator/test_faults.py``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

PROGRESS_FILE = "progress.json"
STATE_FILE = "train_state.pt"
LEARNED_FILE = "learned_state.pt"


@dataclass
class TrainState:
    """The in-flight configuration after ``epoch`` completed epochs."""

    epoch: int
    params: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class Progress:
    """Where a bundle's Train run stands: finished configurations, the one in flight."""

    done: list[str] = field(default_factory=list)  # config digests, in the order they finished
    current: str | None = None  # digest of the configuration ``state`` belongs to
    state: TrainState | None = None


def _saved_tensors(method: nn.Module) -> dict[str, Tensor]:
    """The method's trainable parameters and persistent buffers, by ``state_dict`` name (live)."""
    state = method.state_dict(keep_vars=True)
    trainable = {name: p for name, p in method.named_parameters() if p.requires_grad}
    buffers = {name: t for name, t in state.items() if not isinstance(t, nn.Parameter)}
    return {**trainable, **buffers}


def trainable_state(method: nn.Module) -> dict[str, Tensor]:
    """The method's trainable parameters and persistent buffers by name (everything else -- frozen
    parameters, non-persistent buffers -- is rebuilt identically with the method)."""
    return {name: t.detach().cpu().clone() for name, t in _saved_tensors(method).items()}


def capture(
    method: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, stats: dict[str, float]
) -> TrainState:
    return TrainState(epoch, trainable_state(method), optimizer.state_dict(), rng_state(), dict(stats))


def restore(state: TrainState, method: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Put parameters, persistent buffers, optimiser and RNG streams back as they were after
    ``state.epoch`` epochs."""
    live = _saved_tensors(method)
    missing = sorted(set(state.params) ^ set(live))
    if missing:
        raise ValueError(
            f"checkpoint does not match the method's trainable parameters and persistent buffers: {missing}"
        )
    with torch.no_grad():
        for name, value in state.params.items():
            live[name].copy_(value.to(live[name].device))
    optimizer.load_state_dict(state.optimizer)
    set_rng_state(state.rng)


def rng_state() -> dict[str, Any]:
    """Every global generator a run draws from: Python, NumPy, torch CPU (and CUDA when present)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(words), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write(folder: Path, progress: Progress, learned: dict[str, Tensor] | None = None) -> None:
    """One checkpoint folder: ``progress.json``, and the tensors beside it."""
    record: dict[str, Any] = {"done": progress.done, "current": progress.current}
    st = progress.state
    if st is not None:
        record["epoch"] = st.epoch
        record["rng"] = {k: v for k, v in st.rng.items() if k in ("python", "numpy")}
        tensors = {k: v for k, v in st.rng.items() if k not in ("python", "numpy")}
        payload = {"params": st.params, "optimizer": st.optimizer, "rng": tensors, "stats": st.stats}
        torch.save(payload, folder / STATE_FILE)
    if learned is not None:
        torch.save(learned, folder / LEARNED_FILE)
    (folder / PROGRESS_FILE).write_text(json.dumps(record))


def read(folder: Path) -> Progress:
    """The progress a checkpoint folder records (tensors loaded with ``weights_only=True``)."""
    record = json.loads((folder / PROGRESS_FILE).read_text())
    progress = Progress(list(record["done"]), record.get("current"))
    if (folder / STATE_FILE).exists() and progress.current is not None:
        payload = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        rng = {**record["rng"], **payload["rng"]}
        progress.state = TrainState(
            record["epoch"], payload["params"], payload["optimizer"], rng, payload["stats"]
        )
    return progress


def latest_progress() -> Progress:
    """What the Train run's latest checkpoint says (nothing yet: a fresh start)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as folder:
        return read(Path(folder))
