"""Preparing a cache: volumes preprocessed once and stored for random superpatch reads.

Preprocessing a CT volume (decompress, reorient, resample, window, crop) takes seconds; a training
step needs only a 128³ superpatch of it. :func:`prepare_cache` runs the deterministic preprocessing of
:class:`~maesil.data.preprocess.PreprocessSettings` once per subject and stores the result (layout:
:mod:`maesil.data.cache.index`; formats: :mod:`maesil.data.cache.volumes`, uncompressed ``.npy`` or
chunked, compressed blosc2), so that :class:`~maesil.data.cache.reader.CachedPatchDataset` can
memory-map a volume and read just one superpatch. Volumes are stored without padding, so one cache serves every superpatch size.

Every file is written through :func:`maesil.files.atomic_write`: a reader, or a run killed half-way,
never sees a partial file, and a re-run skips the subjects already done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maesil.data.cache.index import (
    CACHE_FORMAT,
    CACHE_VERSION,
    INDEX_NAME,
    SUBJECTS_DIR,
    SUBJECTS_TABLE,
    read_index_json,
    read_subjects,
    write_subjects,
)
from maesil.data.cache.volumes import FORMATS, SUFFIXES, VolumeFormat, ct_levels, write_volume
from maesil.data.io import subject_from_record
from maesil.data.preprocess import LoadVolume, PreprocessSettings, foreground_mask
from maesil.data.records import DataError, SubjectRecord
from maesil.files import atomic_write

__all__ = [
    "MAX_LABEL_POINTS", "PrepareReport", "file_fingerprint", "label_points", "prepare_cache", "record_fingerprint",
    "subject_folder_name",
]

log = logging.getLogger(__name__)

#: Voxel coordinates kept per label value for label-centred sampling.
MAX_LABEL_POINTS = 4096
#: The index is rewritten at most this often (seconds) while subjects complete (rewriting it after
#: every subject would cost time quadratic in the number of subjects).
_INDEX_WRITE_INTERVAL = 2.0


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
                     fingerprint: dict, format: VolumeFormat = "npy") -> dict:
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
    suffix = SUFFIXES[format]
    entry: dict[str, Any] = {
        "image": f"{rel}/image{suffix}",
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
        write_volume(target / f"label{suffix}", label, format)
        arrays = {"values": values, "counts": counts, **{f"points_{v}": p for v, p in points.items()}}
        atomic_write(target / "label_points.npz", lambda f: np.savez(f, **arrays))
        entry.update(label=f"{rel}/label{suffix}", label_points=f"{rel}/label_points.npz",
                     label_values=[int(v) for v in values], label_counts=[int(c) for c in counts])
    else:
        for stale in ("label.npy", "label.b2nd", "label_points.npz"):
            (target / stale).unlink(missing_ok=True)
    levels = ct_levels(settings.hu_window) if format == "blosc2" and settings.modality == "ct" else None
    write_volume(target / f"image{suffix}", array, format, levels)
    for other in FORMATS:  # a subject re-prepared in another format
        if other != format:
            for stale in ("image", "label"):
                (target / f"{stale}{SUFFIXES[other]}").unlink(missing_ok=True)
    return entry


def _prepare_safely(record: SubjectRecord, out_dir: str, folder: str, settings: PreprocessSettings,
                    fingerprint: dict, format: VolumeFormat = "npy") -> tuple[dict | None, str | None]:
    """:func:`_prepare_subject`, with any error turned into a message naming the file."""
    try:
        return _prepare_subject(record, out_dir, folder, settings, fingerprint, format), None
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
    """The subjects table, then ``index.json`` (each replaced whole; layout: :mod:`~maesil.data.cache.index`)."""
    write_subjects(path.with_name(SUBJECTS_TABLE), subjects)
    data = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "settings": settings.to_dict(), "subjects": SUBJECTS_TABLE}
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _existing_subjects(path: Path, settings: PreprocessSettings, force: bool) -> dict[str, dict]:
    """The subjects of an existing index (``{}`` if none or unreadable). An index made with other
    settings, or an unreadable one, is refused unless ``force`` (which re-prepares every subject)."""
    if not path.exists():
        return {}
    try:
        data = read_index_json(path)
        cached = PreprocessSettings.from_dict(data["settings"])
        subjects = read_subjects(path.parent, data)
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
    return subjects


def _unchanged(entry: dict, record: SubjectRecord, fingerprint: dict, root: Path, format: VolumeFormat) -> bool:
    try:
        source = entry["source"]
        if not str(entry["image"]).endswith(SUFFIXES[format]):
            return False
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
    format: VolumeFormat = "npy",
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
        format: how volumes are stored (:mod:`~maesil.data.cache.volumes`): ``"npy"`` (uncompressed
            float32) or ``"blosc2"`` (chunked and compressed, CT quantised to 0.1 HU). Subjects stored
            in the other format are prepared again.

    Returns:
        a :class:`PrepareReport`. A subject that cannot be read or preprocessed is listed in
        ``failed`` with a message naming its file and does not stop the others; the caller decides
        whether to raise.

    Raises:
        DataError: ``out_dir`` holds a cache with other settings (or an unreadable index) and
            ``force`` is false.
        ValueError: duplicate subject ids.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
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
        if not force and entry is not None and _unchanged(entry, record, fingerprint, root, format):
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
                                               settings, fingerprint, format)
                finish(record, entry, error)
        else:
            def started() -> None:  # the bar's monitor thread starts after the workers are forked
                nonlocal bar
                bar = _progress_bar(len(todo), progress)

            _run_pool(todo, root, settings, format, min(int(workers), len(todo)), finish, started)
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


def _run_pool(todo: list[tuple[SubjectRecord, dict]], root: Path, settings: PreprocessSettings,
              format: VolumeFormat, workers: int,
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
                                 settings, fingerprint, format)
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
