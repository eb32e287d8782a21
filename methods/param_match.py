"""Bias tuning with as many trainable parameters as a prompt configuration (arXiv 2312.11570's
comparison "in the same parameter settings").

Both counts are taken from **built modules** (:func:`count_pair`), never from formulas; the
formulas below only propose a candidate.

Matching rule (a bias vector costs its tower's width, 512 text / 768 vision on ViT-B/16):

1. **One bias vector per prompt vector, at the prompt's (layer, token slot)** where the method
   declares that its parameters are per-layer prompt tokens (the ``prompt_tokens`` capability,
   read from its options):

   * IVLP (``n_ctx_text`` × ``depth_text``, ``n_ctx_vision`` × ``depth_vision``): text biases in
     blocks ``0 .. depth_text-1`` with ``slots = n_ctx_text``, vision biases in blocks
     ``0 .. depth_vision-1`` with ``slots = n_ctx_vision``, after attention. Exact by construction
     (2+2 depth 12 → 30,720 = 30,720 on ViT-B/16).
   * CoOp (shared context of ``n`` tokens, layer 0 only): text biases in block 0, ``slots = n``.

2. **Otherwise** (MaPLe, whose count is mostly its ``Linear`` couplings; class-specific CoOp; any
   other method): a search over per-tower depths (blocks ``0 .. d-1``), one site for both towers
   (``attn`` or ``both``) and per-tower slots (at most the tower's token positions) for the largest
   count ``<= target``; ties prefer more layers, then fewer slots, then ``attn``. If no
   configuration hits the target the closest one below is returned with the difference
   (``Match.difference``): MaPLe n_ctx 2 depth 9 on ViT-B/16 (3,555,072 = 256 · 13,887, odd) is
   256 parameters short, because with ``attn`` alone both towers together hold at most 2,288,640
   and with ``both`` every count is an even multiple of 256.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vlprompt.methods import build_method, capabilities, method_config
from vlprompt.methods.base import count_trainable
from vlprompt.methods.clip import Backbone
from vlprompt.methods.options import BiasTuningConfig

#: Classes the methods are built for when counting (counts do not depend on them, except csc CoOp).
COUNT_TASKS: Mapping[str, Sequence[str]] = {"count": ("cat", "dog")}
TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class Match:
    """A bias-tuning configuration and both trainable-parameter counts, from built modules."""

    config: BiasTuningConfig
    prompt_params: int
    bias_params: int

    @property
    def difference(self) -> int:
        """Prompt minus bias parameters: 0 when exact, > 0 when the closest is below."""
        return self.prompt_params - self.bias_params

    @property
    def exact(self) -> bool:
        return self.difference == 0


def count_pair(
    backbone: Backbone,
    method: str,
    options: Mapping[str, Any],
    bias: BiasTuningConfig,
    tasks: Mapping[str, Sequence[str]] = COUNT_TASKS,
) -> tuple[int, int]:
    """Trainable parameters of the built prompt method and of the built bias-tuning method."""
    prompt = count_trainable(build_method(method, backbone, tasks, dict(options)))
    return prompt, count_trainable(build_method("bias_tuning", backbone, tasks, bias))


def _config(layers: dict[str, int], slots: dict[str, int], site: str) -> BiasTuningConfig:
    towers = [t for t in ("text", "vision") if layers.get(t)]
    tower = "both" if len(towers) == 2 else towers[0]
    return BiasTuningConfig(
        tower=tower,
        layers={t: layers[t] for t in towers},
        slots={t: slots[t] for t in towers},
        site=site,
        template=TEMPLATE,
    )


def _structured(
    backbone: Backbone, method: str, options: Mapping[str, Any], target: int
) -> BiasTuningConfig | None:
    """Rule 1: one bias per prompt vector at the prompt's (layer, slot), for methods that declare
    where their prompt tokens sit (the ``prompt_tokens`` capability)."""
    where = capabilities(method).prompt_tokens
    layout = where(method_config(method, options)) if where else None
    if layout is None:
        return None
    layers: dict[str, int] = {}
    slots: dict[str, int] = {}
    for tower, (depth, tokens) in layout.towers.items():
        blocks = backbone.text_layers if tower == "text" else backbone.vision_layers
        width = backbone.text_width if tower == "text" else backbone.vision_width
        if tokens is None:  # one block of as many tokens as the parameters make (CoOp's context)
            tokens, rest = divmod(target, width)
            if rest or not 1 <= tokens <= backbone.token_positions(tower):
                return None
        layers[tower], slots[tower] = min(depth, blocks), tokens
    return _config(layers, slots, "attn")


def _search(backbone: Backbone, target: int) -> BiasTuningConfig:
    """Rule 2: the largest count <= target over depths, one site and per-tower slots."""
    width = {"text": backbone.text_width, "vision": backbone.vision_width}
    blocks = {"text": backbone.text_layers, "vision": backbone.vision_layers}
    positions = {t: backbone.token_positions(t) for t in width}
    best: tuple[tuple[int, ...], BiasTuningConfig] | None = None
    for n_sites, site in ((1, "attn"), (2, "both")):
        for depth_t in range(blocks["text"] + 1):
            for slots_t in range(1, positions["text"] + 1) if depth_t else (0,):
                text = depth_t * n_sites * slots_t * width["text"]
                if text > target:
                    break
                for depth_v in range(blocks["vision"] + 1):
                    unit = depth_v * n_sites * width["vision"]
                    slots_v = min((target - text) // unit, positions["vision"]) if unit else 0
                    if (depth_v and slots_v < 1) or not (depth_t or depth_v):
                        continue
                    total = text + unit * slots_v
                    key = (total, depth_t + depth_v, -(slots_t + slots_v), -n_sites)
                    if best is None or key > best[0]:
                        cfg = _config(
                            {"text": depth_t, "vision": depth_v}, {"text": slots_t, "vision": slots_v}, site
                        )
                        best = (key, cfg)
    if best is None:
        raise ValueError(f"no bias-tuning configuration has at most {target} parameters on {backbone.name}")
    return best[1]


def match_bias_tuning(
    backbone: Backbone,
    method: str,
    options: Mapping[str, Any],
    tasks: Mapping[str, Sequence[str]] = COUNT_TASKS,
) -> Match:
    """The bias-tuning configuration matching ``method`` (``ivlp``, ``maple``, ``coop``, ...) built
    with ``options`` on ``backbone``: exactly as many trainable parameters, or the closest below."""
    target = count_trainable(build_method(method, backbone, tasks, dict(options)))
    if target < min(backbone.text_width, backbone.vision_width):
        raise ValueError(f"{method} has {target} trainable parameters, fewer than one bias vector")
    cfg = _structured(backbone, method, options, target) or _search(backbone, target)
    prompt, bias = count_pair(backbone, method, options, cfg, tasks)
    if bias > prompt:  # the structured rule can only be exact; a search result is never above
        raise AssertionError(f"bias tuning {cfg} has {bias} > {prompt} parameters")
    return Match(cfg, prompt, bias)
