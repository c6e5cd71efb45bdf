"""Writing phantoms as NIfTI files, idempotently, with a manifest of what was written."""

from __future__ import annotations

import gzip
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from maesil.files import atomic_write_bytes
from maesil.phantoms.grid import check_shape_spacing
from maesil.phantoms.phantom import DEFAULT_SHAPE, DEFAULT_SPACING, GENERATOR_VERSION, make_phantom

__all__ = ["MANIFEST_NAME", "default_workers", "write_phantoms"]

#: Name of the manifest in the output folder: generator version, shape, spacing and written seeds.
MANIFEST_NAME = "phantoms.json"


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI-1 bytes of ``array`` with qform = sform = ``affine`` (scanner RAS, mm)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    img.header.set_data_dtype(array.dtype)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _phantom_files(seed: int, shape: tuple[int, int, int], spacing: tuple[float, float, float]
                   ) -> tuple[bytes, bytes]:
    """The image's and the label map's NIfTI bytes of phantom ``seed`` (runs in a worker process)."""
    ph = make_phantom(seed, shape, spacing)
    return _nifti_bytes(ph.image, ph.affine), _nifti_bytes(ph.label, ph.affine)


def default_workers(count: int) -> int:
    """Processes that generate ``count`` phantoms: one per phantom, at most one per CPU core."""
    return max(1, min(count, os.cpu_count() or 1))


def _read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_phantoms(
    out_dir: str | Path,
    count: int,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    workers: int = 1,
) -> list[Path]:
    """Writes ``count`` phantoms as ``out_dir/images/phantom_{seed+i:03d}.nii.gz`` and
    ``out_dir/labels/phantom_{seed+i:03d}.nii.gz`` for i in range(count); returns the image paths.

    Idempotent: a phantom whose two files exist and that ``out_dir/phantoms.json`` records with
    the same shape, spacing and generator version is not regenerated. When those parameters
    changed, the requested phantoms are regenerated and files of other seeds recorded under the
    old parameters are removed (so the folder never mixes grids). Every file is written
    atomically (:func:`maesil.files.atomic_write_bytes`), and the manifest is updated after each
    phantom, so an interrupted run leaves no truncated file behind. With ``workers`` > 1 the phantoms are generated
    in that many processes (the files are the same); this process alone writes the files and the manifest.

    Args:
        out_dir: destination folder (created if missing).
        count: number of phantoms, >= 1.
        seed: seed of the first phantom (>= 0); phantom i uses ``seed + i``.
        shape: voxels along (X, Y, Z), each >= 16.
        spacing: voxel size in mm, each > 0.
        workers: processes generating phantoms, >= 1 (:func:`default_workers` is one per core).

    Raises:
        ValueError: on invalid arguments.
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    shape, spacing = check_shape_spacing(shape, spacing)
    out = Path(out_dir).expanduser()
    img_dir, lab_dir = out / "images", out / "labels"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    for d in (img_dir, lab_dir):  # temp files of an interrupted earlier run
        for stale in d.glob(".phantom_*.tmp"):
            stale.unlink(missing_ok=True)

    manifest_path = out / MANIFEST_NAME
    params = {"version": GENERATOR_VERSION, "shape": list(shape), "spacing": list(spacing)}
    manifest = _read_manifest(manifest_path)
    same = all(manifest.get(k) == v for k, v in params.items())
    done: set[int] = set(int(s) for s in manifest.get("seeds", [])) if same else set()
    if not same:
        for old in manifest.get("seeds", []) or []:
            if isinstance(old, int) and not (seed <= old < seed + count):
                for d in (img_dir, lab_dir):
                    (d / f"phantom_{old:03d}.nii.gz").unlink(missing_ok=True)

    def save_manifest() -> None:
        data = {**params, "seeds": sorted(done)}
        atomic_write_bytes(manifest_path, (json.dumps(data, indent=2) + "\n").encode())

    if not same:
        save_manifest()
    def path_of(s: int, folder: Path) -> Path:
        return folder / f"phantom_{s:03d}.nii.gz"

    seeds = list(range(seed, seed + count))
    missing = [s for s in seeds
               if not (s in done and path_of(s, img_dir).is_file() and path_of(s, lab_dir).is_file())]
    done.difference_update(missing)

    def write(s: int, files: tuple[bytes, bytes]) -> None:
        atomic_write_bytes(path_of(s, img_dir), files[0])
        atomic_write_bytes(path_of(s, lab_dir), files[1])
        done.add(s)
        save_manifest()

    if workers > 1 and len(missing) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(missing))) as pool:
            for s, files in zip(missing, pool.map(_phantom_files, missing, [shape] * len(missing),
                                                  [spacing] * len(missing))):
                write(s, files)
    else:
        for s in missing:
            write(s, _phantom_files(s, shape, spacing))
    return [path_of(s, img_dir) for s in seeds]
