"""One run, on every Ray Train worker: prepare → set up → log → optimise → evaluate → summarise → report.

Each phase is one short function below; :func:`run` calls them in order. The loop knows methods
only through the registry's declared capabilities (``vlprompt.methods``) and the interface in
``vlprompt.methods.base``, and protocols only through their declarations
(``orchestrator/protocols.py``): which evaluation sets exist, whether anything is trained. Where
the pieces live:

* ``orchestrator/data.py`` -- the data phase: splits, few-shot subsets, evaluation sets;
* ``orchestrator/batching.py`` -- images or cached features in batches, per task and rank;
* ``orchestrator/training.py`` -- SGD epochs (Dassl/CoOp schedule) or one full-batch fit;
* ``orchestrator/evaluation.py`` -- accuracy, batched or per test image, and transfer to new classes;
* ``orchestrator/worker.py`` -- rank, device and the collectives of exact data-parallel training.

Rank 0 alone talks to MLflow; every rank returns the same metrics.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from vlprompt import datasets as vds
from vlprompt.datasets.images import test_transform, train_transform
from vlprompt.datasets.views import AugmentedViews
from vlprompt.methods import Capabilities, build_method, capabilities
from vlprompt.methods.base import EpochHooks, ReportsInputs, count_trainable, trainable_parameters
from vlprompt.methods.clip import Backbone, load_backbone
from vlprompt.orchestrator import tracking
from vlprompt.orchestrator.batching import Encoder, Source
from vlprompt.orchestrator.checkpoints import TrainState
from vlprompt.orchestrator.checks import method_options
from vlprompt.orchestrator.data import EvalSet, RunData, prepare_data
from vlprompt.orchestrator.evaluation import evaluate, evaluate_test_time, transferred
from vlprompt.orchestrator.features import FeatureStore, backbone_identity
from vlprompt.orchestrator.protocols import Protocol, get_protocol, harmonic_mean
from vlprompt.orchestrator.schema import flatten
from vlprompt.orchestrator.training import fit_features, train_epochs
from vlprompt.orchestrator.views import fits_full_batch, train_views
from vlprompt.orchestrator.worker import WorkerContext, broadcast_parameters, seed_everything

#: What an evaluation set that brings its own classes is called in errors, by its role.
ROLE_CLASSES = {"novel": "the novel classes", "test": "the base classes", "val": "the base classes"}


class Session:
    """What runs the loop, and hears from it: here nothing (tests, benchmarks, notebooks); on a
    Ray Train worker ``bundle_worker.TrainSession`` (checkpoints, reports to Tune, restarts).

    ``resume``: the checkpoint this run continues from (None: from the start).
    """

    resume: TrainState | None = None
    reopened: bool = False  # the run's MLflow run is an earlier attempt's, reopened

    def validates(self, epoch: int) -> bool:
        """Whether to score the val split after this epoch (early-stopping schedulers need it)."""
        return False

    def epoch_end(
        self,
        epoch: int,
        method: nn.Module,
        optimizer: torch.optim.Optimizer,
        stats: dict[str, float],
    ) -> None:
        """After every SGD epoch (and its validation, when asked for: in ``stats``)."""

    def finish(self, metrics: dict[str, float], learned: dict[str, Tensor]) -> None:
        """Once, at the end, with the final metrics and the learned state (on every rank)."""


class Keep(Session):
    """A session that keeps what the run ended with (notebooks, tests): ``.metrics``, ``.learned``."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.learned: dict[str, Tensor] = {}

    def finish(self, metrics: dict[str, float], learned: dict[str, Tensor]) -> None:
        self.metrics, self.learned = dict(metrics), dict(learned)


@dataclass(frozen=True)
class Transforms:
    train: Any
    test: Any
    views: AugmentedViews | None  # per-image test-time views, for methods that adapt on them
    images_per_call: int = 1  # test images a test-time method adapts in one predict call


@dataclass
class Setup:
    """What the set-up phase made: the backbone, the method, and the batches that feed it."""

    protocol: Protocol
    backbone: Backbone
    method_name: str
    caps: Capabilities
    method: nn.Module
    build: Callable[[Mapping[str, vds.DatasetSplits]], nn.Module]  # the method for other classes
    transforms: Transforms
    train: Source
    sources: dict[str, Source]  # evaluation-set key → batches (empty when scored per test image)
    store: FeatureStore | None

    @property
    def per_sample(self) -> bool:
        """Scored one test image at a time, with its views (a test-time method where nothing trains)."""
        return self.transforms.views is not None

    @property
    def fits(self) -> bool:
        return fits_full_batch(self.caps, self.protocol)


class Tracker:
    """Rank 0's MLflow run, or nothing (other ranks; runs without a tracking run)."""

    def __init__(self, uri: str, run_id: str | None, reopened: bool = False) -> None:
        self.uri, self.run_id, self.reopened = uri, run_id, reopened

    def params(self, params: Mapping[str, Any]) -> None:
        """A reopened run (a restart) keeps the params its first attempt logged."""
        if self.run_id:
            kept = tracking.logged_params(self.uri, self.run_id) if self.reopened else set()
            tracking.log_params(self.uri, self.run_id, {k: v for k, v in params.items() if k not in kept})

    def tags(self, tags: Mapping[str, str]) -> None:
        if self.run_id:
            tracking.set_tags(self.uri, self.run_id, tags)

    def metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.run_id:
            tracking.log_metrics(self.uri, self.run_id, metrics, step=step)

    def files(self, files: Mapping[str, bytes | str], folder: str) -> None:
        if self.run_id and files:
            tracking.log_artifact_files(self.uri, self.run_id, files, folder)


# ------------------------------------------------------------------------------------ the run


def run(
    cfg: DictConfig, ctx: WorkerContext, run_id: str | None, session: Session | None = None
) -> dict[str, float]:
    """One complete run on this worker; returns the final metrics (identical on every rank).

    ``session`` (default: none) hears of every epoch's end and of the end of the run, and may
    hand the run a checkpoint to resume from (:class:`Session`).
    """
    session = session or Session()
    started = time.perf_counter()
    if cfg.train.batch_size < ctx.world_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must be at least "
            f"the number of workers ({ctx.world_size})"
        )
    seed_everything(cfg.seed)
    tracker = Tracker(cfg.tracking.uri, run_id if ctx.is_main else None, session.reopened)
    data = prepare_data(cfg)
    announce_skipped(data, ctx)
    setup = set_up(cfg, ctx, data)
    log_run(cfg, ctx, data, setup, tracker)
    set_up_at = time.perf_counter()
    trained = optimise(cfg, ctx, setup, tracker, session, data.eval_sets)
    trained_at = time.perf_counter()
    setup.method.eval()
    scores = evaluate_all(cfg, ctx, setup, data.eval_sets)
    ended = time.perf_counter()
    metrics = {
        **summarise(scores, data.eval_sets),
        **trained,
        "trainable_params": float(count_trainable(setup.method)),
        "bad_images_skipped": float(len(data.skipped_images)),
        **(setup.store.stats() if setup.store is not None else {}),
        "time_setup_s": set_up_at - started,
        "time_train_s": trained_at - set_up_at,
        "time_eval_s": ended - trained_at,
        "time_worker_s": ended - started,
    }
    finish(cfg, setup, metrics, tracker, session)
    return metrics


# ------------------------------------------------------------------------------------ phases


def announce_skipped(data: RunData, ctx: WorkerContext) -> None:
    if data.skipped_images and ctx.is_main:
        shown = ", ".join(data.skipped_images[:5]) + (" ..." if len(data.skipped_images) > 5 else "")
        print(f"[vlprompt] skipped {len(data.skipped_images)} unreadable images: {shown}", flush=True)


def set_up(cfg: DictConfig, ctx: WorkerContext, data: RunData) -> Setup:
    """Backbone, method (same initial values on every rank), transforms, batches, cached features."""
    protocol = get_protocol(cfg.data.protocol)
    backbone = load_backbone(
        cfg.model.name,
        cfg.model.pretrained,
        device=ctx.device,
        precision=cfg.model.precision,
        text_chunk_size=cfg.model.text_chunk_size,
        text_checkpoint=cfg.model.text_checkpoint,
    )
    name, typed = method_options(cfg.method)
    caps = capabilities(name)

    def build(tasks: Mapping[str, vds.DatasetSplits]) -> nn.Module:
        classes = {task: list(s.classnames) for task, s in tasks.items()}
        templates = {task: s.template for task, s in tasks.items()}
        return build_method(name, backbone, classes, typed, templates=templates).to(ctx.device)

    method = build(data.tasks)
    broadcast_parameters(trainable_parameters(method), ctx)
    views = caps.test_time_views(typed) if caps.test_time_views and not protocol.trains else None
    transforms = make_transforms(cfg, backbone, fit=fits_full_batch(caps, protocol), views=views)
    workers = cfg.data.loader_workers
    # nothing trained: no training items to index (ImageNet's are 1.28 million)
    train = Source(
        {t: s.train if protocol.trains else () for t, s in data.tasks.items()}, transforms.train, workers
    )
    sources = {}
    if transforms.views is None:
        sources = {es.key: Source({es.task: es.items}, transforms.test, workers) for es in data.eval_sets}
    store = FeatureStore(Path(cfg.data.feature_cache)) if cfg.data.feature_cache else None
    setup = Setup(protocol, backbone, name, caps, method, build, transforms, train, sources, store)
    cache_features(cfg, ctx, setup)
    return setup


def make_transforms(cfg: DictConfig, backbone: Backbone, *, fit: bool, views: Any) -> Transforms:
    """The backbone's own test transform; training crops (or, for a full-batch fit, the test
    transform: CoOp lpclip's ``feat_extractor.py`` sees each image once); test-time views."""
    size, mean, std = backbone.image_size, backbone.image_mean, backbone.image_std
    test = test_transform(size, mean, std)
    train = test if fit else train_transform(size, mean, std, cfg.train.crop_min_scale)
    per_image = AugmentedViews(size, mean, std, views.n_views, augmix=views.augmix) if views else None
    return Transforms(train, test, per_image, views.images_per_step if views else 1)


def cache_features(cfg: DictConfig, ctx: WorkerContext, setup: Setup) -> None:
    """Frozen image towers read features: the test transform's for every evaluation set and a
    fit's train split, augmented views for SGD (``train.view_mode``, ``orchestrator/views.py``);
    shared ones through the feature cache, read lazily (only this rank's rows)."""
    if not setup.caps.frozen_image_tower or setup.per_sample:
        return
    identity = {
        "backbone": backbone_identity(cfg.model.name, cfg.model.pretrained, cfg.seed),
        "precision": cfg.model.precision,
        "device": ctx.device.type,
    }
    d = cfg.data
    encoder = Encoder(
        setup.backbone,
        ctx.device,
        cfg.train.eval_batch_size,
        identity,
        setup.store,
        d.root,
        d.features_planned,
    )
    for source in setup.sources.values():
        source.use_test_features(encoder)
    if setup.fits:
        setup.train.use_test_features(encoder)
        return
    views = train_views(cfg.train, setup.caps, setup.protocol)
    if views is not None:
        setup.train.use_views(encoder, views)


def reported_inputs(setup: Setup) -> dict[str, str]:
    """What a method declaring ``source_stats`` read (it must then implement :class:`ReportsInputs`)."""
    if setup.caps.source_stats is None:
        return {}
    if not isinstance(setup.method, ReportsInputs):
        raise TypeError(f"{setup.method_name} declares source_stats but has no run_inputs()")
    return setup.method.run_inputs()


def log_run(cfg: DictConfig, ctx: WorkerContext, data: RunData, setup: Setup, tracker: Tracker) -> None:
    """The run's parameters: resolved config, split fingerprint, transforms, code version, and
    what the method read beyond its options (``ReportsInputs``)."""
    generated = ", ".join(data.generated)
    inputs = reported_inputs(setup)
    tracker.tags({"data.generated": "true" if data.generated else "false"})
    tracker.params(
        {
            **flatten(cfg),
            "trainable_params": count_trainable(setup.method),
            "split_fingerprint": data.fingerprint,
            "world_size": ctx.world_size,
            "device": str(ctx.device),
            "train_transform": repr(setup.transforms.train),
            "test_transform": repr(setup.transforms.test),
            "test_time_views_transform": repr(setup.transforms.views),
            "tasks": ", ".join(data.tasks),
            "num_tasks": len(data.tasks),
            "num_classes": sum(len(s.classnames) for s in data.tasks.values()),
            "num_train_images": len(setup.train),
            "data.generated": generated or "none",
            **inputs,
            **tracking.code_version(),
        }
    )


def optimise(
    cfg: DictConfig,
    ctx: WorkerContext,
    setup: Setup,
    tracker: Tracker,
    session: Session,
    eval_sets: Sequence[EvalSet],
) -> dict[str, float]:
    """fit | train | nothing, as the method's capabilities and the protocol say."""
    label = f"{setup.method_name} {cfg.data.dataset} seed {cfg.seed}"
    if setup.fits:
        val = {task: setup.sources[f"val/{task}"] for task in setup.train.tasks}
        stats = fit_features(setup.method, setup.train, val, ctx)
        tracker.metrics(stats)
        if ctx.is_main:
            print(
                f"[vlprompt] {label}: fit: {', '.join(f'{k} {v:.4g}' for k, v in stats.items())}", flush=True
            )
        return {}
    if not (setup.caps.learns and setup.protocol.trains):
        return {}

    def on_epoch(epoch: int, stats: dict[str, float]) -> None:
        tracker.metrics(stats, step=epoch)
        if ctx.is_main:
            print(
                f"[vlprompt] {label}: epoch {epoch + 1}/{cfg.train.epochs} "
                f"loss {stats['train_loss']:.4f} lr {stats['lr']:.2e}",
                flush=True,
            )

    def on_epoch_end(epoch: int, optimizer: torch.optim.Optimizer, stats: dict[str, float]) -> None:
        if session.validates(epoch):
            stats = {**stats, **validate(cfg, ctx, setup, eval_sets)}
            tracker.metrics({k: v for k, v in stats.items() if k.startswith("val")}, step=epoch)
        session.epoch_end(epoch, setup.method, optimizer, stats)

    t = cfg.train
    return train_epochs(
        setup.method,
        setup.train,
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        warmup_epochs=t.warmup_epochs,
        warmup_lr=t.warmup_lr,
        seed=cfg.seed,
        ctx=ctx,
        on_epoch=on_epoch,
        on_epoch_end=on_epoch_end,
        resume=session.resume,
        withhold_labels=setup.protocol.transductive,
        hooks=epoch_hooks(setup),
    )


def epoch_hooks(setup: Setup) -> EpochHooks | None:
    """The method, when it declares ``epoch_hooks`` (it must then implement :class:`EpochHooks`)."""
    if not setup.caps.epoch_hooks:
        return None
    if not isinstance(setup.method, EpochHooks):
        raise TypeError(f"{setup.method_name} declares epoch_hooks but has no epoch_end(epoch, epochs)")
    return setup.method


def validate(
    cfg: DictConfig, ctx: WorkerContext, setup: Setup, eval_sets: Sequence[EvalSet]
) -> dict[str, float]:
    """The val split's accuracy now, mid-training (``val_acc``, per task when several): what an
    early-stopping scheduler compares trials on. Never the test split."""
    val = [es for es in eval_sets if es.role == "val"]
    setup.method.eval()
    scores = evaluate_all(cfg, ctx, setup, val)
    setup.method.train()
    by_task = {es.name: scores[es.key] for es in val if es.key in scores}
    if not by_task:
        return {}
    out = {"val_acc": sum(by_task.values()) / len(by_task)}
    if len(by_task) > 1:
        out.update({f"task_val_acc/{task}": acc for task, acc in by_task.items()})
    return out


def evaluate_all(
    cfg: DictConfig, ctx: WorkerContext, setup: Setup, eval_sets: Sequence[EvalSet]
) -> dict[str, float]:
    """Accuracy of every evaluation set (key → %), in order; empty val splits are skipped."""
    scores = {}
    for es in eval_sets:
        if es.role == "val" and not es.items:
            continue
        model = setup.method
        if es.classes is not None:
            what = ROLE_CLASSES.get(es.role, f"dataset {es.name!r}")
            model = transferred(setup.method, setup.build, es.task, es.classes, what, setup.method_name)
        if setup.per_sample:
            scores[es.key] = evaluate_test_time(
                model,
                es.items,
                es.task,
                setup.transforms.views,
                seed=cfg.seed,
                loader_workers=cfg.data.loader_workers,
                ctx=ctx,
                images_per_call=setup.transforms.images_per_call,
            )
        else:
            scores[es.key] = evaluate(model, setup.sources[es.key], cfg.train.eval_batch_size, ctx)
    return scores


def summarise(scores: Mapping[str, float], eval_sets: Sequence[EvalSet]) -> dict[str, float]:
    """The protocol's metrics from the evaluation sets' accuracies.

    ``test_acc`` / ``val_acc``: the mean over tasks (SoftCPT's ``ClassificationMT``), per task
    also ``task_acc/<task>`` / ``task_val_acc/<task>`` when there are several; base-to-novel:
    ``base_acc`` (= ``test_acc``), ``novel_acc``, ``hm``; transfer: ``target_acc/<dataset>`` and
    ``target_acc_mean``.
    """
    by_role: dict[str, dict[str, float]] = {}
    for es in eval_sets:
        if es.key in scores:
            by_role.setdefault(es.role, {})[es.name] = scores[es.key]
    test, val = by_role["test"], by_role.get("val", {})
    metrics = {"test_acc": sum(test.values()) / len(test)}
    several = len(test) > 1
    if several:
        metrics.update({f"task_acc/{task}": acc for task, acc in test.items()})
    if val:
        metrics["val_acc"] = sum(val.values()) / len(val)
        if several:
            metrics.update({f"task_val_acc/{task}": acc for task, acc in val.items()})
    if "novel" in by_role:
        base, novel = metrics["test_acc"], by_role["novel"]["novel"]
        metrics.update(base_acc=base, novel_acc=novel, hm=harmonic_mean(base, novel))
    targets = by_role.get("target", {})
    metrics.update({f"target_acc/{name}": acc for name, acc in targets.items()})
    if targets:
        metrics["target_acc_mean"] = sum(targets.values()) / len(targets)
    return metrics


def finish(
    cfg: DictConfig, setup: Setup, metrics: dict[str, float], tracker: Tracker, session: Session
) -> None:
    """Final metrics and the learned state to MLflow (rank 0) and to the session."""
    learned = {k: v.detach().cpu() for k, v in setup.method.learned_state().items()}
    tracker.metrics(metrics, step=cfg.train.epochs)
    tracker.files(learned_files(learned, setup.backbone, setup.caps.token_space_keys), "learned")
    session.finish(metrics, learned)


def learned_files(
    learned: dict[str, Tensor], backbone: Backbone, token_keys: Sequence[str]
) -> dict[str, bytes | str]:
    """``learned_state.pt`` and, for prompt vectors, ``learned_prompt_words.txt`` (nearest words)."""
    if not learned:
        return {}
    buf = io.BytesIO()
    torch.save(learned, buf)
    files: dict[str, bytes | str] = {"learned_state.pt": buf.getvalue()}
    lines = []
    for key in token_keys:
        vectors = learned[key].reshape(-1, learned[key].shape[-1]).float().to(backbone.device)
        for i, nearest in enumerate(backbone.nearest_words(vectors, k=3)):
            lines.append(f"{key}[{i}]: " + ", ".join(f"{w} ({d:.3f})" for w, d in nearest))
        lines.append(f"{key} as text: " + " ".join(n[0][0] for n in backbone.nearest_words(vectors, k=1)))
    if lines:
        files["learned_prompt_words.txt"] = "\n".join(lines) + "\n"
    return files
