"""Typed experiment configuration: defaults → preset YAML → CLI dotlist, validated, then frozen.

Every preset in ``experiments/configs/`` and every ``key=value`` override is checked
against the dataclasses below before anything starts, so a misspelt key fails with its
full dotted name. The ``method`` section is free-form here because its keys depend on
the chosen method; :func:`validate` checks it against that method's own config
dataclass (``vlprompt.methods``), and :func:`project_method` re-targets it when a sweep
switches the method name.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

PRESET_DIR = Path(__file__).resolve().parent.parent / "experiments" / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what to do."""


@dataclass
class ModelConfig:
    name: str = "vlp-tiny"  # open_clip model name, e.g. "ViT-B-16"
    pretrained: str | None = None  # open_clip tag ("openai"), a checkpoint path, or null for random init
    precision: str = "fp32"  # fp32 | bf16 | fp16 (backbone weights)


@dataclass
class DataConfig:
    # a catalog dataset; for protocol multi_task a task group (general10, sw_all) or a
    # multi-task dataset (fashion20) — `python -m vlprompt.datasets list` shows both
    dataset: str = "synthetic"
    root: str = "data"  # folder holding the dataset folders; made absolute before Ray sees it
    shots: int = 16  # images per class for training; <= 0 means every training image
    # few_shot | base_to_novel | cross_dataset | domain_generalisation | multi_task | test_time
    protocol: str = "few_shot"
    # cross_dataset / domain_generalisation: after training on `dataset`, evaluate the learned
    # state on each of these datasets' test split with their own class names and templates
    eval_targets: list[str] = field(default_factory=list)
    generate_missing: bool = False  # write procedural data when the folder is missing (synthetic data only)
    # a missing split JSON is written next to the data by the reference's rule (not the
    # published file; a line on stderr says so); false: a missing split file is an error
    make_missing_splits: bool = True
    # true: unreadable/corrupt images are dropped from every split and counted
    # (metric bad_images_skipped); false: the first one stops the run, naming the file
    skip_bad_images: bool = False
    loader_workers: int = 0  # torch DataLoader worker processes
    # folder of cached frozen image features (Parquet, orchestrator/features.py), shared by
    # every trial and sweep that encodes the same images the same way; null turns it off
    feature_cache: str | None = "feature_cache"


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
    feature_views: int = 0  # >0: train frozen-image-tower methods on this many cached augmented views
    crop_min_scale: float = 0.08  # RandomResizedCrop's lower scale bound (Dassl reference: 0.08)
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class ResourcesConfig:
    num_workers: int = 1  # Ray Train workers per trial (DDP when > 1)
    use_gpu: str = "auto"  # auto | true | false — auto uses GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only when GPUs are used
    max_concurrent_trials: int = 0  # 0: as many as the cluster's resources allow


@dataclass
class TrackingConfig:
    uri: str | None = (
        None  # MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite in the launch dir
    )
    experiment: str = "vlprompt"


@dataclass
class SweepConfig:
    name: str | None = None  # defaults to the config's name; deterministic, so a sweep can resume
    sampler: str = "grid"  # grid (every point of the space, via Optuna) | tpe | random
    num_samples: int = 0  # tpe/random: number of trials (grid: ignored)
    metric: str = "test_acc"
    mode: str = "max"
    space: dict[str, Any] = field(default_factory=dict)  # "section.key": {choice: [...], when: {...}}
    storage_path: str = "ray_results"  # made absolute before Ray sees it


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "zeroshot"})
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def preset_path(name_or_path: str) -> Path:
    """A preset name (``quickstart``) or a YAML path → the file."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}; presets in {PRESET_DIR}: {', '.join(known)}")
    return candidate


def load_config(preset: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge defaults → preset → dotlist overrides and validate; returns a read-only config."""
    cfg = OmegaConf.structured(ExperimentConfig)
    layers: list[tuple[str, Any]] = []
    if preset is not None:
        path = preset_path(preset)
        layers.append((str(path), OmegaConf.load(path)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like section.key=value, got {bad}")
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    for origin, layer in layers:
        cfg = _merge(cfg, layer, origin)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _merge(cfg: DictConfig, layer: Any, origin: str) -> DictConfig:
    # The method section is replaced key by key; if the layer switches the method name,
    # keys only the previous method knew would be wrong, so they are dropped first.
    section = layer.get("method")
    layer_method = OmegaConf.to_container(section, resolve=False) if OmegaConf.is_config(section) else {}
    if "name" in layer_method and layer_method["name"] != cfg.method.get("name"):
        cfg.method = {"name": layer_method["name"]}
    # A layer that gives sweep.space replaces the whole space: merging would keep axes of
    # the preset that the user meant to drop (``sweep.space={}`` must mean "no sweep").
    sweep = layer.get("sweep")
    if OmegaConf.is_config(sweep) and "space" in sweep:
        cfg.sweep.space = {}
    try:
        return OmegaConf.merge(cfg, layer)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = getattr(err, "full_key", None) or str(err)
        raise ConfigError(f"{origin}: unknown config key {key!r} ({_first_line(err)})") from None
    except ValidationError as err:
        raise ConfigError(f"{origin}: bad value for {err.full_key!r}: {_first_line(err)}") from None
    except TypeError as err:  # e.g. a list where the defaults have a mapping
        raise ConfigError(
            f"{origin}: {_first_line(err)} (check the shape of every key this layer sets)"
        ) from None


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0]


_CHOICES = {
    "data.protocol": (
        "few_shot",
        "base_to_novel",
        "cross_dataset",
        "domain_generalisation",
        "multi_task",
        "test_time",
    ),
    "model.precision": ("fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "resources.use_gpu": ("auto", "true", "false"),
    "sweep.sampler": ("grid", "tpe", "random"),
    "sweep.mode": ("max", "min"),
}


PROTOCOL_METRICS = {
    "few_shot": ("test_acc", "val_acc"),
    "base_to_novel": ("test_acc", "val_acc", "base_acc", "novel_acc", "hm"),
    "cross_dataset": ("test_acc", "val_acc", "target_acc_mean"),
    "domain_generalisation": ("test_acc", "val_acc", "target_acc_mean"),
    # test_acc / val_acc: the mean over tasks of each task's accuracy (SoftCPT's
    # ClassificationMT evaluator); per task also task_acc/<task>
    "multi_task": ("test_acc", "val_acc"),
    # no training: each test image is classified on its own, labels withheld; with
    # data.eval_targets also target_acc/<dataset> and their mean
    "test_time": ("test_acc", "target_acc_mean"),
}
_TRANSFER = ("cross_dataset", "domain_generalisation")
_OPTIONAL_TARGETS = ("test_time",)


def validate(cfg: DictConfig) -> None:
    """Check values the types cannot: choices, ranges, the method section, the sweep space."""
    for key, allowed in _CHOICES.items():
        value = str(OmegaConf.select(cfg, key)).lower()
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    positive = ("train.epochs", "train.batch_size", "train.eval_batch_size", "resources.num_workers")
    for key in positive:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    if cfg.train.warmup_epochs < 0 or cfg.train.warmup_epochs >= cfg.train.epochs + 1:
        raise ConfigError("train.warmup_epochs must be between 0 and train.epochs")
    if not 0.0 < cfg.train.crop_min_scale <= 1.0:
        raise ConfigError(f"train.crop_min_scale must be in (0, 1], got {cfg.train.crop_min_scale}")
    if cfg.resources.cpus_per_worker <= 0:
        raise ConfigError("resources.cpus_per_worker must be > 0")
    metrics = PROTOCOL_METRICS[cfg.data.protocol]
    if cfg.sweep.metric not in metrics:
        raise ConfigError(
            f"sweep.metric={cfg.sweep.metric!r}: protocol {cfg.data.protocol} reports {', '.join(metrics)}"
        )
    if cfg.sweep.metric == "target_acc_mean" and not cfg.data.eval_targets:
        raise ConfigError("sweep.metric=target_acc_mean needs data.eval_targets")
    method_section(cfg.method)  # raises on unknown method / keys
    _validate_names(cfg)
    _validate_space(cfg)


def _validate_names(cfg: DictConfig) -> None:
    """Dataset and model names, checked against the catalog and open_clip's registry."""
    import open_clip

    from vlprompt.datasets import check_task_source, get_entry, is_multitask
    from vlprompt.methods import clip  # noqa: F401 - registers vlprompt's model configs

    multi = cfg.data.protocol == "multi_task"
    try:
        check_task_source(cfg.data.dataset)  # a dataset or a task group
        several = is_multitask(cfg.data.dataset)
    except ValueError as err:
        raise ConfigError(f"data.dataset: {err}") from None
    if not multi and several:
        raise ConfigError(
            f"data.dataset={cfg.data.dataset!r} holds several tasks; train on it with "
            "data.protocol=multi_task"
        )
    for i, name in enumerate(cfg.data.eval_targets):
        try:
            get_entry(name)
        except ValueError as err:
            raise ConfigError(f"data.eval_targets[{i}]: {err}") from None
    if cfg.data.protocol in _OPTIONAL_TARGETS:
        pass
    elif (cfg.data.protocol in _TRANSFER) != bool(cfg.data.eval_targets):
        raise ConfigError(
            f"data.protocol={cfg.data.protocol} "
            + (
                "needs data.eval_targets (the datasets to transfer to)"
                if cfg.data.protocol in _TRANSFER
                else "takes no data.eval_targets; use cross_dataset, domain_generalisation or test_time"
            )
        )
    if cfg.model.name not in open_clip.list_models():
        close = difflib.get_close_matches(cfg.model.name, open_clip.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"model.name={cfg.model.name!r} is not an open_clip model config.{hint} "
            "open_clip.list_models() lists them; vlprompt adds methods/model_configs/*.json."
        )


def method_section(section: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split ``method`` into (name, options) and check the options against the method's dataclass."""
    from vlprompt.methods import get_method, method_config

    options = (
        dict(OmegaConf.to_container(section, resolve=True))
        if isinstance(section, DictConfig)
        else dict(section)
    )
    name = options.pop("name", None)
    if not name:
        raise ConfigError("method.name is required (e.g. method.name=coop)")
    try:
        get_method(name)
        method_config(name, options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method: {err}") from None
    return name, options


def project_method(method: Mapping[str, Any], new_name: str) -> dict[str, Any]:
    """The method section for ``new_name``, keeping only the options that method accepts.

    A sweep over ``method.name`` starts every trial from the preset's method section;
    options of the preset's method that the trial's method does not have (CoOp's
    ``n_ctx`` for a zero-shot trial) are dropped rather than rejected.
    """
    from vlprompt.methods import method_option_names

    allowed = method_option_names(new_name)
    kept = {k: v for k, v in method.items() if k in allowed}
    return {"name": new_name, **kept}


def _validate_space(cfg: DictConfig) -> None:
    space = OmegaConf.to_container(cfg.sweep.space, resolve=True) or {}
    sections = {"model", "data", "method", "train", "seed"}
    for key, spec in space.items():
        root = key.split(".")[0]
        if root not in sections:
            raise ConfigError(f"sweep.space key {key!r} must start with one of {sorted(sections)}")
        if (
            root != "method"
            and root != "seed"
            and OmegaConf.select(cfg, key, default="__missing__") == "__missing__"
        ):
            raise ConfigError(f"sweep.space key {key!r} is not a config key")
        if not isinstance(spec, dict) or "choice" not in spec or not isinstance(spec["choice"], list):
            raise ConfigError(
                f"sweep.space.{key} must be {{choice: [values...]}} (optional when: {{key: value}})"
            )
        if not spec["choice"]:
            raise ConfigError(f"sweep.space.{key}.choice is empty")
        extra = set(spec) - {"choice", "when"}
        if extra:
            raise ConfigError(f"sweep.space.{key} has unknown fields {sorted(extra)} (allowed: choice, when)")
        for cond_key in spec.get("when") or {}:
            if cond_key not in space:
                raise ConfigError(
                    f"sweep.space.{key}.when refers to {cond_key!r}, which is not in sweep.space"
                )
    if cfg.sweep.sampler != "grid" and space and cfg.sweep.num_samples < 1:
        raise ConfigError(f"sweep.num_samples must be >= 1 with sampler={cfg.sweep.sampler}")


def resolve_paths(cfg: DictConfig, base: Path | None = None) -> DictConfig:
    """Make every path absolute against the launch directory before it crosses into Ray.

    Ray Tune and Train change the working directory of trials and workers; a relative
    ``data.root`` or ``sqlite:///mlflow.db`` would then point somewhere else.
    """
    base = (base or Path.cwd()).resolve()
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))

    def absolute(path: str) -> str:
        return str((base / os.path.expanduser(path)).resolve())

    def weights(value: str | None) -> str | None:
        """A checkpoint path made absolute; an open_clip tag ("openai", "bundled") kept as is."""
        is_path = value and ("/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors")))
        return absolute(value) if is_path else value

    cfg.data.root = absolute(cfg.data.root)
    cfg.sweep.storage_path = absolute(cfg.sweep.storage_path)
    if cfg.data.feature_cache:
        cfg.data.feature_cache = absolute(cfg.data.feature_cache)
    cfg.model.pretrained = weights(cfg.model.pretrained)
    # files a method reads: a learned_state.pt to start from (tpt), a teacher's (promptkd)
    for key in ("init_state", "teacher_state"):
        if cfg.method.get(key):
            cfg.method[key] = absolute(cfg.method[key])
    if "teacher_pretrained" in cfg.method:
        cfg.method.teacher_pretrained = weights(cfg.method.teacher_pretrained)
    cfg.tracking.uri = tracking_uri(cfg.tracking.uri, base)
    cfg.sweep.name = cfg.sweep.name or cfg.name
    return cfg


def tracking_uri(configured: str | None, base: Path) -> str:
    """config → $MLFLOW_TRACKING_URI → ``sqlite:///<launch dir>/mlflow.db``, always absolute."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str((base / uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri:  # a bare folder or file path
        uri = "sqlite:///" + str((base / uri).resolve())
    return uri


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
