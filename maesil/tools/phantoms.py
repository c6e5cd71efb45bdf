"""``python -m maesil phantoms --out DIR``: write synthetic CT phantoms (HU images + organ label maps) as NIfTI."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from maesil.phantoms import DEFAULT_SHAPE, DEFAULT_SPACING, default_workers, write_phantoms


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m maesil phantoms",
        description="Write deterministic synthetic torso CT phantoms (HU images + organ label maps) as NIfTI: "
        "OUT/images/phantom_XXX.nii.gz and OUT/labels/phantom_XXX.nii.gz.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--count", "--n", type=int, default=8, help="number of phantoms (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first phantom (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=list(DEFAULT_SPACING), metavar=("SX", "SY", "SZ"))
    parser.add_argument("--workers", type=int, default=None,
                        help="processes generating phantoms (default: one per phantom, at most one per CPU core)")
    return parser


def phantoms_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    workers = args.workers if args.workers is not None else default_workers(args.count)
    paths = write_phantoms(args.out, args.count, seed=args.seed, shape=tuple(args.shape), spacing=tuple(args.spacing),
                           workers=workers)
    print(f"{len(paths)} phantoms in {args.out.resolve()}")
    return 0
