"""Make the offline source statistics a method aligns to: the command ``experiments/source_stats.py``.

    python experiments/source_stats.py --config promptalign data.root=/data method.init_state=...
    python experiments/source_stats.py --config promptsync ... method.source_folder=/data/proxy --ray

It reads the *run's own* config -- the same preset and overrides -- so the statistics are made by
exactly the model the run starts from: ``model.*`` (architecture, weights, precision), the
method's options (its prompts, ``init_state``, the aligned blocks) and ``seed`` (a random-init
backbone or prompts are drawn from it in the same order as in the run). The method must declare
the ``source_stats`` capability (``methods/__init__.py``), whose spec names the proxy source:

* a catalog dataset -- for PromptAlign ``method.source_dataset`` / ``source_split`` /
  ``source_images_per_class``, default ImageNet's train split, every image -- read from
  ``data.root`` like any catalog dataset (generated where ``data.generate_missing`` /
  ``generate_stand_ins`` allow);
* or a folder of images labelled by class name, ``method.source_folder=/path``
  (``<folder>/<class name>/<image>``; ``datasets/classfolders.py`` says how a folder's name
  becomes a class name), e.g. images retrieved per class name for targets ImageNet lacks.

Either is checked before torch is imported (a missing or empty folder is a config error naming
the key), and recorded in the file, whose run then refuses a file made from another source.
The images are seen under the backbone's test transform (Resize + CenterCrop,
``datasets.images.test_transform``), in batches of ``data.encode_batch_size`` (else
``train.eval_batch_size``).

Where: ``--no-ray`` (the default without ``RAY_ADDRESS``) streams them through the model in this
process on ``train.device`` -- the path a Train worker would take, and the quickest for a few
thousand images. ``--ray`` (the default when ``RAY_ADDRESS`` names a cluster) runs the same
per-batch sums as a Ray Data job (``orchestrator/stats_pipeline.py``: CPU decoding tasks, an actor
pool that builds the model once per actor, partial sums added up here), on the cluster
``RAY_ADDRESS`` names or a local Ray started and stopped for it; the two files are equal (tested).
A flag, not a config key: where the sums are computed changes nothing in the file, and the
config is the run's (``data.pipeline`` is the sweep's feature cache, another question).

The file goes to ``method.<option>`` when the config names one, else to the cache path
``<out_dir>/<fingerprint>-<dataset>-<split>[-<n>pc].safetensors`` (a folder:
``<fingerprint>-folder-<name>-<path digest>[-<n>pc]``) keyed by the model's fingerprint
(``methods/stats_file.py``). A file already there that this model and source made is kept
(``--force`` recomputes); one made by another model is refused unless ``--force``. The last line
printed is the override the run needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vlprompt import datasets as vds
from vlprompt.methods import METHODS, capabilities, stats_file
from vlprompt.methods.options import SourceStatsSpec
from vlprompt.orchestrator.config import ConfigError, method_options

DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class Job:
    """What to make, checked without torch: the method, its spec and the proxy images."""

    method: str
    options: Any
    spec: SourceStatsSpec
    splits: vds.DatasetSplits
    items: tuple[vds.Datum, ...]


def plan(cfg: DictConfig) -> Job:
    """The method's statistics spec and the proxy split's items; ``ConfigError`` otherwise."""
    name, typed = method_options(cfg.method)
    wanted = capabilities(name).source_stats
    if wanted is None:
        makers = sorted(m for m, spec in METHODS.items() if spec.capabilities.source_stats)
        raise ConfigError(
            f"method.name={name} aligns to no source statistics; methods that do: {', '.join(makers)}"
        )
    spec = wanted(typed)
    splits = read_source(cfg, spec)
    items = splits.train if spec.folder else getattr(splits, spec.split)
    if spec.images_per_class:
        items = first_per_class(items, spec.images_per_class)
    if not items:
        raise ConfigError(f"{spec.dataset} has no images in its {spec.split} split under {cfg.data.root}")
    return Job(name, typed, spec, splits, tuple(items))


def read_source(cfg: DictConfig, spec: SourceStatsSpec) -> vds.DatasetSplits:
    """The proxy source: the folder ``method.source_folder`` names, else the catalog dataset from
    ``data.root``, generated first where the data options allow."""
    if spec.folder:
        try:
            return vds.read_class_folders(spec.folder)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"method.source_folder={spec.folder}: {err}") from None
    root = Path(cfg.data.root)
    try:
        entry = vds.get_entry(spec.dataset)
        allowed = cfg.data.generate_stand_ins or (cfg.data.generate_missing and entry.procedural)
        if allowed and not (root / entry.folder).exists():
            vds.generate_dataset(spec.dataset, root, seed=0)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={root} does not exist")
        return vds.load_dataset(spec.dataset, root, make_missing_split=cfg.data.make_missing_splits)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(
            f"source dataset {spec.dataset!r} (method.source_dataset): {err} (check it with "
            f"`python -m vlprompt.datasets doctor --root {root}`)"
        ) from None


def first_per_class(items: Sequence[vds.Datum], n: int) -> list[vds.Datum]:
    """At most ``n`` items of each label, the first in the split's order."""
    seen: dict[int, int] = {}
    kept = []
    for item in items:
        if seen.get(item.label, 0) < n:
            seen[item.label] = seen.get(item.label, 0) + 1
            kept.append(item)
    return kept


def cache_name(fingerprint: str, spec: SourceStatsSpec) -> str:
    """``<fingerprint[:16]>-<dataset>-<split>[-<n>pc].safetensors``: one file per model and source
    (a folder: ``-folder-<its name>-<digest of its path>``, two folders of one name apart)."""
    cap = f"-{spec.images_per_class}pc" if spec.images_per_class else ""
    if spec.folder:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(spec.folder.rstrip("/"))) or "root"
        where = hashlib.sha256(spec.folder.encode()).hexdigest()[:8]
        return f"{fingerprint[:16]}-folder-{name}-{where}{cap}.safetensors"
    return f"{fingerprint[:16]}-{spec.dataset}-{spec.split}{cap}.safetensors"


def device_of(cfg: DictConfig) -> str:
    """``train.device``; auto: the GPU when there is one."""
    import torch

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda, but this machine has no GPU")
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def make(
    cfg: DictConfig,
    job: Job,
    out_dir: Path,
    *,
    force: bool = False,
    dtype: str = "float32",
    say: Callable[[str], None] = print,
    use_ray: bool = False,
) -> Path:
    """Build the model as the run builds it, stream the proxy images through it, write the file.

    ``use_ray``: the per-batch sums on a Ray Data actor pool (``stats_pipeline``); the model
    built here (on the CPU) then only gives the fingerprint the actors' models must have."""
    import torch

    from vlprompt.methods import source_stats

    recipe = model_recipe(cfg, job)
    model = build_model(recipe, "cpu" if use_ray else device_of(cfg))
    extra = {"transform_repr": repr(_transform(model.backbone)), "config": cfg.name, "dtype": dtype}
    parts = model.stats_fingerprint()
    digest = stats_file.fingerprint_digest(parts)
    out = Path(job.spec.file) if job.spec.file else out_dir / cache_name(digest, job.spec)
    source = job.spec.source()
    if out.exists() and not force and _up_to_date(out, parts, source, say):
        return out
    tick = _progress(len(job.items), say)
    n_classes = len(job.splits.classnames)
    if use_ray:
        from vlprompt.orchestrator import stats_pipeline

        preprocess = stats_pipeline.Preprocess.of(model.backbone)
        del model  # the actors build their own
        acc = stats_pipeline.accumulate(cfg, job, recipe, preprocess, digest, tick, say)
    else:
        acc = source_stats.accumulate(
            model, _batches(cfg, job, model.backbone), n_classes, job.spec.blocks, tick
        )
    tensors, kept = acc.tensors(getattr(torch, dtype))
    classes = [job.splits.classnames[i] for i in kept.tolist()]
    if len(classes) < n_classes:
        say(f"[vlprompt] {n_classes - len(classes)} classes of {job.spec.label()} have no image: no rows")
    source_stats.save_stats(out, tensors, classes, parts, source, extra)
    say(f"[vlprompt] wrote {out}: {len(job.items)} images, {len(classes)} classes, fingerprint {digest[:16]}")
    return out


def _up_to_date(out: Path, parts: dict, source: dict, say: Callable[[str], None]) -> bool:
    """Whether ``out`` is this model's file for this source (kept); refuses a foreign one."""
    from vlprompt.methods.source_stats import load_stats

    try:
        load_stats(out, parts, source=source)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(
            f"{out} exists and is not this configuration's ({err}); use --force to replace it"
        ) from None
    say(f"[vlprompt] {out} is up to date (this model, this source): not recomputed (--force recomputes)")
    return True


@dataclass(frozen=True)
class ModelRecipe:
    """Everything :func:`build_model` reads, picklable: an encoder actor builds the same model."""

    seed: int
    model: dict[str, Any]
    """``load_backbone``'s arguments but the device (``model.*`` of the run)."""
    method: str
    options: Any
    """The method's options, without the statistics file it would read (the file is being made)."""
    task: str
    classnames: tuple[str, ...]
    template: str


def model_recipe(cfg: DictConfig, job: Job) -> ModelRecipe:
    """The run's model as ``loop.set_up`` makes it, for the proxy's classes."""
    m = cfg.model
    return ModelRecipe(
        seed=int(cfg.seed),
        model={
            "model_name": m.name,
            "pretrained": m.pretrained,
            "precision": m.precision,
            "text_chunk_size": m.text_chunk_size,
            "text_checkpoint": m.text_checkpoint,
        },
        method=job.method,
        options=dataclasses.replace(job.options, **{job.spec.option: ""}),
        task=job.splits.name,
        classnames=tuple(job.splits.classnames),
        template=job.splits.template,
    )


def build_model(recipe: ModelRecipe, device: str) -> Any:
    """The backbone and method exactly as ``loop.set_up`` makes them, without the file it would read."""
    from vlprompt.methods import build_method
    from vlprompt.methods.clip import load_backbone
    from vlprompt.methods.source_stats import ObservesBlocks
    from vlprompt.orchestrator.worker import seed_everything

    seed_everything(recipe.seed)
    backbone = load_backbone(**recipe.model, device=device)
    model = build_method(
        recipe.method,
        backbone,
        {recipe.task: list(recipe.classnames)},
        recipe.options,
        templates={recipe.task: recipe.template},
    )
    if not isinstance(model, ObservesBlocks):
        raise TypeError(f"{recipe.method} declares source_stats but cannot observe its image blocks")
    return model.eval()


def _transform(backbone: Any) -> Any:
    from vlprompt.datasets.images import test_transform

    return test_transform(backbone.image_size, backbone.image_mean, backbone.image_std)


def _batches(cfg: DictConfig, job: Job, backbone: Any) -> Iterator[tuple[Any, Any]]:
    import torch

    from vlprompt.datasets.images import ImageDataset

    size = cfg.data.encode_batch_size or cfg.train.eval_batch_size
    dataset = ImageDataset(job.items, _transform(backbone))
    loader = torch.utils.data.DataLoader(dataset, batch_size=size, num_workers=cfg.data.loader_workers)
    for images, labels in loader:
        yield images.to(backbone.device), labels.to(backbone.device)


def _progress(total: int, say: Callable[[str], None]) -> Callable[[int], None]:
    """A progress line about every twentieth of the images, with the rate."""
    started = time.perf_counter()
    every = max(1, total // 20)
    last = [0]

    def tick(done: int) -> None:
        if done - last[0] >= every or done == total:
            last[0] = done
            rate = done / max(time.perf_counter() - started, 1e-9)
            eta = (total - done) / max(rate, 1e-9)
            say(f"[vlprompt] source statistics: {done}/{total} images ({rate:.1f}/s, ~{eta:.0f} s left)")

    return tick


def _arguments(argv: Sequence[str] | None) -> Any:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's preset name or YAML path")
    parser.add_argument("--out-dir", default="source_stats", help="cache folder (default: source_stats)")
    parser.add_argument("--force", action="store_true", help="recompute even if an up-to-date file exists")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="storage precision")
    parser.add_argument(
        "--ray",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sum the images' statistics as a Ray Data job (decoding tasks, an encoder actor pool) on "
        "$RAY_ADDRESS's cluster or a local Ray; --no-ray: in this process. Default: --ray when "
        "RAY_ADDRESS is set. The file is the same either way",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for the run")
    args = parser.parse_args(argv)
    if args.ray is None:
        args.ray = bool(os.environ.get("RAY_ADDRESS"))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``experiments/source_stats.py``'s body; exit status 2 for a bad config, 1 for an image
    that cannot be read (either names the key or the file)."""
    from vlprompt.orchestrator.config import load_config, resolve_paths
    from vlprompt.orchestrator.stats_pipeline import StatsPipelineError

    args = _arguments(argv)
    try:
        cfg = resolve_paths(load_config(args.config, args.overrides))
        job = plan(cfg)
        out_dir = Path(args.out_dir).resolve()
        out = make(cfg, job, out_dir, force=args.force, dtype=args.dtype, use_ray=args.ray)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (StatsPipelineError, OSError) as err:  # an unreadable image, here or in a Ray worker
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"method.{job.spec.option}={out}")
    return 0
