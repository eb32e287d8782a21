"""Everything about a configuration that can be checked before anything starts.

Types are checked by OmegaConf as the layers merge (``config.py``); this module checks what the
types cannot: choices and ranges, the protocol's rules (targets, task groups, which metric it
reports), which methods may run under the protocol (their declared capabilities), the method's
options against its typed options class, dataset and model names -- and every point of the
sweep's search space, so a bad value inside ``sweep.space`` fails here, not in trial 37.

Nothing here imports torch or open_clip: names come from the torch-free registries
(``vlprompt.methods``, ``vlprompt.methods.pretrained``, ``vlprompt.datasets``). What needs the
file system (the data root, split files, shots per class) is ``orchestrator/preflight.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlprompt import datasets as vds
from vlprompt.methods import (
    METHODS,
    capabilities,
    check_option_names,
    get_method,
    method_config,
    method_option_names,
)
from vlprompt.methods.pretrained import BUNDLED, bundled_models, model_names
from vlprompt.orchestrator.protocols import PROTOCOLS, get_protocol
from vlprompt.orchestrator.schema import SECTIONS, ConfigError, structured

#: Numeric bounds the types cannot express: key → (lowest allowed, whether it is exclusive).
BOUNDS: dict[str, tuple[float, bool]] = {
    "train.epochs": (1, False),
    "train.batch_size": (1, False),
    "train.eval_batch_size": (1, False),
    "train.lr": (0, True),
    "train.momentum": (0, False),
    "train.weight_decay": (0, False),
    "train.warmup_epochs": (0, False),
    "train.warmup_lr": (0, False),
    "train.feature_views": (0, False),
    "train.crop_min_scale": (0, True),
    "data.loader_workers": (0, False),
    "model.text_chunk_size": (1, False),
    "data.encode_actors": (0, False),
    "resources.num_workers": (1, False),
    "resources.cpus_per_worker": (0, True),
    "resources.gpus_per_worker": (0, True),
    "resources.max_concurrent_trials": (0, False),
    "resources.health_check_interval_s": (0, True),
    "sweep.bundle_size": (0, False),
    "sweep.num_samples": (0, False),
    "sweep.grace_period": (1, False),
    "sweep.reduction_factor": (2, False),
    "train.checkpoint_every": (0, False),
    "train.checkpoint_min_interval_s": (0, False),
    "resources.max_failures": (0, False),
}


def validate(cfg: DictConfig) -> None:
    """Check values the types cannot: choices, ranges, protocol, method, names (not the space)."""
    _check_choices(cfg)
    _check_bounds(cfg)
    name, typed = method_options(cfg.method)
    _check_epochs(name, typed, cfg.train.epochs)
    _check_protocol(cfg, name)
    _check_scheduler(cfg)
    _check_names(cfg)


def _check_scheduler(cfg: DictConfig) -> None:
    """Early stopping compares trials mid-training: on the val split only, never on test."""
    if cfg.sweep.scheduler == "none":
        return
    if not cfg.sweep.metric.startswith("val"):
        raise ConfigError(
            f"sweep.scheduler={cfg.sweep.scheduler} stops trials on sweep.metric={cfg.sweep.metric!r} "
            "every epoch, which would select on the test split; set sweep.metric=val_acc"
        )
    if cfg.sweep.grace_period > cfg.train.epochs:
        raise ConfigError(
            f"sweep.grace_period={cfg.sweep.grace_period} must be at most train.epochs={cfg.train.epochs}"
        )


def _check_choices(cfg: DictConfig) -> None:
    for section, schema in SECTIONS.items():
        for f in dataclasses.fields(schema):
            allowed = f.metadata.get("choices")
            value = OmegaConf.select(cfg, f"{section}.{f.name}")
            if allowed and str(value).lower() not in allowed:
                hint = difflib.get_close_matches(str(value), allowed, n=1)
                close = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(f"{section}.{f.name}={value!r} is not one of {', '.join(allowed)}{close}")


def _check_bounds(cfg: DictConfig) -> None:
    for key, (low, exclusive) in BOUNDS.items():
        value = OmegaConf.select(cfg, key)
        if value < low or (exclusive and value == low):
            raise ConfigError(f"{key} must be {'>' if exclusive else '>='} {low}, got {value}")
    if cfg.train.warmup_epochs > cfg.train.epochs:
        raise ConfigError(f"train.warmup_epochs={cfg.train.warmup_epochs} must be at most train.epochs")
    if not cfg.train.momentum < 1:
        raise ConfigError(f"train.momentum must be < 1, got {cfg.train.momentum}")
    if cfg.train.crop_min_scale > 1:
        raise ConfigError(f"train.crop_min_scale must be in (0, 1], got {cfg.train.crop_min_scale}")
    _check_views(cfg)
    if cfg.sweep.sampler != "grid" and cfg.sweep.space and cfg.sweep.num_samples < 1:
        raise ConfigError(f"sweep.num_samples must be >= 1 with sweep.sampler={cfg.sweep.sampler}")


def _check_views(cfg: DictConfig) -> None:
    if cfg.train.view_mode == "cycled" and cfg.train.feature_views < 1:
        raise ConfigError(
            f"train.feature_views={cfg.train.feature_views}: train.view_mode=cycled needs at least one "
            "view per image (e.g. train.feature_views=4), or use train.view_mode=per_epoch"
        )
    size = cfg.data.encode_batch_size
    if size is not None and size < 1:
        raise ConfigError(f"data.encode_batch_size must be >= 1 (or null: train.eval_batch_size), got {size}")


def _check_epochs(method: str, options: Any, epochs: int) -> None:
    """The method's own rule on ``train.epochs`` (its ``check_epochs`` capability), e.g. that
    PromptSRC's prompt-aggregation weights put weight on some epoch."""
    check = capabilities(method).check_epochs
    if check is None:
        return
    try:
        check(options, epochs)
    except ValueError as err:
        raise ConfigError(f"method: {err} (train.epochs={epochs})") from None


def _check_protocol(cfg: DictConfig, method: str) -> None:
    """The protocol's rules: its metrics, its targets, task groups, and which methods it runs."""
    name = cfg.data.protocol
    protocol = get_protocol(name)
    if cfg.sweep.metric not in protocol.metrics:
        raise ConfigError(
            f"sweep.metric={cfg.sweep.metric!r}: protocol {name} reports {', '.join(protocol.metrics)}"
        )
    if cfg.sweep.metric == "target_acc_mean" and not cfg.data.eval_targets:
        raise ConfigError("sweep.metric=target_acc_mean needs data.eval_targets (the datasets to score)")
    with_targets = [p for p, spec in PROTOCOLS.items() if spec.targets != "none"]
    if protocol.targets == "required" and not cfg.data.eval_targets:
        raise ConfigError(f"data.protocol={name} needs data.eval_targets (the datasets to transfer to)")
    if protocol.targets == "none" and cfg.data.eval_targets:
        raise ConfigError(f"data.protocol={name} takes no data.eval_targets; use {', '.join(with_targets)}")
    caps = capabilities(method)
    if not protocol.trains and caps.learns:
        learnless = sorted(m for m, spec in METHODS.items() if not spec.capabilities.learns)
        raise ConfigError(
            f"data.protocol={name} trains nothing, and method.name={method} learns parameters it would "
            f"be scored with untrained; use a method that learns nothing before evaluation "
            f"(it may adapt to each test image): {', '.join(learnless)}"
        )
    if protocol.transductive and not caps.unlabelled:
        allowed = sorted(m for m, spec in METHODS.items() if spec.capabilities.unlabelled)
        raise ConfigError(
            f"data.protocol={name} trains on unlabelled images, and method.name={method} needs labels; "
            f"methods that learn without labels: {', '.join(allowed)}"
        )
    if protocol.trains and caps.test_time_views:
        untrained = [p for p, spec in PROTOCOLS.items() if not spec.trains]
        raise ConfigError(
            f"method.name={method} adapts to each test image and learns nothing beforehand: "
            f"run it with data.protocol={' or '.join(untrained)}"
        )


def _check_names(cfg: DictConfig) -> None:
    """Dataset, task group and model names, checked against the catalog and the model configs."""
    protocol = get_protocol(cfg.data.protocol)
    try:
        vds.check_task_source(cfg.data.dataset)
        several = vds.is_multitask(cfg.data.dataset)
    except ValueError as err:
        raise ConfigError(f"data.dataset: {err}") from None
    if several and not protocol.task_source:
        groups = [p for p, spec in PROTOCOLS.items() if spec.task_source]
        raise ConfigError(
            f"data.dataset={cfg.data.dataset!r} holds several tasks; train on it with "
            f"data.protocol={' or '.join(groups)}"
        )
    for i, name in enumerate(cfg.data.eval_targets):
        try:
            vds.get_entry(name)
        except ValueError as err:
            raise ConfigError(f"data.eval_targets[{i}]: {err}") from None
    check_model("model.name", cfg.model.name, cfg.model.pretrained)


def check_model(key: str, name: str, pretrained: str | None = None) -> None:
    """An open_clip architecture name, and ``bundled`` weights only for a model that ships them."""
    if name not in model_names():
        close = difflib.get_close_matches(name, model_names(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"{key}={name!r} is not an open_clip model config.{hint} "
            "open_clip.list_models() lists them; vlprompt adds methods/model_configs/*.json."
        )
    if pretrained == BUNDLED and name not in bundled_models():
        raise ConfigError(
            f"{key}={name}: pretrained=bundled, but {name} has no bundled weights "
            f"(models with bundled weights: {', '.join(bundled_models())})"
        )


# ------------------------------------------------------------------------------ the method section


def method_options(section: Mapping[str, Any]) -> tuple[str, Any]:
    """``method`` → (name, its options dataclass), typed by OmegaConf against the options class,
    then checked by the registry (bounds, choices, cross-field rules, referenced methods)."""
    options = (
        dict(OmegaConf.to_container(section, resolve=True))
        if isinstance(section, DictConfig)
        else dict(section)
    )
    name = options.pop("name", None)
    if not name:
        raise ConfigError("method.name is required (e.g. method.name=coop)")
    try:
        typed = _typed(name, options, "method")
        return name, method_config(name, typed)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method: {err}") from None


def _typed(name: str, options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``options`` merged onto method ``name``'s options class (OmegaConf types them); nested
    options of another method (``options_of`` fields) typed against that method's class."""
    options_class = get_method(name).options
    check_option_names(name, options)
    try:
        merged = OmegaConf.merge(structured(options_class), options)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "?"
        raise ConfigError(f"bad value for '{where}.{key}': {str(err).splitlines()[0]}") from None
    plain = OmegaConf.to_container(merged, resolve=True)
    for f in dataclasses.fields(options_class):
        of = f.metadata.get("options_of")
        if of and plain.get(of) in METHODS:
            plain[f.name] = _typed(plain[of], plain[f.name], f"{where}.{f.name}")
        if f.metadata.get("model_name"):
            check_model(f"{where}.{f.name}", plain[f.name])
        if f.metadata.get("dataset_name"):
            try:
                vds.get_entry(plain[f.name])
            except ValueError as err:
                raise ConfigError(f"{where}.{f.name}: {err}") from None
    return plain


def project_method(method: Mapping[str, Any], new_name: str) -> dict[str, Any]:
    """The method section for ``new_name``, keeping only the options that method accepts.

    A sweep over ``method.name`` starts every trial from the preset's method section;
    options of the preset's method that the trial's method does not have (CoOp's
    ``n_ctx`` for a zero-shot trial) are dropped rather than rejected.
    """
    allowed = method_option_names(new_name)
    kept = {k: v for k, v in method.items() if k in allowed}
    return {"name": new_name, **kept}
