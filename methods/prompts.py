"""Learned context spliced into frozen token embeddings: the prompt plumbing CoOp's kin share.

CoOp's ``PromptLearner`` (``KaiyangZhou/CoOp trainers/coop.py``) tokenises ``"<prefix> <class name>."``
once, keeps the embedding of SOS (``token_prefix``) and of everything after the context slots --
class tokens, ``"."``, EOS, padding (``token_suffix``) -- and assembles ``cat([prefix, ctx, suffix])``
per class at every forward pass. CoCoOp, KgCoOp, IVLP, MaPLe, SoftCPT (its class prompts and its
task prompts) and TPT do the same; :class:`PromptEmbeddings` does it once for all of them.

A method registers its :class:`PromptEmbeddings` as a submodule, so ``.to()`` moves the buffers, but
the component owns no parameter and its buffers are not persistent: the method's ``state_dict()`` /
``learned_state()`` hold what it learned under its own names (``ctx``, ``task_ctx`` ...), and the
context is passed in at each call. :class:`DeepPrompts` adds the forward IVLP and MaPLe share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone, LayerHook
from vlprompt.methods.common import (
    TaskClasses,
    cosine_logits,
    hold_backbone,
    prompted_image_features,
    require_images,
    text_deep_prompt_hook,
)


class PromptEmbeddings(nn.Module):
    """The fixed token embeddings around ``n_ctx`` context slots of one sentence per row.

    Rows are the classes of every task (:class:`~vlprompt.methods.common.TaskClasses`, a batch uses
    its task's rows) or, without ``classes``, any sentences used all together (SoftCPT's tasks).
    """

    def __init__(
        self,
        backbone: Backbone,
        prefix: Tensor,
        suffix: Tensor,
        eot: Tensor,
        name_lens: Sequence[int],
        *,
        classes: TaskClasses | None = None,
        position: str = "end",
    ) -> None:
        super().__init__()
        hold_backbone(self, backbone)
        self.register_buffer("token_prefix", prefix, persistent=False)  # (R, 1, W): SOS
        self.register_buffer("token_suffix", suffix, persistent=False)  # (R, L-1-n_ctx, W)
        self.register_buffer("eot", eot, persistent=False)  # (R,): EOS position in each sentence
        self.n_ctx = backbone.context_length - 1 - int(suffix.shape[1])
        self.name_lens = tuple(name_lens)  # BPE tokens of each row's name alone
        self.classes = classes
        self.position = position  # where the name sits: end | middle | front of the context

    def rows(self, task: str | None = None) -> slice:
        """The rows of ``task`` (``ValueError`` listing the known tasks otherwise); all rows for None."""
        if task is None:
            return slice(None)
        if self.classes is None:
            raise ValueError(f"these prompts are not split into tasks; got task {task!r}")
        return self.classes.rows(task)

    def embed(self, ctx: Tensor, index: slice | Tensor, length: int | None = None) -> Tensor:
        """``cat([prefix, ctx, suffix])`` ``(n, L, W)`` of the rows ``index``, with ``ctx`` one
        ``(n_ctx, W)`` block per selected row; only the first ``length`` positions when given."""
        suffix = (
            self.token_suffix[index]
            if length is None
            else self.token_suffix[index, : length - 1 - self.n_ctx]
        )
        return torch.cat([self.token_prefix[index], ctx, suffix], dim=1)

    def prompts(self, ctx: Tensor, task: str | None = None) -> tuple[Tensor, Tensor]:
        """Prompt embeddings ``(n, L, W)`` of ``task``'s rows with context ``ctx``, and their EOS positions.

        ``ctx`` is ``(n_ctx, W)``, shared by every row, or ``(R, n_ctx, W)``, one block per row of every
        task (CoOp's class-specific context). The name tokens follow the context (``end``), sit between
        its halves, split at ``n_ctx // 2`` (``middle``), or precede it (``front``), cut out of the suffix
        by the name's own token count.
        """
        rows = self.rows(task)
        prefix = self.token_prefix[rows]
        ctx = ctx[rows] if ctx.dim() == 3 else ctx.unsqueeze(0).expand(prefix.shape[0], -1, -1)
        if self.position == "end":
            return self.embed(ctx, rows), self.eot[rows]
        suffix, half = self.token_suffix[rows], self.n_ctx // 2
        out = []
        for i, name_len in enumerate(self.name_lens[rows]):
            cls_tokens, rest = suffix[i : i + 1, :name_len], suffix[i : i + 1, name_len:]
            if self.position == "middle":
                parts = [prefix[i : i + 1], ctx[i : i + 1, :half], cls_tokens, ctx[i : i + 1, half:], rest]
            else:  # front
                parts = [prefix[i : i + 1], cls_tokens, ctx[i : i + 1], rest]
            out.append(torch.cat(parts, dim=1))
        return torch.cat(out, dim=0), self.eot[rows]

    def text_features_stacked(self, ctx: Tensor, task: str | None = None) -> Tensor:
        """Text features ``(G, n, D)`` of ``task``'s rows under each of ``G`` shared contexts
        ``ctx`` ``(G, n_ctx, W)`` (one per test image being adapted): the ``G · n`` prompts go
        through the text tower together, in its chunks. Row ``g`` equals
        ``text_features(ctx[g], task)``."""
        prompts = [self.prompts(c, task) for c in ctx]
        x = torch.cat([p for p, _ in prompts])
        eot = torch.cat([e for _, e in prompts])
        return self.backbone.encode_text_embeddings(x, eot).view(ctx.shape[0], len(prompts[0][1]), -1)

    def text_features(
        self, ctx: Tensor, task: str | None = None, *, layer_hook: LayerHook | None = None
    ) -> Tensor:
        """Text features ``(n, D)`` (not normalised) of :meth:`prompts`, read at each EOS (CoOp's
        ``TextEncoder``); ``layer_hook`` as in :meth:`Backbone.encode_text_embeddings`."""
        x, eot = self.prompts(ctx, task)
        return self.backbone.encode_text_embeddings(x, eot, layer_hook=layer_hook)


def sentence_prompts(
    backbone: Backbone,
    names: Sequence[str],
    prompt_prefix: str,
    n_ctx: int,
    too_long: Callable[[int, str, int, int], str],
    *,
    classes: TaskClasses | None = None,
    position: str = "end",
) -> PromptEmbeddings:
    """``"<prompt_prefix> <name>."`` tokenised for every name, the embeddings around its ``n_ctx``
    context positions kept (CoOp ``PromptLearner.__init__``). A sentence longer than the context is a
    ``ValueError`` with ``too_long(index, name, name tokens, limit)``, where the reference's tokenizer
    silently cuts it."""
    limit = backbone.context_length
    name_lens = tuple(backbone.num_tokens(name) for name in names)
    for index, (name, name_len) in enumerate(zip(names, name_lens, strict=True)):
        if n_ctx + name_len + 3 > limit:
            raise ValueError(too_long(index, name, name_len, limit))
    ids = backbone.tokenize([f"{prompt_prefix} {name}." for name in names])
    with torch.no_grad():
        embedding = backbone.token_embedding(ids).float()
    return PromptEmbeddings(
        backbone,
        prefix=embedding[:, :1].clone(),
        suffix=embedding[:, 1 + n_ctx :].clone(),
        eot=backbone.eot_positions(ids),
        name_lens=name_lens,
        classes=classes,
        position=position,
    )


def class_prompts(
    backbone: Backbone,
    classes: TaskClasses,
    prompt_prefix: str,
    n_ctx: int,
    method: str,
    position: str = "end",
) -> PromptEmbeddings:
    """:func:`sentence_prompts` of every class of every task, errors naming the class and ``method``.

    ``middle``/``front`` cut the class tokens out of the suffix by their standalone count; that is only
    right if the name is tokenised the same inside the prompt, which is checked here.
    """

    def too_long(row: int, name: str, name_len: int, limit: int) -> str:
        return (
            f"{method}: class name {name!r} (task {classes.task_of_row(row)!r}) is {name_len} tokens; "
            f"with {n_ctx} context tokens, start/end tokens and '.' its prompt needs "
            f"{n_ctx + name_len + 3} positions but {backbone.name} has {limit}. "
            "Shorten the class name or lower n_ctx."
        )

    prompts = sentence_prompts(
        backbone, classes.names, prompt_prefix, n_ctx, too_long, classes=classes, position=position
    )
    if position != "end":
        expected = torch.tensor(prompts.name_lens, device=prompts.eot.device) + n_ctx + 2
        bad = (prompts.eot != expected).nonzero().flatten().tolist()
        if bad:
            name = classes.names[bad[0]]
            raise ValueError(
                f"{method}: class name {name!r} tokenises differently inside '{prompt_prefix} {name}.'; "
                "class_token_position middle/front needs names that do not merge with the final '.'"
            )
    return prompts


class DeepPrompts(nn.Module):
    """The forward of deep prompts in both towers, shared by IVLP and MaPLe (the MaPLe repository's
    ``clip/model.py``, ``ResidualAttentionBlock_IVLP`` / ``_MaPLe`` and ``VisionTransformer_MaPLe``).

    Text: the layer-0 context ``ctx`` after SOS in the class prompts; before text block ``i = 1 ..
    len(deep)`` positions ``1 .. n_ctx`` are replaced by ``deep[i - 1]``. Vision: ``vision[0]`` appended
    after the positional embedding, ``vision[i]`` replacing it before image block ``i``. Cosine logits.
    The prompts are passed in, so each method supplies only what differs: IVLP's visual prompts are
    parameters of their own, MaPLe's are projections of its text prompts.
    """

    def __init__(self, method: str, prompts: PromptEmbeddings) -> None:
        super().__init__()
        hold_backbone(self, prompts.backbone)
        self.method = method
        self.prompts = prompts

    def text_features(self, ctx: Tensor, deep: Sequence[Tensor], task: str) -> Tensor:
        """Text features ``(n_cls, D)`` of ``task``'s classes under the text prompts."""
        return self.prompts.text_features(ctx, task, layer_hook=text_deep_prompt_hook(list(deep)))

    def image_features(self, vision: Sequence[Tensor], images: Tensor) -> Tensor:
        """Image features ``(B, D)`` under the visual prompts (the frozen tower when there are none)."""
        return prompted_image_features(self.backbone, vision, images)

    def logits(self, ctx: Tensor, deep: Sequence[Tensor], vision: Sequence[Tensor], batch: Batch) -> Tensor:
        """Cosine logits ``(B, n_cls)`` of the batch's images; cached features are refused."""
        images = require_images(self.method, batch)
        return cosine_logits(
            self.image_features(vision, images),
            self.text_features(ctx, deep, batch.task),
            self.backbone.logit_scale,
        )
