"""Superpatch loading: TorchIO Queue on the NIfTI files vs the prepared cache, ``.npy`` and blosc2.

Three ways to feed 128³ superpatches (batch 2) of phantom CT volumes (300 × 300 × 200 voxels of
1 × 1 × 1.5 mm, resampled to 1.5 mm) to a training loop, all with 2 worker processes:

(a) the DataModule's TorchIO path: ``tio.Queue`` (samples_per_volume 8, queue length 48) whose workers
    read each ``.nii.gz`` and run the full preprocessing (canonical, resample, HU window, foreground
    crop, pad), then ``QueueSampler`` + a 0-worker DataLoader;
(b) a plain ``DataLoader(CachedPatchDataset, num_workers=2, shuffle=True)`` over a cache made once by
    :func:`maesil.data.cache.prepare_cache` (memory-mapped ``.npy``: one superpatch is copied per item);
(c) the same over a blosc2 cache (``prepare --format blosc2``: chunks of 64³, CT as uint16 steps of
    0.1 HU, LZ4HC; a superpatch decompresses only the chunks it touches).

Disk size per volume is the mean over the subjects of the image file the loader reads (for (a) the
``.nii.gz``), and of all the subject's files (image, label, label points). The caches are also timed
with 1 worker, for the scaling from 1 to 2 workers.

Throughput is superpatches per second in the steady state, i.e. after a warm-up of one queue fill
(queue length / batch size batches) over as many whole fills as the epoch has left (the queue loads
volumes in bursts, so timing whole fills is what makes (a) fair), and over the whole epoch including
the start of the workers and the first fill. Both loaders are timed over the same batches. Peak memory
is measured for (b), (c) (and (a)) over one whole epoch with 8 and 64 volumes, in separate runs: the sum
over the main process and its workers of the resident set (RSS), sampled every 20 ms from /proc
(``getrusage`` cannot serve: a child started by ``subprocess`` inherits its parent's ``ru_maxrss``),
and the summed PSS, which counts the pages shared by the forked workers once.
Every measurement runs in a fresh Python process. Phantoms and cache are written once under
``data_cache/`` and reused (generating a 300 × 300 × 200 phantom takes a few seconds).

    python benchmarks/loader_throughput.py [--volumes 32] [--rss-volumes 8 64] [--patch 128] [--workers 2]
                                           [--only npy blosc2]   # skip the queue
    python benchmarks/loader_throughput.py --quick   # small volumes, a smoke test of the script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

QUICK = {"volumes": 4, "rss_volumes": [2, 4], "patch": 32, "shape": [64, 64, 40], "spacing": [3.0, 3.0, 4.5],
         "target_spacing": 4.5, "data_dir": "data_cache/bench_phantoms_quick",
         "cache_dir": "data_cache/bench_cache_quick", "blosc2_cache_dir": "data_cache/bench_cache_blosc2_quick"}
#: The loaders measured: (name in the tables, cache-dir option or None for the queue).
LOADERS = {"queue": ("(a) tio.Queue, .nii.gz + full preprocessing", None),
           "npy": ("(b) prepared cache, .npy", "cache_dir"),
           "blosc2": ("(c) prepared cache, blosc2", "blosc2_cache_dir")}


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


def _rss_kib(pid: int) -> int:
    """Resident set of one process in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, IndexError, ValueError):
        return 0


def _pss_kib(pid: int) -> int:
    """Proportional set (shared pages divided among their users) of one process in KiB."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples, in a thread, the RSS of this process and of all its descendants: the peak of their
    sum, of this process alone and of the largest descendant; and every ``pss_every`` samples the
    summed PSS (reading smaps_rollup is costlier)."""

    def __init__(self, interval: float = 0.02, pss_every: int = 10) -> None:
        self.interval, self.pss_every = interval, pss_every
        self.peak_rss = self.peak_pss = self.peak_main = self.peak_worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me, n = os.getpid(), 0
        while not self._stop.is_set():
            children = _descendants(me)
            main, workers = _rss_kib(me), [_rss_kib(p) for p in children]
            self.peak_rss = max(self.peak_rss, main + sum(workers))
            self.peak_main = max(self.peak_main, main)
            self.peak_worker = max(self.peak_worker, *workers, 0)
            if n % self.pss_every == 0:
                self.peak_pss = max(self.peak_pss, sum(_pss_kib(p) for p in [me, *children]))
            n += 1
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
    from maesil.data.records import SubjectRecord

    names = [f"phantom_{i:03d}.nii.gz" for i in range(count)]
    return [SubjectRecord(n[: -len(".nii.gz")], data_dir / "images" / n, data_dir / "labels" / n) for n in names]


def _queue_loader(args: argparse.Namespace, volumes: int):
    import torchio as tio
    from torch.utils.data import DataLoader

    from maesil.data.backends.queue import PolicyPatchSampler, QueueSampler, train_queue
    from maesil.data.collate import collate_patches
    from maesil.data.io import subject_from_record
    from maesil.data.preprocess import PreprocessSettings
    from maesil.data.sampling import UniformPolicy

    settings = PreprocessSettings(modality="ct", target_spacing=(args.target_spacing,) * 3)
    patch = (args.patch,) * 3
    subjects = tio.SubjectsDataset(
        [subject_from_record(r, with_label=False) for r in _records(Path(args.data_dir), volumes)],
        transform=settings.transform(min_shape=patch), load_getitem=False,
    )
    queue = train_queue(subjects, args.samples_per_volume, max_length=args.queue_length,
                        num_workers=args.workers, sampler=PolicyPatchSampler(patch, UniformPolicy()))
    return DataLoader(queue, batch_size=args.batch_size, sampler=QueueSampler(queue), num_workers=0,
                      collate_fn=collate_patches)


def _cache_loader(args: argparse.Namespace, volumes: int, cache_dir: Path):
    from torch.utils.data import DataLoader

    from maesil.data.cache import CachedPatchDataset, CacheIndex
    from maesil.data.collate import collate_patches

    index = CacheIndex.load(cache_dir)
    ids = [r.subject_id for r in _records(Path(args.data_dir), volumes)]
    dataset = CachedPatchDataset(index, ids, args.patch, args.samples_per_volume)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      collate_fn=collate_patches)


def read_cost(args: argparse.Namespace, volumes: int, reads: int = 24, rounds: int = 3) -> dict[str, float]:
    """Milliseconds per superpatch read by ``CachedPatchDataset`` in this one process (no DataLoader), the
    ``.npy`` and the blosc2 cache taking turns, so that both see the same load of a shared machine."""
    from maesil.data.cache import CachedPatchDataset, CacheIndex

    ids = [r.subject_id for r in _records(Path(args.data_dir), volumes)]
    datasets = {m: CachedPatchDataset(CacheIndex.load(getattr(args, LOADERS[m][1])), ids, args.patch,
                                      args.samples_per_volume) for m in ("npy", "blosc2")}
    total = dict.fromkeys(datasets, 0.0)
    step = max(1, len(datasets["npy"]) // reads)
    for _ in range(rounds):
        for method, dataset in datasets.items():
            start = time.perf_counter()
            for i in range(0, step * reads, step):
                dataset[i]
            total[method] += time.perf_counter() - start
    return {m: t / (rounds * reads) * 1e3 for m, t in total.items()}


def measure(args: argparse.Namespace, method: str, volumes: int, memory: bool) -> dict:
    """Superpatches/s after ``args.warmup`` batches and over the whole epoch; with ``memory`` the
    epoch's peak memory instead (sampling costs CPU, so throughput runs do not sample)."""
    option = LOADERS[method][1]
    loader = _queue_loader(args, volumes) if option is None else _cache_loader(args, volumes, getattr(args, option))
    total = len(loader)
    cycle = max(1, args.queue_length // args.batch_size)  # batches per refill of the tio.Queue
    warmup = min(cycle if args.warmup is None else args.warmup, total // 4)
    if args.batches is not None:
        timed_batches = min(args.batches, total - warmup)
    else:  # whole refill cycles, so that (a) is timed in its steady state
        timed_batches = (total - warmup) // cycle * cycle or total - warmup
    sampler = PeakMemory() if memory else contextlib.nullcontext()
    with sampler:
        start = time.perf_counter()
        iterator = iter(loader)
        for _ in range(warmup):
            next(iterator)
        warm = time.perf_counter()
        patches = 0
        for _ in range(timed_batches):
            patches += len(next(iterator)["subject_id"])
        seconds = time.perf_counter() - warm
        for _ in iterator:  # finish the epoch (the memory figure covers all volumes)
            pass
        epoch_seconds = time.perf_counter() - start
        del iterator
    result = {"method": method, "volumes": volumes, "warmup": warmup, "patches": patches, "seconds": seconds,
              "rate": patches / seconds, "epoch_seconds": epoch_seconds,
              "epoch_rate": len(loader.dataset) / epoch_seconds}
    if memory:
        result.update(peak_rss_mib=sampler.peak_rss / 1024, peak_pss_mib=sampler.peak_pss / 1024,
                      peak_main_mib=sampler.peak_main / 1024, peak_worker_mib=sampler.peak_worker / 1024)
    return result


def _child_args(args: argparse.Namespace) -> list[str]:
    out = ["--patch", str(args.patch), "--workers", str(args.workers), "--batch-size", str(args.batch_size),
           "--samples-per-volume", str(args.samples_per_volume), "--queue-length", str(args.queue_length),
           "--target-spacing", str(args.target_spacing),
           "--data-dir", str(args.data_dir), "--cache-dir", str(args.cache_dir),
           "--blosc2-cache-dir", str(args.blosc2_cache_dir)]
    out += ["--warmup", str(args.warmup)] if args.warmup is not None else []
    return out + (["--batches", str(args.batches)] if args.batches is not None else [])


def run_child(args: argparse.Namespace, method: str, volumes: int, memory: bool = False,
              workers: int | None = None) -> dict:
    child = argparse.Namespace(**{**vars(args), "workers": args.workers if workers is None else workers})
    command = [sys.executable, __file__, "--measure", method, str(volumes), *_child_args(child)]
    command += ["--measure-memory"] if memory else []
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
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed batches first (default: one queue fill, queue length / batch size)")
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches (default: as many whole queue fills as the epoch has left)")
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 300, 200], help="phantom voxels (X, Y, Z)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.5], help="phantom spacing (mm)")
    parser.add_argument("--target-spacing", type=float, default=1.5, help="isotropic spacing after resampling (mm)")
    parser.add_argument("--data-dir", default="data_cache/bench_phantoms", help="phantom folder (reused)")
    parser.add_argument("--cache-dir", default="data_cache/bench_cache", help="prepared .npy cache folder (reused)")
    parser.add_argument("--blosc2-cache-dir", default="data_cache/bench_cache_blosc2",
                        help="prepared blosc2 cache folder (reused)")
    parser.add_argument("--only", nargs="+", choices=sorted(LOADERS), default=sorted(LOADERS),
                        help="the loaders to measure (default: all three)")
    parser.add_argument("--no-queue-memory", action="store_true", help="measure peak memory of (b) only")
    parser.add_argument("--quick", action="store_true", help="tiny volumes: a smoke test of this script")
    parser.add_argument("--measure", nargs=2, metavar=("METHOD", "VOLUMES"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key in ("data_dir", "cache_dir", "blosc2_cache_dir"):
        path = Path(getattr(args, key)).expanduser()
        setattr(args, key, path if path.is_absolute() else REPO_ROOT / path)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args, args.measure[0], int(args.measure[1]), args.measure_memory)))
        return

    from maesil.data.cache import prepare_cache
    from maesil.data.preprocess import PreprocessSettings
    from maesil.phantoms import write_phantoms

    wall = time.perf_counter()
    count = max(args.volumes, *args.rss_volumes)
    t0 = time.perf_counter()
    write_phantoms(args.data_dir, count, seed=0, shape=tuple(args.shape), spacing=tuple(args.spacing))
    print(f"phantoms: {count} x {'x'.join(map(str, args.shape))} voxels in {args.data_dir} "
          f"({time.perf_counter() - t0:.1f} s, existing files reused)")
    settings = PreprocessSettings(modality="ct", target_spacing=(args.target_spacing,) * 3)
    records = _records(args.data_dir, count)
    for method in ("npy", "blosc2"):
        folder = getattr(args, LOADERS[method][1])
        t0 = time.perf_counter()
        report = prepare_cache(records, folder, settings, workers=args.workers, format=method)  # type: ignore[arg-type]
        if report.failed:
            raise SystemExit(f"prepare failed: {report.failed}")
        print(f"{method} cache: {len(report.prepared)} prepared, {len(report.skipped)} unchanged in {folder} "
              f"({time.perf_counter() - t0:.1f} s)")

    methods = [m for m in LOADERS if m in args.only]
    print(f"\ndisk size per volume, mean over {count} volumes (MiB):")
    print(f"{'loader':<44} {'image read':>11} {'all files':>10} {'vs .npy':>8}")
    sizes = {m: _disk_sizes(args, m, records) for m in LOADERS}
    for method in methods:
        image, total = sizes[method]
        print(f"{LOADERS[method][0]:<44} {image:>11.2f} {total:>10.2f} {sizes['npy'][1] / total:>7.2f}x")
    print(f"blosc2 cache: {sizes['npy'][1] / sizes['blosc2'][1]:.2f}x smaller than the .npy cache (target >= 3x)")

    rates = {m: run_child(args, m, args.volumes) for m in methods}
    single = {m: run_child(args, m, args.volumes, workers=1) for m in methods if m != "queue"}
    print(f"\nthroughput: {args.volumes} volumes, superpatch {args.patch}^3, batch {args.batch_size}, "
          f"{args.workers} workers, samples_per_volume {args.samples_per_volume}, queue length {args.queue_length}")
    print(f"{'loader':<44} {'superpatches/s':>15} {'(warm-up, timed batches)':>25} {'whole epoch':>12}"
          f" {'1 worker':>9} {'scaling':>8}")
    for method in methods:
        r = rates[method]
        counts = f"({r['warmup']}, {r['patches'] // args.batch_size})"
        one = f"{single[method]['rate']:>9.2f} {r['rate'] / single[method]['rate']:>7.2f}x" if method in single else ""
        print(f"{LOADERS[method][0]:<44} {r['rate']:>15.2f} {counts:>25} {r['epoch_rate']:>12.2f} {one}")
    if "queue" in rates:
        for method in (m for m in methods if m != "queue"):
            print(f"speed-up {LOADERS[method][0][:3]}/(a): {rates[method]['rate'] / rates['queue']['rate']:.1f}x after"
                  f" warm-up, {rates[method]['epoch_rate'] / rates['queue']['epoch_rate']:.1f}x over the whole epoch"
                  " (target >= 20x)")
    if "npy" in rates and "blosc2" in rates:
        print(f"blosc2 / .npy: {rates['blosc2']['rate'] / rates['npy']['rate']:.2f}x the superpatches/s with "
              f"{args.workers} workers (target >= 1)")
        cost = read_cost(args, args.volumes)
        print(f"one superpatch read in one process (no DataLoader; the two caches taking turns): .npy "
              f"{cost['npy']:.1f} ms, blosc2 {cost['blosc2']:.1f} ms")

    memory = [m for m in methods if not (m == "queue" and args.no_queue_memory)]
    print("\npeak memory over one epoch, sampled every 20 ms (MiB; PSS counts pages shared by the forked"
          " workers once):")
    print(f"{'loader':<12} {'volumes':>7} {'RSS sum':>9} {'PSS sum':>9} {'RSS main':>9} {'RSS worker':>11}")
    for method in memory:
        name = LOADERS[method][0][:3] + " " + method
        rows = [run_child(args, method, v, memory=True) for v in args.rss_volumes]
        for r in rows:
            print(f"{name:<12} {r['volumes']:>7d} {r['peak_rss_mib']:>9.0f} {r['peak_pss_mib']:>9.0f} "
                  f"{r['peak_main_mib']:>9.0f} {r['peak_worker_mib']:>11.0f}")
        first, last = rows[0], rows[-1]
        print(f"{name}: RSS sum with {last['volumes']} volumes / {first['volumes']} volumes = "
              f"{last['peak_rss_mib'] / first['peak_rss_mib']:.3f}"
              + (" (the queue keeps whole volumes; no target)" if method == "queue" else " (target <= 1.10)"))
    print(f"\nwall time {time.perf_counter() - wall:.0f} s")


def _disk_sizes(args: argparse.Namespace, method: str, records: list) -> tuple[float, float]:
    """Mean MiB per volume of the image file the loader reads and of all the subject's files."""
    if LOADERS[method][1] is None:
        images = [r.image.stat().st_size for r in records]
        totals = [r.image.stat().st_size + r.label.stat().st_size for r in records]
    else:
        from maesil.data.cache import CacheIndex

        index = CacheIndex.load(getattr(args, LOADERS[method][1]))
        entries = [index.entries[r.subject_id] for r in records]
        images = [e.image_path.stat().st_size for e in entries]
        totals = [sum(f.stat().st_size for f in e.image_path.parent.iterdir()) for e in entries]
    return sum(images) / len(images) / 2**20, sum(totals) / len(totals) / 2**20


if __name__ == "__main__":
    main()
