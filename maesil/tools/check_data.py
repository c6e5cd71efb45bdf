"""``python -m maesil check-data DIR``: validate a dataset up front and print one row per problem."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from maesil.data.checks import check_dataset, format_problem_table
from maesil.data.manifest import declared_classes
from maesil.data.sources import DEFAULT_EXCLUDE
from maesil.shapes import as_triple
from maesil.tools.data_options import add_data_arguments, resolve_data_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m maesil check-data",
        description="Check every image and label of a dataset (a folder, a DICOM tree or a CSV/JSON manifest, as"
        " data_dir takes it) and print a table with one row per problem. Errors: unreadable or truncated files,"
        " 2D/4D images, NaN/Inf voxels, constant volumes, spacing <= 0 or > 20 mm, label/image geometry mismatch,"
        " label values outside the declared classes, duplicate subject ids, DICOM series with missing slices."
        " Warnings: volumes smaller than one superpatch (padded), empty folders. Exit code 1 if any error.",
    )
    parser.add_argument("data_dir", nargs="?", default=None,
                        help="folder or manifest (default: data_dir of --config)")
    add_data_arguments(parser)
    parser.add_argument("--superpatch-size", type=int, nargs="+", default=None, metavar="N",
                        help="superpatch size in voxels, for the too-small warning (default: from --config, else 128)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-classes", type=int, default=None,
                       help="labels must be in 0..N-1 (default: from --config, or the 'labels' of a JSON manifest /"
                       " dataset.json; else any non-negative integer)")
    group.add_argument("--classes", type=int, nargs="+", default=None, metavar="V",
                       help="the allowed label values, e.g. 0 1 2 5")
    parser.add_argument("--headers-only", action="store_true",
                        help="read file headers only (fast; skips NaN, constant-volume and label-value checks)")
    return parser


def check_data_command(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    options = resolve_data_options(args)
    data_dir = args.data_dir or options.get("data_dir")
    if data_dir is None:
        raise SystemExit("error: give DIR (a data folder or manifest) or a --config with data.init_args.data_dir")
    size = args.superpatch_size or options["superpatch_size"]
    superpatch = as_triple(size[0] if isinstance(size, list) and len(size) == 1 else size, "superpatch_size")
    num_classes = args.num_classes if args.num_classes is not None else options.get("num_classes")
    classes = args.classes or (list(range(num_classes)) if num_classes else declared_classes(data_dir))
    exclude = options["exclude"] if options["exclude"] is not None else DEFAULT_EXCLUDE

    start = time.perf_counter()
    report = check_dataset(data_dir, exclude=exclude, superpatch_size=superpatch,
                           target_spacing=options["target_spacing"], classes=classes,
                           read_voxels=not args.headers_only, workers=max(1, args.workers))
    elapsed = time.perf_counter() - start
    if report.problems:
        print(format_problem_table(report.problems))
        print()
    n_files = len(report.records) + sum(r.label is not None for r in report.records)
    what = "headers" if args.headers_only else "headers and voxels"
    print(f"{report.source}: {len(report.records)} subject(s), {n_files} file(s) checked ({what}) in {elapsed:.1f} s:"
          f" {len(report.errors)} error(s), {len(report.warnings)} warning(s)"
          + (f"; label classes {classes}" if classes is not None else ""))
    return 1 if report.errors else 0
