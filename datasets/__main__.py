"""``python -m vlprompt.datasets {list,generate,check,doctor,make-split}`` — catalog, stand-ins, data checks.

``check`` reads one dataset exactly as a run would and prints the class count, split sizes
and fingerprint, or the error that says which file is missing; for a multi-task source (a
task group such as general10, or fashion20) it prints one such summary per task. ``doctor``
does that for every catalog entry under a data root (``doctor.py``). ``make-split`` writes a
missing split file by the dataset's rule, on request only (``makesplit.py``; fashion20's
per-task rule in ``fashion20.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from vlprompt.datasets.catalog import CATALOG
from vlprompt.datasets.cuts import DEFAULT_SEED
from vlprompt.datasets.doctor import diagnose, report
from vlprompt.datasets.generate import generate_dataset
from vlprompt.datasets.makesplit import datasets_with_rules, make_split
from vlprompt.datasets.splits import load_dataset, split_fingerprint
from vlprompt.datasets.tasks import GROUPS, is_multitask, load_tasks
from vlprompt.datasets.types import SPLIT_NAMES, DatasetSplits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vlprompt.datasets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the catalog")
    gen = sub.add_parser("generate", help="write a procedural dataset in an entry's real layout")
    gen.add_argument("name", choices=sorted(CATALOG))
    gen.add_argument("--root", required=True)
    gen.add_argument("--images-per-class", type=int, default=40)
    gen.add_argument("--image-size", type=int, default=32)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-classes", type=int, default=None, help="the first N classes (fashion20: tasks)")
    check = sub.add_parser("check", help="read a dataset (or each task of a group) as a run would")
    check.add_argument("name", choices=sorted(CATALOG) + sorted(GROUPS))
    check.add_argument("--root", required=True)
    doc = sub.add_parser("doctor", help="walk a data root: found / missing / broken per catalog entry")
    doc.add_argument("names", nargs="*", choices=[[], *sorted(CATALOG)], metavar="NAME")
    doc.add_argument("--root", required=True)
    doc.add_argument("--verify-images", action="store_true", help="also decode every image")
    mk = sub.add_parser("make-split", help="write a missing split file by the dataset's rule")
    mk.add_argument("name", choices=datasets_with_rules())
    mk.add_argument("--root", required=True)
    mk.add_argument("--seed", type=int, default=DEFAULT_SEED)
    mk.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return COMMANDS[args.command](args)


def _list(args: argparse.Namespace) -> int:
    for key in sorted(CATALOG):
        entry = CATALOG[key]
        print(f"{key:<12} {entry.num_classes:>4} classes  {entry.description}")
        print(f"{'':<12} layout: {entry.layout}")
    print("task groups (data.protocol=multi_task; fashion20 and any dataset work there too):")
    for key in sorted(GROUPS):
        print(f"{key:<12} {len(GROUPS[key]):>4} tasks    {', '.join(GROUPS[key])}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    folder = generate_dataset(
        args.name,
        args.root,
        images_per_class=args.images_per_class,
        image_size=args.image_size,
        seed=args.seed,
        num_classes=args.num_classes,
    )
    print(folder)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    findings = diagnose(args.root, args.names, verify_images=args.verify_images)
    text, code = report(findings, args.root, requested=bool(args.names))
    print(text)
    return code


def _make_split(args: argparse.Namespace) -> int:
    try:
        path = make_split(args.name, args.root, seed=args.seed, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:  # missing files, read-only folder, bad rows
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        if is_multitask(args.name):
            tasks = load_tasks(args.name, args.root)
            parts = [task.splits for task in tasks.values()]
            n_classes = sum(splits.num_classes for splits in parts)
            print(f"{args.name}: {len(parts)} tasks, {n_classes} classes")
        else:
            parts = [load_dataset(args.name, args.root)]
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for splits in parts:
        _print_check(splits)
    return 0


def _print_check(splits: DatasetSplits) -> None:
    sizes = ", ".join(f"{s} {len(splits.split(s))}" for s in SPLIT_NAMES)
    print(f"{splits.name}: {splits.num_classes} classes; {sizes}")
    print(f"template: {splits.template!r}")
    print(f"fingerprint: {split_fingerprint(splits)}")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": _list,
    "generate": _generate,
    "check": _check,
    "doctor": _doctor,
    "make-split": _make_split,
}


if __name__ == "__main__":
    raise SystemExit(main())
