"""A prepared cache: volumes preprocessed once, read back a superpatch at a time.

Preprocessing a CT volume (decompress, reorient, resample, window, crop) takes seconds; a
training step needs only a 128³ superpatch of it. :func:`prepare_cache` runs the deterministic
preprocessing of :class:`~maesil.data.preprocess.PreprocessSettings` once per subject and stores
the result uncompressed, so that :class:`CachedPatchDataset` can memory-map a volume and copy out
just one superpatch. Training then runs on a plain ``DataLoader`` with worker processes, and
memory stays bounded by the loader's prefetch queue, not by the number of volumes.

Layout of a cache folder::

    index.json                          # see below
    subjects/<id>/image.npy             # float32 (X, Y, Z), C order, preprocessed, *not* padded
    subjects/<id>/label.npy             # uint8 (int16/int32 if the values need it), same grid
    subjects/<id>/label_points.npz      # per label value: up to 4096 voxel coordinates (N, 3)

``index.json`` is ``{"format": "maesil-cache", "version": 1, "settings": PreprocessSettings.to_dict(),
"subjects": {subject_id: entry}}`` where an entry holds the relative file paths, the preprocessed
``shape``/``spacing``/``affine``, the ``original_shape``/``original_spacing``/``original_affine``,
the ``source`` (image, label, series_uid and a fingerprint of the files), intensity ``stats`` of the
preprocessed image (min, max, mean, std, foreground_fraction), ``label_values``/``label_counts`` and
the manifest ``split``.

Volumes are stored without padding; a volume smaller than the superpatch is padded at read time
exactly as :class:`~maesil.data.preprocess.PadToMinShape` would (centred; 0 for CT, the volume
minimum for MRI), so one cache serves every superpatch size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset

from maesil.data.io import subject_from_record
from maesil.data.preprocess import LoadVolume, PreprocessSettings, foreground_mask
from maesil.data.sampling import as_patch_size
from maesil.data.sources import DataError, Problem, SubjectRecord

log = logging.getLogger(__name__)

CACHE_FORMAT = "maesil-cache"
CACHE_VERSION = 1
INDEX_NAME = "index.json"
CACHE_INDEX = INDEX_NAME  # the name the DataModule uses
SUBJECTS_DIR = "subjects"
#: Voxel coordinates kept per label value for label-centred sampling.
MAX_LABEL_POINTS = 4096
#: The index is rewritten at most this often (seconds) while subjects complete (rewriting it after
#: every subject would cost time quadratic in the number of subjects).
_INDEX_WRITE_INTERVAL = 2.0


# --------------------------------------------------------------------------------------------
# Index entries
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheStats:
    """Intensity statistics of a preprocessed image (``foreground_fraction``: share of voxels
    that :class:`~maesil.data.preprocess.CropForeground` counts as body)."""

    min: float
    max: float
    mean: float
    std: float
    foreground_fraction: float


@dataclass(frozen=True)
class CacheSource:
    """Where a cached subject came from; ``fingerprint`` detects changed sources."""

    image: str
    label: str | None
    series_uid: str | None
    fingerprint: dict


def _tuple(values: Any, kind: type = float) -> tuple:
    return tuple(kind(v) for v in values)


def _matrix(values: Any) -> tuple[tuple[float, ...], ...]:
    return tuple(_tuple(row) for row in values)


@dataclass(frozen=True)
class CacheEntry:
    """One subject of a cache index (mirrors its JSON entry; paths relative to ``root``)."""

    subject_id: str
    root: Path
    image: str
    label: str | None
    label_points: str | None
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: tuple[tuple[float, ...], ...]
    original_shape: tuple[int, ...]
    original_spacing: tuple[float, float, float]
    original_affine: tuple[tuple[float, ...], ...]
    source: CacheSource
    stats: CacheStats
    label_values: tuple[int, ...] = ()
    label_counts: tuple[int, ...] = ()
    split: str | None = None

    @property
    def image_path(self) -> Path:
        return self.root / self.image

    @property
    def label_path(self) -> Path | None:
        return None if self.label is None else self.root / self.label

    @property
    def label_points_path(self) -> Path | None:
        return None if self.label_points is None else self.root / self.label_points

    @property
    def affine_array(self) -> np.ndarray:
        """The preprocessed volume's 4x4 affine as a float64 array."""
        return np.array(self.affine, dtype=np.float64)

    @classmethod
    def from_json(cls, subject_id: str, root: Path, data: dict) -> CacheEntry:
        source, stats = data["source"], data["stats"]
        return cls(
            subject_id=subject_id,
            root=root,
            image=str(data["image"]),
            label=data.get("label"),
            label_points=data.get("label_points"),
            shape=_tuple(data["shape"], int),
            spacing=_tuple(data["spacing"]),
            affine=_matrix(data["affine"]),
            original_shape=_tuple(data["original_shape"], int),
            original_spacing=_tuple(data["original_spacing"]),
            original_affine=_matrix(data["original_affine"]),
            source=CacheSource(str(source["image"]), source.get("label"), source.get("series_uid"),
                               dict(source["fingerprint"])),
            stats=CacheStats(**{k: float(stats[k]) for k in
                                ("min", "max", "mean", "std", "foreground_fraction")}),
            label_values=_tuple(data.get("label_values", ()), int),
            label_counts=_tuple(data.get("label_counts", ()), int),
            split=data.get("split"),
        )


class CacheIndex:
    """A prepared cache folder: its settings and subjects, read from ``index.json``.

    Use :meth:`load`; it checks the format, the version and that every indexed file exists.
    """

    def __init__(self, root: Path, settings: PreprocessSettings, entries: dict[str, CacheEntry]) -> None:
        self.root = root
        self.settings = settings
        self.entries = entries

    @property
    def subject_ids(self) -> list[str]:
        return sorted(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, subject_id: str) -> CacheEntry:
        try:
            return self.entries[subject_id]
        except KeyError:
            raise DataError(f"{self.root / INDEX_NAME}: no subject {subject_id!r} in this cache") from None

    @classmethod
    def load(cls, cache_dir: str | Path) -> CacheIndex:
        """Read and check ``cache_dir/index.json``; raises ``DataError`` naming the problem path."""
        root = Path(cache_dir).expanduser().absolute()
        path = root / INDEX_NAME
        data = _read_index_json(path)
        try:
            settings = PreprocessSettings.from_dict(data["settings"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{path}: invalid preprocessing settings ({error})") from error
        entries: dict[str, CacheEntry] = {}
        missing: list[str] = []
        for subject_id, raw in data["subjects"].items():
            try:
                entry = CacheEntry.from_json(subject_id, root, raw)
            except (KeyError, TypeError, ValueError) as error:
                raise DataError(f"{path}: invalid entry for subject {subject_id!r} ({error!r})") from error
            for file in (entry.image_path, entry.label_path, entry.label_points_path):
                if file is not None and not file.is_file():
                    missing.append(f"{file}: indexed file of subject {subject_id!r} is missing")
            entries[subject_id] = entry
        if missing:
            raise DataError(missing, header=f"Cache {root} is incomplete; run `prepare` again")
        return cls(root, settings, entries)

    def require_settings(self, settings: PreprocessSettings) -> None:
        """Raise ``DataError`` unless the cache was prepared with ``settings``."""
        if settings != self.settings:
            raise DataError(
                f"{self.root / INDEX_NAME}: the cache was prepared with {self.settings.to_dict()}, "
                f"not {settings.to_dict()}; prepare another cache with these settings"
            )


def is_cache(path: str | Path) -> bool:
    """Whether ``path`` is a prepared cache folder (holds an ``index.json``)."""
    return (Path(path).expanduser() / INDEX_NAME).is_file()


def cache_problems(entries: Iterable[CacheEntry], superpatch_size: Sequence[int] | None = None,
                   classes: Sequence[int] | None = None, needs_labels: bool = False) -> list[Problem]:
    """The checks of :func:`maesil.data.checks.check_records`, answered from a cache index alone.

    Errors: a missing label where ``needs_labels`` (except ``split == "test"`` subjects), label values
    outside ``classes`` (negative values when ``classes`` is ``None``), a constant preprocessed image.
    Warnings: a volume smaller than ``superpatch_size`` (padded at read time), a required label map
    without any voxel > 0.
    """
    problems: list[Problem] = []
    for entry in entries:
        image, label = entry.source.image, entry.source.label or str(entry.label_path)
        if entry.stats.min == entry.stats.max:
            problems.append(Problem(image, f"is constant after preprocessing (every voxel is {entry.stats.min:g})"))
        if superpatch_size is not None and any(s < p for s, p in zip(entry.shape, superpatch_size)):
            problems.append(Problem(image, f"is {'x'.join(map(str, entry.shape))} voxels after preprocessing, smaller"
                                           f" than one superpatch {'x'.join(map(str, superpatch_size))};"
                                           " it will be padded", "warning"))
        if entry.label_path is None:
            if needs_labels and entry.split != "test":
                problems.append(Problem(image, f"subject {entry.subject_id!r} has no label in the cache"))
            continue
        values = list(entry.label_values)
        if classes is not None:
            outside = [v for v in values if v not in set(classes)]
            if outside:
                problems.append(Problem(label, f"label values {outside} are outside the declared classes"
                                               f" {list(classes)}"))
        elif values and values[0] < 0:
            problems.append(Problem(label, f"label map has negative values {[v for v in values if v < 0]}"))
        if needs_labels and not any(v > 0 for v in values):
            problems.append(Problem(label, "label map has no voxel > 0 after preprocessing", "warning"))
    return problems


def _read_index_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: no cache index (prepare the cache first: python -m maesil prepare)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: unreadable cache index ({error})") from error
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise DataError(f"{path}: not a maesil cache index (expected \"format\": \"{CACHE_FORMAT}\")")
    if data.get("version") != CACHE_VERSION:
        raise DataError(f"{path}: cache version {data.get('version')!r} is not supported "
                        f"(expected {CACHE_VERSION}); prepare the cache again")
    if not isinstance(data.get("subjects"), dict) or not isinstance(data.get("settings"), dict):
        raise DataError(f"{path}: invalid cache index (\"settings\" and \"subjects\" must be objects)")
    return data


# --------------------------------------------------------------------------------------------
# Source fingerprints
# --------------------------------------------------------------------------------------------


def _mhd_data_file(mhd: Path) -> Path | None:
    """The raw data file named by an ``.mhd`` header (``ElementDataFile``), if it is a file."""
    try:
        with open(mhd, encoding="latin-1") as f:
            for line in f.read(65536).splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "ElementDataFile":
                    candidate = mhd.parent / value.strip()
                    return candidate if value.strip() and candidate.is_file() else None
    except OSError:
        return None
    return None


def file_fingerprint(path: str | Path) -> dict:
    """Cheap change detector of a source: size and mtime of a file (plus the raw data of an
    ``.mhd``), or for a folder (a DICOM study) a SHA-1 over its files' relative names, sizes and
    mtimes. Raises ``OSError`` if ``path`` cannot be read."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha1()
        names = []
        for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
            dirnames.sort()
            names += [os.path.join(dirpath, n) for n in filenames]
        for name in sorted(names):
            st = os.stat(name)
            digest.update(f"{os.path.relpath(name, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"kind": "dir", "files": len(names), "sha1": digest.hexdigest()}
    st = path.stat()
    fingerprint: dict = {"kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path.name.lower().endswith(".mhd"):
        data = _mhd_data_file(path)
        if data is not None:
            dst = data.stat()
            fingerprint["data"] = {"size": dst.st_size, "mtime_ns": dst.st_mtime_ns}
    return fingerprint


def record_fingerprint(record: SubjectRecord) -> dict:
    """``{"image": ..., "label": ... | None}`` of :func:`file_fingerprint`."""
    return {
        "image": file_fingerprint(record.image),
        "label": None if record.label is None else file_fingerprint(record.label),
    }


# --------------------------------------------------------------------------------------------
# Preparing one subject
# --------------------------------------------------------------------------------------------


def subject_folder_name(subject_id: str) -> str:
    """File-name-safe folder name for a subject id (unsafe ids get a hash suffix, so two ids
    never share a folder)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", subject_id).lstrip(".")
    if safe != subject_id or not safe:
        safe = f"{safe}-{hashlib.sha1(subject_id.encode()).hexdigest()[:8]}"
    return safe


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a hidden temp file in the same folder and ``os.replace``, so a
    reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _label_dtype(low: int, high: int) -> type:
    if low >= 0 and high < 256:
        return np.uint8
    if low >= -(2**15) and high < 2**15:
        return np.int16
    return np.int32


def _point_seed(subject_id: str) -> int:
    return int.from_bytes(hashlib.sha1(subject_id.encode()).digest()[:8], "little")


def label_points(label: np.ndarray, subject_id: str, max_points: int = MAX_LABEL_POINTS
                 ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """``(values, counts, {value: (N, 3) int32 voxel coordinates})`` of a label map: for every value
    present, up to ``max_points`` of its voxels, drawn without replacement with a seed derived from
    ``subject_id`` (so re-preparing gives the same points)."""
    flat = label.reshape(-1)
    low = int(flat.min())
    counts_all = np.bincount(flat.astype(np.int64) - low)
    values = np.flatnonzero(counts_all).astype(np.int64) + low
    counts = counts_all[values - low].astype(np.int64)
    rng = np.random.default_rng(_point_seed(subject_id))
    # few classes: one comparison pass each; many (whole-body atlases): one sort for all
    order = np.argsort(flat, kind="stable") if len(values) > 16 else None
    ends = np.cumsum(counts)
    points = {}
    for n, value in enumerate(values):
        where = np.flatnonzero(flat == value) if order is None else order[ends[n] - counts[n]:ends[n]]
        k = min(max_points, where.size)
        chosen = np.sort(rng.choice(where.size, size=k, replace=False)) if k < where.size else np.arange(k)
        points[int(value)] = np.stack(np.unravel_index(where[chosen], label.shape), axis=1).astype(np.int32)
    return values, counts, points


def _require_path(message: str, *paths: Path | None) -> str:
    """``message`` prefixed with the first path unless it already names one of ``paths``."""
    named = [str(p) for p in paths if p is not None]
    return message if any(p in message for p in named) else f"{named[0]}: {message}"


def _prepare_subject(record: SubjectRecord, out_dir: str, folder: str, settings: PreprocessSettings,
                     fingerprint: dict) -> dict:
    """Preprocess one subject, write its arrays, return its JSON index entry (runs in a worker)."""
    with_label = record.label is not None
    subject = subject_from_record(record, with_label=with_label)
    steps = settings.steps()
    if not isinstance(steps[0], LoadVolume):  # the original geometry is read right after loading
        raise RuntimeError("preprocessing must start with LoadVolume")
    subject = steps[0](subject)
    original = subject["image"]
    original_shape = [int(s) for s in original.spatial_shape]
    original_spacing = [float(s) for s in original.spacing]
    original_affine = np.asarray(original.affine, dtype=np.float64).tolist()
    for step in steps[1:]:  # same as settings.transform()(subject): Compose applies them in turn
        subject = step(subject)

    image = subject["image"]
    if image.num_channels != 1:
        raise DataError(f"{record.image}: {image.num_channels} channels; the cache stores single-channel volumes")
    array = np.ascontiguousarray(image.data[0].numpy(), dtype=np.float32)
    foreground = array > 0 if settings.modality == "ct" else foreground_mask(torch.from_numpy(array)).numpy()
    stats = {
        "min": float(array.min()),
        "max": float(array.max()),
        "mean": float(array.mean(dtype=np.float64)),
        "std": float(array.std(dtype=np.float64)),
        "foreground_fraction": float(foreground.mean()),
    }
    del foreground

    target = Path(out_dir) / SUBJECTS_DIR / folder
    target.mkdir(parents=True, exist_ok=True)
    rel = f"{SUBJECTS_DIR}/{folder}"
    entry: dict[str, Any] = {
        "image": f"{rel}/image.npy",
        "label": None,
        "label_points": None,
        "shape": list(array.shape),
        "spacing": [float(s) for s in image.spacing],
        "affine": np.asarray(image.affine, dtype=np.float64).tolist(),
        "original_shape": original_shape,
        "original_spacing": original_spacing,
        "original_affine": original_affine,
        "source": {
            "image": str(record.image),
            "label": None if record.label is None else str(record.label),
            "series_uid": record.series_uid,
            "fingerprint": fingerprint,
        },
        "stats": stats,
        "label_values": [],
        "label_counts": [],
        "split": record.split,
    }
    if with_label:
        label = subject["label"].data[0].numpy()
        if label.shape != array.shape:
            raise DataError(f"{record.label}: label grid {label.shape} differs from the image's {array.shape}")
        if label.dtype.kind == "f":
            rounded = np.rint(label)
            if not np.array_equal(rounded, label):
                raise DataError(f"{record.label}: the label map has non-integer values")
            label = rounded
        label = np.ascontiguousarray(label.astype(_label_dtype(int(label.min()), int(label.max()))))
        values, counts, points = label_points(label, record.subject_id)
        _atomic_write(target / "label.npy", lambda f: np.save(f, label, allow_pickle=False))
        arrays = {"values": values, "counts": counts, **{f"points_{v}": p for v, p in points.items()}}
        _atomic_write(target / "label_points.npz", lambda f: np.savez(f, **arrays))
        entry.update(label=f"{rel}/label.npy", label_points=f"{rel}/label_points.npz",
                     label_values=[int(v) for v in values], label_counts=[int(c) for c in counts])
    else:
        for stale in ("label.npy", "label_points.npz"):
            (target / stale).unlink(missing_ok=True)
    _atomic_write(target / "image.npy", lambda f: np.save(f, array, allow_pickle=False))
    return entry


def _prepare_safely(record: SubjectRecord, out_dir: str, folder: str, settings: PreprocessSettings,
                    fingerprint: dict) -> tuple[dict | None, str | None]:
    """:func:`_prepare_subject`, with any error turned into a message naming the file."""
    try:
        return _prepare_subject(record, out_dir, folder, settings, fingerprint), None
    except Exception as error:  # noqa: BLE001 - one bad subject must not stop the others
        message = str(error) if isinstance(error, DataError) else f"{type(error).__name__}: {error}"
        return None, _require_path(message, record.image, record.label)


def _init_worker(threads: int) -> None:
    """Worker set-up: one torch thread (the processes are the parallelism; a forked child must not
    use the parent's OpenMP pool, which would deadlock, as DataLoader workers also avoid), and
    ``threads`` SimpleITK threads so the workers do not oversubscribe the CPUs. Neither changes a
    CT result (resampling and windowing are per-voxel operations)."""
    import SimpleITK as sitk

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))


# --------------------------------------------------------------------------------------------
# Preparing a cache
# --------------------------------------------------------------------------------------------


@dataclass
class PrepareReport:
    """Outcome of :func:`prepare_cache`: subject ids prepared now, skipped (unchanged), failed
    (id -> message naming the file) and removed from the index (no longer among the records)."""

    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)


def _write_index(path: Path, settings: PreprocessSettings, subjects: dict[str, dict]) -> None:
    data = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "settings": settings.to_dict(),
            "subjects": {k: subjects[k] for k in sorted(subjects)}}
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _existing_subjects(path: Path, settings: PreprocessSettings, force: bool) -> dict[str, dict]:
    """The subjects of an existing index (``{}`` if none or unreadable). An index made with other
    settings, or an unreadable one, is refused unless ``force`` (which re-prepares every subject)."""
    if not path.exists():
        return {}
    try:
        data = _read_index_json(path)
        cached = PreprocessSettings.from_dict(data["settings"])
    except (DataError, KeyError, TypeError, ValueError) as error:
        if force:
            return {}
        raise DataError(f"{path}: existing cache index cannot be used ({error}); use another --out, or "
                        "pass --force to rebuild this cache") from error
    if cached != settings and not force:
        raise DataError(
            f"{path}: this cache was prepared with other settings ({cached.to_dict()}, now "
            f"{settings.to_dict()}); use another --out, or pass --force to rebuild this cache"
        )
    return dict(data["subjects"])


def _unchanged(entry: dict, record: SubjectRecord, fingerprint: dict, root: Path) -> bool:
    try:
        source = entry["source"]
        if (source["image"] != str(record.image)
                or source.get("label") != (None if record.label is None else str(record.label))
                or source.get("series_uid") != record.series_uid
                or source.get("fingerprint") != fingerprint):
            return False
        files = [entry["image"]] + ([entry["label"], entry["label_points"]] if record.label is not None else [])
        return all(isinstance(f, str) and (root / f).is_file() for f in files)
    except (KeyError, TypeError, AttributeError):
        return False


def _remove_subject_files(root: Path, entry: dict) -> None:
    """Delete the folder of an index entry (only a folder directly under ``root/subjects``)."""
    try:
        folder = (root / entry["image"]).parent
    except (KeyError, TypeError):
        return
    if folder.parent == root / SUBJECTS_DIR and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with lightning; without it there is just no bar
        return None
    return tqdm(total=total, desc="prepare", unit="subject", dynamic_ncols=True)


def prepare_cache(
    records: Sequence[SubjectRecord],
    out_dir: str | Path,
    settings: PreprocessSettings,
    workers: int = 2,
    progress: bool = True,
    force: bool = False,
) -> PrepareReport:
    """Preprocess ``records`` once into the cache folder ``out_dir`` (layout: module docstring).

    Each subject goes through ``settings.transform()`` (no padding) as
    ``subject_from_record(record, with_label=record.label is not None)``, so the cached voxels
    equal the TorchIO-preprocessed volume. Subjects run in parallel in ``workers`` processes
    (``workers <= 1``: in this process), with a progress bar if ``progress``. Worker processes run
    torch single-threaded, like DataLoader workers (hence the TorchIO queue); MRI z-normalisation
    statistics are float sums whose last bit depends on the thread count, so an MRI volume may differ
    from an in-process run by float rounding (CT never does: its steps are per-voxel).

    Idempotent: a subject whose source files (fingerprint), series and paths are unchanged and whose
    files exist is skipped. ``index.json`` is updated as subjects complete, so an interrupted run
    keeps its progress. Afterwards the index lists exactly the prepared and skipped ``records``:
    subjects of an earlier run that are not in ``records`` (or failed now) are dropped and their
    files deleted.

    Args:
        records: the subjects (unique ``subject_id``).
        out_dir: cache folder (created if missing).
        settings: the preprocessing; an existing cache made with other settings is refused.
        workers: preprocessing processes.
        progress: show a tqdm progress bar.
        force: re-prepare every subject, also when the existing cache has other settings.

    Returns:
        a :class:`PrepareReport`. A subject that cannot be read or preprocessed is listed in
        ``failed`` with a message naming its file and does not stop the others; the caller decides
        whether to raise.

    Raises:
        DataError: ``out_dir`` holds a cache with other settings (or an unreadable index) and
            ``force`` is false.
        ValueError: duplicate subject ids.
    """
    records = list(records)
    ids = [r.subject_id for r in records]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate subject ids: {duplicates}")
    root = Path(out_dir).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    index_path = root / INDEX_NAME
    old = _existing_subjects(index_path, settings, force)
    (root / SUBJECTS_DIR).mkdir(exist_ok=True)
    for stale in (root / SUBJECTS_DIR).glob("*/.*.tmp"):  # temp files of an interrupted run
        stale.unlink(missing_ok=True)

    report = PrepareReport()
    subjects: dict[str, dict] = {}
    todo: list[tuple[SubjectRecord, dict]] = []
    for record in records:
        try:
            fingerprint = record_fingerprint(record)
        except OSError as error:
            path = Path(error.filename) if error.filename else record.image
            report.failed[record.subject_id] = f"{path}: cannot be read ({error.strerror or error})"
            continue
        entry = old.get(record.subject_id)
        if not force and entry is not None and _unchanged(entry, record, fingerprint, root):
            subjects[record.subject_id] = {**entry, "split": record.split}
            report.skipped.append(record.subject_id)
        else:
            todo.append((record, fingerprint))
    _write_index(index_path, settings, subjects)
    last_write = time.monotonic()

    def finish(record: SubjectRecord, entry: dict | None, error: str | None) -> None:
        nonlocal last_write
        if entry is not None:
            subjects[record.subject_id] = entry
            report.prepared.append(record.subject_id)
        else:
            report.failed[record.subject_id] = error or f"{record.image}: preparation failed"
            log.warning("cannot prepare subject %s: %s", record.subject_id, error)
        if bar is not None:
            bar.update(1)
        if time.monotonic() - last_write >= _INDEX_WRITE_INTERVAL:
            _write_index(index_path, settings, subjects)
            last_write = time.monotonic()

    bar = None
    try:
        if workers <= 1 or len(todo) <= 1:
            bar = _progress_bar(len(todo), progress and bool(todo))
            for record, fingerprint in todo:
                entry, error = _prepare_safely(record, str(root), subject_folder_name(record.subject_id),
                                               settings, fingerprint)
                finish(record, entry, error)
        else:
            def started() -> None:  # the bar's monitor thread starts after the workers are forked
                nonlocal bar
                bar = _progress_bar(len(todo), progress)

            _run_pool(todo, root, settings, min(int(workers), len(todo)), finish, started)
    finally:
        if bar is not None:
            bar.close()
        _write_index(index_path, settings, subjects)
    record_ids = set(ids)
    for subject_id, entry in old.items():  # dropped from the index: removed, or failed now
        if subject_id not in subjects:
            if subject_id not in record_ids:
                report.removed.append(subject_id)
            _remove_subject_files(root, entry)
    for subject_id in report.failed:  # whatever a failed attempt left behind
        folder = root / SUBJECTS_DIR / subject_folder_name(subject_id)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
    log.info("cache %s: %d prepared, %d unchanged, %d failed, %d removed", root, len(report.prepared),
             len(report.skipped), len(report.failed), len(report.removed))
    return report


def _run_pool(todo: list[tuple[SubjectRecord, dict]], root: Path, settings: PreprocessSettings, workers: int,
              finish: Callable[[SubjectRecord, dict | None, str | None], None],
              started: Callable[[], None] = lambda: None) -> None:
    """Prepare ``todo`` in ``workers`` processes: forked where the platform allows it (no
    re-import, so workers start at once), spawned elsewhere."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") and "fork" in methods
                                          else "spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                               initargs=(threads,))
    pending: dict[Future, SubjectRecord] = {}
    try:
        for record, fingerprint in todo:
            future = pool.submit(_prepare_safely, record, str(root), subject_folder_name(record.subject_id),
                                 settings, fingerprint)
            pending[future] = record
        started()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                record = pending.pop(future)
                try:
                    entry, error = future.result()
                except Exception as crash:  # noqa: BLE001 - e.g. a worker killed by the OOM killer
                    entry, error = None, f"{record.image}: worker process failed ({type(crash).__name__}: {crash})"
                finish(record, entry, error)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_cached_subject(index: CacheIndex, subject_id: str, with_label: bool) -> tio.Subject:
    """A whole preprocessed subject in memory (``image``, optional ``label``, ``subject_id``) with
    its preprocessed affine, e.g. for validation grids (:func:`~maesil.data.sampling.grid_patches`)."""
    entry = index[subject_id]
    image = np.load(entry.image_path, allow_pickle=False)
    affine = entry.affine_array
    images: dict[str, tio.Image] = {"image": tio.ScalarImage(tensor=torch.from_numpy(image[np.newaxis]),
                                                             affine=affine)}
    if with_label:
        if entry.label_path is None:
            raise DataError(f"{entry.source.image}: subject {subject_id!r} has no label in the cache {index.root}")
        label = np.load(entry.label_path, allow_pickle=False)
        images["label"] = tio.LabelMap(tensor=torch.from_numpy(label[np.newaxis]), affine=affine)
    return tio.Subject(subject_id=subject_id, **images)


@dataclass(frozen=True)
class _Item:
    """What a worker needs to read patches of one subject (small and picklable)."""

    subject_id: str
    image: str
    label: str | None
    points: str | None
    shape: tuple[int, int, int]
    image_fill: float
    label_fill: int
    label_values: tuple[int, ...]
    label_counts: tuple[int, ...]


def read_window(path: str, start: Sequence[int], size: Sequence[int], before: Sequence[int], fill: float,
                out: np.ndarray | None = None) -> np.ndarray:
    """Copy the box ``[start, start + size)`` of a padded volume out of the ``.npy`` at ``path``.

    The file is memory-mapped and only the box is copied (into ``out`` if given, converting to its
    dtype); the padded volume has ``before`` voxels of value ``fill`` in front of the stored array
    along each axis (and as many as needed behind). The map is dropped before returning, so memory
    does not grow with the number of volumes read.
    """
    volume = np.load(path, mmap_mode="r", allow_pickle=False)
    size = tuple(int(s) for s in size)
    if out is None:
        out = np.empty(size, dtype=volume.dtype)
    elif out.shape != size:
        raise ValueError(f"out has shape {out.shape}, expected {size}")
    src, dst = [], []
    inside = True
    for axis in range(3):
        lo = int(start[axis]) - int(before[axis])
        hi = lo + size[axis]
        clip_lo, clip_hi = max(0, lo), min(volume.shape[axis], hi)
        inside &= clip_lo == lo and clip_hi == hi
        src.append(slice(clip_lo, clip_hi))
        dst.append(slice(clip_lo - lo, clip_hi - lo))
    if not inside:
        out.fill(fill)
    out[tuple(dst)] = volume[tuple(src)]
    del volume
    return out


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker it is allocated in shared memory, so the
    batch travels to the main process without another copy (as ``default_collate`` does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class CachedPatchDataset(Dataset):
    """Random superpatches read from a prepared cache; a map-style dataset for a plain
    ``DataLoader`` with worker processes (and a ``DistributedSampler``).

    Item ``i`` is a patch of subject ``subject_ids[i // samples_per_volume]`` at a location drawn
    from ``np.random.default_rng([seed, epoch, i])``: reproducible, and new every epoch after
    :meth:`set_epoch` (call it before each epoch; workers started with ``persistent_workers=True``
    keep the epoch they were started with). Placement:

    * uniform over all positions inside the (padded) volume, as ``tio.UniformSampler``, unless
      ``with_label``;
    * ``with_label`` and no ``label_probabilities``: centred on a voxel with label > 0, as
      ``tio.LabelSampler`` without probabilities (classes weighted by their voxel counts);
    * with ``label_probabilities``: a class is drawn with those relative probabilities among the
      classes present in the subject, then one of its stored voxels (up to 4096 per class, chosen at
      prepare time).

    A label-centred patch is shifted as little as needed to stay inside the volume. Volumes smaller
    than the patch are padded centred at read time as ``PadToMinShape`` does (CT: 0, MRI: the volume
    minimum; labels: 0, or their minimum for MRI), and ``location`` ``(i0, j0, k0, i1, j1, k1)`` is in
    the padded volume, as TorchIO reports it.

    Items are dicts ``{"image": float32 (1, X, Y, Z), "subject_id": str, "location": int64 (6,)}``
    plus ``"label"`` (int64 (1, X, Y, Z)) when ``with_label``; batch them with
    :func:`~maesil.data.sampling.collate_patches`. A DataLoader fetches whole batches through
    :meth:`__getitems__`, which reads the patches of a batch into one buffer so that collation
    does not copy them again.
    """

    def __init__(
        self,
        index: CacheIndex,
        subject_ids: Sequence[str],
        patch_size: int | Sequence[int],
        samples_per_volume: int,
        with_label: bool = False,
        label_probabilities: dict[int, float] | None = None,
        seed: int = 0,
    ) -> None:
        if int(samples_per_volume) < 1:
            raise ValueError(f"samples_per_volume must be >= 1, got {samples_per_volume}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if label_probabilities is not None and not with_label:
            raise ValueError("label_probabilities needs with_label=True")
        if label_probabilities is not None and any(float(p) < 0 for p in label_probabilities.values()):
            raise ValueError(f"label_probabilities must be >= 0, got {label_probabilities}")
        self.patch_size = as_patch_size(patch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.with_label = bool(with_label)
        self.label_probabilities = ({int(k): float(v) for k, v in label_probabilities.items()}
                                    if label_probabilities is not None else None)
        self.seed = int(seed)
        self.epoch = 0
        mri = index.settings.modality == "mri"
        items = []
        for subject_id in subject_ids:
            entry = index[subject_id]
            if with_label and entry.label_path is None:
                raise DataError(f"{entry.source.image}: subject {subject_id!r} has no label in the cache "
                                f"{index.root}")
            items.append(_Item(
                subject_id=subject_id,
                image=str(entry.image_path),
                label=str(entry.label_path) if with_label else None,
                points=str(entry.label_points_path) if with_label else None,
                shape=tuple(int(s) for s in entry.shape),  # type: ignore[arg-type]
                image_fill=float(entry.stats.min) if mri else 0.0,
                label_fill=int(min(entry.label_values)) if mri and entry.label_values else 0,
                label_values=entry.label_values,
                label_counts=entry.label_counts,
            ))
        self.items: list[_Item] = items

    def __len__(self) -> int:
        return len(self.items) * self.samples_per_volume

    def set_epoch(self, epoch: int) -> None:
        """Draw new locations: item ``i`` of epoch ``e`` uses the seed ``[seed, e, i]``."""
        self.epoch = int(epoch)

    def _class_points(self, item: _Item, rng: np.random.Generator) -> np.ndarray:
        values = np.array(item.label_values, dtype=np.int64)
        if self.label_probabilities is None:
            weights = np.where(values > 0, np.array(item.label_counts, dtype=np.float64), 0.0)
            wanted = "label > 0"
        else:
            weights = np.array([self.label_probabilities.get(int(v), 0.0) for v in values], dtype=np.float64)
            wanted = f"label in {sorted(k for k, p in self.label_probabilities.items() if p > 0)}"
        if values.size == 0 or weights.sum() <= 0:
            raise DataError(f"{item.label}: subject {item.subject_id!r} has no voxel with {wanted} "
                            "to centre a patch on")
        value = int(values[rng.choice(values.size, p=weights / weights.sum())])
        with np.load(item.points, allow_pickle=False) as stored:
            return stored[f"points_{value}"]

    def _location(self, i: int) -> tuple[_Item, np.ndarray, np.ndarray]:
        """Subject, start (in the padded volume) and front padding of item ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} patches")
        item = self.items[i // self.samples_per_volume]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        patch = np.array(self.patch_size)
        shape = np.array(item.shape)
        padded = np.maximum(shape, patch)
        before = (padded - shape) // 2
        if self.with_label:
            points = self._class_points(item, rng)
            centre = points[rng.integers(len(points))].astype(np.int64) + before
            start = np.clip(centre - patch // 2, 0, padded - patch)
        else:
            start = np.array([rng.integers(0, int(n) + 1) for n in padded - patch])
        return item, start, before

    def _read(self, i: int, image: torch.Tensor, label: torch.Tensor | None) -> dict[str, Any]:
        """Item ``i`` read into the (1, X, Y, Z) tensors ``image`` and ``label``."""
        item, start, before = self._location(int(i))
        read_window(item.image, start, self.patch_size, before, item.image_fill, out=image[0].numpy())
        sample: dict[str, Any] = {
            "image": image,
            "subject_id": item.subject_id,
            "location": torch.as_tensor(np.concatenate([start, start + np.array(self.patch_size)]),
                                        dtype=torch.int64),
        }
        if label is not None:
            read_window(item.label, start, self.patch_size, before, item.label_fill,  # type: ignore[arg-type]
                        out=label[0].numpy())
            sample["label"] = label
        return sample

    def __getitem__(self, i: int) -> dict[str, Any]:
        shape = (1, *self.patch_size)
        return self._read(i, torch.empty(shape, dtype=torch.float32),
                          torch.empty(shape, dtype=torch.int64) if self.with_label else None)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A whole batch (what a DataLoader asks for): the patches are read side by side into one
        tensor (in shared memory inside a worker), which :func:`~maesil.data.sampling.collate_patches`
        then returns without copying."""
        shape = (len(indices), 1, *self.patch_size)
        images = _batch_tensor(shape, torch.float32)
        labels = _batch_tensor(shape, torch.int64) if self.with_label else None
        return [self._read(i, images[k], None if labels is None else labels[k]) for k, i in enumerate(indices)]
