"""MaPLe's forward under G independent copies of its learned tensors: what lets PromptAlign and
PromptSync adapt G test images in one forward pass and one AdamW step.

Each copy holds every tensor a MaPLe learns -- ``ctx``, ``proj``, the deep text prompts and their
projections -- stacked along a new leading axis ``G`` (leaves that need grad; ``test_time.py``
says why one step on them equals G separate per-image episodes). Copy ``g``'s text prompts make
copy ``g``'s class prompts, and its projections make the visual prompts of copy ``g``'s images
only, through the backbone's hooks with one prompt per row (``common.per_row``): the forward is
:class:`~vlprompt.methods.prompts.DeepPrompts`' with ``nn.Linear`` replaced by its batched form,
equal to MaPLe's own forward with copy ``g`` loaded up to the rounding of the batched matmuls
(tested to 1e-5).

The text tower sees several copies' prompts together while they fit in one of its chunks
(``Backbone.text_chunk_size`` rows: the per-row deep prompts must meet every row at once); a copy
whose classes alone fill a chunk (ImageNet's 1000) is encoded on its own, chunked as usual. Under
gradients the calls recompute their activations in backward exactly as one chunked call would
(``Backbone.checkpoints_text`` of the total chunk count), so G copies hold no more text-tower
activations than the memory budget allows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from vlprompt.methods.common import observed_image_features, prompted_image_features, text_deep_prompt_hook
from vlprompt.methods.maple import MaPLe
from vlprompt.methods.test_time import stacked_copies

__all__ = ["StackedMaPLe"]


class StackedMaPLe:
    """``G`` independent copies of a MaPLe's learned tensors, and MaPLe's forward under each."""

    def __init__(self, prompt: MaPLe, start: Mapping[str, Tensor], copies: int) -> None:
        """Copies of ``start`` (MaPLe's parameter names → tensors, e.g. its ``named_parameters``)
        for ``prompt``'s class prompts and backbone."""
        names = [name for name, _ in prompt.named_parameters()]
        if sorted(start) != sorted(names):
            raise ValueError(f"a MaPLe start state needs {sorted(names)}, got {sorted(start)}")
        self.prompt = prompt
        self.backbone = prompt.backbone
        self.copies = copies
        self.state = {name: stacked_copies(start[name], copies) for name in names}
        self.depth = len(prompt.compound_prompts_text)

    def leaves(self) -> list[Tensor]:
        """The stacked tensors, in MaPLe's parameter order: what the optimiser steps."""
        return list(self.state.values())

    def copy(self, g: int) -> dict[str, Tensor]:
        """Copy ``g``'s tensors, detached (a MaPLe state dict of its parameters)."""
        return {name: t[g].detach() for name, t in self.state.items()}

    # ------------------------------------------------------------ the prompts of each copy
    def deep_text(self) -> list[Tensor]:
        """``[P_1 .. P_{J-1}]``, each ``(G, n_ctx, W_text)``."""
        return [self.state[f"compound_prompts_text.{k}"] for k in range(self.depth)]

    def vision_prompts(self) -> list[Tensor]:
        """``[F_0(P_0), F_1(P_1), ...]`` of every copy, each ``(G, n_ctx, W_vision)``
        (:meth:`MaPLe.vision_prompts`, the projections batched)."""
        pairs = [("ctx", "proj")] + [
            (f"compound_prompts_text.{k}", f"compound_prompt_projections.{k}") for k in range(self.depth)
        ]
        s = self.state
        return [torch.baddbmm(s[f"{f}.bias"].unsqueeze(1), s[p], s[f"{f}.weight"].mT) for p, f in pairs]

    # ------------------------------------------------------------ the two towers
    def text_features(self, task: str) -> Tensor:
        """Text features ``(G, n_cls, D)`` of ``task``'s classes under each copy's text prompts."""
        embeddings = self.prompt.towers.prompts
        n_cls = len(embeddings.eot[embeddings.rows(task)])
        size = self.backbone.text_chunk_size
        per_call = max(1, size // n_cls)
        calls = -(-self.copies // per_call)
        chunks = calls if per_call > 1 else self.copies * -(-n_cls // size)
        checkpoint = self.backbone.checkpoints_text(chunks)
        ctx, deep = self.state["ctx"], self.deep_text()
        out = []
        for lo in range(0, self.copies, per_call):
            hi = min(lo + per_call, self.copies)
            rows = [embeddings.prompts(ctx[g], task) for g in range(lo, hi)]
            x, eot = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
            if hi - lo == 1:  # a copy of its own: its prompts shared by its rows, chunked as usual
                hook, chunk = text_deep_prompt_hook([d[lo] for d in deep]), None
            else:  # one chunk, one prompt per row
                hook = text_deep_prompt_hook([d[lo:hi].repeat_interleave(n_cls, 0) for d in deep])
                chunk = len(x)
            encoded = self.backbone.encode_text_embeddings(
                x, eot, layer_hook=hook, chunk_size=chunk, checkpoint=checkpoint
            )
            out.append(encoded.view(hi - lo, n_cls, -1))
        return torch.cat(out)

    def image_features(self, images: Tensor) -> Tensor:
        """Image features ``(G, N, D)`` of ``images`` ``(G, N, C, H, W)``, copy ``g``'s visual
        prompts for images ``[g]``."""
        flat, prompts = self._per_image(images)
        return prompted_image_features(self.backbone, prompts, flat).view(*images.shape[:2], -1)

    def observe(self, images: Tensor, blocks: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
        """:meth:`image_features`, and the input ``(G, N, T, W)`` of each image block in ``blocks``
        (``common.observed_image_features``)."""
        flat, prompts = self._per_image(images)
        features, tokens = observed_image_features(self.backbone, prompts, flat, blocks)
        shape = images.shape[:2]
        return features.view(*shape, -1), {b: t.view(*shape, *t.shape[1:]) for b, t in tokens.items()}

    def _per_image(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The images flattened to ``(G·N, ...)`` and each copy's visual prompts repeated per image."""
        if images.dim() != 5 or images.shape[0] != self.copies:
            raise ValueError(f"expected images (G={self.copies}, N, C, H, W), got {tuple(images.shape)}")
        n = images.shape[1]
        prompts = [p.repeat_interleave(n, 0) for p in self.vision_prompts()]
        return images.flatten(0, 1).to(self.backbone.device), prompts
