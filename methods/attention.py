"""Why prompts work: a prompted block's attention split into what its prompts do through their keys
and through their values (Ma, Xie, Wei, Sun, Fan, Bao, Guo, Zheng, "Understanding the Multi-modal
Prompts of the Pre-trained Vision-Language Model", arXiv 2312.11570; ``reference/METHODS.md`` §4).

For query ``i`` of a block whose sequence holds prompt positions ``P`` and input positions ``I``,
head ``h``'s attention ``a^h_ij = softmax_j(q^h_i · k^h_j / √d + m_ij)`` (``m``: the text tower's
causal mask) and the output projection ``W_o, b_o``, the attention sub-layer is exactly::

    attn_i = [W_o ⊕_h Σ_{j∈I} a^h_ij v^h_j + b_o]  +  W_o ⊕_h Σ_{p∈P} a^h_ip v^h_p
           =            token term T_i             +        prompt term V_i

(``⊕_h``: the heads concatenated). The prompts act in two ways (the paper's Eq. for
``Attn(x_i) = Σ_j a_ij v_j + Σ_p a_ip v_p``): (1) through their **keys**, which take the share
``s_i = mean_h Σ_{p∈P} a^h_ip`` of each query's attention and so re-weight what it reads from the
input -- ``a^h_ij = (1 − s^h_i) a'^h_ij``, with ``a'`` the attention over the input keys alone;
(2) through their **values**: ``V_i`` is added to every token's update, which the paper reads as a
dataset bias and credits with the gain. ``b_o`` is added whatever the prompts do, so it goes with
the token term. The block with its prompts out of the attention (prompt keys masked) gives
``U_i = W_o ⊕_h Σ_{j∈I} a'^h_ij v^h_j + b_o``; the prompts' whole contribution is
``Δ_i = T_i + V_i − U_i``.

The ablations (:data:`ABLATIONS`) replace each block's attention through the backbone's generic
attention hook (``clip.BlockHooks.attention``, opened around a trained method with
``Backbone.scoped_block_hooks``, so the method runs unchanged): (a) ``mean_bias`` -- prompts out of
the attention, their contribution ``Δ`` replaced by its dataset mean, a fixed bias per block and
position; (b) ``zero`` -- prompts out, nothing in their place; (c) ``keys_only`` -- prompt keys kept
(the attention as trained), values zeroed (``T`` alone); (d) ``mean_values`` -- keys kept, the value
term ``V`` replaced by its dataset mean (the literal reading of "a bias in place of ``Σ_p a_ip v_p``").
If prompts work as a bias, (a) keeps most of the gain over zero-shot and (b) and (c) lose it.

**What "the dataset" is, per tower.** Image tower: the images of a split, one sequence each.
Text tower: the class prompts, one sequence per class -- its inputs are the classes, never the
images. The means of (a)/(d) are per block and per position: over images, or over classes, a class
counted only at positions up to its end-of-text token (later positions reach nothing: the tower
is causal). Past the class name, classes with names of different lengths hold different tokens at
one position (the EOT of one, a name token of another): the text mean is per absolute position, a
function of position alone -- input-independent, like the paper's bias -- not aligned to the EOT.

**Which positions are prompts** is declared by the method (capability ``block_prompts``: tower →
(prompted blocks, tokens per block)), never sniffed: text prompts sit at positions ``1 .. n``
(after SOS: the layer-0 context and ``common.text_deep_prompt_hook``), visual prompts are the ``n``
tokens appended after the image's (``common.vision_prompt_hooks``). Past the prompted depth those
positions carry the transformer's outputs at the prompt slots (no fresh prompt is swapped in);
they are still the prompts' positions, analysed and ablated as such (``fresh`` in the tables says
which blocks receive a learned prompt).

Everything is computed in float32 whatever the backbone's precision, and only while a hook is
open: the backbone's own forward is untouched (``tests/orchestrator/test_goldens.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlprompt.methods.clip import AttentionCall, AttentionHook, Backbone
from vlprompt.methods.options import PromptTokens

TOWERS = ("text", "vision")

#: Ablation → what it does to every block's attention in the towers it is applied to.
ABLATIONS: dict[str, str] = {
    "none": "as trained (the explicit attention maths: token term + prompt term)",
    "mean_bias": "(a) prompts out of the attention; their contribution replaced by its dataset mean",
    "zero": "(b) prompts out of the attention; nothing in their place",
    "keys_only": "(c) prompt keys kept (attention as trained), prompt values zeroed",
    "mean_values": "(d) prompt keys kept; the value term replaced by its dataset mean",
}
#: The ablations that read the dataset means (:meth:`TowerStats.means`).
NEEDS_MEANS = ("mean_bias", "mean_values")


@dataclass(frozen=True)
class PromptSlots:
    """Where one tower's prompts sit in each block's sequence, from the method's declaration."""

    tower: str
    tokens: int
    """Prompt tokens per block."""
    depth: int
    """Blocks ``0 .. depth-1`` receive a learned prompt (``fresh``)."""
    image_tokens: int | None = None
    """Image tower: class token + patches, after which the prompts are appended. None: the text
    tower, prompts at positions ``1 .. tokens``."""

    def positions(self, length: int, device: torch.device) -> Tensor:
        """``(length,)`` bool, True at the prompt positions of a ``length``-token sequence.

        An image sequence of exactly the image's tokens holds no prompt (all False); any other
        length than image + declared prompts is a ``ValueError`` -- the declaration is wrong.
        """
        where = torch.zeros(length, dtype=torch.bool, device=device)
        if self.image_tokens is None:
            if length <= self.tokens:
                raise ValueError(
                    f"text sequence of {length} positions cannot hold {self.tokens} prompts after SOS"
                )
            where[1 : 1 + self.tokens] = True
            return where
        if length == self.image_tokens:
            return where
        if length != self.image_tokens + self.tokens:
            raise ValueError(
                f"image-tower sequence of {length} tokens, expected {self.image_tokens} image tokens "
                f"+ {self.tokens} prompts: the method's block_prompts declaration (methods/__init__.py) "
                "does not match the tokens it appends"
            )
        where[self.image_tokens :] = True
        return where


def prompt_slots(backbone: Backbone, declared: PromptTokens) -> dict[str, PromptSlots]:
    """Each declared tower's :class:`PromptSlots` on ``backbone`` (depths capped at its blocks, as
    the methods cap them; MaPLe caps at the shallower tower, which its declaration cannot know)."""
    out = {}
    for tower, (depth, tokens) in declared.towers.items():
        if tower not in TOWERS:
            raise ValueError(f"block prompts declared for tower {tower!r}; towers are {', '.join(TOWERS)}")
        if not tokens or tokens < 1:
            raise ValueError(f"block prompts of the {tower} tower need a token count >= 1, got {tokens}")
        blocks = backbone.text_layers if tower == "text" else backbone.vision_layers
        image = backbone.token_positions("vision") if tower == "vision" else None
        out[tower] = PromptSlots(tower, int(tokens), min(int(depth), blocks), image)
    return out


# ------------------------------------------------------------------------------ the decomposition


@dataclass(frozen=True)
class Decomposition:
    """One block's attention output split by key positions; all ``(N, L, W)`` float32."""

    token: Tensor
    """``T``: what the queries read from the input keys, out-projected, with ``b_o``."""
    prompt: Tensor
    """``V``: what they read from the prompt keys, out-projected without ``b_o``."""
    unprompted: Tensor
    """``U``: the attention with the prompt keys masked out (softmax over the input keys only)."""
    share: Tensor
    """``(N, L)``: each query's attention on the prompt keys, averaged over heads."""
    is_prompt: Tensor
    """``(L,)`` bool: the prompt positions."""

    @property
    def output(self) -> Tensor:
        """``T + V``: the block's attention output."""
        return self.token + self.prompt

    @property
    def contribution(self) -> Tensor:
        """``Δ = T + V − U``: everything the prompts change in this block's attention."""
        return self.output - self.unprompted


def _heads(attention: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys, values ``(N, H, L, d)`` of ``x`` ``(N, L, W)``, as torch's
    ``nn.MultiheadAttention`` splits its packed ``in_proj`` (rows q | k | v, head ``h`` = columns
    ``h·d .. (h+1)·d``)."""
    if not isinstance(attention, nn.MultiheadAttention):
        raise NotImplementedError(
            f"the attention decomposition needs torch's nn.MultiheadAttention (open_clip's "
            f"ResidualAttentionBlock), got {type(attention).__name__}"
        )
    if attention.in_proj_weight is None or attention.bias_k is not None or attention.add_zero_attn:
        raise NotImplementedError(
            "the attention decomposition needs a packed in_proj_weight without bias_k/bias_v or "
            "add_zero_attn (open_clip's blocks); this nn.MultiheadAttention has other options"
        )
    n, length, width = x.shape
    heads = attention.num_heads
    bias = None if attention.in_proj_bias is None else attention.in_proj_bias.float()
    qkv = F.linear(x.float(), attention.in_proj_weight.float(), bias)
    q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    return q, k, v


def _out(attention: nn.MultiheadAttention, per_head: Tensor, with_bias: bool) -> Tensor:
    """Heads ``(N, H, L, d)`` concatenated and out-projected (``b_o`` only ``with_bias``)."""
    n, heads, length, d = per_head.shape
    merged = per_head.transpose(1, 2).reshape(n, length, heads * d)
    proj = attention.out_proj
    bias = proj.bias.float() if with_bias and proj.bias is not None else None
    return F.linear(merged, proj.weight.float(), bias)


def decompose(attention: nn.Module, x: Tensor, mask: Tensor | None, is_prompt: Tensor) -> Decomposition:
    """The token term, prompt term, unprompted output and prompt share of one block's attention.

    ``x``: the block's normalised input ``(N, L, W)``; ``mask``: additive ``(L, L)`` or None;
    ``is_prompt``: ``(L,)`` bool. Position 0 (SOS, the class token) is never a prompt, so every
    query keeps at least one input key when the prompts are masked out.
    """
    q, k, v = _heads(attention, x)
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits + mask.to(logits.dtype)
    weights = logits.softmax(dim=-1)  # (N, H, L queries, L keys)
    on_tokens = weights.masked_fill(is_prompt, 0.0)
    on_prompts = weights.masked_fill(~is_prompt, 0.0)
    without = logits.masked_fill(is_prompt, float("-inf")).softmax(dim=-1)
    return Decomposition(
        token=_out(attention, on_tokens @ v, with_bias=True),
        prompt=_out(attention, on_prompts @ v, with_bias=False),
        unprompted=_out(attention, without @ v, with_bias=True),
        share=on_prompts.sum(dim=-1).mean(dim=1),
        is_prompt=is_prompt,
    )


# ------------------------------------------------------------------------------ the ablations


@dataclass(frozen=True)
class BlockMeans:
    """Dataset means of one block, per position ``(L, W)`` (0 where no sequence reached)."""

    contribution: Tensor
    """``Δ``'s mean: what ``mean_bias`` adds to the unprompted attention."""
    prompt: Tensor
    """``V``'s mean: what ``mean_values`` adds to the token term."""


def _leading(mean: Tensor, length: int, block: int) -> Tensor:
    if length > mean.shape[0]:
        raise ValueError(
            f"block {block}: a sequence of {length} positions, but the dataset means cover "
            f"{mean.shape[0]} (compute them on the sequences being ablated)"
        )
    return mean[:length]


def ablated(parts: Decomposition, ablation: str, means: BlockMeans | None, block: int) -> Tensor:
    """The attention output under ``ablation`` (:data:`ABLATIONS`)."""
    if ablation == "none":
        return parts.output
    if ablation == "zero":
        return parts.unprompted
    if ablation == "keys_only":
        return parts.token
    if means is None:
        raise ValueError(f"ablation {ablation!r} needs the dataset means of block {block}")
    length = parts.token.shape[1]
    if ablation == "mean_bias":
        return parts.unprompted + _leading(means.contribution, length, block).to(parts.token)
    return parts.token + _leading(means.prompt, length, block).to(parts.token)


Observer = Callable[[AttentionCall, Decomposition], None]


def attention_hook(
    slots: PromptSlots,
    ablation: str = "none",
    means: Mapping[int, BlockMeans] | None = None,
    observe: Observer | None = None,
) -> AttentionHook:
    """An attention hook (``clip.BlockHooks.attention``) for one tower: every block's attention
    decomposed, shown to ``observe`` (e.g. :meth:`TowerStats.observe`), and its output returned
    under ``ablation`` -- ``"none"`` returns ``T + V``, the block's own output up to float rounding."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; ablations: {', '.join(ABLATIONS)}")
    if ablation in NEEDS_MEANS and means is None:
        raise ValueError(f"ablation {ablation!r} needs the dataset means (TowerStats.means())")

    def hook(call: AttentionCall) -> Tensor:
        is_prompt = slots.positions(call.x.shape[1], call.x.device)
        parts = decompose(call.attention, call.x, call.mask, is_prompt)
        if observe is not None:
            observe(call, parts)
        block_means = means.get(call.block) if means is not None else None
        if ablation in NEEDS_MEANS and block_means is None:
            raise ValueError(f"no dataset means for {slots.tower} block {call.block}")
        return ablated(parts, ablation, block_means, call.block)

    return hook


# ------------------------------------------------------------------------------ statistics


@dataclass
class _Sums:
    """float64 running sums of one block over the sequences seen (rows of every batch)."""

    rows: int = 0
    share_readout: float = 0.0
    prompt_norm_readout: float = 0.0
    token_norm_readout: float = 0.0
    readout_sq: float = 0.0
    readout_sum: Tensor | None = None  # (W,) Σ V at the readout
    queries: int = 0  # live input queries (not prompts; text: up to each row's EOT)
    share_all: float = 0.0
    prompt_norm_all: float = 0.0
    token_norm_all: float = 0.0
    count: Tensor | None = None  # (L,) rows live at each position
    prompt_sum: Tensor | None = None  # (L, W)
    prompt_sq: Tensor | None = None  # (L,) Σ ‖V‖²
    contribution_sum: Tensor | None = None  # (L, W)
    is_prompt: Tensor | None = None  # (L,) of the longest sequence seen

    def add(self, parts: Decomposition, readout: Tensor, live: Tensor) -> None:
        token, prompt = parts.token.double(), parts.prompt.double()
        share = parts.share.double()
        rows = torch.arange(token.shape[0], device=token.device)
        at = prompt[rows, readout]
        self.rows += token.shape[0]
        self.share_readout += float(share[rows, readout].sum())
        self.prompt_norm_readout += float(at.norm(dim=-1).sum())
        self.token_norm_readout += float(token[rows, readout].norm(dim=-1).sum())
        self.readout_sq += float(at.square().sum())
        self.readout_sum = at.sum(dim=0) + (0 if self.readout_sum is None else self.readout_sum)
        queries = live & ~parts.is_prompt
        self.queries += int(queries.sum())
        self.share_all += float(share[queries].sum())
        self.prompt_norm_all += float(prompt.norm(dim=-1)[queries].sum())
        self.token_norm_all += float(token.norm(dim=-1)[queries].sum())
        self._add_positions(prompt, parts.contribution.double(), live.double(), parts.is_prompt)

    def _add_positions(self, prompt: Tensor, contribution: Tensor, weight: Tensor, is_prompt: Tensor) -> None:
        """Per-position sums over the rows live there (the means of the ablations)."""
        length, width = prompt.shape[1:]
        if self.count is None or self.count.shape[0] < length:
            self._grow(length, width, prompt.device)
            self.is_prompt = is_prompt
        assert self.count is not None and self.prompt_sum is not None
        assert self.prompt_sq is not None and self.contribution_sum is not None
        self.count[:length] += weight.sum(dim=0)
        self.prompt_sum[:length] += (prompt * weight[..., None]).sum(dim=0)
        self.prompt_sq[:length] += (prompt.square().sum(dim=-1) * weight).sum(dim=0)
        self.contribution_sum[:length] += (contribution * weight[..., None]).sum(dim=0)

    def _grow(self, length: int, width: int, device: torch.device) -> None:
        def padded(t: Tensor | None, shape: tuple[int, ...]) -> Tensor:
            out = torch.zeros(shape, dtype=torch.float64, device=device)
            if t is not None:
                out[: t.shape[0]] = t
            return out

        self.count = padded(self.count, (length,))
        self.prompt_sum = padded(self.prompt_sum, (length, width))
        self.prompt_sq = padded(self.prompt_sq, (length,))
        self.contribution_sum = padded(self.contribution_sum, (length, width))

    def means(self) -> BlockMeans:
        assert self.count is not None and self.prompt_sum is not None and self.contribution_sum is not None
        per = self.count.clamp_min(1.0)[:, None]
        return BlockMeans((self.contribution_sum / per).float(), (self.prompt_sum / per).float())

    def dependence_readout(self) -> float:
        """``√(mean ‖V − V̄‖²) / ‖V̄‖`` of the prompt term at the readout, over the sequences."""
        assert self.readout_sum is not None
        mean = self.readout_sum / self.rows
        return _ratio(self.readout_sq / self.rows - float(mean.square().sum()), float(mean.square().sum()))

    def dependence_all(self) -> float:
        """The same over every live input position: ``√(Σ_i var_i / Σ_i ‖V̄_i‖²)``."""
        assert self.count is not None and self.prompt_sum is not None and self.prompt_sq is not None
        assert self.is_prompt is not None
        seen = (self.count > 0) & ~self.is_prompt
        n = self.count[seen]
        mean_sq = (self.prompt_sum[seen] / n[:, None]).square().sum(dim=-1)
        return _ratio(float((self.prompt_sq[seen] / n - mean_sq).sum()), float(mean_sq.sum()))


def _ratio(variance: float, mean_sq: float) -> float:
    """``√variance / √mean_sq``; NaN when the mean is 0 (no prompt term to compare with)."""
    if mean_sq <= 0.0:
        return math.nan
    return math.sqrt(max(variance, 0.0) / mean_sq)


@dataclass
class TowerStats:
    """Streaming statistics of one tower's decomposition over a dataset, per block.

    Pass :meth:`observe` as an :func:`attention_hook`'s ``observe`` and run the tower over the
    dataset in any batches or chunks: sums are float64, so the result does not depend on how the
    sequences were cut. :meth:`rows` gives the per-block table, :meth:`means` the biases of the
    ``mean_*`` ablations.
    """

    slots: PromptSlots
    blocks: dict[int, _Sums] = field(default_factory=dict)

    def observe(self, call: AttentionCall, parts: Decomposition) -> None:
        sums = self.blocks.setdefault(call.block, _Sums())
        sums.add(parts, call.readout, self._live(call, parts.token.shape[1]))

    def _live(self, call: AttentionCall, length: int) -> Tensor:
        """``(N, L)``: positions that reach each row's feature -- up to its EOT in the causal text
        tower, every position in the image tower."""
        positions = torch.arange(length, device=call.readout.device)
        if self.slots.image_tokens is None:
            return positions[None, :] <= call.readout[:, None]
        return torch.ones(call.readout.shape[0], length, dtype=torch.bool, device=call.readout.device)

    def means(self) -> dict[int, BlockMeans]:
        """Block → its per-position dataset means (``mean_bias``, ``mean_values``)."""
        if not self.blocks:
            raise ValueError(f"no {self.slots.tower} sequence was observed: nothing to average")
        return {block: sums.means() for block, sums in sorted(self.blocks.items())}

    def rows(self) -> list[dict[str, Any]]:
        """One row per block: the readout query's prompt share and term norms, every input
        query's, and how much the prompt term depends on the input (0: a fixed bias)."""
        out = []
        for block, s in sorted(self.blocks.items()):
            queries = max(s.queries, 1)
            out.append(
                {
                    "tower": self.slots.tower,
                    "block": block,
                    "fresh": block < self.slots.depth,
                    "sequences": s.rows,
                    "share_readout": s.share_readout / s.rows,
                    "share_all": s.share_all / queries,
                    "prompt_norm_readout": s.prompt_norm_readout / s.rows,
                    "token_norm_readout": s.token_norm_readout / s.rows,
                    "prompt_norm_all": s.prompt_norm_all / queries,
                    "token_norm_all": s.token_norm_all / queries,
                    "dependence_readout": s.dependence_readout(),
                    "dependence_all": s.dependence_all(),
                }
            )
        return out
