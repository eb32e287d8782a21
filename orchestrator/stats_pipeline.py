"""The source-statistics command's Ray Data pass: per-class sums over a proxy set, on an actor pool.

Run by ``experiments/source_stats.py --ray`` (``source_stats.make``). Summing block-input
statistics over a proxy set is an embarrassingly parallel map over images whose results add up,
so it runs like the sweep's feature pipeline (``orchestrator/pipeline.py``)::

    ray.data.from_items(one record per batch of data.encode_batch_size images: paths, labels)
      → map_batches(decode + test transform, CPU tasks)
      → map_batches(_StatsActor, ActorPoolStrategy(size=n), num_gpus=1 | 0): the model built
        once per actor, each batch's per-class partial sums returned (``batch_sums``: only the
        classes in the batch, so a 1000-class source does not ship 1000 rows per batch)
      → added up here (``Accumulator.merge``), a progress line about every 5 %

The actors build the model from the driver's :class:`~vlprompt.orchestrator.source_stats.ModelRecipe`
and refuse to start unless its fingerprint is the one the driver computed (the file records it).
Records are the batches the in-process path makes, in its order, and the sums are the same
function's, so the file equals the in-process one up to float64 summation order (tested, on the
tiny model, to 1e-6). An image that cannot be decoded stops the job with an error naming it.

Ray: ``RAY_ADDRESS``'s cluster when set, else a local Ray started for the job and stopped after
it (``sweep.connect_ray``, as the benchmark does); on a cluster the workers open the images by
the driver's paths, so the proxy must be on a file system every node mounts (as for the sweep).
The actors take at most half the CPUs, so decoding always has one (``pipeline.plan_pipeline``;
ORCHESTRATION.md's Ray Data trap). Importing this module imports neither Ray nor torch (the
command checks its config first); the stages' code is in ``orchestrator/stats_encoding.py``,
imported only in the workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig

from vlprompt.orchestrator.config import ConfigError
from vlprompt.orchestrator.pipeline import error_line, plan_pipeline

MARKER = "source statistics:"
"""Starts every error a stage raises: the line the driver finds in Ray's wrapped error."""


class StatsPipelineError(RuntimeError):
    """The Ray Data pass could not use an image (or build the model); the message names it."""


@dataclass(frozen=True)
class Preprocess:
    """The test transform's facts (``datasets.images.test_transform``), for the decoding tasks."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, backbone: Any) -> Preprocess:
        return cls(int(backbone.image_size), tuple(backbone.image_mean), tuple(backbone.image_std))


def accumulate(
    cfg: DictConfig,
    job: Any,
    recipe: Any,
    preprocess: Preprocess,
    digest: str,
    tick: Callable[[int], None],
    say: Callable[[str], None] = print,
) -> Any:
    """``job``'s images summed on Ray Data into an ``Accumulator`` (``methods/source_stats.py``)."""
    import ray

    from vlprompt.methods.source_stats import Accumulator

    acc = Accumulator(len(job.splits.classnames), job.spec.blocks)
    batch_size = int(cfg.data.encode_batch_size or cfg.train.eval_batch_size)
    records = batch_records(job.items, batch_size)
    with ray_session(cfg):
        device = actor_device(cfg.train.device, ray.cluster_resources())
        share = plan_pipeline(ray.cluster_resources(), device == "cuda", int(cfg.data.encode_actors))
        say(
            f"[vlprompt] source statistics on Ray Data: {len(job.items)} images in {len(records)} "
            f"batches, {share.actors} encoder actor(s) on {device}, decoding in CPU tasks"
        )
        stages = {"preprocess": preprocess, "recipe": recipe, "digest": digest, "device": device}
        done = 0
        for part in _partial_sums(records, job.spec.blocks, share, batch_size, stages):
            acc.merge(part)
            done += int(part.count.sum())
            tick(done)
    if done != len(job.items):
        raise StatsPipelineError(f"{MARKER} {done} of {len(job.items)} images came back from Ray Data")
    return acc


def batch_records(items: Sequence[Any], batch_size: int) -> list[dict[str, Any]]:
    """One record per batch of ``batch_size`` items, in order: the in-process path's batches."""
    return [
        {
            "group": g,
            "paths": [item.path for item in items[start : start + batch_size]],
            "labels": [int(item.label) for item in items[start : start + batch_size]],
        }
        for g, start in enumerate(range(0, len(items), batch_size))
    ]


def actor_device(device: str, cluster: Mapping[str, float]) -> str:
    """``train.device`` for the actors: ``auto`` takes a GPU when the cluster has one."""
    gpus = float(cluster.get("GPU", 0.0))
    if device == "cuda" and gpus < 1:
        raise ConfigError("train.device=cuda, but the Ray cluster has no GPU (train.device=auto uses CPUs)")
    return "cuda" if device != "cpu" and gpus >= 1 else "cpu"


@contextlib.contextmanager
def ray_session(cfg: DictConfig) -> Iterator[None]:
    """Ray for the job: attached to ``RAY_ADDRESS`` or started here, and then stopped (only a
    Ray this started is shut down; an attached driver just disconnects)."""
    import ray

    from vlprompt.orchestrator.sweep import connect_ray

    ours = not ray.is_initialized()
    connect_ray(cfg)
    try:
        yield
    finally:
        if ours:
            ray.shutdown()


def _partial_sums(
    records: list[dict[str, Any]],
    blocks: Sequence[int],
    share: Any,
    batch_size: int,
    stages: Mapping[str, Any],
) -> Iterator[Any]:
    """The Ray Data job; each block of partial sums as ``PartialSums`` as it arrives."""
    import ray
    import torch

    from vlprompt.methods.source_stats import PartialSums

    size = stages["preprocess"].size
    context = ray.data.DataContext.get_current()
    context.execution_options.resource_limits = ray.data.ExecutionResources(cpu=share.cpus, gpu=share.gpus)
    # a batch's decoded images stay one block (one model call), whatever the batch size
    context.target_max_block_size = max(
        context.target_max_block_size or 0, 2 * batch_size * 3 * size * size * 4
    )
    ds = ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 200)))
    ds = ds.map_batches(
        _decode,
        fn_kwargs={"preprocess": asdict(stages["preprocess"])},
        batch_size=1,
        num_cpus=share.decode_cpus,
    )
    ds = ds.map_batches(
        _StatsActor,
        fn_constructor_kwargs={
            "recipe": stages["recipe"],
            "blocks": tuple(blocks),
            "device": stages["device"],
            "digest": stages["digest"],
            "threads": max(1, int(share.actor_cpus)),
        },
        compute=ray.data.ActorPoolStrategy(size=share.actors),
        num_gpus=share.actor_gpus,
        num_cpus=share.actor_cpus,
        batch_size=None,
    )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            yield PartialSums(*(torch.from_numpy(np.require(batch[k], requirements="CW")) for k in PARTS))
    except Exception as err:  # Ray wraps the stage's error in its own; find the line naming the image
        raise StatsPipelineError(error_line(err, MARKER)) from None


PARTS = ("labels", "sums", "squares", "embedding", "count")
"""``PartialSums``' fields, in order: the actors' output columns."""


def _decode(batch: Mapping[str, Any], preprocess: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``stats_encoding.decode_batch``, imported in the Ray worker (the driver never imports torch)."""
    from vlprompt.orchestrator.stats_encoding import decode_batch

    return decode_batch(batch, preprocess)


class _StatsActor:
    """``stats_encoding.StatsActor``, imported in the actor's process."""

    def __init__(self, **kwargs: Any):
        from vlprompt.orchestrator.stats_encoding import StatsActor

        self.actor = StatsActor(**kwargs)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.actor(batch)
