"""Maths and bookkeeping shared by several methods, as plain functions.

Kept here once so that CoOp, CoCoOp, KgCoOp, SoftCPT ... do not each re-derive them (CoOp's
``coop.py`` and ``cocoop.py`` share 212 copied lines; the house style).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone, EmbedHook, LayerHook


def clean_classname(name: str) -> str:
    """Class name as it goes into a prompt: ``"_"`` → ``" "`` (CoOp ``zsclip.py``/``coop.py``)."""
    return name.replace("_", " ")


@dataclass(frozen=True)
class TaskClasses:
    """The classes of every task, concatenated in task order.

    Methods keep one row per class of every task in a single tensor (text features,
    prompt buffers); a batch of task ``t`` uses ``rows(t)`` -- so a single-task run and
    a multi-task run (SoftCPT) share one code path.
    """

    names: tuple[str, ...]
    """Cleaned class names (:func:`clean_classname`) of all tasks, task after task."""
    spans: Mapping[str, tuple[int, int]]
    """Task → ``(start, stop)`` rows in :attr:`names`."""

    @classmethod
    def of(cls, tasks: Mapping[str, Sequence[str]]) -> TaskClasses:
        if not tasks:
            raise ValueError("a method needs at least one task (task name -> class names)")
        names: list[str] = []
        spans: dict[str, tuple[int, int]] = {}
        for task, classnames in tasks.items():
            if isinstance(classnames, str) or not classnames:
                raise ValueError(f"task {task!r} needs a non-empty list of class names, got {classnames!r}")
            spans[task] = (len(names), len(names) + len(classnames))
            names.extend(clean_classname(c) for c in classnames)
        return cls(tuple(names), spans)

    def task_of_row(self, row: int) -> str:
        return next(task for task, (start, stop) in self.spans.items() if start <= row < stop)

    def rows(self, task: str) -> slice:
        """The rows of ``task``; ``ValueError`` listing the known tasks otherwise."""
        if task not in self.spans:
            raise ValueError(f"unknown task {task!r}; this method was built for {sorted(self.spans)}")
        return slice(*self.spans[task])


def hold_backbone(module: nn.Module, backbone: Backbone) -> None:
    """Give ``module`` a plain reference ``module.backbone``, not a registered submodule.

    So the method's ``parameters()``, ``state_dict()`` and ``.to()``/``.train()`` cover only
    its own tensors: checkpoints hold what was learned, never a copy of CLIP.
    """
    object.__setattr__(module, "backbone", backbone)


def learned_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Detached copies of everything in ``module.state_dict()``: the learned state of a method whose
    state is exactly what it learned (the backbone is held, not owned; fixed buffers are not persistent)."""
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def read_saved_state(path: str, what: str) -> object:
    """What ``torch.save`` wrote at ``path``, read without running code (``weights_only``).

    For options that name a saved state (TPT's ``init_state``, PromptKD's ``teacher_state``);
    ``what`` ("tpt init_state") starts every error, which names the file.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what}: {file} does not exist or is not a file")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load: UnpicklingError (weights_only), RuntimeError, EOFError ...
        raise ValueError(f"{what}: cannot read {file} as a torch-saved state: {err}") from err


def init_context(
    backbone: Backbone,
    n_ctx: int,
    ctx_init: str | None,
    *,
    n_rows: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, str]:
    """Initial context vectors and the placeholder text they stand for (CoOp ``PromptLearner``).

    * word init (``ctx_init`` set, ``"_"`` read as space): the token embeddings of the
      init text without its start/end tokens -- ``n_ctx`` is then the number of those
      tokens (the reference counts words; equal whenever each word is one token, as in
      ``"a photo of a"``);
    * random init: ``N(0, 0.02²)`` of shape ``(n_ctx, W)``, placeholder ``"X X ... X"``.

    With ``n_rows`` (class-specific context) the shape is ``(n_rows, n_ctx, W)``, each row
    a copy of the word init or an independent draw. Random draws happen on the CPU from
    ``generator`` (default: torch's global RNG), so a seed gives the same vectors on any
    device. Returns fp32 vectors on the backbone's device.
    """
    text = (ctx_init or "").replace("_", " ").strip()
    if text:
        ids = backbone.tokenize([text])
        n = int(backbone.eot_positions(ids)[0]) - 1
        with torch.no_grad():
            vectors = backbone.token_embedding(ids)[0, 1 : 1 + n].float()
        if n_rows is not None:
            vectors = vectors.expand(n_rows, -1, -1)
        return vectors.clone(), text
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1 for random context init, got {n_ctx}")
    shape = (n_ctx, backbone.text_width) if n_rows is None else (n_rows, n_ctx, backbone.text_width)
    vectors = torch.empty(shape).normal_(0.0, 0.02, generator=generator)
    return vectors.to(backbone.device), " ".join(["X"] * n_ctx)


def image_features(backbone: Backbone, batch: Batch) -> Tensor:
    """Image embeddings of a batch: ``batch.features`` when cached, else the frozen image tower.

    Only for methods that leave the image tower alone (``frozen_image_tower``): no
    gradient flows into it, so it runs under ``no_grad``.
    """
    if batch.features is not None:
        return batch.features.to(backbone.device)
    assert batch.images is not None
    with torch.no_grad():
        return backbone.encode_image(batch.images.to(backbone.device))


def cosine_logits(image_feats: Tensor, text_feats: Tensor, logit_scale: Tensor | float) -> Tensor:
    """CLIP logits ``scale · norm(img) @ norm(txt)ᵀ`` ``(B, C)``, computed in fp32 (CLIP Eq. 1).

    Stacked too: ``(G, B, D)`` images against ``(G, C, D)`` text, one classifier per ``g``
    (test-time methods adapting G images at once) give ``(G, B, C)``."""
    img = F.normalize(image_feats.float(), dim=-1)
    txt = F.normalize(text_feats.float(), dim=-1)
    return logit_scale * img @ txt.mT


def cross_entropy(logits: Tensor, labels: Tensor | None) -> Tensor:
    """Mean cross-entropy over the batch (CoOp ``forward_backward``); labels are required."""
    if labels is None:
        raise ValueError("this method trains on labelled batches; Batch.labels is None")
    return F.cross_entropy(logits.float(), labels.to(logits.device))


def pick_template(method: str, template: str | None, templates: Mapping[str, str], task: str) -> str:
    """The user's ``template`` for every task, else the task's hand-crafted one (never a silent default)."""
    if template is not None:
        return template
    if task not in templates:
        raise ValueError(
            f"{method}: no hand-crafted template for task {task!r}; set method.template "
            "(e.g. 'a photo of a {}.') or pass the dataset's template (build_method(..., templates=...))"
        )
    return templates[task]


# ---------------------------------------------------------------- deep prompts (IVLP, MaPLe)
#: The MaPLe repository's word init applies only up to this many context tokens.
MAX_WORD_INIT_CTX = 4


def deep_prompt_context(backbone: Backbone, n_ctx: int, ctx_init: str) -> tuple[Tensor, str]:
    """Layer-0 text context and prompt prefix as MaPLe's ``MultiModalPromptLearner`` / IVLP's
    ``VLPromptLearner`` make them.

    With ``ctx_init`` and ``n_ctx <= 4``: the first ``n_ctx`` token embeddings of ``ctx_init``,
    while the prompt text keeps the *whole* ``ctx_init`` -- so ``n_ctx=2`` with ``"a photo of a"``
    learns "a photo" and keeps "of a" as fixed tokens: ``[SOS][ctx₁ ctx₂] of a {class}.``.
    Otherwise N(0, 0.02²) vectors and the placeholder ``"X X ..."`` (the reference then ignores
    ``ctx_init``). ``ValueError`` if ``ctx_init`` has fewer than ``n_ctx`` tokens (the reference
    would silently learn from its end-of-text and padding embeddings).
    """
    text = ctx_init.replace("_", " ").strip()
    if not text or n_ctx > MAX_WORD_INIT_CTX:
        return init_context(backbone, n_ctx, None)
    words, prefix = init_context(backbone, n_ctx, text)
    if words.shape[0] < n_ctx:
        raise ValueError(f"ctx_init {text!r} is {words.shape[0]} tokens, fewer than n_ctx={n_ctx}")
    return words[:n_ctx].clone(), prefix


def normal_prompts(n_layers: int, n_ctx: int, width: int, device: torch.device) -> nn.ParameterList:
    """``n_layers`` independent ``(n_ctx, width)`` prompts, N(0, 0.02²) (the references' deep init)."""
    return nn.ParameterList(
        [nn.Parameter(torch.empty(n_ctx, width).normal_(0.0, 0.02).to(device)) for _ in range(n_layers)]
    )


def per_row(prompt: Tensor, x: Tensor) -> Tensor:
    """``prompt`` for each of the ``N`` rows of ``x`` ``(N, L, W)``, in ``x``'s dtype: ``(n_ctx, W)``
    is shared by every row; ``(N, n_ctx, W)`` gives each row its own (test-time methods adapting
    several images at once, one prompt copy per image)."""
    prompt = prompt.to(x.dtype)
    if prompt.dim() == 2:
        return prompt.unsqueeze(0).expand(x.shape[0], -1, -1)
    if prompt.shape[0] != x.shape[0]:
        raise ValueError(f"per-row prompts {tuple(prompt.shape)} for {x.shape[0]} rows")
    return prompt


def text_deep_prompt_hook(deep: Sequence[Tensor]) -> LayerHook | None:
    """Text layer hook: before block ``i`` (1 <= i <= len(deep)) positions ``1 .. n_ctx`` (right after
    SOS) are replaced by ``deep[i - 1]`` (:func:`per_row`: shared, or one per row -- then the hook
    must see every row at once, one chunk); the length is kept, so EOT stays put."""
    if not deep:
        return None

    def hook(i: int, x: Tensor) -> Tensor:
        if not 1 <= i <= len(deep):
            return x
        prompt = per_row(deep[i - 1], x)
        return torch.cat([x[:, :1], prompt, x[:, 1 + prompt.shape[1] :]], dim=1)

    return hook


def vision_prompt_hooks(prompts: Sequence[Tensor]) -> tuple[EmbedHook | None, LayerHook | None]:
    """Image-tower hooks for visual prompts ``prompts[0 .. J-1]`` (each ``(n_ctx, W)``, or
    ``(N, n_ctx, W)``: one per image, :func:`per_row`).

    ``prompts[0]`` is appended after the positional embedding (before ``ln_pre``, no positional
    embedding of its own); before block ``i`` (1 <= i < J) the last ``n_ctx`` tokens -- the
    previous prompts' outputs -- are replaced by ``prompts[i]``. Later blocks carry them along.
    """
    if not prompts:
        return None, None

    def embed(x: Tensor) -> Tensor:
        return torch.cat([x, per_row(prompts[0], x)], dim=1)

    def layer(i: int, x: Tensor) -> Tensor:
        if not 1 <= i < len(prompts):
            return x
        prompt = per_row(prompts[i], x)
        return torch.cat([x[:, : x.shape[1] - prompt.shape[1]], prompt], dim=1)

    return embed, (layer if len(prompts) > 1 else None)


def prompted_image_features(backbone: Backbone, prompts: Sequence[Tensor], images: Tensor) -> Tensor:
    """Image features ``(B, D)`` (not normalised) with visual ``prompts`` (:func:`vision_prompt_hooks`;
    none: the frozen tower), for IVLP, MaPLe and PromptKD's student."""
    embed_hook, layer_hook = vision_prompt_hooks(list(prompts))
    return backbone.encode_image(images.to(backbone.device), embed_hook=embed_hook, layer_hook=layer_hook)


def observed_image_features(
    backbone: Backbone, prompts: Sequence[Tensor], images: Tensor, blocks: Sequence[int]
) -> tuple[Tensor, dict[int, Tensor]]:
    """:func:`prompted_image_features`, and the input ``(N, L, W)`` of each image block in
    ``blocks`` as that block receives it: after ``ln_pre`` and with this layer's visual prompts
    swapped in (the reference PromptAlign's ``visual_feat``, stored at the top of its MaPLe
    block's forward). The layer hook only looks; the features are the same numbers."""
    embed_hook, prompt_hook = vision_prompt_hooks(list(prompts))
    wanted = set(blocks)
    seen: dict[int, Tensor] = {}

    def observe(i: int, x: Tensor) -> Tensor:
        if prompt_hook is not None:
            x = prompt_hook(i, x)
        if i in wanted:
            seen[i] = x
        return x

    features = backbone.encode_image(images.to(backbone.device), embed_hook=embed_hook, layer_hook=observe)
    missing = sorted(wanted - set(seen))
    if missing:
        raise ValueError(
            f"image blocks {missing} do not exist: {backbone.name} has {backbone.vision_layers} (0 .. "
            f"{backbone.vision_layers - 1})"
        )
    return features, {i: seen[i] for i in sorted(wanted)}


def require_images(method: str, batch: Batch) -> Tensor:
    """``batch.images``; a clear error for cached features, which a prompted image tower cannot use."""
    if batch.images is None:
        raise ValueError(
            f"{method} changes the image tower (frozen_image_tower=False), so cached image features "
            "cannot be used: give Batch.images"
        )
    return batch.images


def template_sentences(
    method: str, classes: TaskClasses, template: str | None, templates: Mapping[str, str]
) -> list[str]:
    """Each class's hand-crafted sentence, in ``classes.names`` order (one row per class).

    Templates given for tasks the method was not built for are an error (a misspelt task
    name would otherwise fall back silently), unless one ``template`` overrides them all.
    """
    unknown = sorted(set(templates) - set(classes.spans))
    if unknown and template is None:
        raise ValueError(
            f"{method} templates given for unknown tasks {unknown}; tasks are {sorted(classes.spans)}"
        )
    return [
        pick_template(method, template, templates, task).format(name)
        for task, (start, stop) in classes.spans.items()
        for name in classes.names[start:stop]
    ]


def text_features_while_unchanged(
    cache: dict[str, tuple[tuple[int, ...], Tensor]],
    ctx: Tensor | tuple[Tensor, ...],
    task: str,
    encode: Callable[[str], Tensor],
) -> Tensor:
    """``encode(task)``, reused across evaluation batches while ``ctx`` is unchanged.

    Prompt text features depend only on the learned tensors (``ctx``, or several, e.g. SoftCPT's
    task context and generator): in-place optimiser updates bump a tensor's version counter and
    a move changes its storage, either of which invalidates the entry.
    """
    tensors = ctx if isinstance(ctx, tuple) else (ctx,)
    key = tuple(n for t in tensors for n in (t._version, t.data_ptr()))
    cached = cache.get(task)
    if cached is None or cached[0] != key:
        cached = (key, encode(task))
        cache[task] = cached
    return cached[1]
