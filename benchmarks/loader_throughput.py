"""Superpatch loading: TorchIO Queue on the NIfTI files vs the prepared cache.

Two ways to feed 128³ superpatches (batch 2) of phantom CT volumes (300 × 300 × 200 voxels of
1 × 1 × 1.5 mm, resampled to 1.5 mm) to a training loop, both with 2 worker processes:

(a) the DataModule's TorchIO path: ``tio.Queue`` (samples_per_volume 8, queue length 48) whose workers
    read each ``.nii.gz`` and run the full preprocessing (canonical, resample, HU window, foreground
    crop, pad), then ``QueueSampler`` + a 0-worker DataLoader;
(b) a plain ``DataLoader(CachedPatchDataset, num_workers=2, shuffle=True)`` over a cache made once by
    :func:`maesil.data.cache.prepare_cache` (memory-mapped ``.npy``: one superpatch is copied per item).

Throughput is superpatches per second after ``--warmup`` batches (for (a) that is the first queue
fill, so the figure slightly favours (a)), over the rest of one epoch (or ``--batches``), and over the
whole epoch including the start of the workers. Peak memory
is measured for (b) (and (a)) over one whole epoch with 8 and 64 volumes: the sum over the main
process and its DataLoader workers of the resident set (RSS; also PSS, which counts pages shared
by the forked workers once), sampled every 20 ms from /proc, and ``getrusage`` maxima as a check.
Every measurement runs in a fresh Python process. Phantoms and cache are written once under
``data_cache/`` and reused (generating a 300 × 300 × 200 phantom takes a few seconds).

    python benchmarks/loader_throughput.py [--volumes 32] [--rss-volumes 8 64] [--patch 128] [--workers 2]
    python benchmarks/loader_throughput.py --quick   # small volumes, a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

QUICK = {"volumes": 4, "rss_volumes": [2, 4], "patch": 32, "shape": [64, 64, 40], "spacing": [3.0, 3.0, 4.5],
         "target_spacing": 4.5, "data_dir": "data_cache/bench_phantoms_quick", "cache_dir": "data_cache/bench_cache_quick"}


# --------------------------------------------------------------------------------------------
# Memory sampling (Linux /proc)
# --------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


class PeakMemory:
    """Samples the summed RSS and PSS of this process and all its descendants in a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            totals = [_memory_kib(p) for p in [me, *_descendants(me)]]
            self.peak_rss = max(self.peak_rss, sum(t[0] for t in totals))
            self.peak_pss = max(self.peak_pss, sum(t[1] for t in totals))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------
# One measurement (runs in a fresh process)
# --------------------------------------------------------------------------------------------


def _records(data_dir: Path, count: int) -> list:
    from maesil.data.sources import SubjectRecord

    names = [f"phantom_{i:03d}.nii.gz" for i in range(count)]
    return [SubjectRecord(n[: -len(".nii.gz")], data_dir / "images" / n, data_dir / "labels" / n) for n in names]


def _queue_loader(args: argparse.Namespace, volumes: int):
    import torchio as tio
    from torch.utils.data import DataLoader

    from maesil.data.io import subject_from_record
    from maesil.data.preprocess import PreprocessSettings
    from maesil.data.sampling import QueueSampler, collate_patches, train_queue

    settings = PreprocessSettings(modality="ct", target_spacing=(args.target_spacing,) * 3)
    patch = (args.patch,) * 3
    subjects = tio.SubjectsDataset(
        [subject_from_record(r, with_label=False) for r in _records(Path(args.data_dir), volumes)],
        transform=settings.transform(min_shape=patch), load_getitem=False,
    )
    queue = train_queue(subjects, patch, args.samples_per_volume, max_length=args.queue_length,
                        num_workers=args.workers, sampler=tio.UniformSampler(patch))
    return DataLoader(queue, batch_size=args.batch_size, sampler=QueueSampler(queue), num_workers=0,
                      collate_fn=collate_patches)


def _cache_loader(args: argparse.Namespace, volumes: int):
    from torch.utils.data import DataLoader

    from maesil.data.cache import CachedPatchDataset, CacheIndex
    from maesil.data.sampling import collate_patches

    index = CacheIndex.load(args.cache_dir)
    ids = [r.subject_id for r in _records(Path(args.data_dir), volumes)]
    dataset = CachedPatchDataset(index, ids, args.patch, args.samples_per_volume)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      collate_fn=collate_patches)


def measure(args: argparse.Namespace, method: str, volumes: int) -> dict:
    """Superpatches/s after ``args.warmup`` batches and the epoch's peak memory."""
    loader = (_queue_loader if method == "queue" else _cache_loader)(args, volumes)
    total = len(loader)
    timed_batches = total - args.warmup if args.batches is None else min(args.batches, total - args.warmup)
    with PeakMemory() as memory:
        start = time.perf_counter()
        iterator = iter(loader)
        for _ in range(args.warmup):
            next(iterator)
        warm = time.perf_counter()
        patches = 0
        for _ in range(timed_batches):
            patches += len(next(iterator)["subject_id"])
        seconds = time.perf_counter() - warm
        for _ in iterator:  # finish the epoch so the memory figure covers all volumes
            pass
        epoch_seconds = time.perf_counter() - start
        del iterator
    return {
        "method": method, "volumes": volumes, "patches": patches, "seconds": seconds, "rate": patches / seconds,
        "epoch_seconds": epoch_seconds, "epoch_rate": len(loader.dataset) / epoch_seconds,
        "peak_rss_mib": memory.peak_rss / 1024, "peak_pss_mib": memory.peak_pss / 1024,
        "maxrss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "maxrss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _child_args(args: argparse.Namespace) -> list[str]:
    out = ["--patch", str(args.patch), "--workers", str(args.workers), "--batch-size", str(args.batch_size),
           "--samples-per-volume", str(args.samples_per_volume), "--queue-length", str(args.queue_length),
           "--warmup", str(args.warmup), "--target-spacing", str(args.target_spacing),
           "--data-dir", str(args.data_dir), "--cache-dir", str(args.cache_dir)]
    return out + (["--batches", str(args.batches)] if args.batches is not None else [])


def run_child(args: argparse.Namespace, method: str, volumes: int) -> dict:
    command = [sys.executable, __file__, "--measure", method, str(volumes), *_child_args(args)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=32, help="volumes of the throughput runs")
    parser.add_argument("--rss-volumes", type=int, nargs="+", default=[8, 64], help="volumes of the memory runs")
    parser.add_argument("--patch", type=int, default=128, help="superpatch edge in voxels")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (queue and DataLoader)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--samples-per-volume", type=int, default=8)
    parser.add_argument("--queue-length", type=int, default=48, help="tio.Queue capacity (the DataModule default)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (default: the rest of one epoch)")
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 300, 200], help="phantom voxels (X, Y, Z)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.5], help="phantom spacing (mm)")
    parser.add_argument("--target-spacing", type=float, default=1.5, help="isotropic spacing after resampling (mm)")
    parser.add_argument("--data-dir", default="data_cache/bench_phantoms", help="phantom folder (reused)")
    parser.add_argument("--cache-dir", default="data_cache/bench_cache", help="prepared cache folder (reused)")
    parser.add_argument("--no-queue-memory", action="store_true", help="measure peak memory of (b) only")
    parser.add_argument("--quick", action="store_true", help="tiny volumes: a smoke test of this script")
    parser.add_argument("--measure", nargs=2, metavar=("METHOD", "VOLUMES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key in ("data_dir", "cache_dir"):
        path = Path(getattr(args, key)).expanduser()
        setattr(args, key, path if path.is_absolute() else REPO_ROOT / path)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args, args.measure[0], int(args.measure[1]))))
        return

    from maesil.data.cache import prepare_cache
    from maesil.data.phantoms import write_phantoms
    from maesil.data.preprocess import PreprocessSettings

    wall = time.perf_counter()
    count = max(args.volumes, *args.rss_volumes)
    t0 = time.perf_counter()
    write_phantoms(args.data_dir, count, seed=0, shape=tuple(args.shape), spacing=tuple(args.spacing))
    print(f"phantoms: {count} x {'x'.join(map(str, args.shape))} voxels in {args.data_dir} "
          f"({time.perf_counter() - t0:.1f} s, existing files reused)")
    settings = PreprocessSettings(modality="ct", target_spacing=(args.target_spacing,) * 3)
    t0 = time.perf_counter()
    report = prepare_cache(_records(args.data_dir, count), args.cache_dir, settings, workers=args.workers)
    if report.failed:
        raise SystemExit(f"prepare failed: {report.failed}")
    print(f"cache: {len(report.prepared)} prepared, {len(report.skipped)} unchanged in {args.cache_dir} "
          f"({time.perf_counter() - t0:.1f} s)")

    queue = run_child(args, "queue", args.volumes)
    cache = run_child(args, "cache", args.volumes)
    print(f"\nthroughput: {args.volumes} volumes, superpatch {args.patch}^3, batch {args.batch_size}, "
          f"{args.workers} workers, samples_per_volume {args.samples_per_volume}, {args.warmup} warm-up batches")
    print(f"{'loader':<44} {'superpatches/s':>15} {'timed patches':>14} {'s':>8} {'whole epoch/s':>14}")
    for name, r in (("(a) tio.Queue, .nii.gz + full preprocessing", queue), ("(b) prepared cache, plain DataLoader", cache)):
        print(f"{name:<44} {r['rate']:>15.2f} {r['patches']:>14d} {r['seconds']:>8.2f} {r['epoch_rate']:>14.2f}")
    print(f"speed-up (b)/(a): {cache['rate'] / queue['rate']:.1f}x after warm-up, "
          f"{cache['epoch_rate'] / queue['epoch_rate']:.1f}x over the whole epoch (target >= 20x)")

    methods = [("cache", "(b) cache")] + ([] if args.no_queue_memory else [("queue", "(a) queue")])
    print(f"\npeak memory over one epoch (main process + workers, MiB):")
    print(f"{'loader':<10} {'volumes':>7} {'RSS sum':>9} {'PSS sum':>9} {'maxrss main':>12} {'maxrss worker':>14}")
    for method, name in methods:
        rows = [run_child(args, method, v) for v in args.rss_volumes]
        for r in rows:
            worker = f"{r['maxrss_worker_mib']:.0f}" if r["maxrss_worker_mib"] else "-"  # not reaped yet
            print(f"{name:<10} {r['volumes']:>7d} {r['peak_rss_mib']:>9.0f} {r['peak_pss_mib']:>9.0f} "
                  f"{r['maxrss_main_mib']:>12.0f} {worker:>14}")
        first, last = rows[0], rows[-1]
        print(f"{name}: RSS with {last['volumes']} volumes / {first['volumes']} volumes = "
              f"{last['peak_rss_mib'] / first['peak_rss_mib']:.3f} (target <= 1.10)")
    print(f"\nwall time {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
