"""Activation memory of one CoOp training step over many classes: text chunks kept vs re-computed.

    python experiments/bench_text_memory.py                          # ViT-B-16, 1000 classes, chunk 250
    python experiments/bench_text_memory.py --classes 200 --chunk 50 --model vlp-small

Builds a random-init open_clip model (``pretrained=None``: nothing is downloaded), a CoOp over
``--classes`` made-up class names, and one batch of cached image features, then runs the same
training step with ``text_checkpoint=never`` (every chunk's activations kept for backward) and
``auto`` (chunks re-computed in backward), all in this one invocation. It prints, for each, the
bytes saved for backward (:mod:`vlprompt.methods.memory`: deterministic, any device; for the
checkpointed step the worst moment of backward, held inputs + one re-computed chunk), the wall
time per step, on CUDA ``torch.cuda.max_memory_allocated`` over the step, and the ratios. The
gradients of both steps must be bit-equal; the script fails otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from vlprompt.methods import build_method
from vlprompt.methods.base import Batch
from vlprompt.methods.clip import Backbone, load_backbone
from vlprompt.methods.coop import CoOp
from vlprompt.methods.memory import checkpointed_peak, saved_bytes

#: Words for made-up class names of one to three words (several BPE tokens, like real names).
WORDS = ("red", "golden", "sea", "annual", "crop", "retriever", "lion", "land", "sketch", "tabby")


def class_names(n: int) -> list[str]:
    """``n`` distinct names of varied length, the same every run."""
    names = []
    for i in range(n):
        words = [WORDS[i % 10], WORDS[(i // 10) % 10], WORDS[(i // 100) % 10]][: 1 + i % 3]
        names.append(" ".join(words) + f" {i}")
    return names


def checkpoint_regions(method: CoOp, backbone: Backbone, task: str) -> list[Callable[[], Tensor]]:
    """Each chunk the checkpointed step re-computes, as a step of its own (unchecked)."""
    x, eot = method.prompts.prompts(method.ctx, task)
    size = backbone.text_chunk_size
    return [
        lambda start=start: backbone.encode_text_embeddings(
            x[start : start + size], eot[start : start + size], checkpoint=False
        )
        for start in range(0, x.shape[0], size)
    ]


def run_steps(method: CoOp, batch: Batch, steps: int) -> tuple[list[float], int | None, dict[str, Tensor]]:
    """Wall time of each step, CUDA peak bytes over the steps (None on CPU), the last gradients."""
    cuda = batch.features is not None and batch.features.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        method.zero_grad(set_to_none=True)
        start = time.perf_counter()
        method.training_loss(batch).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - before if cuda else None
    return times, peak, {name: p.grad.clone() for name, p in method.named_parameters()}


def measure(method: CoOp, backbone: Backbone, batch: Batch, mode: str, steps: int) -> dict:
    """Saved-for-backward bytes, step times and gradients of the CoOp step under ``mode``."""
    backbone.text_checkpoint = mode
    held = saved_bytes(lambda: method.training_loss(batch), [backbone])
    peak = held
    if mode != "never" and backbone.checkpoints_text(-(-len(method.prompts.eot) // backbone.text_chunk_size)):
        peak = checkpointed_peak(held, checkpoint_regions(method, backbone, batch.task), [backbone])
    times, cuda_peak, grads = run_steps(method, batch, steps)
    return {"held": held, "peak": peak, "times": times, "cuda_peak": cuda_peak, "grads": grads}


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def report(name: str, r: dict) -> None:
    cuda = f", cuda max_memory_allocated {gib(r['cuda_peak'])}" if r["cuda_peak"] is not None else ""
    print(
        f"{name:>5}: saved for backward {gib(r['peak'])} at peak ({gib(r['held'])} held between forward "
        f"and backward), {statistics.median(r['times']):.2f} s/step{cuda}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture (random init)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=250, help="model.text_chunk_size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per mode (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print("$ python " + " ".join(sys.argv))
    torch.manual_seed(0)
    backbone = load_backbone(args.model, None, device=args.device, text_chunk_size=args.chunk)
    method = build_method("coop", backbone, {"t": class_names(args.classes)}, {"n_ctx": 16}).to(args.device)
    gen = torch.Generator().manual_seed(1)
    batch = Batch(
        "t",
        features=torch.randn(args.batch_size, backbone.embed_dim, generator=gen).to(args.device),
        labels=torch.randint(args.classes, (args.batch_size,), generator=gen).to(args.device),
    )
    length = int(method.prompts.eot.max()) + 1
    print(
        f"{args.model} (random init) on {args.device}, CoOp n_ctx 16, {args.classes} classes "
        f"(prompts {length} tokens), chunks of {args.chunk}, batch {args.batch_size}, fp32"
    )
    kept = measure(method, backbone, batch, "never", args.steps)
    report("never", kept)
    recomputed = measure(method, backbone, batch, "auto", args.steps)
    report("auto", recomputed)
    same = all(torch.equal(kept["grads"][k], g) for k, g in recomputed["grads"].items())
    ratio = f"saved bytes auto / never = {recomputed['peak'] / kept['peak']:.3f}"
    if kept["cuda_peak"]:
        ratio += f", cuda peak auto / never = {recomputed['cuda_peak'] / kept['cuda_peak']:.3f}"
    time_ratio = statistics.median(recomputed["times"]) / statistics.median(kept["times"])
    print(f"{ratio}, time auto / never = {time_ratio:.2f}; gradients bit-equal: {same}")
    if not same:
        raise SystemExit("gradients differ between the kept and the re-computed step")


if __name__ == "__main__":
    main()
