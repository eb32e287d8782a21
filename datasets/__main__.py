"""``python -m vlprompt.datasets {list,generate,check}`` — see the catalog, write a stand-in, check data.

``check`` is the data doctor: it reads a dataset exactly as a run would and prints the
class count, split sizes and fingerprint, or the error that says which file is missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vlprompt.datasets.catalog import CATALOG
from vlprompt.datasets.generate import generate_dataset
from vlprompt.datasets.splits import load_dataset, split_fingerprint


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlprompt.datasets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the catalog")
    gen = sub.add_parser("generate", help="write a procedural dataset in an entry's real layout")
    gen.add_argument("name", choices=sorted(CATALOG))
    gen.add_argument("--root", required=True)
    gen.add_argument("--images-per-class", type=int, default=40)
    gen.add_argument("--image-size", type=int, default=32)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-classes", type=int, default=None)
    check = sub.add_parser("check", help="read a dataset as a run would and summarise it")
    check.add_argument("name", choices=sorted(CATALOG))
    check.add_argument("--root", required=True)
    args = parser.parse_args(argv)

    if args.command == "list":
        for key in sorted(CATALOG):
            entry = CATALOG[key]
            print(f"{key:<12} {len(entry.classnames):>4} classes  {entry.description}")
            print(f"{'':<12} layout: {entry.layout}")
    elif args.command == "generate":
        folder = generate_dataset(
            args.name,
            args.root,
            images_per_class=args.images_per_class,
            image_size=args.image_size,
            seed=args.seed,
            num_classes=args.num_classes,
        )
        print(folder)
    else:
        try:
            splits = load_dataset(args.name, args.root)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        sizes = ", ".join(f"{s} {len(splits.split(s))}" for s in ("train", "val", "test"))
        print(f"{splits.name}: {splits.num_classes} classes; {sizes}")
        print(f"template: {splits.template!r}")
        print(f"fingerprint: {split_fingerprint(splits)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
