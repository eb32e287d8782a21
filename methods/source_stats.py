"""Offline statistics of a proxy source dataset, for test-time methods that align to them.

PromptAlign (Hassan et al., NeurIPS 2023) aligns the token statistics of a test image's views to
those of a *source* dataset, precomputed once (``jameelhassan/PromptAlign``: the
``ImgNetpre_vis_means.pt`` / ``_vars.pt`` of ``docs/run.md:15-19``, read at
``trainers/prompt_align.py`` ``get_tpt_dataloader``; the code that made them is not released). For
every image block ``l`` in ``blocks`` and every token position ``t`` and channel ``d`` of that
block's **input** (after ``ln_pre``, the visual prompts swapped in: ``clip/model.py``'s
``visual_feat``), over the source images::

    μ̂_l[t, d] = mean x_l[t, d]        σ̂²_l[t, d] = mean (x_l[t, d] − μ̂_l[t, d])²

-- the population variance, the form the reference takes over the test views
(``prompt_align.py:760-761``). This module computes them **globally and per class** (PromptSync's
class-aware prototypes, ``PROMPTSYNC.md`` §2.2), plus per class the mean of the L2-normalised final
image embeddings (not re-normalised: a consumer normalises if it wants a direction).

Streaming: per class, sums and sums of squares in float64 (``index_add_``) -- exact enough for
LayerNorm-scale tokens over ImageNet's 1.28 M images; the global statistics are the class sums
added up, so both come from one pass. The sums are additive: each batch's per-class partial sums
(:func:`batch_sums`, only the classes in the batch) are added into the totals
(:meth:`Accumulator.merge`), in this process or -- the same function on an actor pool -- by the
command's Ray Data pass (``orchestrator/stats_pipeline.py``), whose file equals this one's. A
class with no image has no row (the file lists the classes it has).
Files are safetensors (``safetensors.torch.save_file``; no pickle, and a reader can load
one tensor alone: PromptAlign reads only the global statistics of a 2.4 GB ImageNet file):

=================  =====================  ================================================
tensor             shape                  what
=================  =====================  ================================================
``mean``, ``var``  ``(L, T, W)``          over every image, per aligned block
``class_mean``,    ``(C, L, T, W)``       per class (row order: the ``classes`` metadata)
``class_var``
``class_embedding`` ``(C, D)``            mean L2-normalised image embedding per class
``class_count``    ``(C,)`` int64         images per class
=================  =====================  ================================================

with the metadata of ``methods/stats_file.py`` (fingerprint of the model, source, classes). The
model is any method implementing :class:`ObservesBlocks`.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from vlprompt.methods import stats_file
from vlprompt.methods.clip import Backbone

GLOBAL = ("mean", "var")
PER_CLASS = ("class_mean", "class_var", "class_embedding", "class_count")


@runtime_checkable
class ObservesBlocks(Protocol):
    """A method whose image tower's block inputs can be summarised (PromptAlign, PromptSync)."""

    def observe(self, images: Tensor, blocks: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
        """Image embeddings ``(N, D)`` and the input ``(N, T, W)`` of each block in ``blocks``,
        with the method's current prompts."""
        ...

    def stats_fingerprint(self) -> dict[str, str]:
        """The fingerprint parts (``stats_file.FINGERPRINT_PARTS``) of the method as it is now."""
        ...


# ---------------------------------------------------------------- the model's fingerprint
_BACKBONE_DIGESTS: weakref.WeakKeyDictionary[Backbone, str] = weakref.WeakKeyDictionary()


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (hex)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def backbone_part(backbone: Backbone) -> str:
    """``"<name> visual sha256:<digest>"``: the architecture and its image tower's weights (what
    every block input and image embedding is a function of), hashed once per backbone -- the
    weights are frozen."""
    digest = _BACKBONE_DIGESTS.get(backbone)
    if digest is None:
        digest = tensors_digest(backbone.model.visual.state_dict())
        _BACKBONE_DIGESTS[backbone] = digest
    return f"{backbone.name} visual sha256:{digest}"


def transform_part(backbone: Backbone) -> str:
    """The test transform the statistics are taken under, from the facts that define it
    (``datasets.images.test_transform``: Resize shorter side, bicubic → CenterCrop → Normalize)."""
    size, mean, std = backbone.image_size, backbone.image_mean, backbone.image_std
    return f"test: Resize({size}, bicubic) + CenterCrop({size}), mean {list(mean)}, std {list(std)}"


def fingerprint(
    backbone: Backbone, state: Mapping[str, Tensor] | None, blocks: Sequence[int]
) -> dict[str, str]:
    """The fingerprint parts of a model: backbone, the prompts' ``state``, the blocks, the transform
    (without ``init_state`` when ``state`` is None: checked later, against the state tuning starts from)."""
    parts = {"backbone": backbone_part(backbone), "blocks": stats_file.blocks_text(blocks)}
    if state is not None:
        parts["init_state"] = init_state_part(state)
    return {**parts, "transform": transform_part(backbone)}


def init_state_part(state: Mapping[str, Tensor]) -> str:
    """``"sha256:<digest>"`` of the prompts the statistics are taken with."""
    return f"sha256:{tensors_digest(state)}"


# ---------------------------------------------------------------- accumulating
@dataclass(frozen=True)
class PartialSums:
    """One batch's float64 sums for the ``K`` classes it holds (what an encoder actor returns)."""

    labels: Tensor  # (K,) int64, distinct
    sums: Tensor  # (K, L, T, W) of the block inputs
    squares: Tensor  # (K, L, T, W) of their squares
    embedding: Tensor  # (K, D) of the L2-normalised image embeddings
    count: Tensor  # (K,) int64 images


def batch_sums(
    tokens: Mapping[int, Tensor], embeddings: Tensor, labels: Tensor, blocks: Sequence[int]
) -> PartialSums:
    """Per-class sums of one batch: ``tokens[l]`` ``(N, T, W)`` per block in ``blocks``,
    embeddings ``(N, D)``, labels ``(N,)``; rows only for the labels present, so a batch of one
    ImageNet class is one row, not 1000."""
    x = torch.stack([tokens[b].detach() for b in blocks], dim=1).double()  # (N, L, T, W)
    e = F.normalize(embeddings.detach().double(), dim=-1)
    present, row = labels.to(x.device).unique(return_inverse=True)
    sums = x.new_zeros((len(present), *x.shape[1:])).index_add_(0, row, x)
    squares = torch.zeros_like(sums).index_add_(0, row, x.square())
    embedding = e.new_zeros((len(present), e.shape[1])).index_add_(0, row, e)
    count = torch.zeros(len(present), dtype=torch.int64, device=x.device)
    count.index_add_(0, row, torch.ones_like(row, dtype=torch.int64))
    return PartialSums(present.long(), sums, squares, embedding, count)


class Accumulator:
    """Per-class float64 sums of the block inputs, their squares and the normalised embeddings."""

    def __init__(self, n_classes: int, blocks: Sequence[int]) -> None:
        self.n_classes = n_classes
        self.blocks = tuple(blocks)
        self.count: Tensor | None = None
        self.sums: Tensor | None = None  # (C, L, T, W)
        self.squares: Tensor | None = None
        self.embedding: Tensor | None = None  # (C, D)

    def add(self, tokens: Mapping[int, Tensor], embeddings: Tensor, labels: Tensor) -> None:
        """One batch: ``tokens[l]`` ``(N, T, W)`` per block, embeddings ``(N, D)``, labels ``(N,)``."""
        self.merge(batch_sums(tokens, embeddings, labels, self.blocks))

    def merge(self, part: PartialSums) -> None:
        """Add one batch's partial sums (:func:`batch_sums`, here or from an encoder actor)."""
        labels = part.labels
        if len(labels) and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise ValueError(f"labels must lie in 0 .. {self.n_classes - 1}, got {labels.tolist()}")
        if self.sums is None:
            self.sums = part.sums.new_zeros((self.n_classes, *part.sums.shape[1:]))
            self.squares = torch.zeros_like(self.sums)
            self.embedding = part.embedding.new_zeros((self.n_classes, part.embedding.shape[1]))
            self.count = torch.zeros(self.n_classes, dtype=torch.int64, device=self.sums.device)
        labels = labels.to(self.sums.device)
        self.sums.index_add_(0, labels, part.sums.to(self.sums.device))
        self.squares.index_add_(0, labels, part.squares.to(self.sums.device))
        self.embedding.index_add_(0, labels, part.embedding.to(self.sums.device))
        self.count.index_add_(0, labels, part.count.to(self.sums.device))

    def tensors(self, dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], Tensor]:
        """The file's tensors (CPU, ``dtype``) for the classes that had images, and their indices."""
        if self.count is None or int(self.count.sum()) == 0:
            raise ValueError("no images were accumulated")
        kept = (self.count > 0).nonzero().flatten()
        n = self.count[kept].double()
        sums, squares = self.sums[kept], self.squares[kept]
        total = n.sum()
        shape = (-1,) + (1,) * (sums.dim() - 1)
        mean = sums.sum(0) / total
        out = {
            "mean": mean,
            "var": (squares.sum(0) / total - mean.square()).clamp_min(0),
            "class_mean": sums / n.view(shape),
            "class_var": (squares / n.view(shape) - (sums / n.view(shape)).square()).clamp_min(0),
            "class_embedding": self.embedding[kept] / n[:, None],
        }
        out = {k: v.to("cpu", dtype).contiguous() for k, v in out.items()}
        out["class_count"] = self.count[kept].cpu().contiguous()
        return out, kept.cpu()


def accumulate(
    model: ObservesBlocks,
    batches: Iterable[tuple[Tensor, Tensor]],
    n_classes: int,
    blocks: Sequence[int],
    on_batch: Callable[[int], None] | None = None,
) -> Accumulator:
    """Stream ``(images, labels)`` batches through ``model`` (no gradients) into an :class:`Accumulator`;
    ``on_batch(images so far)`` after each (progress)."""
    acc = Accumulator(n_classes, blocks)
    seen = 0
    with torch.no_grad():
        for images, labels in batches:
            embeddings, tokens = model.observe(images, blocks)
            acc.add(tokens, embeddings, labels)
            seen += len(labels)
            if on_batch is not None:
                on_batch(seen)
    return acc


# ---------------------------------------------------------------- the file
def save_stats(
    path: str | Path,
    tensors: Mapping[str, Tensor],
    classes: Sequence[str],
    parts: Mapping[str, str],
    source: Mapping[str, object],
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` (:meth:`Accumulator.tensors`) with the metadata -- the fingerprint
    ``parts``, the ``source`` (``dataset``, ``split``, ``images_per_class``, ``folder``; a missing
    field is written empty), the classes and any
    ``extra`` strings -- atomically (a crash leaves no half file under the name)."""
    if len(classes) != tensors["class_count"].shape[0]:
        raise ValueError(f"{len(classes)} class names for {tensors['class_count'].shape[0]} class rows")
    metadata = {
        **{k: str(v) for k, v in (extra or {}).items()},
        **{key: str(source.get(field, "")) for key, field in stats_file.SOURCE_KEYS.items()},
        **{k: str(parts[k]) for k in stats_file.FINGERPRINT_PARTS},
        "format": stats_file.FORMAT,
        "fingerprint": stats_file.fingerprint_digest(parts),
        "classes": json.dumps(list(classes)),
        "images": str(int(tensors["class_count"].sum())),
    }
    file = Path(path).expanduser()
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(f".{file.name}.{os.getpid()}.partial")
    save_file(dict(tensors), str(partial), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    partial.chmod(0o666 & ~umask)  # safetensors writes 0600; the file is no secret
    os.replace(partial, file)
    return file


@dataclass(frozen=True)
class SourceStats:
    """A loaded statistics file (global statistics always; per-class ones when asked for)."""

    file: Path
    metadata: dict[str, str]
    classes: tuple[str, ...]
    mean: Tensor
    var: Tensor
    class_rows: dict[str, Tensor]
    """``class_mean`` / ``class_var`` / ``class_embedding`` / ``class_count`` of the classes asked
    for, in that order (empty unless ``load_stats(..., classes=...)``)."""

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.metadata["blocks"].split(","))

    @property
    def fingerprint(self) -> str:
        return self.metadata["fingerprint"]

    def check_init_state(self, part: str) -> None:
        """``ValueError`` unless the statistics were taken with the prompts whose part is ``part``."""
        stats_file.check_made_by(self.metadata, self.file, {"init_state": part})


def load_stats(
    path: str | Path,
    parts: Mapping[str, str],
    *,
    source: Mapping[str, object] | None = None,
    classes: Sequence[str] | None = None,
) -> SourceStats:
    """Read and check a statistics file.

    ``parts``: the fingerprint parts it must have been made with (a subset: ``init_state`` may be
    checked later, :meth:`SourceStats.check_init_state`); ``source``: the dataset, split and images
    per class it must come from; ``classes``: load those classes' rows, in that order -- every one
    must be in the file. Errors name the file and the command that makes it.
    """
    metadata, _ = stats_file.read_header(path)
    file = Path(path).expanduser()
    stats_file.check_made_by(metadata, file, parts, source)
    names = stats_file.check_classes(metadata, file, classes or ())
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            mean, var = (f.get_tensor(k) for k in GLOBAL)
            rows = {}
            if classes is not None:
                index = torch.tensor([names.index(c) for c in classes], dtype=torch.long)
                rows = {k: f.get_tensor(k).index_select(0, index) for k in PER_CLASS}
    except (SafetensorError, OSError, KeyError, RuntimeError) as err:
        raise ValueError(
            f"source statistics {file} cannot be read ({err}): {stats_file.remake(file)}"
        ) from None
    blocks = metadata.get("blocks", "").split(",")
    if mean.dim() != 3 or mean.shape != var.shape or mean.shape[0] != len(blocks):
        raise ValueError(
            f"source statistics {file}: mean {tuple(mean.shape)} / var {tuple(var.shape)} are not "
            f"(blocks={len(blocks)}, tokens, width): {stats_file.remake(file)}"
        )
    return SourceStats(file, metadata, names, mean.float(), var.float(), rows)
