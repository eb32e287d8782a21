"""The frozen CLIP backbone: an open_clip model wrapped, never forked.

Every method receives one :class:`Backbone` and reads CLIP only through it. The wrapper
exposes the generic pieces prompt learning needs -- tokenisation that refuses to cut,
token embeddings, the text tower run from embeddings (with a per-layer hook and causal
truncation), the image tower, the logit scale, nearest-word decoding -- and never asks
which method is calling (the MaPLe/PromptKD ``clip/model.py`` forks are what we avoid).

Text tower from embeddings follows CoOp's ``TextEncoder`` (``KaiyangZhou/CoOp trainers/coop.py``)
and open_clip's ``CLIP.encode_text``::

    x = prompts + positional_embedding; transformer (causal mask); ln_final;
    x[arange, eot] @ text_projection

Supported: open_clip ``CLIP`` and ``CustomTextCLIP`` models whose text tower is open_clip's
own causal ``TextTransformer`` pooled at the end-of-text token (``pool_type="argmax"``,
i.e. every OpenAI/LAION CLIP), tokenised by open_clip's ``SimpleTokenizer``.

Memory. The text tower encodes at most ``text_chunk_size`` prompts at once. Without gradients
that alone bounds memory; under gradients every chunk's activations would be kept for backward
(CoOp on ViT-B/16, fp32, 25-token prompts: 2.3 GiB saved at 400 classes, so ~5.7 GiB at 1000;
``experiments/bench_text_memory.py``), so each chunk then runs under
non-reentrant activation checkpointing (``text_checkpoint``): only the chunk inputs are kept and
one chunk's activations are re-computed and live at a time in the backward pass. Gradients are
the same numbers either way (the re-computation runs the same kernels on the same inputs).

Tiny architectures for tests and laptops live in ``model_configs/`` as open_clip JSON and
are registered with ``open_clip.add_model_config`` when this module is imported.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.utils.checkpoint
from open_clip.model import CLIP, CustomTextCLIP, get_input_dtype
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer
from torch import Tensor, nn

from vlprompt.methods.pretrained import (
    BUNDLED,
    MODEL_CONFIG_DIR,
    WEIGHTS_DIR,
    bundled_models,
    is_checkpoint_path,
)

#: Called with (block index, hidden state ``(N, L, W)``) before each block; returns the
#: hidden state to feed the block. Text: same shape (deep prompts replace tokens in place).
#: Vision: may append tokens at the end (deep visual prompts); see :meth:`Backbone.encode_image`.
LayerHook = Callable[[int, Tensor], Tensor]

#: When text chunks are re-computed in backward instead of kept (``Backbone.text_checkpoint``):
#: ``auto`` under gradients when the prompts span more than one chunk, ``always`` under gradients,
#: ``never``. Mirrored by ``model.text_checkpoint``'s choices in ``orchestrator/schema.py`` (tested).
TEXT_CHECKPOINT_MODES = ("auto", "always", "never")

#: Called once with the image tower's embedded tokens ``(N, 1 + patches, W)`` (class token +
#: patches + positional embedding) before ``ln_pre``; may append tokens at the end.
EmbedHook = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AttentionCall:
    """What an attention hook is given: one block's self-attention, about to run."""

    block: int
    """The block's index in its tower."""
    x: Tensor
    """The block's normalised input ``ln_1(h)``, batch-first ``(N, L, W)``: queries, keys and
    values are all computed from it."""
    mask: Tensor | None
    """The additive attention mask ``(L, L)`` (0 where a query may look, ``-inf`` where not):
    the text tower's causal mask; None in the image tower."""
    attention: nn.Module
    """The block's attention module (open_clip: ``nn.MultiheadAttention``, packed
    ``in_proj_weight``/``in_proj_bias`` and ``out_proj``), to compute with, never to change."""
    readout: Tensor
    """``(N,)``: the position each row's feature is read at -- the end-of-text token of each
    text row (positions after it reach nothing: the tower is causal), the class token (0) of
    each image."""


#: Replaces one block's ``attn(ln_1(h))``: returns the attention output, batch-first, same shape
#: as ``call.x`` (before ``ls_1`` and the residual add).
AttentionHook = Callable[[AttentionCall], Tensor]


@dataclass(frozen=True)
class BlockHooks:
    """Hooks *inside* each residual block (either tower), for additive updates such as biases.

    A block with hooks runs as open_clip's ``ResidualAttentionBlock.forward``, split in two::

        x = x + ls_1(attention(i, ln_1(x)));  x = after_attn(i, x)
        x = x + ls_2(mlp(ln_2(x)));           x = after_mlp(i, x)

    ``after_attn``/``after_mlp`` get the batch-first residual stream ``(N, L, W)`` of block ``i``
    and return one of the same shape (``x + b`` adds ``b`` to that sub-layer's residual update).
    ``attention`` (an :data:`AttentionHook`) computes the attention sub-layer in place of the
    block's own module, to observe it or change it (``methods/attention.py``). ``None``: skip.
    """

    after_attn: LayerHook | None = None
    after_mlp: LayerHook | None = None
    attention: AttentionHook | None = None


def merged_hooks(own: BlockHooks | None, added: BlockHooks | None, where: str) -> BlockHooks | None:
    """The hooks of both, slot by slot; ``ValueError`` naming the slot when both fill one."""
    if own is None or added is None:
        return own or added
    slots = {}
    for name in ("after_attn", "after_mlp", "attention"):
        mine, theirs = getattr(own, name), getattr(added, name)
        if mine is not None and theirs is not None:
            raise ValueError(
                f"{where}: the caller's block hooks and the scoped ones (Backbone.scoped_block_hooks) "
                f"both set {name}; close the scope or drop one of them"
            )
        slots[name] = mine if mine is not None else theirs
    return BlockHooks(**slots)


def register_model_configs() -> None:
    """Make the JSON configs in :data:`MODEL_CONFIG_DIR` known to open_clip (idempotent)."""
    known = set(open_clip.list_models())
    if any(path.stem not in known for path in MODEL_CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


register_model_configs()


def bundled_checkpoint(model_name: str) -> Path:
    """The packaged weights file of ``model_name``, after checking its recorded sha256."""
    path = WEIGHTS_DIR / f"{model_name}.safetensors"
    digest_file = path.with_name(path.name + ".sha256")
    if not digest_file.is_file():
        have = bundled_models()
        raise ValueError(
            f"{model_name} has no bundled weights (no {digest_file}); models with bundled weights: "
            f"{', '.join(have) if have else '(none)'}"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled weights file {path} is missing (its checksum file {digest_file} exists)"
        )
    expected = digest_file.read_text(encoding="utf-8").split()[0]
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise ValueError(
            f"bundled weights file {path} is corrupt: sha256 {actual}, but {digest_file} records {expected}"
        )
    return path


def tag_needs_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether the weights of tag ``pretrained`` were trained with QuickGELU.

    OpenAI's CLIP uses QuickGELU, but open_clip's ``ViT-B-16`` config builds nn.GELU and
    only *warns* when ``openai`` weights are loaded into it -- silently worse features.
    The tag's registry entry says which activation its weights need; we build that one.
    (A local copy of OpenAI weights: use the ``*-quickgelu`` architecture names.)
    """
    if not pretrained:
        return False
    return bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))


def check_model_name(model_name: str) -> None:
    """``ValueError`` with close names and how to add one, unless open_clip knows ``model_name``."""
    known = open_clip.list_models()
    if model_name in known:
        return
    close = difflib.get_close_matches(model_name, known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    examples = [n for n in ("RN50", "ViT-B-32", "ViT-B-16", "ViT-L-14", "vlp-tiny") if n in known]
    raise ValueError(
        f"unknown open_clip model {model_name!r}.{hint} Known names include {', '.join(examples)} "
        f"({len(known)} in all: open_clip.list_models()). "
        f"To add an architecture, put its open_clip JSON config in {MODEL_CONFIG_DIR} "
        "or call open_clip.add_model_config(path) before load_backbone."
    )


def resolve_pretrained(model_name: str, pretrained: str | None) -> str | None:
    """What ``open_clip.create_model(pretrained=...)`` gets: a tag, a checkpoint file, or None.

    ``"bundled"`` → the packaged file (checksum verified); a tag of ``model_name`` stays a tag;
    an existing file is a file; a value that looks like a path (``pretrained.is_checkpoint_path``,
    the rule config validation uses too) but is no file is ``FileNotFoundError``; anything else
    is ``ValueError`` listing the model's tags.
    """
    if pretrained == BUNDLED:
        return str(bundled_checkpoint(model_name))
    if not pretrained:
        return None
    path = Path(pretrained).expanduser()
    if open_clip.get_pretrained_cfg(model_name, pretrained):
        return pretrained  # a tag: open_clip resolves (and downloads) it
    if path.is_file():
        return str(path)
    if is_checkpoint_path(pretrained) or path.exists():
        raise FileNotFoundError(
            f"checkpoint file {str(path)!r} (pretrained= for {model_name}) does not exist or is not a file"
        )
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    raise ValueError(
        f"{pretrained!r} is neither a pretrained tag of {model_name} nor an existing file. "
        f"Tags for {model_name}: {', '.join(tags) if tags else '(none)'}; "
        "use null for random initialisation."
    )


def load_backbone(
    model_name: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    text_chunk_size: int = 1000,
    text_checkpoint: str = "auto",
) -> Backbone:
    """Build an open_clip model, freeze it and wrap it.

    Args:
        model_name: open_clip architecture name, verbatim (``"ViT-B-16"``, ``"vlp-tiny"``).
        pretrained: an open_clip pretrained tag for that architecture (``"openai"``; open_clip
            downloads it), a path to a local checkpoint file (loaded by open_clip's own
            ``load_checkpoint``), ``"bundled"`` for the weights shipped in
            :data:`WEIGHTS_DIR` (``vlp-small``; checksum verified), or ``None`` for random
            initialisation.
        device: where the weights live.
        precision: open_clip precision (``"fp32"``, ``"fp16"``, ``"bf16"``); methods keep
            their own parameters in fp32 either way.
        text_chunk_size: most prompts the text tower encodes at once (see
            :meth:`Backbone.encode_text_embeddings`); with ``text_checkpoint`` it bounds
            memory for 1000-class datasets in training as well as in evaluation.
        text_checkpoint: when chunks are re-computed in backward rather than kept
            (:data:`TEXT_CHECKPOINT_MODES`; :meth:`Backbone.checkpoints_text`).
    """
    check_model_name(model_name)
    checkpoint = resolve_pretrained(model_name, pretrained)
    model = open_clip.create_model(
        model_name,
        pretrained=checkpoint,
        device=device,
        precision=precision,
        force_quick_gelu=tag_needs_quick_gelu(model_name, pretrained),
    )
    return Backbone(
        model,
        open_clip.get_tokenizer(model_name),
        name=model_name,
        precision=precision,
        text_chunk_size=text_chunk_size,
        text_checkpoint=text_checkpoint,
    )


def _check_supported(name: str, model: nn.Module, tokenizer: object) -> None:
    """``NotImplementedError`` unless the text tower is open_clip's causal, EOT-pooled, projected one
    with the plain BPE tokenizer (what soft prompts spliced into token embeddings need)."""
    if isinstance(model, CLIP):
        pool_type, text = model.text_pool_type, model
    elif isinstance(model, CustomTextCLIP) and isinstance(model.text, TextTransformer):
        pool_type, text = model.text.pool_type, model.text
        if model.text.cls_emb is not None:
            raise NotImplementedError(f"{name}: text towers with an appended class token (CoCa)")
    else:
        raise NotImplementedError(
            f"{name}: only open_clip CLIP/CustomTextCLIP models with open_clip's TextTransformer "
            f"are supported (got {type(model).__name__}; not HF text towers, CoCa or timm-only models)"
        )
    if pool_type != "argmax":
        raise NotImplementedError(f"{name}: text pool type {pool_type!r}; only 'argmax' (EOT) is supported")
    if text.attn_mask is None:
        raise NotImplementedError(f"{name}: bidirectional text tower; soft prompts need a causal one")
    if text.text_projection is None:
        raise NotImplementedError(f"{name}: text tower without projection into the joint space")
    if getattr(model, "logit_bias", None) is not None:
        raise NotImplementedError(f"{name}: sigmoid-loss models (logit_bias, SigLIP) are not supported")
    if not isinstance(tokenizer, SimpleTokenizer) or tokenizer.reduction_fn is not None:
        raise NotImplementedError(f"{name}: only open_clip's plain SimpleTokenizer is supported")


class Backbone(nn.Module):
    """A frozen open_clip model plus its tokenizer and preprocessing facts.

    All weights have ``requires_grad=False`` and the module never leaves eval mode (its
    :meth:`train` is a no-op), so dropout-free, deterministic features come out whatever
    the calling method does with its own mode.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: object,
        *,
        name: str = "",
        precision: str = "fp32",
        text_chunk_size: int = 1000,
        text_checkpoint: str = "auto",
    ) -> None:
        super().__init__()
        self.name = name or type(model).__name__
        _check_supported(self.name, model, tokenizer)
        self.model = model
        self.tokenizer: SimpleTokenizer = tokenizer
        if text_chunk_size < 1:
            raise ValueError(f"text_chunk_size must be >= 1, got {text_chunk_size}")
        if text_checkpoint not in TEXT_CHECKPOINT_MODES:
            raise ValueError(
                f"text_checkpoint must be one of {', '.join(TEXT_CHECKPOINT_MODES)}, got {text_checkpoint!r}"
            )
        self.text_chunk_size = text_chunk_size
        self.text_checkpoint = text_checkpoint
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        if isinstance(size, Sequence):
            if len(set(size)) != 1:
                raise NotImplementedError(f"{self.name}: non-square input size {tuple(size)}")
            size = size[0]
        #: Input resolution (square), from the model's open_clip preprocess config.
        self.image_size: int = int(size)
        #: Normalisation mean/std the weights were trained with (open_clip preprocess config).
        self.image_mean: tuple[float, ...] = tuple(float(v) for v in cfg["mean"])
        self.image_std: tuple[float, ...] = tuple(float(v) for v in cfg["std"])
        self._input_dtype = get_input_dtype(precision)
        self._scoped: dict[str, BlockHooks] = {}  # tower → hooks added by scoped_block_hooks
        model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode whatever is asked: the backbone is frozen, dropout and all."""
        return super().train(False)

    @contextmanager
    def scoped_block_hooks(
        self, *, text: BlockHooks | None = None, vision: BlockHooks | None = None
    ) -> Iterator[None]:
        """While open, every forward of a tower also runs these block hooks, whoever calls it.

        For tools that study a trained method without changing it (``methods/attention.py``
        splits each block's attention into what the prompts and what the input tokens
        contribute): the method's own calls run unchanged, with the scoped hooks added to the
        hooks it passes (:func:`merged_hooks`; a slot both fill is a ``ValueError``). The hooks are
        taken when a forward starts, so a chunk re-computed in backward runs the same ones. One
        scope at a time (``RuntimeError`` when nested).
        """
        if self._scoped:
            raise RuntimeError(f"{self.name}: scoped block hooks are already open; close them first")
        self._scoped = {t: h for t, h in (("text", text), ("vision", vision)) if h is not None}
        try:
            yield
        finally:
            self._scoped = {}

    # ------------------------------------------------------------------ facts
    @property
    def _text(self) -> nn.Module:
        """The module holding the text tower's parts (the CLIP itself, or its ``.text``)."""
        return self.model if isinstance(self.model, CLIP) else self.model.text

    @property
    def device(self) -> torch.device:
        return self._text.token_embedding.weight.device

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint image-text space."""
        proj = self._text.text_projection
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    @property
    def text_width(self) -> int:
        """Token-embedding dimension (CoOp's ``ctx_dim``: 512 for ViT-B/16)."""
        return int(self._text.token_embedding.embedding_dim)

    @property
    def text_layers(self) -> int:
        """Number of text transformer blocks (layer indices passed to a ``layer_hook``)."""
        return len(self._text.transformer.resblocks)

    @property
    def _visual(self) -> VisionTransformer:
        """open_clip's ViT image tower; the hooked image path needs one (not ResNet/timm towers)."""
        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            raise NotImplementedError(
                f"{self.name}: image-tower hooks need open_clip's VisionTransformer, "
                f"got {type(visual).__name__}"
            )
        return visual

    @property
    def vision_width(self) -> int:
        """Token width of the image transformer (768 for ViT-B/16)."""
        return int(self._visual.transformer.width)

    @property
    def vision_layers(self) -> int:
        """Number of image transformer blocks (layer indices passed to a vision ``layer_hook``)."""
        return len(self._visual.transformer.resblocks)

    @property
    def context_length(self) -> int:
        return int(self._text.positional_embedding.shape[0])

    def token_positions(self, tower: str) -> int:
        """Token positions a tower runs on: the text context length, or 1 + patches (``"vision"``)."""
        if tower == "text":
            return self.context_length
        return int(self._visual.positional_embedding.shape[0])

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's temperature, exponentiated (100 for the OpenAI weights), as a scalar tensor."""
        return self.model.logit_scale.exp().float().reshape(())

    # ------------------------------------------------------------------ text
    def num_tokens(self, text: str) -> int:
        """BPE tokens of ``text``, without the start/end-of-text tokens."""
        return len(self.tokenizer.encode(text))

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids ``(N, context_length)`` on the backbone's device.

        Raises ``ValueError`` naming the text when it does not fit, where open_clip would
        silently cut it (and its end-of-text token would then mark a different word).
        """
        if isinstance(texts, str):
            raise TypeError("tokenize expects a sequence of strings, not a single string")
        limit = self.context_length
        for text in texts:
            n = self.num_tokens(text) + 2
            if n > limit:
                raise ValueError(
                    f"text {text!r} is {n} tokens with its start/end tokens; {self.name} fits {limit}"
                )
        return self.tokenizer(list(texts), context_length=limit).to(self.device)

    def token_embedding(self, ids: Tensor) -> Tensor:
        """Token embeddings ``(N, L, W)`` of ids ``(N, L)``."""
        return self._text.token_embedding(ids)

    def eot_positions(self, ids: Tensor) -> Tensor:
        """Index of the end-of-text token per row: the largest id (open_clip/CLIP ``argmax`` rule)."""
        return ids.argmax(dim=-1)

    def encode_text_embeddings(
        self,
        x: Tensor,
        eot: Tensor,
        *,
        truncate: bool = True,
        layer_hook: LayerHook | None = None,
        block_hooks: BlockHooks | None = None,
        chunk_size: int | None = None,
        checkpoint: bool | None = None,
    ) -> Tensor:
        """Text features ``(N, D)`` (not normalised) from token embeddings ``x`` ``(N, L, W)``.

        Adds the positional embedding, runs the blocks one by one under the causal mask,
        applies ``ln_final``, gathers at ``eot`` and projects -- open_clip's
        ``encode_text`` without the embedding lookup, so soft prompts can be spliced in.

        Args:
            truncate: cut the sequence to ``max(eot) + 1`` positions. Exact, because the
                text tower is causal: nothing after the end-of-text token reaches it.
            layer_hook: called as ``hook(i, hidden)`` before block ``i`` with the
                batch-first hidden state of the current chunk; returns the state to use,
                **same shape** (``ValueError`` otherwise): deep text prompts replace positions
                in place, so ``eot`` keeps pointing at the end-of-text token.
            block_hooks: hooks inside every block (:class:`BlockHooks`), same-shape too.
            chunk_size: encode at most this many rows at once (default: the backbone's
                ``text_chunk_size``); the hooks then see one chunk's rows at a time.
            checkpoint: re-compute each chunk in the backward pass instead of keeping its
                activations (``torch.utils.checkpoint``, non-reentrant, so hooks closing over
                learnable tensors still get their gradients). Default: the backbone's
                :meth:`checkpoints_text` rule; ``False`` for a caller that checkpoints itself
                (CoCoOp's passes). Only takes effect under gradients; numbers are the same.
        """
        if x.ndim != 3 or eot.shape != x.shape[:1]:
            raise ValueError(
                f"expected x (N, L, W) and eot (N,), got {tuple(x.shape)} and {tuple(eot.shape)}"
            )
        if x.shape[1] > self.context_length:
            raise ValueError(f"{x.shape[1]} positions exceed the context length {self.context_length}")
        block_hooks = merged_hooks(block_hooks, self._scoped.get("text"), "text tower")
        size = chunk_size or self.text_chunk_size
        n_chunks = -(-x.shape[0] // size)
        recompute = self.checkpoints_text(n_chunks) if checkpoint is None else checkpoint
        recompute = recompute and torch.is_grad_enabled()
        encode = self._checkpointed_chunk if recompute else self._encode_chunk
        if recompute and truncate:
            # The checkpoints keep their inputs until backward: keep only the positions any chunk
            # reads (a copy, so the full-context tensor is not kept alive through a view).
            x = x[:, : int(eot.max()) + 1].contiguous()
        if n_chunks == 1:
            return encode(x, eot, truncate, layer_hook, block_hooks)
        chunks = zip(x.split(size), eot.split(size), strict=True)
        return torch.cat([encode(xc, ec, truncate, layer_hook, block_hooks) for xc, ec in chunks])

    def checkpoints_text(self, n_chunks: int) -> bool:
        """Whether text encoding split into ``n_chunks`` chunks re-computes them in backward.

        Without gradients nothing is kept anyway, so never. Under gradients, ``auto`` does when
        there is more than one chunk -- the case where keeping every chunk's activations breaks
        the memory bound chunking promises. A single chunk's activations are live at the start
        of backward either way, so ``auto`` does not pay the re-computation for it; ``always``
        does, so that they are not held while the rest of the step runs (the image tower's
        forward and backward). ``never`` keeps everything: fastest, when memory is plentiful.
        """
        if self.text_checkpoint == "never" or not torch.is_grad_enabled():
            return False
        return self.text_checkpoint == "always" or n_chunks > 1

    def _checkpointed_chunk(
        self,
        x: Tensor,
        eot: Tensor,
        truncate: bool,
        layer_hook: LayerHook | None,
        block_hooks: BlockHooks | None,
    ) -> Tensor:
        """:meth:`_encode_chunk` re-computed in backward: only ``x`` and ``eot`` are kept.

        Non-reentrant checkpointing, because hooks close over learnable tensors (deep prompts,
        biases) that are no inputs of the call: it records them in the graph as they are used,
        where the reentrant variant would cut their gradients. No RNG state to restore: the
        frozen tower runs in eval mode, without dropout.
        """
        return torch.utils.checkpoint.checkpoint(
            self._encode_chunk,
            x,
            eot,
            truncate,
            layer_hook,
            block_hooks,
            use_reentrant=False,
            preserve_rng_state=False,
        )

    def _encode_chunk(
        self,
        x: Tensor,
        eot: Tensor,
        truncate: bool,
        layer_hook: LayerHook | None,
        block_hooks: BlockHooks | None,
    ) -> Tensor:
        text = self._text
        transformer = text.transformer
        length = int(eot.max()) + 1 if truncate else x.shape[1]
        cast = transformer.get_cast_dtype()
        h = x[:, :length].to(cast) + text.positional_embedding[:length].to(cast)
        mask = text.attn_mask[:length, :length]
        h = _run_blocks(transformer, h, mask, layer_hook, block_hooks, may_grow=False, readout=eot)
        h = text.ln_final(h)
        pooled = h[torch.arange(h.shape[0], device=h.device), eot]
        proj = text.text_projection
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def encode_text(self, ids: Tensor) -> Tensor:
        """Text features ``(N, D)`` (not normalised) of token ids, truncated and chunked."""
        return self.encode_text_embeddings(self.token_embedding(ids), self.eot_positions(ids))

    # ------------------------------------------------------------------ image
    def encode_image(
        self,
        images: Tensor,
        *,
        embed_hook: EmbedHook | None = None,
        layer_hook: LayerHook | None = None,
        block_hooks: BlockHooks | None = None,
    ) -> Tensor:
        """Image features ``(N, D)`` (not normalised) of preprocessed images.

        Without hooks: open_clip's own ``encode_image``. With any hook: open_clip's
        ``VisionTransformer.forward`` step by step (equal to it when the hooks are identities)::

            conv1 patches; [class token; patches] + positional embedding; patch_dropout;
            embed_hook; ln_pre; for each block i: layer_hook(i, x), block (block_hooks);
            keep the first 1 + patches tokens; open_clip's pooling (_pool); @ proj

        Hooks get batch-first ``(N, L, W)`` states and may append tokens at the end (visual
        prompts, MaPLe/VPT style); a later ``layer_hook`` may replace them. Appended tokens are
        dropped before pooling, so the class token (``tok`` pooling) or the patch average
        (``avg``) is read exactly as open_clip reads it.
        """
        if self._input_dtype is not None:
            images = images.to(self._input_dtype)
        block_hooks = merged_hooks(block_hooks, self._scoped.get("vision"), "image tower")
        if embed_hook is None and layer_hook is None and block_hooks is None:
            return self.model.encode_image(images)
        visual = self._visual
        x = visual.conv1(images)  # (N, W, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, grid², W)
        cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)  # identity: the backbone stays in eval mode
        n_tokens = x.shape[1]
        if embed_hook is not None:
            x = _checked(embed_hook(x), x, "embed_hook", may_grow=True)
        x = visual.ln_pre(x)
        readout = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # the class token
        x = _run_blocks(visual.transformer, x, None, layer_hook, block_hooks, may_grow=True, readout=readout)
        pooled, _ = visual._pool(x[:, :n_tokens])
        return pooled @ visual.proj if visual.proj is not None else pooled

    # ------------------------------------------------------------------ interpretation
    @torch.no_grad()
    def nearest_words(self, vectors: Tensor, k: int = 1) -> list[list[tuple[str, float]]]:
        """The ``k`` vocabulary tokens nearest to each row of ``vectors`` ``(n, W)``.

        Euclidean distance in the token-embedding space, as CoOp's ``interpret_prompt.py``;
        returns ``[(word, distance), ...]`` per row, nearest first, ``</w>`` stripped.
        """
        if vectors.ndim != 2 or vectors.shape[1] != self.text_width:
            raise ValueError(f"expected vectors (n, {self.text_width}), got {tuple(vectors.shape)}")
        table = self._text.token_embedding.weight.double()
        table_sq = table.square().sum(dim=1)
        out: list[list[tuple[str, float]]] = []
        for rows in vectors.detach().to(table.device, torch.float64).split(256):
            # |v - e|^2 = |v|^2 + |e|^2 - 2 v.e, in float64 so an exact match reads ~0
            d2 = rows.square().sum(dim=1, keepdim=True) + table_sq - 2 * rows @ table.T
            dist, idx = d2.clamp_min(0).sqrt().topk(k, dim=1, largest=False)
            for row_d, row_i in zip(dist.tolist(), idx.tolist(), strict=True):
                out.append(
                    [(self.tokenizer.decode([i]).strip(), d) for i, d in zip(row_i, row_d, strict=True)]
                )
        return out


def _checked(out: Tensor, before: Tensor, name: str, *, may_grow: bool) -> Tensor:
    """A hook's output, cast to the tower's dtype, after checking its shape against its input."""
    same = out.ndim == 3 and out.shape[0] == before.shape[0] and out.shape[2] == before.shape[2]
    if not same or (out.shape[1] != before.shape[1] and not (may_grow and out.shape[1] >= before.shape[1])):
        rule = "may only append tokens" if may_grow else "must keep the shape"
        raise ValueError(f"{name} {rule}: got {tuple(out.shape)} for input {tuple(before.shape)}")
    return out.to(before.dtype)


def _run_blocks(
    transformer: nn.Module,
    h: Tensor,
    mask: Tensor | None,
    layer_hook: LayerHook | None,
    block_hooks: BlockHooks | None,
    *,
    may_grow: bool,
    readout: Tensor | None = None,
) -> Tensor:
    """Run ``transformer``'s blocks on batch-first ``h`` with the hooks; batch-first out.

    Hooks always see batch-first states; sequence-first transformers are transposed around
    them. A layer hook may append tokens only where ``may_grow`` (the image tower); block hooks
    always keep the shape. Without block hooks each block is open_clip's own ``forward``, so
    numbers are untouched; ``readout`` (each row's pooled position) is for attention hooks.
    """
    seq_first = not transformer.batch_first
    if seq_first:
        h = h.transpose(0, 1)  # NLD -> LND
    for i, block in enumerate(transformer.resblocks):
        if layer_hook is not None:
            h = _batch_first(layer_hook, i, h, "layer_hook", seq_first, may_grow)
        if block_hooks is None:
            h = block(h, attn_mask=mask)
            continue
        if not isinstance(block, ResidualAttentionBlock):
            raise NotImplementedError(
                f"block hooks need open_clip's ResidualAttentionBlock, got {type(block).__name__}"
            )
        h = h + block.ls_1(_attend(block, i, h, mask, block_hooks.attention, seq_first, readout))
        if block_hooks.after_attn is not None:
            h = _batch_first(block_hooks.after_attn, i, h, "after_attn", seq_first, False)
        h = h + block.ls_2(block.mlp(block.ln_2(h)))
        if block_hooks.after_mlp is not None:
            h = _batch_first(block_hooks.after_mlp, i, h, "after_mlp", seq_first, False)
    return h.transpose(0, 1) if seq_first else h


def _batch_first(fn: LayerHook, i: int, state: Tensor, name: str, seq_first: bool, grow: bool) -> Tensor:
    """``fn(i, state)`` on the batch-first view of ``state``, back in the transformer's layout."""
    view = state.transpose(0, 1) if seq_first else state
    out = _checked(fn(i, view), view, name, may_grow=grow)
    return out.transpose(0, 1) if seq_first else out


def _attend(
    block: ResidualAttentionBlock,
    i: int,
    h: Tensor,
    mask: Tensor | None,
    hook: AttentionHook | None,
    seq_first: bool,
    readout: Tensor | None,
) -> Tensor:
    """``block.attention(ln_1(h))``, or the attention hook's output in its place (same layout)."""
    x = block.ln_1(h)
    if hook is None:
        return block.attention(q_x=x, attn_mask=mask)
    view = x.transpose(0, 1) if seq_first else x
    if readout is None:
        raise ValueError("an attention hook needs each row's readout position")
    out = _checked(
        hook(AttentionCall(i, view, mask, block.attn, readout)), view, "attention hook", may_grow=False
    )
    return out.transpose(0, 1) if seq_first else out
