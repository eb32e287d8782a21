"""Prompt-learning methods on a frozen open_clip backbone, behind one interface (``base.py``).

The registry is an explicit dict -- one line per method, nothing registered by import side
effects (CoOp issue #38). The orchestrator validates a config's ``method`` section with
:func:`method_config` and builds the method with :func:`build_method`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from vlprompt.methods import (
    bias_tuning,
    cocoop,
    coop,
    ivlp,
    kgcoop,
    linear_probe,
    maple,
    promptkd,
    softcpt,
    tpt,
    zeroshot,
)
from vlprompt.methods.base import MethodSpec
from vlprompt.methods.clip import Backbone

METHODS: dict[str, MethodSpec] = {
    "zeroshot": MethodSpec(
        zeroshot.ZeroShotConfig, zeroshot.build, "zero-shot CLIP with a hand-crafted template (no training)"
    ),
    "coop": MethodSpec(coop.CoOpConfig, coop.build, "CoOp: learnable context vectors in the text prompt"),
    "cocoop": MethodSpec(cocoop.CoCoOpConfig, cocoop.build, "CoCoOp: CoOp context shifted per image"),
    "kgcoop": MethodSpec(kgcoop.KgCoOpConfig, kgcoop.build, "KgCoOp: CoOp kept near hand-crafted prompts"),
    "linear_probe": MethodSpec(
        linear_probe.LinearProbeConfig,
        linear_probe.build,
        "Linear probe: logistic regression on CLIP image features",
    ),
    "ivlp": MethodSpec(ivlp.IVLPConfig, ivlp.build, "IVLP: independent deep prompts in both towers"),
    "maple": MethodSpec(maple.MaPLeConfig, maple.build, "MaPLe: deep text prompts coupled to vision prompts"),
    "bias_tuning": MethodSpec(
        bias_tuning.BiasTuningConfig, bias_tuning.build, "Bias tuning: learnable biases inside the blocks"
    ),
    "softcpt": MethodSpec(
        softcpt.SoftCPTConfig, softcpt.build, "SoftCPT: per-task CoOp context generated from the task name"
    ),
    "promptkd": MethodSpec(
        promptkd.PromptKDConfig, promptkd.build, "PromptKD: visual prompts distilled from a frozen teacher"
    ),
    "tpt": MethodSpec(
        tpt.TPTConfig, tpt.build, "TPT: CoOp context tuned on each test image's augmented views"
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
            f"unknown method {name!r}{_did_you_mean(name, list(METHODS))}; known methods: {known}"
        )
    return METHODS[name]


def method_option_names(name: str) -> tuple[str, ...]:
    """The option keys method ``name`` accepts (its config dataclass's fields)."""
    return tuple(f.name for f in dataclasses.fields(get_method(name).config))


def method_config(name: str, options: Mapping[str, Any]) -> Any:
    """Method ``name``'s config dataclass from plain options; ``ValueError`` naming an unknown key.

    Needs no backbone, so a whole experiment config can be validated before anything starts.
    """
    valid = method_option_names(name)
    for key in options:
        if key not in valid:
            raise ValueError(
                f"unknown option {key!r} for method {name!r}{_did_you_mean(str(key), valid)}; "
                f"valid options: {', '.join(valid)}"
            )
    return get_method(name).config(**options)


def build_method(
    name: str,
    backbone: Backbone,
    tasks: Mapping[str, Sequence[str]],
    options: Mapping[str, Any],
    *,
    templates: Mapping[str, str] | None = None,
) -> nn.Module:
    """Build method ``name`` for ``tasks`` (task → class names) from plain options.

    ``templates`` (task → the dataset's hand-crafted template, ``"a photo of a {}."``) is
    context the orchestrator knows and the method config may want: it fills the config's
    ``templates`` field when the method has one and the options did not set it; methods
    without that field ignore it.
    """
    cfg = method_config(name, options)
    if templates is not None and "templates" in method_option_names(name) and not options.get("templates"):
        cfg = dataclasses.replace(cfg, templates=dict(templates))
    return get_method(name).build(backbone, tasks, cfg)
