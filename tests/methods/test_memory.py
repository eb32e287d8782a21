"""Class-chunked text encoding under gradients: checkpointing changes memory, never numbers.

Every method that runs the text tower under gradients is trained one step with the prompts forced
into several chunks (``text_chunk_size=2``), once keeping every chunk's activations
(``text_checkpoint="never"``) and once re-computing them in backward (``"auto"``); the gradients
must be bit-equal. On CPU they are: the re-computation runs the same kernels on the same inputs in
the same order, so no tolerance is needed. The memory side is measured, not timed
(:mod:`vlprompt.methods.memory`).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from vlprompt.methods import build_method
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone
from vlprompt.methods.memory import checkpointed_peak, saved_bytes

#: 8 classes in chunks of 2: four chunks, so "auto" checkpoints under gradients.
CLASSES = ["golden_retriever", "airplane", "sea lion", "annual crop land", "x", "cat", "dog", "tree"]
TASKS = {"t": CLASSES}
SOFTCPT_TASKS = {"caltech101": CLASSES[:5], "fashion20/sleeve_length": ["long sleeve", "short sleeve", "no"]}

CASES: list[tuple[str, dict, dict[str, list[str]]]] = [
    ("coop", {}, TASKS),
    ("coop", {"csc": True, "class_token_position": "middle"}, TASKS),
    ("kgcoop", {"template": "a photo of a {}."}, TASKS),
    ("softcpt", {}, SOFTCPT_TASKS),
    ("ivlp", {}, TASKS),  # deep text prompts through a layer hook, deep visual prompts
    ("maple", {}, TASKS),  # deep text prompts, visual prompts projected from them
    ("bias_tuning", {"template": "a photo of a {}."}, TASKS),  # block hooks in both towers
    ("bias_tuning", {"template": "a photo of a {}.", "tower": "text", "site": "both", "slots": 3}, TASKS),
    ("cocoop", {"max_prompts_per_pass": 5}, TASKS),  # its own passes, ruled by the same mode
]


def chunked(tiny: Backbone, mode: str = "never", size: int = 2) -> Backbone:
    """The tiny backbone's weights, with a small chunk size and the given checkpoint mode."""
    return Backbone(tiny.model, tiny.tokenizer, name="vlp-tiny", text_chunk_size=size, text_checkpoint=mode)


def perturbed(method: nn.Module) -> nn.Module:
    """Every learnable tensor moved off its init (zero biases would make some gradients trivial)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return method


def step_grads(method: nn.Module, batch: Batch) -> dict[str, Tensor]:
    method.zero_grad(set_to_none=True)
    method.training_loss(batch).backward()
    return {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}


def batches(task: str, images: Tensor, n_cls: int) -> Batch:
    return Batch(task, images=images, labels=torch.arange(images.shape[0]) % n_cls)


@pytest.mark.parametrize(("name", "options", "tasks"), CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_checkpointed_gradients_are_bit_equal(
    tiny: Backbone, images: Tensor, name: str, options: dict, tasks: dict[str, list[str]]
) -> None:
    backbone = chunked(tiny)
    torch.manual_seed(0)
    method = perturbed(build_method(name, backbone, tasks, options))
    task = next(iter(tasks))
    batch = batches(task, images[:4], len(tasks[task]))
    kept = step_grads(method, batch)
    kept_bytes = saved_bytes(lambda: method.training_loss(batch), [backbone])
    backbone.text_checkpoint = "auto"
    recomputed = step_grads(method, batch)
    recomputed_bytes = saved_bytes(lambda: method.training_loss(batch), [backbone])
    assert set(kept) == set(recomputed) == {n for n, _ in method.named_parameters()}
    for key, grad in kept.items():
        assert float(grad.abs().max()) > 0, key  # hooks' tensors are reached through the checkpoint
        assert torch.equal(recomputed[key], grad), (key, float((recomputed[key] - grad).abs().max()))
    assert recomputed_bytes < kept_bytes  # it really did checkpoint


def test_modes_decide_when_to_checkpoint(tiny: Backbone) -> None:
    backbone = chunked(tiny, "auto")
    assert backbone.checkpoints_text(2) and not backbone.checkpoints_text(1)
    with torch.no_grad():
        assert not backbone.checkpoints_text(4)  # nothing is kept without gradients anyway
    backbone.text_checkpoint = "always"
    assert backbone.checkpoints_text(1)
    backbone.text_checkpoint = "never"
    assert not backbone.checkpoints_text(4)
    with pytest.raises(ValueError, match="text_checkpoint must be one of auto, always, never"):
        Backbone(tiny.model, tiny.tokenizer, text_checkpoint="sometimes")


def coop_forward(backbone: Backbone, n_cls: int) -> tuple[nn.Module, Callable[[], Tensor]]:
    torch.manual_seed(0)
    names = [f"class number {i}" for i in range(n_cls)]
    method = build_method("coop", backbone, {"t": names}, {"n_ctx": 4})
    return method, lambda: method.text_features("t")


def test_checkpointed_saved_bytes_are_one_chunk_plus_inputs(tiny: Backbone) -> None:
    """16 classes in 4 chunks: at worst (backward of one re-computed chunk) about a quarter of
    keeping everything, plus the chunk inputs (measured: 0.297)."""
    _, forward = coop_forward(chunked(tiny, "never", size=16), 16)
    unchunked = saved_bytes(forward, [tiny])
    backbone = chunked(tiny, "auto", size=4)
    method, forward = coop_forward(backbone, 16)
    held = saved_bytes(forward, [tiny])
    x, eot = method.prompts.prompts(method.ctx, "t")

    def region(rows: slice) -> Callable[[], Tensor]:
        return lambda: backbone.encode_text_embeddings(x[rows], eot[rows], checkpoint=False)

    peak = checkpointed_peak(held, [region(slice(i, i + 4)) for i in range(0, 16, 4)], [tiny])
    inputs = x[:, : int(eot.max()) + 1].numel() * x.element_size()  # truncated at the longest EOS
    assert held <= inputs + 1024  # between forward and backward: the chunk inputs, ~nothing else
    assert peak <= 0.35 * unchunked, (held, peak, unchunked)
    assert peak > 0.2 * unchunked  # one chunk's worth really is re-computed


def test_backward_recomputes_one_chunk_at_a_time(tiny: Backbone) -> None:
    """The premise of ``checkpointed_peak``: a chunk's backward ends before the next is re-computed."""
    backbone = chunked(tiny, "auto", size=2)
    method = build_method("coop", backbone, TASKS, {})
    chunk_of: dict[float, int] = {}  # a chunk's first input value -> its index
    events: list[tuple[str, int]] = []

    def hook(i: int, h: Tensor) -> Tensor:
        key = float(h.detach()[0, 0, 0])
        if i == 0 and key not in chunk_of:  # forward: backward reaching this tensor ends the chunk
            chunk = chunk_of[key] = len(chunk_of)
            h.register_hook(lambda g, c=chunk: events.append(("done", c)))
        elif i == 0:  # a re-computation, in backward
            events.append(("recompute", chunk_of[key]))
        return h

    x, eot = method.prompts.prompts(method.ctx, "t")
    x = x + 0.01 * torch.arange(8.0).view(8, 1, 1)  # chunks start with different values
    backbone.encode_text_embeddings(x, eot, layer_hook=hook).square().sum().backward()
    assert events == [(kind, c) for c in (3, 2, 1, 0) for kind in ("recompute", "done")], events
