"""The source-statistics job's two Ray Data stages, run in Ray workers (they import torch).

:func:`decode_batch` (CPU tasks) decodes one batch of proxy images under the test transform --
the feature pipeline's own ``encoding.view_pixels`` and ``build_transform``, so both pipelines
and the in-process path (``datasets.images.ImageDataset``) see the same pixels.
:class:`StatsActor` (an actor pool) builds the run's model once (``source_stats.build_model``,
the in-process path's function) and turns each batch into per-class partial sums with
``methods.source_stats.batch_sums`` -- the function ``Accumulator.add`` uses -- so the driver's
sum is the in-process one up to summation order. Rows carry their ``group`` (the batch the
driver cut): an actor handed several batches in one block still runs the model on each alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vlprompt.methods import stats_file
from vlprompt.methods.source_stats import batch_sums
from vlprompt.orchestrator.encoding import build_transform, view_pixels
from vlprompt.orchestrator.source_stats import ModelRecipe, build_model
from vlprompt.orchestrator.stats_pipeline import MARKER, PARTS

TEST_VIEW = {"kind": "test"}


def decode_batch(batch: Mapping[str, Any], preprocess: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Records (one batch each) → one row per image: its batch, label and pixels."""
    transform = build_transform({"kind": "test", **preprocess})
    out: dict[str, list] = {"group": [], "label": [], "pixels": []}
    for group, paths, labels in zip(batch["group"], batch["paths"], batch["labels"], strict=True):
        for path, label in zip(paths, labels, strict=True):
            try:
                pixels = view_pixels(str(path), str(path), transform, TEST_VIEW)
            except OSError as err:  # load_image's message names the file
                raise RuntimeError(f"{MARKER} {err}") from err
            except Exception as err:
                raise RuntimeError(f"{MARKER} cannot transform image {path}: {err!r}") from err
            out["group"].append(int(group))
            out["label"].append(int(label))
            out["pixels"].append(pixels)
    return {k: np.stack(v) if k == "pixels" else np.array(v, dtype=np.int64) for k, v in out.items()}


class StatsActor:
    """The run's model on the actor's device; each batch → its classes' partial sums."""

    def __init__(
        self, recipe: ModelRecipe, blocks: Sequence[int], device: str, digest: str, threads: int = 1
    ) -> None:
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.blocks = tuple(blocks)
        self.model = build_model(recipe, device)
        mine = stats_file.fingerprint_digest(self.model.stats_fingerprint())
        if mine != digest:
            raise RuntimeError(
                f"{MARKER} the encoder actor's model on {device} has fingerprint {mine[:16]}, the "
                f"driver's {digest[:16]} (weights or prompts differ on this device); run with --no-ray"
            )

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        groups = batch["group"]
        order = sorted(set(groups.tolist()), key=lambda g: int(np.argmax(groups == g)))
        out: dict[str, list[np.ndarray]] = {k: [] for k in PARTS}
        for group in order:
            rows = np.flatnonzero(groups == group)
            images = torch.from_numpy(np.ascontiguousarray(batch["pixels"][rows])).to(self.device)
            labels = torch.from_numpy(np.ascontiguousarray(batch["label"][rows])).to(self.device)
            with torch.no_grad():
                embeddings, tokens = self.model.observe(images, self.blocks)
            part = batch_sums(tokens, embeddings, labels, self.blocks)
            for name in PARTS:
                out[name].append(getattr(part, name).cpu().numpy())
        return {k: np.concatenate(v) for k, v in out.items()}
