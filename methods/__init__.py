"""Prompt-learning methods on a frozen open_clip backbone: the registry, and what each method can do.

One explicit dict, one entry per method: its options class (``methods/options.py``), the module
whose ``build(backbone, tasks, options)`` makes it, and its :class:`Capabilities`. Nothing is
registered by import side effects (CoOp issue #38), and this module imports neither torch nor the
method modules: a config is validated against the registry before anything heavy is imported,
and :func:`build_method` imports a method's module only to build it.

Whoever needs to know what a method can do -- the loop (cached features? a full-batch fit? test-
time views?), config validation (does it run under this protocol?), composite methods (can it be
PromptKD's teacher?) -- reads its capabilities here, never its name or its attributes.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlprompt.methods import options as opt

if TYPE_CHECKING:
    from torch import nn

    from vlprompt.methods.clip import Backbone


@dataclass(frozen=True)
class Capabilities:
    """What a method can do, declared once (the loop and the checks read these, not the method)."""

    learns: bool = True
    """The loop optimises its parameters before evaluation (SGD epochs, or ``fit``). False: nothing
    is learned (zero-shot), or only per test sample (TPT)."""
    frozen_image_tower: bool = True
    """The image tower is untouched, so ``Batch.features`` (cached image embeddings) are exact inputs."""
    fits_features: bool = False
    """Implements ``FitsFeatures.fit(train, val)`` on whole cached splits; the loop calls it instead
    of SGD epochs. Needs ``frozen_image_tower``."""
    text_classifier: bool = False
    """Implements ``TextClassifier.text_features(task)``: a classifier fixed once trained (so the
    method can be PromptKD's teacher)."""
    test_time_views: Callable[[Any], opt.TestTimeViews] | None = None
    """Adapts to each test image on augmented views of it (``Batch.views``): given the method's
    options, which views. Such a method runs only where the protocol trains nothing."""
    prompt_tokens: Callable[[Any], opt.PromptTokens | None] | None = None
    """Given the options, where the method's prompt vectors sit when its parameters are exactly
    per-layer prompt tokens (``param_match`` places one bias per prompt vector there)."""
    block_prompts: Callable[[Any], opt.PromptTokens] | None = None
    """Given the options, where the prompt tokens sit that the method puts into the towers'
    blocks, whatever its parameters are (MaPLe's visual prompts are projections): text prompts at
    positions 1 .. n, visual prompts the n tokens appended after the image's. Read by the prompt
    analysis (``methods/attention.py``, ``experiments/analyse_prompts.py``); None: no prompts in
    the blocks to analyse."""
    unlabelled: bool = False
    """Learns without labels (``training_loss`` ignores ``Batch.labels``): may run under a
    transductive protocol, which trains on unlabelled images of every class."""
    token_space_keys: tuple[str, ...] = ()
    """Keys of ``learned_state()`` whose rows live in the token-embedding space, decoded to their
    nearest words in the run's record."""
    epoch_hooks: bool = False
    """Implements ``EpochHooks.epoch_end(epoch, epochs)``: the loop calls it after every SGD epoch
    (PromptSRC's Gaussian prompt aggregation)."""
    check_epochs: Callable[[Any, int], None] | None = None
    """Given the options and ``train.epochs``: ``ValueError`` when they cannot work together (the
    config checks call it before anything starts)."""
    source_stats: Callable[[Any], opt.SourceStatsSpec] | None = None
    """Aligns to offline statistics of a proxy source dataset (``methods/source_stats.py``): given
    the options, which file it reads and how that file must have been made. The checks read it
    before a run starts; ``experiments/source_stats.py`` makes the file."""


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry."""

    options: type
    """The options dataclass (``methods/options.py``): the method's ``method.*`` keys."""
    module: str
    """The module under ``vlprompt.methods`` with ``build(backbone, tasks, options) -> nn.Module``."""
    capabilities: Capabilities
    summary: str


METHODS: dict[str, MethodSpec] = {
    "zeroshot": MethodSpec(
        opt.ZeroShotConfig,
        "zeroshot",
        Capabilities(learns=False, text_classifier=True),
        "zero-shot CLIP with a hand-crafted template (no training)",
    ),
    "linear_probe": MethodSpec(
        opt.LinearProbeConfig,
        "linear_probe",
        Capabilities(fits_features=True),
        "Linear probe: logistic regression on CLIP image features",
    ),
    "coop": MethodSpec(
        opt.CoOpConfig,
        "coop",
        Capabilities(
            text_classifier=True, prompt_tokens=opt.CoOpConfig.prompt_tokens, token_space_keys=("ctx",)
        ),
        "CoOp: learnable context vectors in the text prompt",
    ),
    "cocoop": MethodSpec(
        opt.CoCoOpConfig,
        "cocoop",
        Capabilities(token_space_keys=("ctx",)),  # its text features depend on each image
        "CoCoOp: CoOp context shifted per image",
    ),
    "kgcoop": MethodSpec(
        opt.KgCoOpConfig,
        "kgcoop",
        Capabilities(text_classifier=True, token_space_keys=("ctx",)),
        "KgCoOp: CoOp kept near hand-crafted prompts",
    ),
    "ivlp": MethodSpec(
        opt.IVLPConfig,
        "ivlp",
        Capabilities(
            frozen_image_tower=False,
            text_classifier=True,
            prompt_tokens=opt.IVLPConfig.prompt_tokens,
            block_prompts=opt.IVLPConfig.prompt_tokens,
            token_space_keys=("ctx",),
        ),
        "IVLP: independent deep prompts in both towers",
    ),
    "promptsrc": MethodSpec(
        opt.PromptSRCConfig,
        "promptsrc",
        Capabilities(
            frozen_image_tower=False,
            text_classifier=True,
            prompt_tokens=opt.PromptSRCConfig.prompt_tokens,
            block_prompts=opt.PromptSRCConfig.prompt_tokens,
            token_space_keys=("ctx",),
            epoch_hooks=True,
            check_epochs=opt.PromptSRCConfig.check_epochs,
        ),
        "PromptSRC: IVLP prompts kept near frozen CLIP, Gaussian-aggregated over epochs",
    ),
    "maple": MethodSpec(
        opt.MaPLeConfig,
        "maple",
        Capabilities(
            frozen_image_tower=False,
            text_classifier=True,
            block_prompts=opt.MaPLeConfig.block_prompts,
            token_space_keys=("ctx",),
        ),
        "MaPLe: deep text prompts coupled to vision prompts",
    ),
    "bias_tuning": MethodSpec(
        opt.BiasTuningConfig,
        "bias_tuning",
        Capabilities(frozen_image_tower=False, text_classifier=True),
        "Bias tuning: learnable biases inside the blocks",
    ),
    "softcpt": MethodSpec(
        opt.SoftCPTConfig,
        "softcpt",
        Capabilities(text_classifier=True, token_space_keys=("task_ctx",)),
        "SoftCPT: per-task CoOp context generated from the task name",
    ),
    "promptkd": MethodSpec(
        opt.PromptKDConfig,
        "promptkd",
        # a student without a text encoder
        Capabilities(
            frozen_image_tower=False, unlabelled=True, block_prompts=opt.PromptKDConfig.block_prompts
        ),
        "PromptKD: visual prompts distilled from a frozen teacher",
    ),
    "tpt": MethodSpec(
        opt.TPTConfig,
        "tpt",
        Capabilities(learns=False, test_time_views=opt.TPTConfig.test_time_views, token_space_keys=("ctx",)),
        "TPT: CoOp context tuned on each test image's augmented views",
    ),
    "promptalign": MethodSpec(
        opt.PromptAlignConfig,
        "promptalign",
        Capabilities(
            learns=False,
            frozen_image_tower=False,
            test_time_views=opt.PromptAlignConfig.test_time_views,
            token_space_keys=("ctx",),
            source_stats=opt.PromptAlignConfig.source_statistics,
        ),
        "PromptAlign: MaPLe prompts tuned per test image, its token statistics aligned to a source's",
    ),
    "promptsync": MethodSpec(
        opt.PromptSyncConfig,
        "promptsync",
        Capabilities(
            learns=False,
            frozen_image_tower=False,
            test_time_views=opt.PromptSyncConfig.test_time_views,
            token_space_keys=("ctx",),
            source_stats=opt.PromptSyncConfig.source_statistics,
        ),
        "PromptSync: PromptAlign with class-aware prototype alignment and prototype discrimination",
    ),
}


def _did_you_mean(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get_method(name: str) -> MethodSpec:
    """The registry entry for ``name``; ``ValueError`` with the known names otherwise."""
    if name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise ValueError(
            f"unknown method {name!r}{_did_you_mean(str(name), list(METHODS))}; known methods: {known}"
        )
    return METHODS[name]


def capabilities(name: str) -> Capabilities:
    return get_method(name).capabilities


def method_option_names(name: str) -> tuple[str, ...]:
    """The option keys method ``name`` accepts (its options dataclass's fields)."""
    return tuple(f.name for f in dataclasses.fields(get_method(name).options))


def methods_with(capability: str) -> tuple[str, ...]:
    """The registered methods that declare ``capability`` (a :class:`Capabilities` field), sorted."""
    return tuple(sorted(n for n, spec in METHODS.items() if getattr(spec.capabilities, capability)))


def check_option_names(name: str, keys: Iterable[str]) -> None:
    """``ValueError`` naming the first key that is not an option of method ``name``, with a did-you-mean."""
    valid = method_option_names(name)
    for key in keys:
        if key not in valid:
            raise ValueError(
                f"unknown option {key!r} for method {name!r}{_did_you_mean(str(key), valid)}; "
                f"valid options: {', '.join(valid)}"
            )


def method_config(name: str, options: Mapping[str, Any]) -> Any:
    """Method ``name``'s options dataclass from plain options; ``ValueError`` naming a bad key or value.

    Needs no backbone, so a whole experiment config can be validated before anything starts. Fields
    that name another method (``method_with``) or hold its options (``options_of``) are checked
    against that method's registry entry.
    """
    check_option_names(name, options)
    cfg = get_method(name).options(**options)
    for f in dataclasses.fields(cfg):
        _check_reference(name, cfg, f)
    return cfg


def _check_reference(name: str, cfg: Any, f: dataclasses.Field) -> None:
    needs = f.metadata.get("method_with")
    if needs:
        other = getattr(cfg, f.name)
        get_method(other)
        if not getattr(capabilities(other), needs):
            raise ValueError(
                f"{name} {f.name} {other!r} is not supported: it needs a method with {needs} "
                f"({', '.join(methods_with(needs))})"
            )
    of = f.metadata.get("options_of")
    if of:
        other = getattr(cfg, of)
        try:
            method_config(other, getattr(cfg, f.name))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} {f.name} ({other}): {err}") from err


def fill_templates(cfg: Any, templates: Mapping[str, str] | None) -> Any:
    """``cfg`` with its ``fill="templates"`` fields set to ``templates`` where the user left them empty."""
    if not templates:
        return cfg
    empty = {
        f.name: dict(templates)
        for f in dataclasses.fields(cfg)
        if f.metadata.get("fill") == "templates" and not getattr(cfg, f.name)
    }
    return dataclasses.replace(cfg, **empty) if empty else cfg


def build_method(
    name: str,
    backbone: Backbone,
    tasks: Mapping[str, Sequence[str]],
    options: Mapping[str, Any] | Any,
    *,
    templates: Mapping[str, str] | None = None,
) -> nn.Module:
    """Build method ``name`` for ``tasks`` (task → class names) from its options.

    ``options`` is the options dataclass or plain options (checked by :func:`method_config`).
    ``templates`` (task → the dataset's hand-crafted template, ``"a photo of a {}."``) is context
    the orchestrator knows: it fills the options' ``fill="templates"`` fields left empty.
    """
    spec = get_method(name)
    cfg = options if isinstance(options, spec.options) else method_config(name, options)
    module = importlib.import_module(f"vlprompt.methods.{spec.module}")
    return module.build(backbone, tasks, fill_templates(cfg, templates))
