"""Validating a dataset up front: every problem of every file, before a run starts.

Two levels, both collecting :class:`~maesil.data.records.Problem` rows instead of stopping at the
first one:

* headers (cheap, no pixel decoded): readable, single-channel 3D, not truncated, spacing within
  (0, 20] mm, label geometry equal to its image's, DICOM series complete and evenly spaced;
* voxels (one read per file): NaN/Inf voxels, constant volumes, label values outside the declared
  classes.

Volumes smaller than one superpatch at the target spacing get a warning (they are padded).
``python -m maesil check-data`` prints the result as a table; :class:`~maesil.data.VolumeDataModule`
runs the same checks in ``setup`` and raises one :class:`~maesil.data.records.DataError` listing
every error.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from maesil.data.records import DataError, Problem, SubjectRecord
from maesil.data.sources import DEFAULT_EXCLUDE, scan_subjects
from maesil.shapes import as_triple

log = logging.getLogger(__name__)

# Geometry tolerances for label-vs-image checks. NIfTI stores geometry as float32 and tools
# round differently, so exact comparison is too strict; 0.1% of the spacing, 1% of a voxel of
# origin shift and 1e-3 in the direction cosines are far below anything that would misalign a
# label visibly. (Labels within tolerance get the image's exact affine when loaded.)
SPACING_RTOL = 1e-3
ORIGIN_VOXEL_FRACTION = 1e-2
DIRECTION_ATOL = 1e-3

#: Plausible voxel sizes in mm: anything outside is a broken header (0 or negative) or not a
#: medical volume at all (> 20 mm per voxel).
MAX_SPACING_MM = 20.0


@dataclass(frozen=True)
class _Header:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int


def _read_header(path: Path) -> tuple[_Header | None, str | None]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "unknown error")
        return None, f"cannot be read as an image ({first[:200]})"
    header = _Header(
        size=tuple(int(s) for s in reader.GetSize()),
        spacing=tuple(float(s) for s in reader.GetSpacing()),
        origin=tuple(float(s) for s in reader.GetOrigin()),
        direction=tuple(float(s) for s in reader.GetDirection()),
        components=int(reader.GetNumberOfComponents()),
    )
    return header, None


def _shape_problem(header: _Header) -> str | None:
    size = header.size
    if header.components != 1:
        return f"has {header.components} components per voxel (size {size}); a single-channel 3D image is required"
    if len(size) == 4 and size[3] == 1:
        size = size[:3]
    if len(size) == 2 or (len(size) == 3 and 1 in size):
        return f"is 2D (size {'x'.join(map(str, size))}); a 3D volume is required"
    if len(size) != 3:
        return f"is {len(size)}D (size {'x'.join(map(str, size))}); a single 3D volume is required"
    return None


def _gzip_problem(path: Path, expected_bytes: int) -> str | None:
    """Detect truncated/corrupt gzip cheaply: compare the gzip trailer (ISIZE) with the size the
    header announces; only on mismatch decompress the whole stream to be sure."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < 18:
                return "is truncated (gzip stream too short)"
            f.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", f.read(4))[0]
        if isize == expected_bytes % (1 << 32):
            return None
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        total, in_member = 0, False
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                data = chunk
                while data:
                    total += len(decompressor.decompress(data))
                    in_member = True
                    if decompressor.eof:  # end of one gzip member; another may follow
                        data = decompressor.unused_data
                        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                        in_member = False
                        if not data.strip(b"\0"):  # zero padding after the last member
                            data = b""
                    else:
                        data = b""
        if in_member:
            return f"is truncated (gzip stream ends early, after {total} of {expected_bytes} bytes)"
        if total < expected_bytes:
            return f"is truncated (holds {total} bytes, the header announces {expected_bytes})"
    except (OSError, zlib.error, EOFError) as error:
        return f"is corrupt ({type(error).__name__}: {error})"
    return None


def _nifti_data_problem(path: Path) -> str | None:
    """For NIfTI files, check that the file holds as many bytes as its header announces."""
    lower = path.name.lower()
    if not lower.endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib

    try:
        img = nib.load(str(path))
        header = img.header
        expected = int(header.get_data_offset()) + int(np.prod(img.shape)) * header.get_data_dtype().itemsize
    except Exception as error:  # noqa: BLE001 - nibabel raises many types
        return f"cannot be read as NIfTI ({type(error).__name__}: {error})"
    if lower.endswith(".gz"):
        return _gzip_problem(path, expected)
    actual = path.stat().st_size
    if actual < expected:
        return f"is truncated ({actual} bytes, the header announces {expected})"
    return None


def _spacing_problem(header: _Header) -> str | None:
    spacing = header.spacing[:3]
    if any(not np.isfinite(s) or s <= 0 or s > MAX_SPACING_MM for s in spacing):
        return (f"has an implausible voxel spacing {_fmt(spacing)} mm (each must be in (0, {MAX_SPACING_MM:g}] mm);"
                " the header is broken or this is not a medical volume")
    return None


def _dicom_header(folder: Path, series_uid: str | None) -> tuple[_Header | None, list[Problem]]:
    from maesil.data.dicom import select_series, series_geometry, series_problems

    try:
        series = select_series(folder, series_uid)
    except DataError as error:
        return None, [Problem(str(folder), _strip_path(p, folder)) for p in error.problems]
    problems = [Problem(str(folder), _strip_path(p, folder)) for p in series_problems(series)]
    if problems:
        return None, problems
    size, spacing, origin, direction = series_geometry(series)
    return _Header(tuple(int(v) for v in size), tuple(float(v) for v in spacing), tuple(float(v) for v in origin),
                   tuple(float(v) for v in direction), 1), []


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def header_problems(path: Path, series_uid: str | None = None) -> tuple[_Header | None, list[Problem]]:
    """Header of one image/label file (or DICOM study folder) and the problems found reading it."""
    path = Path(path)
    if path.is_dir():
        header, problems = _dicom_header(path, series_uid)
    else:
        header, error = _read_header(path)
        if error is not None:
            return None, [Problem(str(path), error)]
        problems = []
        for problem in (_shape_problem(header), _nifti_data_problem(path)):
            if problem is not None:
                problems.append(Problem(str(path), problem))
    if header is not None:
        spacing = _spacing_problem(header)
        if spacing is not None:
            problems.append(Problem(str(path), spacing))
    return (header if not problems else None), problems


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _geometry_problem(image: _Header, label: _Header) -> str | None:
    if image.size[:3] != label.size[:3]:
        return f"label size {label.size[:3]} vs image size {image.size[:3]}"
    spacing_i, spacing_l = np.array(image.spacing[:3]), np.array(label.spacing[:3])
    if not np.allclose(spacing_l, spacing_i, rtol=SPACING_RTOL, atol=0):
        return f"label spacing {_fmt(spacing_l)} vs image spacing {_fmt(spacing_i)}"
    atol = ORIGIN_VOXEL_FRACTION * float(spacing_i.min())
    if not np.allclose(np.array(label.origin[:3]), np.array(image.origin[:3]), rtol=0, atol=atol):
        return f"label origin {_fmt(label.origin[:3])} vs image origin {_fmt(image.origin[:3])}"
    dim_i, dim_l = len(image.size), len(label.size)
    dir_i = np.array(image.direction).reshape(dim_i, dim_i)[:3, :3]
    dir_l = np.array(label.direction).reshape(dim_l, dim_l)[:3, :3]
    if not np.allclose(dir_l, dir_i, rtol=0, atol=DIRECTION_ATOL):
        return f"label direction {_fmt(dir_l.ravel())} vs image direction {_fmt(dir_i.ravel())}"
    return None




@dataclass
class _FileResult:
    header: _Header | None = None
    problems: list[Problem] = field(default_factory=list)


def _voxel_problems(path: Path, series_uid: str | None, is_label: bool,
                    classes: Sequence[int] | None) -> list[Problem]:
    """Read every voxel once: NaN/Inf, constant images, label values."""
    from maesil.data.io import read_volume

    try:
        data, _ = read_volume(path, series_uid=series_uid) if not is_label else read_volume(path)
    except DataError as error:
        return [Problem(str(path), _strip_path(p, path)) for p in error.problems]
    except Exception as error:  # noqa: BLE001 - readers raise anything
        return [Problem(str(path), f"cannot be read ({type(error).__name__}: {str(error).strip()[:200]})")]
    data = torch.as_tensor(data)
    if torch.is_floating_point(data):
        finite = torch.isfinite(data)
        if not bool(finite.all()):
            n_nan, n_inf = int(torch.isnan(data).sum()), int(torch.isinf(data).sum())
            return [Problem(str(path), f"contains {n_nan} NaN and {n_inf} Inf voxel(s); fix or exclude this file")]
    low, high = float(data.min()), float(data.max())
    if not is_label:
        if low == high:
            return [Problem(str(path), f"is constant (every voxel is {low:g}); an empty or failed export?")]
        return []
    values = torch.unique(data)
    if torch.is_floating_point(values) and not bool((values == values.round()).all()):
        odd = [f"{v:g}" for v in values[values != values.round()][:5].tolist()]
        return [Problem(str(path), f"label map has non-integer values ({', '.join(odd)} ...);"
                                   " is this an intensity image in the labels folder?")]
    present = sorted(int(v) for v in values.tolist())
    if classes is not None:
        outside = [v for v in present if v not in set(classes)]
        if outside:
            return [Problem(str(path), f"label values {outside} are outside the declared classes {list(classes)}")]
    elif present and present[0] < 0:
        return [Problem(str(path), f"label map has negative values {[v for v in present if v < 0]}")]
    return []


def _size_warning(path: Path, header: _Header, superpatch_size: Sequence[int],
                  target_spacing: float | Sequence[float] | None) -> Problem | None:
    spacing = None if target_spacing is None else as_triple(target_spacing, "target_spacing", kind=float)
    size = np.array(header.size[:3], dtype=float)
    if spacing is not None:
        size = size * np.array(header.spacing[:3]) / np.array(spacing)
    voxels = np.floor(size + 1e-6).astype(int)
    patch = np.array(superpatch_size)
    if (voxels >= patch).all():
        return None
    at = f" at {_fmt(spacing)} mm" if spacing is not None else ""
    return Problem(str(path), f"is {'x'.join(map(str, voxels))} voxels{at}, smaller than one superpatch"
                              f" {'x'.join(map(str, patch))}; it will be padded", "warning")


def check_records(
    records: Sequence[SubjectRecord],
    superpatch_size: Sequence[int] | None = None,
    target_spacing: float | Sequence[float] | None = None,
    classes: Sequence[int] | None = None,
    read_voxels: bool = True,
    workers: int = 4,
) -> list[Problem]:
    """Check every image and label of ``records``; return all problems (errors and warnings).

    Args:
        records: the subjects (from :func:`~maesil.data.sources.discover_subjects`).
        superpatch_size: warn about volumes smaller than this at ``target_spacing``.
        target_spacing: the spacing volumes are resampled to (``None``: native).
        classes: the allowed label values; ``None`` only requires non-negative integers.
        read_voxels: also read every voxel (NaN/Inf, constant volumes, label values). Costs
            one full read per file, in ``workers`` threads.
        workers: threads reading files in parallel.
    """
    jobs: list[tuple[Path, str | None, bool]] = []
    for record in records:
        jobs.append((record.image, record.series_uid, False))
        if record.label is not None:
            jobs.append((record.label, None, True))

    def run(job: tuple[Path, str | None, bool]) -> _FileResult:
        path, series_uid, is_label = job
        header, problems = header_problems(path, series_uid)
        if header is not None and read_voxels:
            problems = _voxel_problems(path, series_uid, is_label, classes)
        return _FileResult(header, problems)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs) or 1))) as pool:
        results = dict(zip(((p, l) for p, _, l in jobs), pool.map(run, jobs)))
    problems: list[Problem] = []
    for record in records:
        image = results[(record.image, False)]
        problems.extend(image.problems)
        if image.header is not None and superpatch_size is not None:
            warning = _size_warning(record.image, image.header, superpatch_size, target_spacing)
            if warning is not None:
                problems.append(warning)
        if record.label is None:
            continue
        label = results[(record.label, True)]
        problems.extend(label.problems)
        if image.header is not None and label.header is not None:
            geometry = _geometry_problem(image.header, label.header)
            if geometry is not None:
                problems.append(Problem(str(record.label), f"label does not match its image {record.image}: {geometry}"))
    return problems


def raise_on_errors(problems: Sequence[Problem], what: str = "input data") -> None:
    """Log the warnings; raise one :class:`DataError` listing every error, if any."""
    for warning in (p for p in problems if p.severity != "error"):
        log.warning("%s", warning)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise DataError(errors, header=f"Found {len(errors)} problem(s) in the {what}")


def check_headers(records: Sequence[SubjectRecord], max_threads: int = 8) -> None:
    """Header-level checks only (see :func:`check_records`); raises :class:`DataError` on any error."""
    raise_on_errors(check_records(records, read_voxels=False, workers=max_threads))


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`: the subjects found and every problem."""

    source: Path
    records: list[SubjectRecord]
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity != "error"]


def check_dataset(
    data_dir: str | Path,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    superpatch_size: Sequence[int] | None = None,
    target_spacing: float | Sequence[float] | None = None,
    classes: Sequence[int] | None = None,
    read_voxels: bool = True,
    workers: int = 4,
) -> CheckReport:
    """Discover the subjects of ``data_dir`` (folder or manifest) and check all of them."""
    records, problems = scan_subjects(data_dir, exclude)
    problems = list(problems) + check_records(records, superpatch_size, target_spacing, classes, read_voxels, workers)
    return CheckReport(Path(data_dir), records, problems)


def format_problem_table(problems: Sequence[Problem]) -> str:
    """A plain-text table, one row per problem: severity, file, problem (errors first)."""
    rows = sorted(problems, key=lambda p: (p.severity != "error", p.path))
    width = min(80, max([len("file")] + [len(p.path) for p in rows]))
    lines = [f"{'severity':<8}  {'file':<{width}}  problem", f"{'-' * 8}  {'-' * width}  {'-' * 7}"]
    for p in rows:
        lines.append(f"{p.severity:<8}  {p.path:<{width}}  {p.message}")
    return "\n".join(lines)
