"""Pretrain the bundled small CLIP (``vlp-small``) on the procedural small world, on a CPU.

    python experiments/pretrain_small_clip.py --steps 1500 --batch-size 256 --seed 0

Every batch is drawn fresh from ``vlprompt.datasets.smallworld`` (no files); the model is
open_clip's own ``CLIP`` built from ``methods/model_configs/vlp-small.json`` and trained with
open_clip's ``ClipLoss`` and tokenizer. Logged to MLflow (``MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow.db``): parameters, the loss curve and zero-shot probes. Writes the
fp16 weights to ``methods/weights/<model>.safetensors`` with a ``.sha256`` file and a JSON
record of the command, seed, steps, wall time and machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import open_clip
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset

from vlprompt.datasets import smallworld as sw
from vlprompt.methods.clip import register_model_configs

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "methods" / "weights"


class WorldStream(IterableDataset):
    """Endless (images, token ids) batches from the small world, seeded per run."""

    def __init__(
        self, seed: int, batch_size: int, tokenizer: object, mean: tuple, std: tuple, simple: float
    ) -> None:
        self.seed, self.batch_size, self.tokenizer, self.simple = seed, batch_size, tokenizer, simple
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, 1])
        while True:
            images, captions = sw.pretraining_batch(rng, self.batch_size, simple=self.simple)
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
            yield (x - self.mean) / self.std, self.tokenizer(captions)


@torch.no_grad()
def zero_shot_probe(model, tokenizer, mean, std, seed: int, n: int = 600) -> dict[str, float]:
    """Accuracy of naming the shape and the colour of fresh single-object scenes."""
    rng = np.random.default_rng([seed, 2])
    scenes = [sw.Scene(thing=sw.random_thing(rng, count=1)) for _ in range(n)]
    images = np.stack([np.asarray(sw.render(s, rng)) for s in scenes])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255) - mean) / std
    img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    out = {}
    for attr, names, template in (
        ("shape", sw.SHAPES, "a photo of a {}."),
        ("colour", tuple(sw.HUES), "a photo of something {}."),
    ):
        txt = model.encode_text(tokenizer([template.format(c) for c in names]))
        pred = (img @ torch.nn.functional.normalize(txt, dim=-1).T).argmax(-1)
        truth = torch.tensor(
            [names.index(getattr(s.thing, "hue" if attr == "colour" else "shape")) for s in scenes]
        )
        out[f"zeroshot_{attr}"] = float((pred == truth).float().mean())
    return out


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vlp-small")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--out", type=Path, default=None, help="weights file (default methods/weights/<model>.safetensors)"
    )
    p.add_argument("--simple", type=float, default=0.0, help="fraction of plain one-object scenes")
    p.add_argument("--init", type=Path, default=None, help="start from these weights")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--snapshot", type=Path, default=None, help="also save weights here every 100 steps")
    return p.parse_args(argv)


def _optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW, no weight decay on embeddings, biases and norms (open_clip's training recipe)."""
    decay = [q for n, q in model.named_parameters() if q.ndim >= 2 and "embedding" not in n]
    no_decay = [q for n, q in model.named_parameters() if not (q.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )


def _lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine to zero."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * t))


def _half_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}


def _train(model: torch.nn.Module, tokenizer: object, pre: dict, args: argparse.Namespace) -> float:
    """The contrastive steps; returns the last step's loss."""
    opt = _optimizer(model, args)
    stream = WorldStream(args.seed, args.batch_size, tokenizer, pre["mean"], pre["std"], args.simple)
    loader = DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4)
    loss_fn = open_clip.ClipLoss()
    start, loss = time.time(), torch.tensor(float("nan"))
    model.train()
    for step, (x, ids) in enumerate(loader):
        if step >= args.steps:
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args)
        img, txt, scale = model(x, ids)
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if args.snapshot is not None and step % 100 == 99:
            save_file(_half_state(model), str(args.snapshot))
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.time() - start
            mlflow.log_metrics(
                {"loss": loss.item(), "lr": _lr_at(step, args), "elapsed_s": elapsed}, step=step
            )
            print(f"step {step:5d} loss {loss.item():.3f} {elapsed / (step + 1):.2f}s/step", flush=True)
    return loss.item()


def _save(model: torch.nn.Module, out: Path, args: argparse.Namespace, record: dict) -> dict:
    """fp16 weights, their sha256 file and the ``<model>.json`` record of how they were made."""
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(_half_state(model), str(out))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.with_name(out.name + ".sha256").write_text(f"{digest}  {out.name}\n", encoding="utf-8")
    record = {
        **record,
        "sha256": digest,
        "bytes": out.stat().st_size,
        "machine": f"{platform.platform()}; {os.cpu_count()} cpus, {args.threads} torch threads; "
        f"torch {torch.__version__}; open_clip {open_clip.__version__}",
    }
    out.with_name(out.stem + ".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    out = args.out or WEIGHTS_DIR / f"{args.model}.safetensors"
    register_model_configs()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = open_clip.create_model(args.model, pretrained=str(args.init) if args.init else None)
    tokenizer = open_clip.get_tokenizer(args.model)
    pre = open_clip.get_model_preprocess_cfg(model)
    mean, std = torch.tensor(pre["mean"]).view(1, 3, 1, 1), torch.tensor(pre["std"]).view(1, 3, 1, 1)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    mlflow.set_experiment("pretrain_small_clip")
    n_params = sum(q.numel() for q in model.parameters())
    start = time.time()
    with mlflow.start_run(run_name=f"{args.model}-s{args.seed}"):
        mlflow.log_params({**{k: str(v) for k, v in vars(args).items()}, "params": n_params})
        final_loss = _train(model, tokenizer, pre, args)
        wall = time.time() - start
        model.eval()
        probes = zero_shot_probe(model, tokenizer, mean, std, args.seed)
        mlflow.log_metrics({**probes, "final_loss": final_loss, "wall_s": wall})
        print(probes, flush=True)
        record = {
            "command": "python experiments/pretrain_small_clip.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "model": args.model,
            "seed": args.seed,
            "simple": args.simple,
            "init": str(args.init) if args.init else None,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "pairs_seen": args.steps * args.batch_size,
            "lr": args.lr,
            "params": n_params,
            "wall_s": round(wall, 1),
            "final_loss": round(final_loss, 4),
            **{k: round(v, 4) for k, v in probes.items()},
        }
        record = _save(model, out, args, record)
        mlflow.log_dict(record, "record.json")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
