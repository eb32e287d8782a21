"""PromptAlign -- test-time prompting with distribution alignment (Hassan, Hassan, Huang, Sun,
Khan, Hayat, Khan; NeurIPS 2023, "Align Your Prompts: Test-Time Prompting with Distribution
Alignment for Zero-Shot Generalization", arXiv 2311.01459).

For every test image, the MaPLe prompts of a trained ImageNet MaPLe (text prompts and the
text → vision projections) are tuned on that image alone, then reset. The original and its
augmented views are classified, the ``ρ`` fraction with the lowest prediction entropy is kept
(TPT's confidence selection) and the loss (paper Eq. 5-7) is::

    L = H(p̃) + β · Σ_{l ∈ aligned blocks} [ ½·mean|μ_l − μ̂_l| + ½·mean|σ²_l − σ̂²_l| ]

``H(p̃)``: the entropy of the mean prediction over the kept views (TPT's ``avg_entropy``);
``μ_l``, ``σ²_l``: per token position and channel, the mean and (population) variance over the
kept views of the input tokens of image block ``l``; ``μ̂_l``, ``σ̂²_l``: the same statistics of a
proxy source dataset, computed offline (``methods/source_stats.py``, made by
``experiments/source_stats.py``). The original is then classified with the tuned prompts.

Matches ``jameelhassan/PromptAlign`` ``trainers/prompt_align.py`` (line numbers of bfe32b9,
``PROMPTSYNC.md`` §1.2, §3): views as TPT's but never AugMix (``AugMixAugmenter`` keeps an empty
``aug_list``, ``:494-521``); ``int(64 · 0.1) = 6`` lowest-entropy images, counted over the original
and its views and chosen once, at the first step (``select_confident_samples``, ``:750-753``,
``:784-788``); the same images for the entropy and the statistics (``TPT_THRESHOLD`` =
``ALIGN_THRESHOLD`` = 0.1); statistics over them per token (``:757-761``; the block input is the
``visual_feat`` stored by ``clip/model.py``'s MaPLe block after its prompts are swapped in,
``:337-338``, ``:468-475``); ``distr_align_loss`` with ``F.l1_loss`` means (``:797-809``);
β = ``DISTR_LOSS_W / (ALIGN_LAYER_TO − ALIGN_LAYER_FROM)`` = 100/3 (``:765``); AdamW over all the
prompt learner's tensors with torch's defaults, lr 4e-2 (DG) / 5e-4 (fine-grained config), one
step, state and optimiser reset before every image (``:635-637``, ``:694-699``); the prediction
is the original's with the tuned prompts (``:712-717``). Defaults from
``configs/trainers/PromptAlign/vit_b16_c2_ep5_batch4_2ctx_DG.yaml``: n_ctx 2, "a photo of a",
depth 3. Trainable per image on ViT-B/16: 1,185,024.

**The aligned blocks.** The config names ``ALIGN_LAYER_FROM 0``, ``ALIGN_LAYER_TO 3`` (``DG
yaml:42-43``), but ``distr_align_loss`` loops ``range(FROM, TO - 1)`` (``:805``): blocks 0 and 1
are aligned, while β is still divided by 3. ``align_layers`` defaults to ``[0, 1]``, what the
reference runs; ``[0, 1, 2]`` is what its config says (then consider β = 100/3 still, as the code
would have it, or 100/3 · 2/3 to keep the per-block weight).

**The prompt positions.** Statistics made with the very prompts tuning starts from (the
reference's, and ours) hold, at the prompt positions of the aligned blocks, exactly the values the
test views start with -- a prompt token is the same for every image, variance 0 -- so there the L1
terms start at their kink (gradient 0) and any step raises them; only the class and patch tokens
are pulled towards the source. As in the reference.

Built on MaPLe by composition (``maple.hold``): the prompt assembly, both towers' forward and the
cosine logits are MaPLe's; PromptAlign's ``state_dict``/``learned_state`` are exactly a MaPLe
checkpoint, and ``init_state`` loads a ``maple`` run's ``learned_state.pt``.

Deliberate changes:

* fp32 prompts, losses and AdamW state (the reference: fp16 CLIP under autocast with
  ``GradScaler(init_scale=1000)``, which would skip a step on an inf gradient).
* the selection pass runs the original and all views without gradients; only the kept images
  are then run again with gradients (the reference back-propagates through all 64, although the
  loss reads only the kept 6: the same loss, a tenth of the backward's memory). Their features
  in that second pass may differ from the first pass's in the last float bits (another batch size).
* ties in the entropy ranking go to the earlier image (stable sort; the reference's is unstable).
* the source statistics are checked to come from *this* model (backbone weights, starting prompts,
  blocks, transform) and from the configured source (``source_dataset``, ``source_split``,
  ``source_images_per_class``); the reference loads whatever ``VIS_MEANS`` names.
* ``predict`` without ``Batch.views`` does no tuning: MaPLe's prediction with the current prompts.
  With views, every sample of the batch is tuned independently from the same start.
* ``training_loss`` is MaPLe's cross-entropy (the ``test_time`` protocol trains nothing; a
  training protocol refuses a method with test-time views).
* ``images_per_step`` > 1 adapts that many test images at once, each on its own copy of the
  prompts stacked along a new axis (``methods/maple_stacked.py``, ``tune_stacked``): one forward,
  one backward and one AdamW step for all of them, the same numbers as the reference's batch of one
  image (tested to 1e-5 in logits). Default 1, the reference's loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from vlprompt.methods import maple
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.common import cosine_logits, observed_image_features, read_saved_state, require_images
from vlprompt.methods.maple_stacked import StackedMaPLe
from vlprompt.methods.options import AlignedMaPLeOptions, MaPLeConfig, PromptAlignConfig
from vlprompt.methods.source_stats import SourceStats, fingerprint, init_state_part, load_stats
from vlprompt.methods.test_time import (
    average_entropy_stacked,
    select_confident,
    select_confident_stacked,
    take,
)

__all__ = [
    "PromptAlign",
    "Tower",
    "alignment_loss",
    "build",
    "build_prompt",
    "read_stats",
    "same_tensors",
    "select_views",
    "stats_inputs",
    "token_statistics",
    "tune_each",
    "tune_stacked",
    "verify_start",
]


# ---------------------------------------------------------------- the objective
def token_statistics(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population variance ``(T, W)`` over the images of block-input tokens ``(N, T, W)``
    (the reference's ``torch.mean(x)`` and ``torch.mean((x − mean)²)`` over the kept views); with
    leading axes (G test images adapted at once, ``(G, N, T, W)``) each image's own: ``(G, T, W)``."""
    x = tokens.float()
    mean = x.mean(dim=-3)
    return mean, (x - mean.unsqueeze(-3)).square().mean(dim=-3)


def alignment_loss(tokens: Sequence[Tensor], source_mean: Tensor, source_var: Tensor) -> Tensor:
    """``Σ_l ½·mean|μ_l − μ̂_l| + ½·mean|σ²_l − σ̂²_l|`` (``distr_align_loss``): ``tokens[l]``
    ``(N, T, W)`` are block ``l``'s inputs over the kept images, ``source_mean``/``source_var``
    ``(L, T, W)`` the source statistics of the same blocks. ``(G, N, T, W)`` tokens give each
    image's loss, ``(G,)``."""
    loss = source_mean.new_zeros(())
    for block, x in enumerate(tokens):
        mean, var = token_statistics(x)
        loss = loss + 0.5 * (mean - source_mean[block]).abs().mean(dim=(-2, -1))
        loss = loss + 0.5 * (var - source_var[block]).abs().mean(dim=(-2, -1))
    return loss


# ---------------------------------------------------------------- the method
class PromptAlign(nn.Module):
    """MaPLe's prompts, tuned afresh on every test image's views inside :meth:`predict`."""

    def __init__(self, prompt: maple.MaPLe, cfg: PromptAlignConfig, stats: SourceStats | None) -> None:
        super().__init__()
        maple.hold(self, prompt)  # self.maple (held); its tensors registered under MaPLe's names
        self.selection_p = cfg.selection_p
        self.lr = cfg.lr
        self.steps = cfg.steps
        self.images_per_step = cfg.images_per_step
        self.align_weight = cfg.align_weight
        self.align_layers = tuple(cfg.align_layers)
        self.stats = stats
        self._verified: list[Tensor] | None = None  # the start state the statistics were checked for
        if stats is not None:
            device = self.backbone.device
            self.register_buffer("source_mean", stats.mean.to(device), persistent=False)
            self.register_buffer("source_var", stats.var.to(device), persistent=False)

    # ------------------------------------------------------------ MaPLe's forward, observed
    def text_features(self, task: str) -> Tensor:
        return maple.held(self).text_features(task)

    def image_features(self, images: Tensor) -> Tensor:
        """Image embeddings ``(N, D)`` with the current prompts."""
        return maple.held(self).image_features(images)

    def observe(self, images: Tensor, blocks: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
        """Image embeddings ``(N, D)`` with the current prompts, and the input tokens of ``blocks``."""
        return observed_image_features(self.backbone, maple.held(self).vision_prompts(), images, blocks)

    def stats_fingerprint(self) -> dict[str, str]:
        """The fingerprint a statistics file made from this model, in its current state, records."""
        return fingerprint(self.backbone, self.learned_state(), self.align_layers)

    def logits(self, task: str, images: Tensor) -> Tensor:
        """Cosine logits ``(N, n_cls)`` of ``images`` under the current prompts."""
        features = maple.held(self).image_features(images.to(self.backbone.device))
        return cosine_logits(features, self.text_features(task), self.backbone.logit_scale)

    # ------------------------------------------------------------ one test image, or G at once
    def loss(self, tower: Tower, images: Tensor, text: Tensor) -> Tensor:
        """The entropy of the mean prediction of ``images`` (the kept ones) against the class
        features ``text``, + β · the alignment of their block-input statistics, under ``tower``'s
        prompts (this method's, or G copies': ``(G, k, ...)`` images give ``(G,)`` losses)."""
        scale = self.backbone.logit_scale
        if self.align_weight == 0:
            return average_entropy_stacked(cosine_logits(tower.image_features(images), text, scale))
        features, tokens = tower.observe(images, self.align_layers)
        logits = cosine_logits(features, text, scale)
        blocks = [tokens[b] for b in self.align_layers]
        return average_entropy_stacked(logits) + self.align_weight * alignment_loss(
            blocks, self.source_mean, self.source_var
        )

    def adapt(self, task: str, images: Tensor) -> list[float]:
        """Tune the prompts in place, from their current values, on one test image's ``images``
        ``(1 + V, C, H, W)`` (original first, then its views): ``steps`` AdamW steps on the loss of
        the images selected (without gradients) at the first step. A fresh optimiser each call.
        Returns the loss before each step."""
        self._require_stats()
        return self.tune(self, [p for p in self.parameters() if p.requires_grad], task, images)

    def tune(self, tower: Tower, params: Sequence[Tensor], task: str, images: Tensor) -> list[float]:
        """:meth:`adapt`'s steps on ``params``, the tensors ``tower``'s prompts are made of: this
        method's own, or the stacked copies of G images (``images`` ``(G, 1 + V, ...)``)."""
        optimizer = torch.optim.AdamW(params, lr=self.lr)
        kept: Tensor | None = None
        losses = []
        with torch.enable_grad():
            for _ in range(self.steps):
                text = tower.text_features(task)
                if kept is None:
                    kept = take(images, select_views(tower, images, text, self.selection_p)[0])
                loss = self.loss(tower, kept, text).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        return losses

    def _require_stats(self) -> None:
        """The statistics exist when β > 0, and were taken with the prompts tuning starts from."""
        if self.align_weight == 0:
            return
        if self.stats is None:
            raise ValueError(
                f"promptalign: align_weight={self.align_weight:g} aligns to source statistics, but "
                "method.source_stats is empty: make the file with `python experiments/source_stats.py "
                "--config CONFIG` and set method.source_stats to it (or align_weight=0: TPT on MaPLe)"
            )
        verify_start(self)

    def predict(self, batch: Batch) -> Tensor:
        """Logits ``(B, n_cls)`` of the originals; each sample tuned on its own ``Batch.views``.

        Without views: MaPLe's prediction with the current prompts, no tuning. The prompts (and
        their ``.grad``) are the same after the call as before it, bit for bit.
        """
        if getattr(batch, "views", None) is not None and self.steps > 0:
            self._require_stats()  # before G images are stacked: adapt checks one image alone
        return tune_each(self, "promptalign", batch, None)

    def training_loss(self, batch: Batch) -> Tensor:
        """MaPLe's cross-entropy (the ``test_time`` protocol trains nothing)."""
        return maple.held(self).training_loss(batch)

    def learned_state(self) -> dict[str, Tensor]:
        """The starting prompts: exactly a MaPLe checkpoint's keys and shapes."""
        return maple.held(self).learned_state()

    def run_inputs(self) -> dict[str, str]:
        """What this run read beyond its options, logged with it: the statistics file and its fingerprint."""
        return stats_inputs(self.stats)


# ---------------------------------------------------------------- shared with PromptSync
class Tower(Protocol):
    """The prompted forward a test image is tuned through: the method's own MaPLe prompts
    (PromptAlign, PromptSync), or the stacked copies of G images adapted at once
    (:class:`~vlprompt.methods.maple_stacked.StackedMaPLe`, every output with a leading G)."""

    backbone: Backbone

    def text_features(self, task: str) -> Tensor: ...

    def image_features(self, images: Tensor) -> Tensor: ...

    def observe(self, images: Tensor, blocks: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]: ...


def select_views(tower: Tower, images: Tensor, text: Tensor, selection_p: float) -> tuple[Tensor, Tensor]:
    """The indices of the confident images (TPT's selection, most confident first) among
    ``images`` (original first), and the logits ``(N, n_cls)`` it ranked, both without gradients;
    for G images' ``(G, N, ...)``, each image's own: ``(G, k)`` and ``(G, N, n_cls)``."""
    with torch.no_grad():
        logits = cosine_logits(tower.image_features(images), text.detach(), tower.backbone.logit_scale)
    select = select_confident if logits.dim() == 2 else select_confident_stacked
    return select(logits, selection_p).to(images.device), logits


def tune_each(owner: nn.Module, name: str, batch: Batch, start: Sequence[Tensor] | None) -> Tensor:
    """The per-image episode of a MaPLe held by ``owner`` (PromptAlign's and PromptSync's
    ``predict``): each sample's parameters reset to ``start`` (None: their current values), then
    ``owner.adapt(task, original + views)`` when ``owner.steps`` > 0, then the original's logits. The
    parameters and their ``.grad`` are restored after the call, bit for bit. With
    ``owner.images_per_step`` > 1, :func:`tune_stacked` runs the same episodes that many at once.
    Without ``Batch.views``: MaPLe's prediction with the current prompts, no tuning."""
    views = getattr(batch, "views", None)
    if views is None:
        return maple.held(owner).predict(batch)
    images = require_images(name, batch)
    if views.dim() != 5 or views.shape[0] != len(batch):
        raise ValueError(
            f"{name}: Batch.views must be (B, V, C, H, W) with B = {len(batch)} samples, "
            f"got {tuple(views.shape)}"
        )
    if owner.images_per_step > 1:
        return tune_stacked(owner, batch.task, images, views, start)
    params = list(owner.parameters())
    saved = [p.detach().clone() for p in params]
    start = saved if start is None else start
    grads = [p.grad for p in params]
    device = owner.backbone.device
    out = []
    try:
        for b in range(len(batch)):
            with torch.no_grad():
                for p, s in zip(params, start, strict=True):
                    p.copy_(s)
            if owner.steps > 0:
                owner.adapt(batch.task, torch.cat([images[b : b + 1].to(device), views[b].to(device)]))
            with torch.no_grad():
                out.append(owner.logits(batch.task, images[b : b + 1]))
    finally:
        with torch.no_grad():
            for p, s, g in zip(params, saved, grads, strict=True):
                p.copy_(s)
                p.grad = g
    return torch.cat(out)


def tune_stacked(
    owner: nn.Module, task: str, images: Tensor, views: Tensor, start: Sequence[Tensor] | None
) -> Tensor:
    """:func:`tune_each`'s episodes, ``owner.images_per_step`` test images at a time: each group's
    start state stacked into one copy per image (:class:`StackedMaPLe`), tuned by ``owner.tune``
    in one forward and one AdamW step per step, then each original classified under its own copy.
    The same numbers as one image at a time (``methods/test_time.py``); ``owner``'s tensors are
    never touched."""
    names = [name for name, _ in owner.named_parameters()]
    state = dict(zip(names, start or [p.detach() for p in owner.parameters()], strict=True))
    device, scale = owner.backbone.device, owner.backbone.logit_scale
    out = []
    for lo in range(0, len(images), owner.images_per_step):
        hi = min(lo + owner.images_per_step, len(images))
        group = torch.cat([images[lo:hi, None].to(device), views[lo:hi].to(device)], dim=1)
        copies = StackedMaPLe(maple.held(owner), state, hi - lo)
        if owner.steps > 0:
            owner.tune(copies, copies.leaves(), task, group)
        with torch.no_grad():
            logits = cosine_logits(copies.image_features(group[:, :1]), copies.text_features(task), scale)
        out.append(logits[:, 0])
    return torch.cat(out)


def same_tensors(a: Sequence[Tensor], b: Sequence[Tensor] | None) -> bool:
    """``a`` and ``b`` hold equal tensors, pairwise (False when ``b`` is None)."""
    return b is not None and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def verify_start(owner: nn.Module) -> None:
    """``ValueError`` unless ``owner.stats`` were taken with ``owner``'s current prompts (the state
    tuning starts from); remembered in ``owner._verified`` until the prompts change."""
    params = [p.detach() for p in owner.parameters()]
    if same_tensors(params, owner._verified):
        return
    owner.stats.check_init_state(init_state_part(owner.learned_state()))
    owner._verified = [p.clone() for p in params]


def stats_inputs(stats: SourceStats | None) -> dict[str, str]:
    """The ``run_inputs`` of a statistics file: its path, fingerprint, source and image count."""
    if stats is None:
        return {}
    meta = stats.metadata
    return {
        "source_stats.file": str(stats.file),
        "source_stats.fingerprint": meta["fingerprint"],
        "source_stats.source": (
            f"folder {meta['source_folder']}"
            if meta.get("source_folder")
            else f"{meta.get('source_dataset')}/{meta.get('source_split')}"
        ),
        "source_stats.images": meta.get("images", ""),
    }


# ---------------------------------------------------------------- building it
def load_init_state(prompt: maple.MaPLe, path: str, name: str = "promptalign") -> None:
    """``prompt.load_state_dict`` from a ``maple`` run's ``learned_state.pt``: the same keys and
    shapes (n_ctx, depth, the backbone's widths), every error naming the file (and method ``name``)."""
    file = Path(path).expanduser()
    state = read_saved_state(path, f"{name} init_state")
    expected = prompt.state_dict()
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{name} init_state: {file} is not a learned_state.pt (name -> tensor)")
    if set(state) != set(expected):
        raise ValueError(
            f"{name} init_state: {file} holds {sorted(state)}, but this MaPLe (n_ctx, "
            f"prompt_depth as configured) has {sorted(expected)}; it needs the learned_state.pt of a "
            "maple run with the same n_ctx and prompt_depth"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(
            f"{name} init_state: shapes in {file} differ from this MaPLe's ({'; '.join(wrong)}): "
            "another backbone, n_ctx or prompt_depth"
        )
    prompt.load_state_dict({k: v.float() for k, v in state.items()})


def build_prompt(
    backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: AlignedMaPLeOptions, name: str
) -> maple.MaPLe:
    """MaPLe for ``tasks`` as ``cfg`` says, started from its ``init_state``, the blocks checked."""
    bad = [b for b in cfg.align_layers if b >= backbone.vision_layers]
    if bad:
        raise ValueError(
            f"{name} align_layers {cfg.align_layers}: {backbone.name} has image blocks "
            f"0 .. {backbone.vision_layers - 1}"
        )
    options = MaPLeConfig(n_ctx=cfg.n_ctx, prompt_depth=cfg.prompt_depth, ctx_init=cfg.ctx_init)
    prompt = maple.build(backbone, tasks, options)
    if cfg.init_state:
        load_init_state(prompt, cfg.init_state, name)
    return prompt


def read_stats(
    backbone: Backbone, cfg: AlignedMaPLeOptions, name: str, classes: Sequence[str] | None = None
) -> SourceStats | None:
    """The statistics file ``cfg.source_stats`` names (None: none), checked for this backbone,
    the blocks, the source and the block inputs' shape (the starting prompts: when tuning starts);
    with ``classes``, their per-class rows (each must be in the file)."""
    if not cfg.source_stats:
        return None
    parts = fingerprint(backbone, None, cfg.align_layers)  # init_state: when tuning starts
    stats = load_stats(cfg.source_stats, parts, source=cfg.source_statistics().source(), classes=classes)
    tokens = backbone.token_positions("vision") + cfg.n_ctx  # class token, patches, prompts
    if tuple(stats.mean.shape[1:]) != (tokens, backbone.vision_width):
        raise ValueError(
            f"{name}: source statistics {stats.file} have tokens x width "
            f"{tuple(stats.mean.shape[1:])}, this model's block inputs {(tokens, backbone.vision_width)}"
        )
    return stats


def build(backbone: Backbone, tasks: Mapping[str, Sequence[str]], cfg: PromptAlignConfig) -> PromptAlign:
    """MaPLe for ``tasks``, started from ``init_state``, with the source statistics it aligns to."""
    return PromptAlign(
        build_prompt(backbone, tasks, cfg, "promptalign"), cfg, read_stats(backbone, cfg, "promptalign")
    )
