"""The sweep's feature pipeline: every frozen image feature the trials will read, encoded once with Ray Data.

Run by the driver after ``preflight`` and the resource plan, before the Tuner starts
(``sweep.run_sweep``). From the resolved trial configs it works out every cache entry
(``orchestrator/features.py``: backbone, precision, device, transform, view, dataset) the
frozen-image-tower trials will read -- the test transform's features of every evaluation set
and of a full-batch fit's train split, and the shared training views (``orchestrator/views.py``:
epochs 0..E-1 for ``per_epoch``, 0..K-1 for ``cycled``) -- subtracts what the cache already
holds, and encodes the rest::

    ray.data.from_items(one record per encoder batch: ids, paths)
      → map_batches(decode + transform, CPU tasks; seeded views as in the trials)
      → map_batches(_EncoderActor, ActorPoolStrategy(size=n), num_gpus=1 | 0)
      → rows collected in the driver, merged into each entry (atomic rename)

An image shared by several trials (two seeds' overlapping few-shot subsets, the test split of
every trial) is decoded and encoded once. The trials then only read (``data.features_planned``):
an entry the pipeline wrote but a trial cannot find is an error naming the file and the node.

Exactness: the encoder actor calls the trial's own ``batching.encode_batches`` on batches of
``data.encode_batch_size`` (default ``train.eval_batch_size``) images, in the order of the first
trial that needs them -- the batches that trial would have encoded itself -- so its features are
the trial's to the bit on the same kernels (tested; other batchings differ by ~1e-6).

Why it runs *before* the trials, from the driver: a Ray Data actor pool started inside a trial
competes with the trials' workers for CPUs (on 2 CPUs it waits for one that never frees,
ORCHESTRATION.md); here the cluster is idle, and the resource limits are set explicitly from
``ray.cluster_resources()`` so decoding tasks always have a CPU next to the encoder actors.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from vlprompt.methods import capabilities
from vlprompt.orchestrator.checks import method_options
from vlprompt.orchestrator.config import apply_point, trial_config
from vlprompt.orchestrator.data import RunData, prepare_data
from vlprompt.orchestrator.features import (
    TEST_VIEW,
    FeatureStore,
    backbone_identity,
    dataset_of,
    family_key,
    file_stat,
    image_id,
    seeded_view,
)
from vlprompt.orchestrator.protocols import get_protocol
from vlprompt.orchestrator.resources import ResourcePlan
from vlprompt.orchestrator.search_space import grid_points
from vlprompt.orchestrator.views import fits_full_batch, train_views


class FeaturePipelineError(RuntimeError):
    """The pipeline could not encode an image; raised before any trial starts."""


@dataclass(frozen=True)
class Backbone:
    """What an encoder actor loads; the trials' ``load_backbone`` arguments and init seed."""

    model: str
    pretrained: str | None
    precision: str
    init_seed: int | None  # random-init weights depend on the run's seed
    device: str


@dataclass
class Job:
    """One cache entry to fill, merged from what every trial needs of it."""

    key: dict[str, Any]
    backbone: Backbone
    transform: dict[str, Any]  # {"kind": "test" | "train", "crop_min_scale": ...}
    view: dict[str, Any]
    batch_size: int
    labels: list[str] = field(default_factory=list)  # the splits/views it serves
    items: dict[str, str] = field(default_factory=dict)  # image id → path, in first-needed order
    missing: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        seed = self.backbone.init_seed
        weights = "" if seed is None else f" (random-init {self.backbone.model}, seed {seed})"
        return f"{self.key['dataset']} {'+'.join(self.labels)}{weights}"


@dataclass
class PipelineReport:
    planned: bool  # every trial's features were planned (the trials only read)
    entries: list[tuple[str, int, int]] = field(default_factory=list)  # label, encoded, cached
    wall_s: float = 0.0

    @property
    def encoded(self) -> int:
        return sum(e[1] for e in self.entries)

    @property
    def cached(self) -> int:
        return sum(e[2] for e in self.entries)


# ------------------------------------------------------------------------------ which trials


def planned_trials(cfg: DictConfig) -> list[DictConfig]:
    """Every trial the sweep will run, when that is known before it starts: the config itself
    (no space) or every grid point. A sampled space (``tpe``/``random``) is not planned: its
    trials are not known yet, and each trial encodes what it lacks (empty list)."""
    if not cfg.data.pipeline or not cfg.data.feature_cache:
        return []
    space = OmegaConf.to_container(cfg.sweep.space, resolve=True) or {}
    if not space:
        return [cfg]
    if cfg.sweep.sampler != "grid":
        return []
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["sweep"]["space"] = {}
    return [trial_config(apply_point(plain, point)) for point in grid_points(space)]


def fill_feature_cache(
    cfg: DictConfig, trial_cfgs: Sequence[DictConfig], plan: ResourcePlan
) -> PipelineReport:
    """Encode every missing feature ``trial_cfgs`` will read; set ``cfg.data.features_planned``.

    ``FeaturePipelineError`` (naming the dataset and the image) if an image cannot be encoded.
    """
    started = time.perf_counter()
    if not trial_cfgs:
        if cfg.data.pipeline and cfg.data.feature_cache and cfg.sweep.space:
            print(
                f"[vlprompt] features: sweep.sampler={cfg.sweep.sampler} picks trials as it goes; "
                "each trial encodes the features it lacks",
                file=sys.stderr,
                flush=True,
            )
        return PipelineReport(planned=False)
    store = FeatureStore(Path(cfg.data.feature_cache))
    jobs = plan_jobs(trial_cfgs, plan, describe_remote)
    for job in jobs.values():
        entry = store.entry(job.key)
        ids = list(job.items)
        job.missing = [ids[i] for i in store.missing(entry, ids, [file_stat(job.items[i]) for i in ids])]
    todo = [job for job in jobs.values() if job.missing]
    if todo:
        encode_jobs(store, todo, plan, cfg.data.encode_actors)
    report = PipelineReport(planned=True, wall_s=time.perf_counter() - started)
    for job in jobs.values():
        done = len(job.missing)
        report.entries.append((job.label, done, len(job.items) - done))
        print(
            f"[vlprompt] features: {job.label}: {done} images encoded ({len(job.items) - done} cached)",
            flush=True,
        )
    cfg.data.features_planned = True
    return report


# ------------------------------------------------------------------------------ planning


def trial_device(trial: DictConfig, plan: ResourcePlan) -> str:
    """The device the trial's workers encode on (``loop.train_loop``'s rule)."""
    if trial.train.device == "cpu":
        return "cpu"
    return "cuda" if trial.train.device == "cuda" or plan.use_gpu else "cpu"


def plan_jobs(trial_cfgs: Iterable[DictConfig], plan: ResourcePlan, describe: Any) -> dict[str, Job]:
    """Every cache entry the trials read (keyed by file name), with the images each needs.

    ``describe(backbone) -> {"test": repr, "train": {crop_min_scale: repr}, "size", "mean", "std"}``
    gives the transforms (they need torch and the weights' preprocessing: a Ray task).
    """
    jobs: dict[str, Job] = {}
    read: dict[str, RunData] = {}
    described: dict[Backbone, dict[str, Any]] = {}
    for trial in trial_cfgs:
        if not reads_features(trial):
            continue
        data_key = json.dumps([OmegaConf.to_container(trial.data, resolve=True), trial.seed], sort_keys=True)
        data = read.get(data_key) or read.setdefault(data_key, prepare_data(trial))
        backbone = Backbone(
            trial.model.name,
            trial.model.pretrained,
            trial.model.precision,
            trial.seed if trial.model.pretrained is None else None,
            trial_device(trial, plan),
        )
        if backbone not in described:
            described[backbone] = describe(backbone, _crop_scales(trial_cfgs))
        for need in trial_needs(trial, data):
            _add(jobs, trial, backbone, described[backbone], *need)
    return jobs


def _crop_scales(trial_cfgs: Iterable[DictConfig]) -> list[float]:
    return sorted({float(t.train.crop_min_scale) for t in trial_cfgs})


def reads_features(trial: DictConfig) -> bool:
    """Whether the trial reads cached image features at all: not when images go through a trained
    tower, nor when a test-time method scores each test image with its own views."""
    caps, protocol = capabilities(method_options(trial.method)[0]), get_protocol(trial.data.protocol)
    return caps.frozen_image_tower and not (caps.test_time_views and not protocol.trains)


def trial_needs(trial: DictConfig, data: RunData) -> list[tuple]:
    """``(label, items, transform kind, view)`` for every feature set the trial reads (one that
    :func:`reads_features`), ``data`` being its prepared data."""
    caps, protocol = capabilities(method_options(trial.method)[0]), get_protocol(trial.data.protocol)
    needs: list[tuple] = [(es.key.split("/")[0], es.items, "test", TEST_VIEW) for es in data.eval_sets]
    train_items = tuple(item for splits in data.tasks.values() for item in splits.train)
    if fits_full_batch(caps, protocol):
        return [*needs, ("train", train_items, "test", TEST_VIEW)]
    views = train_views(trial.train, caps, protocol)
    if views is not None and views.shared:
        kind = "epoch" if views.mode == "per_epoch" else "view"
        needs += [
            (f"train {kind} {v}", train_items, "train", seeded_view(views.seed, v))
            for v in range(views.count)
        ]
    return needs


def _add(
    jobs: dict[str, Job],
    trial: DictConfig,
    backbone: Backbone,
    described: Mapping[str, Any],
    label: str,
    items: Sequence[Any],
    kind: str,
    view: dict[str, Any],
) -> None:
    """Add one feature set's images to the entries (one per dataset) that hold them."""
    scale = float(trial.train.crop_min_scale)
    transform_repr = described["test"] if kind == "test" else described["train"][scale]
    identity = backbone_identity(trial.model.name, trial.model.pretrained, trial.seed)
    batch_size = int(trial.data.encode_batch_size or trial.train.eval_batch_size)
    for item in items:
        image = image_id(item.path, trial.data.root)
        dataset = dataset_of(image)
        key = family_key(identity, backbone.precision, backbone.device, transform_repr, view, dataset)
        name = json.dumps(key, sort_keys=True)
        if name not in jobs:
            transform = {"kind": kind, "crop_min_scale": scale, **_preprocess(described)}
            jobs[name] = Job(key, backbone, transform, view, batch_size)
        job = jobs[name]
        if label not in job.labels:
            job.labels.append(label)
        job.items.setdefault(image, item.path)


def _preprocess(described: Mapping[str, Any]) -> dict[str, Any]:
    return {"size": described["size"], "mean": described["mean"], "std": described["std"]}


def describe(backbone: Backbone, crop_scales: Sequence[float]) -> dict[str, Any]:
    """The backbone's preprocessing and the reprs of the transforms the trials build from it."""
    from vlprompt.datasets.images import test_transform, train_transform
    from vlprompt.methods.clip import load_backbone

    loaded = load_backbone(backbone.model, backbone.pretrained, device="cpu", precision=backbone.precision)
    size, mean, std = loaded.image_size, loaded.image_mean, loaded.image_std
    return {
        "size": size,
        "mean": list(mean),
        "std": list(std),
        "test": repr(test_transform(size, mean, std)),
        "train": {s: repr(train_transform(size, mean, std, s)) for s in crop_scales},
    }


def describe_remote(backbone: Backbone, crop_scales: Sequence[float]) -> dict[str, Any]:
    """:func:`describe` in a Ray task: the driver never imports torch or loads weights."""
    import ray

    return ray.get(ray.remote(num_cpus=1)(describe).remote(backbone, list(crop_scales)))


# ------------------------------------------------------------------------------ encoding


def encode_jobs(store: FeatureStore, jobs: Sequence[Job], plan: ResourcePlan, actors: int = 0) -> None:
    """One Ray Data pipeline per backbone; every job's missing images merged into its entry."""
    by_backbone: dict[Backbone, list[int]] = {}
    for j, job in enumerate(jobs):
        by_backbone.setdefault(job.backbone, []).append(j)
    for backbone, members in by_backbone.items():
        rows = run_pipeline(backbone, {j: jobs[j] for j in members}, plan, actors)
        for j in members:
            ids, stats, features = rows.get(j, ([], [], []))
            if len(ids) != len(jobs[j].missing):
                got, want = len(ids), len(jobs[j].missing)
                raise FeaturePipelineError(
                    f"feature pipeline: {jobs[j].label}: {got} of {want} images came back"
                )
            store.merge(jobs[j].key, ids, stats, np.stack(features))


def _records(jobs: Mapping[int, Job]) -> list[dict[str, Any]]:
    """One record per encoder batch: a job's missing images in order, ``batch_size`` at a time."""
    records = []
    for j, job in jobs.items():
        size = job.batch_size
        for start in range(0, len(job.missing), size):
            ids = job.missing[start : start + size]
            records.append(
                {"group": len(records), "job": j, "ids": ids, "paths": [job.items[i] for i in ids]}
            )
    return records


def run_pipeline(
    backbone: Backbone, jobs: Mapping[int, Job], plan: ResourcePlan, actors: int = 0
) -> dict[int, tuple]:
    """Decode → transform → encode with Ray Data; ``{job: (ids, stats, features)}``.

    ``actors``: ``data.encode_actors`` (0: one per GPU when the trials use GPUs, else one)."""
    import ray

    share = plan_pipeline(ray.cluster_resources(), backbone.device == "cuda", actors)
    context = ray.data.DataContext.get_current()
    context.execution_options.resource_limits = ray.data.ExecutionResources(cpu=share.cpus, gpu=share.gpus)
    specs = {j: {"label": job.label, "transform": job.transform, "view": job.view} for j, job in jobs.items()}
    biggest = max(job.batch_size for job in jobs.values())
    size = max(job.transform["size"] for job in jobs.values())
    # a batch's decoded images stay one block (so one encoder call), whatever the batch size
    context.target_max_block_size = max(context.target_max_block_size or 0, 2 * biggest * 3 * size * size * 4)
    ds = ray.data.from_items(_records(jobs), override_num_blocks=max(1, min(len(jobs) * 4, 200)))
    ds = ds.map_batches(_decode, fn_kwargs={"specs": specs}, batch_size=1, num_cpus=share.decode_cpus)
    ds = ds.map_batches(
        _Encoder,
        fn_constructor_kwargs={"backbone": backbone.__dict__, "threads": max(1, int(share.actor_cpus))},
        compute=ray.data.ActorPoolStrategy(size=share.actors),
        num_gpus=share.actor_gpus,
        num_cpus=share.actor_cpus,
        batch_size=None,
    )
    out: dict[int, tuple[list, list, list]] = {}
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for j, image, stat, feature in zip(
                batch["job"], batch["image"], batch["stat"], batch["feature"], strict=True
            ):
                ids, stats, features = out.setdefault(int(j), ([], [], []))
                ids.append(str(image))
                stats.append(str(stat))
                features.append(feature)
    except Exception as err:  # Ray wraps the UDF's error in its own; find the line naming the image
        raise FeaturePipelineError(error_line(err)) from None
    return out


def error_line(err: BaseException, marker: str = "feature pipeline:") -> str:
    """A stage's own message (dataset, split, image path) from Ray's wrapped error: the last line
    holding ``marker``, from there on (the source-statistics job's stages mark theirs too)."""
    seen: BaseException | None = err
    text = []
    while seen is not None:
        text.append(str(seen))
        seen = seen.__cause__
    lines = [line[line.index(marker) :].strip() for line in "\n".join(text).splitlines() if marker in line]
    return lines[-1] if lines else f"{marker.rstrip(':')} failed: {err!r}"


def _decode(batch: Mapping[str, Any], specs: Mapping[int, Any]) -> dict[str, np.ndarray]:
    """``encoding.decode_batch``, imported in the Ray worker (the driver never imports torch)."""
    from vlprompt.orchestrator.encoding import decode_batch

    return decode_batch(batch, specs)


class _Encoder:
    """``encoding.EncoderActor``, imported in the actor's process."""

    def __init__(self, **kwargs: Any):
        from vlprompt.orchestrator.encoding import EncoderActor

        self.actor = EncoderActor(**kwargs)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.actor(batch)


@dataclass(frozen=True)
class PipelineShare:
    """What the pipeline may hold: the encoder actors and the CPU decoding tasks beside them."""

    actors: int
    actor_cpus: float
    actor_gpus: float
    decode_cpus: float
    cpus: float
    gpus: float


def plan_pipeline(cluster: Mapping[str, float], gpu: bool, actors: int) -> PipelineShare:
    """Actors and CPUs for the pipeline, fitted to the idle cluster so it cannot deadlock:
    the actors take at most half the CPUs, so decoding always has a CPU (ORCHESTRATION.md).

    Decoding tasks ask for half of what is left each (two decode beside each actor on a 2-CPU
    machine); asking for other resources than the actors also keeps Ray Data from fusing the
    two stages into the actors, which would serialise decoding with encoding."""
    cpus = float(cluster.get("CPU", 1.0))
    gpus = float(cluster.get("GPU", 0.0))
    if actors <= 0:
        actors = max(1, int(gpus)) if gpu and gpus >= 1 else 1
    actor_cpus = min(1.0, cpus / (2 * actors))
    decode_cpus = min(1.0, cpus - actors * actor_cpus) / 2
    return PipelineShare(actors, actor_cpus, 1.0 if gpu else 0.0, decode_cpus, cpus, gpus)
