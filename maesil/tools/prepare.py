"""``python -m maesil prepare DIR --out CACHE``: preprocess a dataset once into a cache for fast loading."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from maesil.data.checks import check_records, format_problem_table
from maesil.data.manifest import declared_classes
from maesil.data.records import DataError, Problem
from maesil.data.sources import DEFAULT_EXCLUDE, discover_subjects
from maesil.tools.data_options import add_data_arguments, resolve_data_options, settings_from_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m maesil prepare",
        description="Preprocess every subject of DIR (folder, DICOM tree or manifest) once: canonical orientation,"
        " target spacing, intensity window/normalisation, foreground crop. Writes OUT/subjects/<id>/image.npy"
        " (+ label.npy), or with --format blosc2 chunked, compressed image.b2nd (+ label.b2nd), for random"
        " superpatch reads, and OUT/index.json (shapes, spacing, affines, sources,"
        " intensity stats). Re-running skips subjects whose source is unchanged. Train from it with"
        " --data.init_args.cache_dir OUT.",
    )
    parser.add_argument("data_dir", nargs="?", default=None, help="folder or manifest (default: data_dir of --config)")
    parser.add_argument("--out", default=None, help="cache folder (default: cache_dir of --config)")
    add_data_arguments(parser)
    parser.add_argument("--format", choices=["npy", "blosc2"], default=None,
                        help="how volumes are stored: npy (uncompressed float32) or blosc2 (chunked, compressed,"
                        " CT quantised to 0.1 HU; about 4x smaller); default: cache_format of --config, else npy")
    parser.add_argument("--force", action="store_true",
                        help="rebuild every subject, also when the cache was made with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def prepare_command(argv: Sequence[str]) -> int:
    from maesil.data.cache import CacheIndex, cache_problems, prepare_cache

    args = build_parser().parse_args(list(argv))
    options = resolve_data_options(args)
    data_dir = args.data_dir or options.get("data_dir")
    out = args.out or options.get("cache_dir")
    if data_dir is None:
        raise SystemExit("error: give DIR (a data folder or manifest) or a --config with data.init_args.data_dir")
    if out is None:
        raise SystemExit("error: give --out CACHE or a --config with data.init_args.cache_dir")
    settings = settings_from_options(options)
    exclude = options["exclude"] if options["exclude"] is not None else DEFAULT_EXCLUDE
    try:
        records = discover_subjects(data_dir, exclude=exclude)
    except DataError as error:
        print(format_problem_table(error.findings))
        return 1

    header_problems = check_records(records, read_voxels=False, workers=max(1, args.workers))
    bad = {p.path for p in header_problems if p.severity == "error"}
    usable = [r for r in records if str(r.image) not in bad and (r.label is None or str(r.label) not in bad)]
    start = time.perf_counter()
    try:
        report = prepare_cache(usable, out, settings, workers=max(1, args.workers),
                               progress=not args.no_progress, force=args.force,
                               format=args.format or options["cache_format"])
    except DataError as error:
        print(format_problem_table(error.findings))
        return 1
    elapsed = time.perf_counter() - start
    by_id = {r.subject_id: r for r in records}
    failures = [p for p in header_problems if p.severity == "error"] + [
        Problem(str(by_id[sid].image) if sid in by_id else sid, message) for sid, message in report.failed.items()
    ]
    # what the DataModule would refuse when reading the cache (constant volumes, label values)
    index = CacheIndex.load(out, check_files=True)
    prepared = [index.entries[r.subject_id] for r in usable if r.subject_id in index.entries]
    num_classes = options.get("num_classes")
    classes = list(range(num_classes)) if num_classes else declared_classes(data_dir)
    failures += [p for p in cache_problems(prepared, classes=classes) if p.severity == "error"]
    if failures:
        print(format_problem_table(failures))
        print()
    print(f"{Path(out)}: {len(report.prepared)} prepared, {len(report.skipped)} unchanged (skipped),"
          f" {len(records) - len(usable) + len(report.failed)} failed, in {elapsed:.1f} s; settings {settings.to_dict()}")
    if failures:
        print(f"{len(failures)} problem(s): a training run on this data stops at setup until they are fixed")
    return 1 if failures else 0
