"""Opening the index of a cache of many subjects: one JSON document (cache version 1) against SQLite (version 2).

Writes a synthetic index of ``--subjects`` subjects (no volumes; every entry a copy of a real one with its
own id and paths) in both layouts, then opens each in a fresh process and reports the wall time and the
peak resident memory above the interpreter with maesil imported. Opening means what a training run does
first: ``CacheIndex.load`` for version 2, and for version 1 what it did (parse the JSON, one
``CacheEntry`` per subject). Also timed: one entry looked up, one pass over all entries (the checks a
run answers from the index), and building a ``CachedPatchDataset`` over all subjects, with its pickled
size (what each DataLoader worker receives).

    python benchmarks/index_scale.py [--subjects 50000]
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

ENTRY = {
    "image": "", "label": "", "label_points": "", "shape": [200, 165, 200], "spacing": [1.5, 1.5, 1.5],
    "affine": [[1.5, 0.0, 0.0, -149.25], [0.0, 1.5, 0.0, -116.25], [0.0, 0.0, 1.5, -149.25], [0, 0, 0, 1.0]],
    "original_shape": [300, 300, 200], "original_spacing": [1.0, 1.0, 1.5],
    "original_affine": [[1.0, 0.0, 0.0, -149.5], [0.0, 1.0, 0.0, -149.5], [0.0, 0.0, 1.5, -149.25], [0, 0, 0, 1.0]],
    "source": {"image": "", "label": "", "series_uid": None,
               "fingerprint": {"image": {"kind": "file", "size": 21357984, "mtime_ns": 1796010957603233665},
                               "label": {"kind": "file", "size": 470279, "mtime_ns": 1796010957670216266}}},
    "stats": {"min": 0.0, "max": 1.0, "mean": 0.2174, "std": 0.2702, "foreground_fraction": 0.5281},
    "label_values": [0, 1, 2, 3, 4, 5, 6, 7],
    "label_counts": [5057001, 283328, 41791, 22043, 23943, 48901, 686644, 196349], "split": None,
}


def write(root: Path, count: int) -> None:
    from maesil.data.cache.index import CACHE_FORMAT, SUBJECTS_TABLE, write_subjects
    from maesil.data.preprocess import PreprocessSettings

    subjects = {}
    for i in range(count):
        sid, rel = f"subject_{i:06d}", f"subjects/subject_{i:06d}"
        subjects[sid] = {**ENTRY, "image": f"{rel}/image.b2nd", "label": f"{rel}/label.b2nd",
                         "label_points": f"{rel}/label_points.npz",
                         "source": {**ENTRY["source"], "image": f"/data/ct/images/{sid}.nii.gz",
                                    "label": f"/data/ct/labels/{sid}.nii.gz"}}
    settings = PreprocessSettings(modality="ct", target_spacing=(1.5, 1.5, 1.5)).to_dict()
    (root / "v1").mkdir(parents=True)
    (root / "v1" / "index.json").write_text(json.dumps(
        {"format": CACHE_FORMAT, "version": 1, "settings": settings, "subjects": subjects}, indent=1))
    (root / "v2").mkdir()
    (root / "v2" / "index.json").write_text(json.dumps(
        {"format": CACHE_FORMAT, "version": 2, "settings": settings, "subjects": SUBJECTS_TABLE}))
    write_subjects(root / "v2" / SUBJECTS_TABLE, subjects)


def _peak_mib() -> float:
    """This process's peak resident set (VmHWM; ``getrusage`` would report the parent's peak, inherited)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(root: Path, layout: str) -> dict:
    """Runs in a fresh process: open the index, then look up, scan, and build a dataset."""
    from maesil.data.cache import CachedPatchDataset, CacheIndex
    from maesil.data.cache.index import CacheEntry, read_index_json

    base = _peak_mib()
    start = time.perf_counter()
    if layout == "json":  # what opening a version-1 index did (without its file checks)
        data = read_index_json(root / "index.json")
        entries = {sid: CacheEntry.from_json(sid, root, raw) for sid, raw in data["subjects"].items()}
        del data
        lookup = entries.__getitem__
        scan = entries.values
    else:
        index = CacheIndex.load(root)
        entries = index.entries
        lookup = index.__getitem__
        scan = entries.values
    opened = time.perf_counter() - start
    open_mib = _peak_mib() - base
    start = time.perf_counter()
    lookup(f"subject_{len(entries) // 2:06d}")
    one = time.perf_counter() - start
    start = time.perf_counter()
    scanned = sum(1 for _ in scan())
    scan_s = time.perf_counter() - start
    result = {"layout": layout, "subjects": len(entries), "open_s": opened, "open_mib": open_mib,
              "lookup_ms": one * 1e3, "scan_s": scan_s, "scanned": scanned}
    if layout == "sqlite":
        start = time.perf_counter()
        dataset = CachedPatchDataset(index, list(entries), 128, 8)
        result.update(dataset_s=time.perf_counter() - start, dataset_pickle_mib=len(pickle.dumps(dataset)) / 2**20)
    result["peak_mib"] = _peak_mib() - base
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=50_000)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1])))
        return
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        start = time.perf_counter()
        write(root, args.subjects)
        sizes = {k: sum(f.stat().st_size for f in (root / k).iterdir()) / 2**20 for k in ("v1", "v2")}
        print(f"{args.subjects} synthetic subjects written in {time.perf_counter() - start:.1f} s; index on disk:"
              f" JSON {sizes['v1']:.1f} MiB, SQLite {sizes['v2']:.1f} MiB")
        print(f"{'index':<22} {'open s':>7} {'open MiB':>9} {'lookup ms':>10} {'all entries s':>14} {'peak MiB':>9}")
        for layout, sub in (("json", "v1"), ("sqlite", "v2")):
            done = subprocess.run([sys.executable, __file__, "--measure", str(root / sub), layout], check=True,
                                  capture_output=True, text=True, cwd=REPO_ROOT)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            name = "index.json (v1)" if layout == "json" else "index.sqlite (v2)"
            print(f"{name:<22} {r['open_s']:>7.2f} {r['open_mib']:>9.0f} {r['lookup_ms']:>10.2f} {r['scan_s']:>14.2f}"
                  f" {r['peak_mib']:>9.0f}")
            if "dataset_s" in r:
                print(f"CachedPatchDataset over all {r['subjects']} subjects: built in {r['dataset_s']:.2f} s,"
                      f" {r['dataset_pickle_mib']:.1f} MiB pickled (sent to each DataLoader worker)")
        print("targets: open a cache of 50,000 subjects in < 2 s and < 200 MB")


if __name__ == "__main__":
    main()
