"""The experiment configuration's schema: one typed dataclass per section.

Fields whose value is a path carry ``metadata={"path": kind}`` (``"dir"``, ``"file"``, or
``"weights"`` -- a checkpoint path or an open_clip tag), so ``config.resolve_paths`` makes every
path absolute by iterating fields, here and in the method's options (``methods/options.py``),
without knowing any option by name. Choices are declared as ``metadata={"choices": ...}``;
``data.protocol``'s come from the protocol registry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlprompt.orchestrator.protocols import PROTOCOLS


class ConfigError(ValueError):
    """A configuration problem; the message names the key (or file) and what to do."""


def _path(kind: str, default: Any) -> Any:
    return field(default=default, metadata={"path": kind})


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass
class ModelConfig:
    name: str = "vlp-tiny"  # open_clip model name, e.g. "ViT-B-16"
    # an open_clip tag ("openai"), "bundled", a checkpoint path, or null for random init
    pretrained: str | None = _path("weights", None)
    precision: str = _choice("fp32", "fp32", "bf16", "fp16")  # backbone weights
    # the memory budget of the text tower (methods/clip.py): most prompts encoded at once, and
    # when those chunks are re-computed in backward instead of kept (auto: under gradients when
    # the prompts span more than one chunk; always: under gradients; never). Same numbers
    # either way; checkpointing trades about one extra text forward per step for memory.
    text_chunk_size: int = 1000
    text_checkpoint: str = _choice("auto", "auto", "always", "never")


@dataclass
class DataConfig:
    # a catalog dataset; for protocol multi_task a task group (general10, sw_all) or a
    # multi-task dataset (fashion20) — `python -m vlprompt.datasets list` shows both
    dataset: str = "synthetic"
    root: str = _path("dir", "data")  # folder holding the dataset folders
    shots: int = 16  # images per class for training; <= 0 means every training image
    protocol: str = _choice("few_shot", *PROTOCOLS)  # orchestrator/protocols.py
    # cross_dataset / domain_generalisation (test_time: optional): after training on `dataset`,
    # evaluate the learned state on each of these datasets' test split with their own classes
    eval_targets: list[str] = field(default_factory=list)
    # write a missing dataset folder when the dataset is procedural by nature (synthetic, sw_*)
    generate_missing: bool = False
    # also write procedural *stand-ins* for missing real benchmarks (eurosat, imagenet ...): drawn
    # shapes in the real layout, for trying the platform; runs on them are tagged data.generated
    generate_stand_ins: bool = False
    # a missing split JSON is written next to the data by the reference's rule (not the
    # published file; a line on stderr says so); false: a missing split file is an error
    make_missing_splits: bool = True
    # true: unreadable/corrupt images are dropped from every split and counted
    # (metric bad_images_skipped); false: the first one stops the run, naming the file
    skip_bad_images: bool = False
    loader_workers: int = 0  # torch DataLoader worker processes
    # folder of cached frozen image features (Parquet, orchestrator/features.py), shared by
    # every trial and sweep that encodes the same images the same way; null turns it off
    feature_cache: str | None = _path("dir", "feature_cache")
    # the sweep encodes every feature its frozen-image-tower trials will read before they start,
    # once, with Ray Data (orchestrator/pipeline.py); false: each trial encodes what it lacks
    pipeline: bool = True
    encode_batch_size: int | None = None  # images per pipeline encoder call; null: train.eval_batch_size
    encode_actors: int = 0  # the pipeline's encoder actors; 0: one per GPU the trials use, else one
    # set by the sweep's pipeline, not by hand: every cache entry a trial reads was written before
    # it started, so a missing one is an error naming the path and node (no silent re-encoding)
    features_planned: bool = False


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1  # constant-LR warm-up epochs counted inside `epochs` (Dassl)
    warmup_lr: float = 1e-5
    eval_batch_size: int = 100
    # what frozen-image-tower methods train on (orchestrator/views.py): `images` (random crops,
    # the tower run every step), `per_epoch` (a fresh augmented view per image per epoch, each
    # encoded once), `cycled` (feature_views views per image, one drawn per sample per epoch)
    view_mode: str = _choice("per_epoch", "images", "per_epoch", "cycled")
    feature_views: int = 0  # K, the views per image of view_mode=cycled
    # seed of the sweep's shared views: view v of an image is the same in every trial, so it is
    # encoded once and cached; null: views drawn from each run's own stream (never shared)
    view_seed: int | None = 0
    # a Ray Train checkpoint (orchestrator/checkpoints.py) after every this many epochs, so a
    # restarted worker resumes there and ends with an unbroken run's numbers; 0: none
    checkpoint_every: int = 1
    checkpoint_min_interval_s: float = 10.0  # and no sooner than this after the last one
    crop_min_scale: float = 0.08  # RandomResizedCrop's lower scale bound (Dassl reference: 0.08)
    device: str = _choice("auto", "auto", "cpu", "cuda")


@dataclass
class ResourcesConfig:
    num_workers: int = 1  # Ray Train workers per trial (DDP when > 1)
    use_gpu: str = _choice("auto", "auto", "true", "false")  # auto: GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only when GPUs are used
    max_concurrent_trials: int = 0  # 0: as many as the cluster's resources allow
    # how often Ray Train's controller polls its workers (Ray's default 2 s is waited out at the
    # end of every short Train run)
    health_check_interval_s: float = 0.2
    # a Ray started by the sweep itself (no RAY_ADDRESS): with its dashboard. Off saves ~1.5 s of
    # start-up per sweep, but Ray Train's placement-group cleaner needs its state API to free the
    # resources of a Train run whose controller died; a cluster you attach to keeps what it has
    local_dashboard: bool = True
    # how often a trial is restarted after a process of it dies (a Train worker: Ray Train
    # restarts the worker group from the last checkpoint; the trial or its controller: Tune
    # retries the trial); errors raised by the code are not retried
    max_failures: int = 2


@dataclass
class TrackingConfig:
    # MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite in the launch dir
    uri: str | None = None
    experiment: str = "vlprompt"
    # how long a call waits for an unreachable server (retries with backoff) before a write is
    # spooled to local disk, or a call that needs an answer (new run, search) fails (spool.py)
    retry_deadline_s: float = 90.0
    request_timeout_s: float = 30.0  # one HTTP request to the server, at most
    # where spooled writes go; null: <sweep.storage_path>/<sweep name>/tracking-spool
    spool_dir: str | None = _path("dir", None)


@dataclass
class SweepConfig:
    name: str | None = None  # defaults to the config's name; deterministic, so a sweep can resume
    sampler: str = _choice("grid", "grid", "tpe", "random")  # grid: every point of the space once
    num_samples: int = 0  # tpe/random: number of trials (grid: ignored)
    metric: str = "test_acc"
    mode: str = _choice("max", "max", "min")
    space: dict[str, Any] = field(default_factory=dict)  # "section.key": {choice: [...], when: {...}}
    storage_path: str = _path("dir", "ray_results")
    # grid only: most configurations one trial runs in turn in one Train run (orchestrator/
    # bundles.py); 0: as many as keep every concurrent trial busy; 1: one per trial
    bundle_size: int = 0
    # early stopping on the per-epoch val split (sweep.metric must be a val_ metric: never select
    # on test): asha (Tune's ASHAScheduler) or median (MedianStoppingRule); none: every trial runs out
    scheduler: str = _choice("none", "none", "asha", "median")
    grace_period: int = 1  # epochs every trial runs before a scheduler may stop it
    reduction_factor: int = 3  # asha: the fraction 1/reduction_factor of trials goes on at each rung


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # free-form here, typed against the chosen method's options class by checks.method_options
    method: dict[str, Any] = field(default_factory=lambda: {"name": "zeroshot"})
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


#: Section name → its dataclass (the typed sections; ``method`` is typed per method).
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "resources": ResourcesConfig,
    "tracking": TrackingConfig,
    "sweep": SweepConfig,
}


@cache
def structured(schema: type) -> DictConfig:
    """``OmegaConf.structured(schema)``, built once per class (merging copies it)."""
    return OmegaConf.structured(schema)


def flatten(cfg: Mapping[str, Any] | DictConfig, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (MLflow params, results tables)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def param_value(text: str) -> Any:
    """A config value back from its logged param text (``tracking.log_params``: ``str(value)``,
    JSON for lists and dicts): ``"4"`` → 4, ``"True"`` → True, ``"None"`` → None, ``"[1, 2]"``
    → [1, 2]; anything else stays the text."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    try:
        return json.loads(text)
    except ValueError:
        return text
