"""Every method's options: one typed dataclass per method, the ``method.*`` section of a config.

Kept out of the method files on purpose: this module imports neither torch nor open_clip, so the
experiment driver can check a whole config -- the method's options, the protocol it runs under,
the files it names -- before Ray, torch or a dataset is touched. Each method file imports its
options class from here (``coop.CoOpConfig`` is :class:`CoOpConfig`). peft splits a tuner the same
way (``tuners/prompt_tuning/config.py`` beside ``model.py``).

A field says what it accepts in two places: its type annotation (checked by
:func:`check_fields`, and by OmegaConf when a config is merged) and its metadata, made with
:func:`option`:

* ``at_least`` / ``above`` / ``at_most``: bounds of a number; ``choices``: the allowed values;
* ``path``: ``"file"`` -- a file the method reads, made absolute before Ray changes the working
  directory; ``"weights"`` -- a checkpoint path or an open_clip tag (``methods/pretrained.py``);
* ``fill="templates"``: filled with each task's hand-crafted template by whoever builds the
  method (``build_method(..., templates=...)``) when the user left it empty;
* ``method_with``: the name of another registered method, which must declare that capability
  (PromptKD's teacher needs a ``text_classifier``); ``options_of``: that method's options, checked
  as its own; ``model_name``: an open_clip architecture name (checked against the model configs);
  ``dataset_name``: a dataset of the catalog (checked by the orchestrator, which may read it).

``__post_init__`` calls :func:`check_fields` and then keeps only the rules that tie fields
together (IVLP's visual prompts on or off in both counts, TPT's selection keeping an image).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar

# ---------------------------------------------------------------- field declarations and checks


def option(
    default: Any = MISSING,
    *,
    factory: Any = MISSING,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    choices: Sequence[Any] | None = None,
    path: str | None = None,
    fill: str | None = None,
    method_with: str | None = None,
    options_of: str | None = None,
    model_name: bool = False,
    dataset_name: bool = False,
) -> Any:
    """A dataclass field with the value rules this module's docstring lists."""
    rules = {
        "at_least": at_least,
        "above": above,
        "at_most": at_most,
        "choices": tuple(choices) if choices is not None else None,
        "path": path,
        "fill": fill,
        "method_with": method_with,
        "options_of": options_of,
        "model_name": model_name or None,
        "dataset_name": dataset_name or None,
    }
    metadata = {k: v for k, v in rules.items() if v is not None}
    return field(default=default, default_factory=factory, metadata=metadata)


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` has the type ``annotation`` names (the shapes options use)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list | tuple) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(annotation)
        return isinstance(value, Mapping) and all(
            _matches(k, key) and _matches(v, item) for k, v in value.items()
        )
    return isinstance(value, annotation)


def _type_words(annotation: Any) -> str:
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if annotation in words:
        return words[annotation]
    return str(annotation).replace("typing.", "")


def _bounds_error(value: Any, rules: Mapping[str, Any]) -> str | None:
    if "at_least" in rules and value < rules["at_least"]:
        return f">= {rules['at_least']}"
    if "above" in rules and not value > rules["above"]:
        return f"> {rules['above']}"
    if "at_most" in rules and value > rules["at_most"]:
        return f"<= {rules['at_most']}"
    return None


def check_fields(options: Any, method: str) -> None:
    """Check every field of ``options`` against its type and its :func:`option` rules.

    Numbers given as integers for ``float`` fields become floats; lists become lists. Raises
    ``ValueError`` naming ``method``, the field and what it accepts.
    """
    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        value, rules, annotation = getattr(options, f.name), f.metadata, hints[f.name]
        where = f"{method} {f.name}"
        if not _matches(value, annotation):
            raise ValueError(f"{where} must be {_type_words(annotation)}, got {value!r}")
        if annotation is float or (isinstance(value, int | float) and not isinstance(value, bool)):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{where} must be a finite number, got {value!r}")
            bound = _bounds_error(value, rules)
            if bound:
                raise ValueError(f"{where} must be {_type_words(annotation)} {bound}, got {value!r}")
        if annotation is float and isinstance(value, int):
            setattr(options, f.name, float(value))
        if "choices" in rules and value not in rules["choices"]:
            raise ValueError(f"{where} must be one of {rules['choices']}, got {value!r}")


def check_templates(method: str, template: str | None, templates: Mapping[str, str]) -> None:
    """A ``template`` / ``templates`` option: strings with exactly one ``{}`` for the class name."""
    named = {"template": template} if template is not None else {}
    named.update({f"templates[{task!r}]": value for task, value in templates.items()})
    for where, value in named.items():
        if value.count("{}") != 1:
            raise ValueError(
                f"{method} {where} must be a string with exactly one '{{}}' for the class name, got {value!r}"
            )


# ---------------------------------------------------------------- what the loop reads from options


@dataclass(frozen=True)
class TestTimeViews:
    """The augmented views a test-time method wants of each test image (``datasets.views``)."""

    n_views: int
    augmix: bool
    images_per_step: int = 1
    """Test images handed to one ``predict`` call (adapted together, ``methods/test_time.py``)."""


@dataclass(frozen=True)
class PromptTokens:
    """A method whose parameters are per-layer prompt tokens: tower → (prompted blocks, tokens
    per block); tokens ``None``: one block of as many tokens as its parameters make (CoOp's
    context, whose length ``ctx_init`` decides). Read by ``param_match`` to place one bias per
    prompt vector."""

    towers: Mapping[str, tuple[int, int | None]]


@dataclass(frozen=True)
class SourceStatsSpec:
    """The offline source statistics a method aligns to (``methods/source_stats.py``): which file
    it reads, and how that file must have been made. Read by the orchestrator's checks before a
    run and by the command that makes the file (``experiments/source_stats.py``)."""

    option: str
    """The option that names the file (the command builds the method with it empty)."""
    file: str
    """The file the run reads; empty: none given."""
    dataset: str
    """The catalog dataset the statistics come from (the proxy source)."""
    split: str
    """Its split: ``train``, ``val`` or ``test``."""
    images_per_class: int
    """At most this many images of each class, the first in the split's order; 0: all of them."""
    blocks: tuple[int, ...]
    """The image-tower blocks whose input tokens are summarised."""
    required: bool
    """The run cannot do without the file (an alignment weight above 0)."""
    per_class: bool = False
    """The run reads the file's per-class rows of every class it classifies (PromptSync's
    prototypes): the file must cover the classes of the run's tasks and targets."""
    folder: str = ""
    """A folder of images labelled by class name (``datasets/classfolders.py``), the source in
    place of ``dataset`` / ``split`` when set; recorded and checked by its absolute path."""

    def source(self) -> dict[str, object]:
        """The proxy source, as the file's metadata records it (``stats_file.SOURCE_KEYS``): a
        folder source has no dataset and split, a catalog one no folder."""
        folder = self.folder
        return {
            "dataset": "" if folder else self.dataset,
            "split": "" if folder else self.split,
            "images_per_class": self.images_per_class,
            "folder": folder,
        }

    def label(self) -> str:
        """The source in words, for messages: ``imagenet/train`` or ``folder /data/proxy``."""
        return f"folder {self.folder}" if self.folder else f"{self.dataset}/{self.split}"


# ---------------------------------------------------------------- the methods' options

POSITIONS = ("end", "middle", "front")
ENSEMBLE_NAMES = ("imagenet80", "imagenet7")
"""Zero-shot prompt ensembles (``zeroshot.ENSEMBLES`` holds their templates)."""


@dataclass
class ZeroShotConfig:
    """Options of the zero-shot baseline."""

    template: str | None = None
    """One template for every task, e.g. ``"a photo of a {}."``; overrides ``templates``."""
    templates: dict[str, str] = option(factory=dict, fill="templates")
    """Task → template; filled by the orchestrator with each dataset's hand-crafted template."""
    ensemble: str = ""
    """Average the prompts of an ensemble instead of one template: ``imagenet80``,
    ``imagenet7``, or either with ``+dataset`` (plus each task's own template). Empty: none."""

    def __post_init__(self) -> None:
        check_fields(self, "zeroshot")
        check_templates("zeroshot", self.template, self.templates)
        base, _, extra = self.ensemble.partition("+")
        if self.ensemble and (base not in ENSEMBLE_NAMES or extra not in ("", "dataset")):
            raise ValueError(
                f"zeroshot ensemble must be one of {', '.join(ENSEMBLE_NAMES)} (optionally with "
                f"'+dataset'), or empty; got {self.ensemble!r}"
            )


#: CoOp ``lpclip/linear_probe.py`` ``search_list``: inverse L2 strengths, every two decades.
COOP_C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


@dataclass
class LinearProbeConfig:
    """Options of the linear probe (CoOp ``lpclip/linear_probe.py`` arguments)."""

    c_grid: list[float] = option(factory=lambda: list(COOP_C_GRID))
    """Inverse L2 strengths C (scikit-learn's ``C``) tried first, in this order; the first with the
    best val accuracy wins, so put weaker regularisation (larger C) first to break ties that way."""
    search_steps: int = option(8, at_least=0)
    """Rounds of CoOp's log10(C) bisection around the grid's best (``--num_step 8``); 0: the grid's best."""
    max_iter: int = option(1000, at_least=1)
    """L-BFGS iterations per fit (scikit-learn ``max_iter``, 1000 in CoOp and CLIP)."""
    tol: float = option(1e-4, above=0)
    """Stop a fit when every gradient entry is at most this (scikit-learn ``tol``)."""
    normalize: bool = True
    """L2-normalise features before the probe (the reference uses raw features)."""

    def __post_init__(self) -> None:
        check_fields(self, "linear_probe")
        self.c_grid = [float(c) for c in self.c_grid]
        if not self.c_grid or not all(c > 0 and math.isfinite(c) for c in self.c_grid):
            raise ValueError(
                f"linear_probe c_grid must be a non-empty list of positive C values, got {self.c_grid}"
            )


@dataclass
class CoOpConfig:
    """Options of CoOp (``TRAINER.COOP.*`` in the reference configs)."""

    IGNORED_WITH: ClassVar[dict[str, str]] = {"n_ctx": "ctx_init"}
    """Option → the option that, when non-empty, makes it have no effect (the command line is
    refused for setting one that is ignored: ``orchestrator/config.py``)."""

    n_ctx: int = option(16, at_least=1)
    """Number of learnable context tokens M (16 in ``vit_b16.yaml``); ignored with ``ctx_init``."""
    ctx_init: str = ""
    """Words to initialise the context from (``"a photo of a"`` in ``*_ctxv1`` configs); their
    token count then sets M. Empty: random N(0, 0.02²) init."""
    class_token_position: str = option("end", choices=POSITIONS)
    """Where the class name sits: ``end`` | ``middle`` | ``front``."""
    csc: bool = False
    """Class-specific context: one set of M vectors per class instead of one shared set."""

    def __post_init__(self) -> None:
        check_fields(self, "coop")

    def prompt_tokens(self) -> PromptTokens | None:
        return None if self.csc else PromptTokens({"text": (1, None)})


@dataclass
class CoCoOpConfig:
    """Options of CoCoOp (``TRAINER.COCOOP.*`` in the reference configs)."""

    IGNORED_WITH: ClassVar[dict[str, str]] = {"n_ctx": "ctx_init"}
    """Option → the option that, when non-empty, makes it have no effect (the command line is
    refused for setting one that is ignored: ``orchestrator/config.py``)."""

    n_ctx: int = option(4, at_least=1)
    """Number of learnable context tokens M (4 in ``vit_b16_c4_*``); ignored with ``ctx_init``."""
    ctx_init: str = "a photo of a"
    """Words to initialise the context from (the reference ``ctxv1`` configs); their token count
    then sets M. Empty: random N(0, 0.02²) init."""
    max_prompts_per_pass: int | None = option(None, at_least=1)
    """Most image-conditioned prompts (images × classes) encoded in one text-tower pass; bounds
    memory in training (several passes are re-computed in backward, by the backbone's
    ``text_checkpoint`` rule) and evaluation. None: the backbone's ``text_chunk_size``."""

    def __post_init__(self) -> None:
        check_fields(self, "cocoop")


@dataclass
class KgCoOpConfig:
    """Options of KgCoOp (``TRAINER.COOP.*`` in the reference configs)."""

    IGNORED_WITH: ClassVar[dict[str, str]] = {"n_ctx": "ctx_init"}
    """Option → the option that, when non-empty, makes it have no effect (the command line is
    refused for setting one that is ignored: ``orchestrator/config.py``)."""

    n_ctx: int = option(4, at_least=1)
    """Number of learnable context tokens M; ignored with ``ctx_init``."""
    ctx_init: str = "a photo of a"
    """Words to initialise the context from (the reference ``ctxv1`` config); their token count
    then sets M. Empty: random N(0, 0.02²) init."""
    lam: float = option(8.0, at_least=0)
    """λ, weight of the knowledge term ``1 − mean cos(w, w^clip)`` (the reference's ``W``)."""
    template: str | None = None
    """One hand-crafted template for every task, e.g. ``"a photo of a {}."``; overrides ``templates``."""
    templates: dict[str, str] = option(factory=dict, fill="templates")
    """Task → hand-crafted template; filled by the orchestrator with each dataset's template."""

    def __post_init__(self) -> None:
        check_fields(self, "kgcoop")
        check_templates("kgcoop", self.template, self.templates)


def check_vision_prompts(method: str, n_ctx_vision: int, depth_vision: int) -> None:
    """IVLP-style visual prompts are on (both counts >= 1) or off (both 0), never half set."""
    if (n_ctx_vision == 0) != (depth_vision == 0):
        raise ValueError(
            f"{method} n_ctx_vision and depth_vision must both be 0 (no visual prompts) or both >= 1, "
            f"got {n_ctx_vision} and {depth_vision}"
        )


@dataclass
class IVLPConfig:
    """Options of IVLP (``TRAINER.IVLP.*`` in the reference configs)."""

    n_ctx_text: int = option(2, at_least=1)
    """Text prompt tokens per prompted layer (``N_CTX_TEXT``)."""
    n_ctx_vision: int = option(2, at_least=0)
    """Visual prompt tokens per prompted layer (``N_CTX_VISION``); 0 (with ``depth_vision`` 0): none."""
    depth_text: int = option(12, at_least=1)
    """Text layers with prompts, 0 .. depth-1 (``PROMPT_DEPTH_TEXT``; >= 1, layer 0 is the context;
    capped at the tower's blocks)."""
    depth_vision: int = option(12, at_least=0)
    """Image layers with prompts, 0 .. depth-1 (``PROMPT_DEPTH_VISION``; capped at the tower's
    blocks); 0: no visual prompts."""
    ctx_init: str = "a photo of a"
    """Words for the layer-0 text context when ``n_ctx_text <= 4`` (their first ``n_ctx_text``
    tokens are learned, the rest stay fixed words); empty or longer context: random init."""

    def __post_init__(self) -> None:
        check_fields(self, "ivlp")
        check_vision_prompts("ivlp", self.n_ctx_vision, self.depth_vision)

    def prompt_tokens(self) -> PromptTokens:
        towers = {"text": (self.depth_text, self.n_ctx_text)}
        if self.depth_vision:
            towers["vision"] = (self.depth_vision, self.n_ctx_vision)
        return PromptTokens(towers)


@dataclass
class MaPLeConfig:
    """Options of MaPLe (``TRAINER.MAPLE.*`` in the reference configs)."""

    n_ctx: int = option(2, at_least=1)
    """Prompt tokens per prompted layer, the same count in both towers (``N_CTX``)."""
    prompt_depth: int = option(9, at_least=1)
    """J: layers 0 .. J-1 of both towers get prompts (``PROMPT_DEPTH``; 9 base-to-novel, 3
    cross-dataset); capped at the shallower tower's blocks."""
    ctx_init: str = "a photo of a"
    """Words for the layer-0 text context when ``n_ctx <= 4`` (first ``n_ctx`` tokens learned, the
    rest kept as fixed words); empty or longer context: random N(0, 0.02²) init."""

    def __post_init__(self) -> None:
        check_fields(self, "maple")

    def block_prompts(self) -> PromptTokens:
        """Prompts in blocks ``0 .. prompt_depth-1`` of both towers, ``n_ctx`` tokens each."""
        return PromptTokens(
            {"text": (self.prompt_depth, self.n_ctx), "vision": (self.prompt_depth, self.n_ctx)}
        )


def gpa_weights(mean: float, std: float, epochs: int) -> tuple[float, ...]:
    """PromptSRC's Gaussian prompt aggregation weights ``w_e = N(e; μ, σ) / Σ_e' N(e'; μ, σ)`` for
    epochs ``e = 1 .. epochs``, in float64 as the reference (``trainers/promptsrc.py`` ``get_gauss``
    and ``build_model``, lines 265-270).

    ``ValueError`` when the density is (numerically) zero at every epoch, or not finite: the
    reference would then divide 0 by 0 and end with NaN prompts.
    """
    scale = 1 / (std * math.sqrt(2 * math.pi))
    density = [scale * math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, epochs + 1)]
    total = sum(density)
    if not (math.isfinite(total) and total > 0):
        raise ValueError(
            f"promptsrc gpa_mean={mean} gpa_std={std} put no weight on any of the epochs 1 .. {epochs} "
            "(the Gaussian's density is 0 at each of them in float64, so its weights would be 0/0); "
            f"move gpa_mean into 1 .. {epochs}, widen gpa_std, or set gpa=false"
        )
    return tuple(d / total for d in density)


@dataclass
class PromptSRCConfig:
    """Options of PromptSRC (``TRAINER.PROMPTSRC.*`` in the reference configs)."""

    n_ctx_text: int = option(4, at_least=1)
    """Text prompt tokens per prompted layer (``N_CTX_TEXT``)."""
    n_ctx_vision: int = option(4, at_least=0)
    """Visual prompt tokens per prompted layer (``N_CTX_VISION``); 0 (with ``depth_vision`` 0): none."""
    depth_text: int = option(9, at_least=1)
    """Text layers with prompts, 0 .. depth-1 (``PROMPT_DEPTH_TEXT``; 3 in the cross-dataset config;
    capped at the tower's blocks)."""
    depth_vision: int = option(9, at_least=0)
    """Image layers with prompts, 0 .. depth-1 (``PROMPT_DEPTH_VISION``; capped at the tower's
    blocks); 0: no visual prompts."""
    ctx_init: str = "a photo of a"
    """Words for the layer-0 text context when ``n_ctx_text <= 4`` (``CTX_INIT``), as IVLP's."""
    text_loss_weight: float = option(25.0, at_least=0)
    """Weight of the L1 between prompted and frozen template-ensemble text features (``TEXT_LOSS_WEIGHT``)."""
    image_loss_weight: float = option(10.0, at_least=0)
    """Weight of the L1 between prompted and frozen image features (``IMAGE_LOSS_WEIGHT``)."""
    logit_loss_weight: float = option(1.0, at_least=0)
    """Weight of the KL between zero-shot and prompted logits (no config key: the reference adds
    ``L_SCL_logits`` unweighted, ``trainers/promptsrc.py`` line 312)."""
    gpa: bool = True
    """Gaussian prompt aggregation: the prompts evaluated are the Gaussian-weighted sum of every
    epoch's (no config key: the reference always aggregates). False: the last epoch's prompts."""
    gpa_mean: float = 15.0
    """μ of the GPA weights over epochs 1 .. ``train.epochs`` (``GPA_MEAN``; 6 cross-dataset)."""
    gpa_std: float = option(1.0, above=0)
    """σ of the GPA weights (``GPA_STD``; 10 cross-dataset)."""
    text_templates: list[str] = option(factory=list)
    """Templates (one ``{}`` each) of the frozen text targets. Empty: the reference's 60 ImageNet
    templates (``trainers/imagenet_templates.py`` ``IMAGENET_TEMPLATES``; ``promptsrc.IMAGENET60``)."""
    normalise_templates: bool = False
    """Average L2-normalised template features (CLIP's zero-shot ensembling) instead of the raw
    features the reference averages (``trainers/promptsrc.py`` lines 125-128); normalised after."""

    def __post_init__(self) -> None:
        check_fields(self, "promptsrc")
        check_vision_prompts("promptsrc", self.n_ctx_vision, self.depth_vision)
        self.text_templates = list(self.text_templates)
        for i, template in enumerate(self.text_templates):
            if template.count("{}") != 1:
                raise ValueError(
                    f"promptsrc text_templates[{i}] must be a string with exactly one '{{}}' for the "
                    f"class name, got {template!r}"
                )

    def ivlp(self) -> IVLPConfig:
        """The prompts' options: PromptSRC's architecture is IVLP's."""
        return IVLPConfig(
            self.n_ctx_text, self.n_ctx_vision, self.depth_text, self.depth_vision, self.ctx_init
        )

    def prompt_tokens(self) -> PromptTokens:
        return self.ivlp().prompt_tokens()

    def check_epochs(self, epochs: int) -> None:
        """``ValueError`` when the GPA weights put no weight on any of ``epochs`` epochs."""
        if self.gpa:
            gpa_weights(self.gpa_mean, self.gpa_std, epochs)


TOWERS = ("text", "vision")
TOWER_CHOICES = ("both", "text", "vision")
SITES = ("attn", "mlp", "both")


@dataclass
class BiasTuningConfig:
    """Where the learnable biases go."""

    tower: str = option("both", choices=TOWER_CHOICES)
    """``both`` | ``text`` | ``vision``: which transformer(s) get biases."""
    layers: Any = 9
    """A depth ``d`` (blocks 0 .. d-1, capped at the tower's blocks) or a list of block indices; or
    ``{"text": .., "vision": ..}`` to choose per tower."""
    site: str = option("attn", choices=SITES)
    """``attn``: added after the attention update of the block; ``mlp``: after the MLP update;
    ``both``: one set at each."""
    slots: Any = 1
    """Bias vectors per (tower, block, site): vector ``j < slots-1`` for token position ``j``, the
    last for all later positions (1: one bias for every token); or ``{"text": .., "vision": ..}``."""
    match: str | None = None
    """A prompt configuration to match in trainable parameters, as ``"<method> key=value ..."``
    (e.g. ``"ivlp n_ctx_text=2 n_ctx_vision=2 depth_text=9 depth_vision=9"``). When set, the
    placement (tower, layers, site, slots) is chosen by :func:`vlprompt.methods.param_match.
    match_bias_tuning` on the actual backbone and replaces the fields above."""
    template: str | None = None
    """Hand-crafted text template for every task (``"a photo of a {}."``); overrides ``templates``."""
    templates: dict[str, str] = option(factory=dict, fill="templates")
    """Task → template; filled by the orchestrator with each dataset's hand-crafted template."""

    def __post_init__(self) -> None:
        check_fields(self, "bias_tuning")
        for tower in self.towers:
            layers, slots = self.layers_of(tower), self.slots_of(tower)
            if isinstance(layers, list):
                if not layers or not all(_is_int(i, 0) for i in layers) or len(set(layers)) != len(layers):
                    raise ValueError(
                        f"bias_tuning layers for {tower} must be distinct block indices >= 0, got {layers!r}"
                    )
            elif not _is_int(layers, 1):
                raise ValueError(
                    f"bias_tuning layers for {tower} must be a depth >= 1 or a list of indices, "
                    f"got {layers!r}"
                )
            if not _is_int(slots, 1):
                raise ValueError(f"bias_tuning slots for {tower} must be an integer >= 1, got {slots!r}")
        check_templates("bias_tuning", self.template, self.templates)
        if self.match is not None:
            parse_match(self.match)

    @property
    def towers(self) -> tuple[str, ...]:
        return TOWERS if self.tower == "both" else (self.tower,)

    @property
    def sites(self) -> tuple[str, ...]:
        return ("attn", "mlp") if self.site == "both" else (self.site,)

    def layers_of(self, tower: str) -> int | list[int]:
        value = self.layers.get(tower) if isinstance(self.layers, Mapping) else self.layers
        if value is None:
            raise ValueError(f"bias_tuning layers has no entry for the {tower} tower: {self.layers!r}")
        return list(value) if isinstance(value, list | tuple) else value

    def slots_of(self, tower: str) -> int:
        return self.slots.get(tower, 1) if isinstance(self.slots, Mapping) else self.slots

    def layer_indices(self, tower: str, n_blocks: int) -> tuple[int, ...]:
        """The block indices of ``tower`` that get biases, checked against its ``n_blocks``."""
        spec = self.layers_of(tower)
        indices = tuple(range(min(spec, n_blocks))) if isinstance(spec, int) else tuple(sorted(spec))
        if indices[-1] >= n_blocks:
            raise ValueError(f"bias_tuning: {tower} layers {spec!r} exceed the tower's {n_blocks} blocks")
        return indices


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def parse_match(spec: str) -> tuple[str, dict[str, object]]:
    """``"ivlp n_ctx_text=2 depth_text=9"`` → ``("ivlp", {"n_ctx_text": 2, "depth_text": 9})``.

    A string (not a mapping) so that a sweep can choose it like any other categorical value.
    Values are read as int, float, true/false or else kept as text.
    """
    words = spec.split() if isinstance(spec, str) else []
    if not words or "=" in words[0]:
        raise ValueError(f"bias_tuning match must look like '<method> key=value ...', got {spec!r}")
    options: dict[str, object] = {}
    for word in words[1:]:
        key, sep, raw = word.partition("=")
        if not sep or not key:
            raise ValueError(f"bias_tuning match: {word!r} in {spec!r} is not key=value")
        options[key] = _scalar(raw)
    return words[0], options


def _scalar(raw: str) -> object:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


@dataclass
class SoftCPTConfig:
    """Options of SoftCPT-NATA (``TRAINER.MTCOOP.*`` in the reference configs)."""

    IGNORED_WITH: ClassVar[dict[str, str]] = {"task_n_ctx": "task_ctx_init"}
    """Option → the option that, when non-empty, makes it have no effect."""

    n_ctx: int = option(16, at_least=1)
    """Context length M of the class prompts, generated per task (``N_CTX``)."""
    task_n_ctx: int = option(4, at_least=1)
    """Learnable task-context vectors shared by all tasks (``TASK_N_CTX``); ignored with
    ``task_ctx_init``."""
    task_ctx_init: str = ""
    """Words to initialise the task context from (``TASK_CTX_INIT``; their token count then sets
    ``task_n_ctx``). Empty (the reference default): random N(0, 0.02²) init."""
    task_names: dict[str, str] = option(factory=dict)
    """Task key → natural-language task name for the task prompt. Tasks not listed use their
    key: the part after the last ``"/"``, ``"_"`` → ``" "`` (``"fashion20/sleeve_length"`` →
    ``"sleeve length"``)."""

    def __post_init__(self) -> None:
        check_fields(self, "softcpt")
        for task, name in self.task_names.items():
            if not name.replace("_", " ").strip():
                raise ValueError(
                    f"softcpt task_names[{task!r}] must be a non-empty string (the task's name), got {name!r}"
                )
        self.task_names = dict(self.task_names)


@dataclass
class PromptKDConfig:
    """Options of PromptKD (``TRAINER.PROMPTKD.*`` in the reference configs, plus the teacher)."""

    teacher_model: str = option("ViT-L-14", model_name=True)
    """open_clip architecture of the teacher (the reference: ViT-L/14)."""
    teacher_pretrained: str | None = option("openai", path="weights")
    """Teacher weights: an open_clip tag, a checkpoint path, ``"bundled"`` or null (random init)."""
    teacher_method: str = option("zeroshot", method_with="text_classifier")
    """The vlprompt method the teacher runs (the reference: PromptSRC, i.e. ``ivlp`` 4+4 depth 9);
    any registered method with a fixed text classifier."""
    teacher_options: dict[str, Any] = option(factory=dict, options_of="teacher_method")
    """Options of ``teacher_method``, validated like a method section."""
    teacher_state: str = option("", path="file")
    """Path to the ``learned_state.pt`` of a vlprompt run of ``teacher_method``; empty: none."""
    templates: dict[str, str] = option(factory=dict, fill="templates")
    """Task → hand-crafted template, filled by the orchestrator; passed on to the teacher."""
    n_ctx_vision: int = option(4, at_least=1)
    """Student visual prompt tokens per prompted layer (``N_CTX_VISION``)."""
    depth_vision: int = option(9, at_least=1)
    """Student image layers with prompts, 0 .. depth-1 (``PROMPT_DEPTH_VISION``; 3 cross-dataset)."""
    kd_weight: float = option(1000.0, at_least=0)
    """Weight of the KL term (``KD_WEIGHT``; the reference uses 200 for FGVCAircraft, Flowers, DTD)."""
    temperature: float = option(1.0, above=0)
    """Distillation temperature τ (``TEMPERATURE``)."""

    def __post_init__(self) -> None:
        check_fields(self, "promptkd")
        if not self.teacher_model:
            raise ValueError("promptkd teacher_model must be an open_clip model name, got ''")
        self.teacher_options = dict(self.teacher_options)
        check_templates("promptkd", None, self.templates)

    def block_prompts(self) -> PromptTokens:
        """The student's visual prompts (its text side is the teacher's fixed classifier)."""
        return PromptTokens({"vision": (self.depth_vision, self.n_ctx_vision)})


def n_selected(n_images: int, selection_p: float) -> int:
    """How many of ``n_images`` TPT's confidence selection keeps: ``int(n · ρ)``, as the reference."""
    return int(n_images * selection_p)


@dataclass
class TPTConfig:
    """Options of TPT (the reference's command-line arguments)."""

    IGNORED_WITH: ClassVar[dict[str, str]] = {"n_ctx": "ctx_init"}
    """Option → the option that, when non-empty, makes it have no effect (the command line is
    refused for setting one that is ignored: ``orchestrator/config.py``)."""

    n_views: int = option(63, at_least=1)
    """Augmented views per test image (``--batch-size`` 64 = the original + 63 views)."""
    selection_p: float = option(0.1, above=0, at_most=1)
    """Fraction ρ of the ``1 + n_views`` images kept by confidence selection (``--selection_p``)."""
    lr: float = option(5e-3, at_least=0)
    """AdamW learning rate for the per-image tuning (``--lr``)."""
    steps: int = option(1, at_least=0)
    """Tuning steps per test image (``--tta_steps``); 0: no tuning."""
    ctx_init: str = "a photo of a"
    """Words to initialise the context from (``--ctx_init a_photo_of_a``); their token count is M.
    Empty: random N(0, 0.02²) init of ``n_ctx`` vectors."""
    n_ctx: int = option(4, at_least=1)
    """Number of context tokens M when ``ctx_init`` is empty (``--n_ctx``)."""
    init_state: str = option("", path="file")
    """TPT+CoOp: path to a trained CoOp run's ``learned_state.pt`` (or a CoOp checkpoint) whose
    ``ctx`` replaces the initial context; its shape must match."""
    augmix: bool = False
    """AugMix the views (the reference does for the fine-grained cross-dataset sets, not for the
    ImageNet variants)."""
    images_per_step: int = option(1, at_least=1)
    """Test images adapted at once, each from the same reset context (``methods/test_time.py``):
    the same numbers as one at a time (the reference's batch of one image), in one forward and
    one optimiser step for all of them. Default 1, the reference's loop: G copies cost G times the
    text-tower memory of one (G x classes prompts), so raise it where the accelerator has room."""

    def __post_init__(self) -> None:
        check_fields(self, "tpt")
        if n_selected(1 + self.n_views, self.selection_p) < 1:
            raise ValueError(
                f"tpt selection_p={self.selection_p} keeps int({1 + self.n_views} x {self.selection_p}) = 0 "
                f"of the original + n_views={self.n_views} images; raise selection_p or n_views"
            )

    def test_time_views(self) -> TestTimeViews:
        """The views the ``test_time`` protocol hands TPT for each test image."""
        return TestTimeViews(self.n_views, self.augmix, self.images_per_step)


SPLITS = ("train", "val", "test")


@dataclass
class AlignedMaPLeOptions:
    """The options PromptAlign and PromptSync share (``jameelhassan/PromptAlign``:
    ``TRAINER.PROMPTALIGN.*`` and ``TPT.*`` of
    ``configs/trainers/PromptAlign/vit_b16_c2_ep5_batch4_2ctx_DG.yaml`` (DG), the MaPLe options of
    the model they start from, and the source statistics they align to). Not a method's options by
    itself: each method's class adds its own fields and checks in ``__post_init__``."""

    n_ctx: int = option(2, at_least=1)
    """MaPLe prompt tokens per prompted layer (``TRAINER.PROMPTALIGN.N_CTX``)."""
    prompt_depth: int = option(3, at_least=1)
    """MaPLe's J: layers 0 .. J-1 of both towers get prompts (``PROMPT_DEPTH``: 3 in the DG
    config, the depth of the ImageNet MaPLe it loads)."""
    ctx_init: str = "a photo of a"
    """Words for the layer-0 text context (``CTX_INIT``), as MaPLe's ``ctx_init``."""
    init_state: str = option("", path="file")
    """Path to a trained ``maple`` run's ``learned_state.pt`` (same n_ctx and depth: the keys and
    shapes must match): the state every test image starts from (the reference's ``--model-dir``
    ``weights/maple/ori/seed{S}``, epoch 2). Empty: MaPLe's own initialisation (tests)."""
    n_views: int = option(63, at_least=1)
    """Augmented views per test image (``TPT.BATCH_SIZE`` 64 = the original + 63 views)."""
    selection_p: float = option(0.1, above=0, at_most=1)
    """Fraction of the ``1 + n_views`` images kept by confidence selection, for the entropy and
    the statistics alike (``TPT.TPT_THRESHOLD`` = ``TPT.ALIGN_THRESHOLD`` = 0.1)."""
    lr: float = option(4e-2, at_least=0)
    """AdamW learning rate of the per-image step (``TPT.LR``: 4e-2 in the DG config, 5e-4 in the
    fine-grained/cross-dataset ``finegrain`` config)."""
    steps: int = option(1, at_least=0)
    """Steps per test image (``TPT.TTA_STEPS``); 0: no tuning (MaPLe's prediction)."""
    align_weight: float = option(100 / 3, at_least=0)
    """β, the weight of the summed per-block alignment term (``TPT.DISTR_LOSS_W`` 100 divided by
    ``ALIGN_LAYER_TO - ALIGN_LAYER_FROM`` = 3, although only two blocks are summed); 0: TPT on
    MaPLe (no statistics needed)."""
    align_layers: list[int] = option(factory=lambda: [0, 1])
    """Image blocks whose input tokens are aligned. The reference's config says ``ALIGN_LAYER_FROM
    0``, ``ALIGN_LAYER_TO 3``, but its loop ``range(FROM, TO - 1)`` aligns blocks 0 and 1: the
    default is what it runs; ``[0, 1, 2]`` is what its config names."""
    source_stats: str = option("", path="file")
    """The source statistics file (``TPT.VIS_MEANS`` / ``TPT.VIS_VARS``), made by
    ``python experiments/source_stats.py --config CONFIG``; needed when ``align_weight`` > 0."""
    source_dataset: str = option("imagenet", dataset_name=True)
    """The catalog dataset the statistics come from (ImageNet, the reference's proxy source)."""
    source_split: str = option("train", choices=SPLITS)
    """Its split (train: ImageNet val is also a reported test set)."""
    source_images_per_class: int = option(0, at_least=0)
    """At most this many images per class, the first of each in the split's order; 0: all."""
    source_folder: str = option("", path="dir")
    """A folder of proxy images labelled by class name, instead of a catalog dataset:
    ``<folder>/<class name>/<image>``, ``_`` read as a space, case kept, an optional
    ``classnames.txt`` naming the folders a class name cannot be (``datasets/classfolders.py``;
    PROMPTSYNC.md §2.2's per-class retrieval for targets ImageNet lacks). When set it is the source:
    ``source_dataset`` and ``source_split`` are not read; ``source_images_per_class`` caps it."""
    images_per_step: int = option(1, at_least=1)
    """Test images adapted at once, each from the same reset state on its own copy of the prompts
    (``methods/maple_stacked.py``): the same numbers as one at a time (the reference's batch of one
    image), in one forward and one AdamW step for all of them. Default 1, the reference's loop: G
    copies cost G times the text-tower work and memory of one (G x classes prompts)."""

    def check_aligned(self, method: str) -> None:
        """The shared checks (fields, selection, blocks), their messages naming ``method``."""
        check_fields(self, method)
        if n_selected(1 + self.n_views, self.selection_p) < 1:
            raise ValueError(
                f"{method} selection_p={self.selection_p} keeps int({1 + self.n_views} x "
                f"{self.selection_p}) = 0 of the original + n_views={self.n_views} images; raise "
                "selection_p or n_views"
            )
        layers = list(self.align_layers)
        if not layers or any(not _is_int(i, 0) for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(
                f"{method} align_layers must be distinct image block indices >= 0, got {layers!r}"
            )
        self.align_layers = sorted(layers)

    def test_time_views(self) -> TestTimeViews:
        """The views the ``test_time`` protocol hands the method: crops and flips, no AugMix (the
        reference's ``AugMixAugmenter`` keeps an empty ``aug_list`` for every dataset),
        ``images_per_step`` test images per ``predict`` call."""
        return TestTimeViews(self.n_views, augmix=False, images_per_step=self.images_per_step)

    def needs_stats(self) -> bool:
        """The run cannot do without the statistics file."""
        return self.align_weight > 0

    def needs_class_rows(self) -> bool:
        """The run reads the file's per-class rows of the classes it classifies."""
        return False

    def source_statistics(self) -> SourceStatsSpec:
        """The statistics file this configuration reads, and how it must have been made."""
        return SourceStatsSpec(
            option="source_stats",
            file=self.source_stats,
            dataset=self.source_dataset,
            split=self.source_split,
            images_per_class=self.source_images_per_class,
            blocks=tuple(self.align_layers),
            required=self.needs_stats(),
            per_class=self.needs_class_rows(),
            folder=self.source_folder,
        )


@dataclass
class PromptAlignConfig(AlignedMaPLeOptions):
    """Options of PromptAlign (``jameelhassan/PromptAlign``: ``TRAINER.PROMPTALIGN.*`` and ``TPT.*``
    of ``configs/trainers/PromptAlign/vit_b16_c2_ep5_batch4_2ctx_DG.yaml`` (DG), the MaPLe options
    of the model it starts from, and the source statistics it aligns to): exactly
    :class:`AlignedMaPLeOptions`."""

    def __post_init__(self) -> None:
        self.check_aligned("promptalign")


WEIGHTS_OVER = ("original_and_selected", "selected")
DISCRIMINATION = ("cached", "joint")


@dataclass
class PromptSyncConfig(AlignedMaPLeOptions):
    """Options of PromptSync (Khandelwal, CVPRW 2024; no code released): PromptAlign's, plus the
    class-aware alignment and the prototype discrimination. Every field below is a reconstruction
    ([R] in ``PROMPTSYNC.md``, §6 row named), with the documented default; ``source_stats`` must
    hold per-class rows (``class_mean``/``class_var``/``class_embedding``) of every class a task
    classifies."""

    weights_over: str = option("original_and_selected", choices=WEIGHTS_OVER)
    """Images whose mean softmax gives the class weights w (§6 row 4; the abstract's "the test
    sample and filtered augmented views"): the original and the selected views, or the selected only."""
    detach_weights: bool = True
    """Stop the gradient through w (§1.3 step 1: otherwise moving mass onto the nearest prototype's
    class is the cheapest way down, the collapse the paper says it prevents)."""
    top_k_classes: int = option(0, at_least=0)
    """Align to the k classes of largest w only (their weights not renormalised: the full sum with
    its smallest terms dropped; §3 step 8's latency knob); 0: every class."""
    discrimination_weight: float = option(1.0, at_least=0)
    """γ, the weight of the prototype → text contrastive loss L_PD (§6 row 9); 0: none."""
    discrimination_tau: float = option(0.01, above=0)
    """τ of L_PD's cosine logits (§6 row 9: 1 / CLIP's logit scale 100)."""
    symmetric: bool = False
    """L_PD as CLIP's symmetric loss: ½ (prototype → text + text → prototype); False: prototype →
    text only (§1.3 step 3)."""
    discrimination: str = option("cached", choices=DISCRIMINATION)
    """When L_PD acts (§3 step 8, the "reusable prototype-discrimination step"): ``cached``:
    ``discrimination_steps`` AdamW steps of γ·L_PD from the reset state, once per task, give the
    state every image is reset to (then L_ent + β·L_PA per image); ``joint``: γ·L_PD in every
    image's loss, its gradient at the reset state computed once per task and reused."""
    discrimination_steps: int = option(1, at_least=0)
    """M, the AdamW steps of γ·L_PD in ``cached`` mode (§6 row 10: 1, sweep 1-10), same lr."""

    def __post_init__(self) -> None:
        self.check_aligned("promptsync")

    def needs_stats(self) -> bool:
        """The alignment and the discrimination both read the file."""
        return self.align_weight > 0 or self.discrimination_weight > 0

    def needs_class_rows(self) -> bool:
        """Both read per-class rows."""
        return self.needs_stats()
