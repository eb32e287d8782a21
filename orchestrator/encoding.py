"""The feature pipeline's two Ray Data stages, run in Ray workers (they import torch; the driver does not).

:func:`decode_batch` (CPU tasks) decodes one encoder batch of images and applies the entry's
transform -- the test transform, or view ``v`` of each image seeded exactly as the trials seed
it (``batching.seeded_transform``, ``views.view_seed``); :class:`EncoderActor` (an actor pool,
one backbone per actor) encodes each batch with the trials' own ``batching.encode_batches``.
Every row carries its ``group`` (the encoder batch it belongs to), so an actor encodes exactly
the batches the planner cut even when Ray Data hands it several in one block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from vlprompt import datasets as vds
from vlprompt.datasets.images import test_transform, train_transform
from vlprompt.methods.clip import load_backbone
from vlprompt.orchestrator.batching import encode_batches, seeded_transform
from vlprompt.orchestrator.features import file_stat
from vlprompt.orchestrator.views import view_seed
from vlprompt.orchestrator.worker import seed_everything


def build_transform(spec: Mapping[str, Any]) -> Any:
    """The transform a trial builds (``loop.make_transforms``) from the backbone's preprocessing."""
    size, mean, std = spec["size"], spec["mean"], spec["std"]
    if spec["kind"] == "test":
        return test_transform(size, mean, std)
    return train_transform(size, mean, std, spec["crop_min_scale"])


def view_pixels(path: str, image: str, transform: Any, view: Mapping[str, Any]) -> np.ndarray:
    """One image through ``transform``: deterministic for the test view, else seeded by (id, view)."""
    decoded = vds.load_image(path)
    if view["kind"] == "test":
        with torch.random.fork_rng(devices=[]):
            pixels = transform(decoded)
    else:
        pixels = seeded_transform(transform, decoded, view_seed(image, view["index"], view["seed"]))
    return pixels.numpy()


def decode_batch(batch: Mapping[str, Any], specs: Mapping[int, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Records (one encoder batch each) → one row per image with its pixels and file stat."""
    out: dict[str, list] = {"group": [], "job": [], "image": [], "stat": [], "pixels": []}
    for group, job, ids, paths in zip(
        batch["group"], batch["job"], batch["ids"], batch["paths"], strict=True
    ):
        spec = specs[int(job)]
        transform = build_transform(spec["transform"])
        for image, path in zip(ids, paths, strict=True):
            try:
                stat = file_stat(str(path))
                pixels = view_pixels(str(path), str(image), transform, spec["view"])
            except Exception as err:
                raise RuntimeError(f"feature pipeline: {spec['label']}: cannot encode {path}: {err}") from err
            out["group"].append(int(group))
            out["job"].append(int(job))
            out["image"].append(str(image))
            out["stat"].append(stat)
            out["pixels"].append(pixels)
    return {k: np.stack(v) if k == "pixels" else np.array(v) for k, v in out.items()}


class EncoderActor:
    """A frozen backbone on the trials' device; each encoder batch encoded in one call."""

    def __init__(self, backbone: Mapping[str, Any], threads: int = 1):
        torch.set_num_threads(threads)
        if backbone["init_seed"] is not None:
            seed_everything(backbone["init_seed"])  # random-init weights, drawn as the trial draws them
        self.device = torch.device(backbone["device"])
        self.backbone = load_backbone(
            backbone["model"], backbone["pretrained"], device=self.device, precision=backbone["precision"]
        )

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        groups = batch["group"]
        order = sorted(set(groups.tolist()), key=lambda g: int(np.argmax(groups == g)))
        parts: dict[str, list] = {"job": [], "image": [], "stat": [], "feature": []}
        for group in order:
            rows = np.flatnonzero(groups == group)
            images = torch.from_numpy(np.ascontiguousarray(batch["pixels"][rows]))
            parts["feature"].append(encode_batches(self.backbone, self.device, images).numpy())
            for name in ("job", "image", "stat"):
                parts[name].append(batch[name][rows])
        return {k: np.concatenate(v) for k, v in parts.items()}
