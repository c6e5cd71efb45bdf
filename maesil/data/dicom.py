"""Reading CT/MR volumes from DICOM folders with SimpleITK.

A DICOM study arrives as a folder of files, one per slice (classic) or one per volume (enhanced,
multi-frame), often without an extension and often holding several series (localizer, soft-tissue
and bone reconstructions, contrast phases). Reading it right takes care that SimpleITK alone does
not give:

* the series is chosen explicitly (by SeriesInstanceUID) or, by default, as the largest CT series,
  and the choice is logged, never silently the first series found;
* slices are ordered by their position along the slice normal (ImagePositionPatient projected on
  the cross product of the ImageOrientationPatient cosines), not by file name or instance number;
* a series whose slices do not form one regular grid (missing slice, uneven gaps, duplicate
  positions, changing orientation, size or pixel spacing, gantry tilt) is refused with a message
  naming the folder, because reading it anyway yields a silently distorted volume;
* rescale slope/intercept are applied, so voxel values are HU (float32).

Everything but :func:`read_dicom` reads headers only, so folders can be checked up front cheaply.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from maesil.data.records import DataError

log = logging.getLogger(__name__)

#: Magic bytes of a DICOM Part 10 file, after its 128-byte preamble.
DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET = 128
DICOM_EXTENSION = ".dcm"

#: Slice gaps may differ from the expected spacing by this much (relative, with an absolute floor
#: in mm) before the series is called uneven; scanners round positions to a few micrometres.
GAP_RTOL = 1e-2
GAP_ATOL_MM = 1e-2
#: Tolerance on direction cosines and on pixel spacing (relative) across the slices of a series.
ORIENTATION_ATOL = 1e-3
PIXEL_SPACING_RTOL = 1e-3
#: Largest in-plane drift of the slice positions across the stack, in pixels, before the stack is
#: called sheared (gantry tilt), which a regular voxel grid cannot represent.
MAX_SHEAR_PIXELS = 0.1

#: Size (x, y, z), spacing (x, y, z) in mm, origin (LPS, mm) and row-major 3x3 direction.
Geometry = tuple[tuple[int, int, int], tuple[float, float, float], tuple[float, float, float], tuple[float, ...]]

# DICOM tags, as SimpleITK's metadata keys.
_SERIES_UID = "0020|000e"
_MODALITY = "0008|0060"
_DESCRIPTION = "0008|103e"
_POSITION = "0020|0032"
_ORIENTATION = "0020|0037"
_INSTANCE_NUMBER = "0020|0013"
_PIXEL_SPACING = "0028|0030"
_IMAGER_PIXEL_SPACING = "0018|1164"
_SLICE_THICKNESS = "0018|0050"

_NO_UID = "<no SeriesInstanceUID>"

# (folder, series UID) pairs whose choice was already logged by this process: a folder is read
# every time its subject is loaded, and the choice need not be repeated each epoch.
_logged_choices: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class DicomFileHeader:
    """The header fields of one DICOM image file that series assembly needs."""

    path: Path
    series_uid: str
    modality: str
    description: str
    instance_number: int | None
    columns: int
    rows: int
    num_frames: int
    #: ImagePositionPatient (LPS, mm) of the first voxel; ``None`` when absent or unreadable.
    position: tuple[float, float, float] | None
    #: ImageOrientationPatient: row then column direction cosines; ``None`` when absent.
    orientation: tuple[float, ...] | None
    #: In-plane spacing (x = along a row, y = along a column) in mm, as SimpleITK reads it.
    pixel_spacing: tuple[float, float]
    has_pixel_spacing: bool
    slice_thickness: float | None
    #: SimpleITK's geometry of the file itself (meaningful for multi-frame files).
    geometry: Geometry


@dataclass(frozen=True)
class DicomSeries:
    """One series of a DICOM folder, its files sorted by position along the slice normal.

    ``num_frames`` is the number of frames per file: 1 for a classic series (one slice per file),
    N for an enhanced CT stored as one multi-frame file. ``headers`` parallels ``files``.
    """

    folder: Path
    series_uid: str
    modality: str
    description: str
    files: tuple[Path, ...]
    num_frames: int
    headers: tuple[DicomFileHeader, ...]

    @property
    def num_slices(self) -> int:
        """Slices of the volume: files times frames per file."""
        return len(self.files) * self.num_frames

    @property
    def is_multiframe(self) -> bool:
        """Whether the series is one multi-frame file read as a whole volume."""
        return len(self.files) == 1 and self.num_frames > 1

    def summary(self) -> str:
        """``uid (CT, 120 slices, 'Abdomen 2.5mm')``, for logs and error messages."""
        text = f"{self.series_uid} ({self.modality or 'no modality'}, {self.num_slices} slices"
        return text + (f", {self.description!r})" if self.description else ")")


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM file: a ``.dcm`` extension or the ``DICM`` magic at byte 128.

    DICOM files often have no extension (``IM000123``, ``1.2.840...``), so the magic decides.
    """
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == DICOM_EXTENSION:
        return True
    try:
        with path.open("rb") as f:
            f.seek(DICOM_MAGIC_OFFSET)
            return f.read(len(DICOM_MAGIC)) == DICOM_MAGIC
    except OSError:
        return False


def _dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly inside ``folder`` (hidden files skipped), in name order."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_dicom_file(p))


def _floats(text: str | None, n: int) -> tuple[float, ...] | None:
    """``n`` backslash-separated numbers of a DICOM DS value, or ``None`` if absent or malformed."""
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.strip().split("\\"))
    except ValueError:
        return None
    return values if len(values) == n and all(np.isfinite(values)) else None


def read_header(path: str | Path) -> DicomFileHeader:
    """Read the header of one DICOM image file (no pixel data) with SimpleITK/GDCM.

    Raises ``RuntimeError`` (from SimpleITK) if the file is not a readable DICOM image.
    """
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    reader.ReadImageInformation()
    keys = set(reader.GetMetaDataKeys())

    def tag(key: str) -> str:
        return reader.GetMetaData(key).strip().strip("\x00").strip() if key in keys else ""

    size = tuple(int(s) for s in reader.GetSize())
    spacing = tuple(float(s) for s in reader.GetSpacing())
    origin = tuple(float(o) for o in reader.GetOrigin())
    direction = tuple(float(d) for d in reader.GetDirection())
    if len(size) == 2:
        size, spacing, origin = size + (1,), spacing + (1.0,), origin + (0.0,)
        direction = (direction[0], direction[1], 0.0, direction[2], direction[3], 0.0, 0.0, 0.0, 1.0)
    instance = tag(_INSTANCE_NUMBER)
    thickness = _floats(tag(_SLICE_THICKNESS), 1)
    position = _floats(tag(_POSITION), 3)
    orientation = _floats(tag(_ORIENTATION), 6)
    return DicomFileHeader(
        path=path,
        series_uid=tag(_SERIES_UID) or _NO_UID,
        modality=tag(_MODALITY).upper(),
        description=tag(_DESCRIPTION),
        instance_number=int(float(instance)) if _floats(instance, 1) else None,
        columns=size[0],
        rows=size[1],
        num_frames=max(1, size[2]),
        position=position,  # type: ignore[arg-type]
        orientation=orientation,
        pixel_spacing=(spacing[0], spacing[1]),
        has_pixel_spacing=bool(tag(_PIXEL_SPACING) or tag(_IMAGER_PIXEL_SPACING)),
        slice_thickness=thickness[0] if thickness else None,
        geometry=(size[:3], spacing[:3], origin[:3], direction),  # type: ignore[arg-type]
    )


def _normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit slice normal: the cross product of the row and column direction cosines."""
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float))
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else normal


def _sorted_by_position(headers: list[DicomFileHeader]) -> list[DicomFileHeader]:
    """Headers ordered by position along the slice normal (of the first file with an orientation).

    Files lacking a position or orientation sort last, by instance number then name;
    :func:`series_problems` reports them.
    """
    reference = next((h.orientation for h in headers if h.orientation is not None), None)
    if reference is None:
        return sorted(headers, key=lambda h: (h.instance_number is None, h.instance_number or 0, h.path.name))
    normal = _normal(reference)

    def key(h: DicomFileHeader) -> tuple:
        if h.position is None:
            return (1, 0.0, h.instance_number or 0, h.path.name)
        return (0, float(np.dot(h.position, normal)), h.instance_number or 0, h.path.name)

    return sorted(headers, key=key)


def list_series(folder: str | Path) -> list[DicomSeries]:
    """The image series directly inside ``folder``, largest first, from file headers only.

    Files are grouped by SeriesInstanceUID and sorted by position along the slice normal. DICOM
    files that are not readable images (DICOMDIR, structured reports ...) are skipped with a
    warning naming them.
    """
    folder = Path(folder)
    groups: dict[str, list[DicomFileHeader]] = {}
    for path in _dicom_files(folder):
        try:
            header = read_header(path)
        except RuntimeError as err:
            first_line = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
            log.warning("%s: skipped, not a readable DICOM image (%s)", path, first_line)
            continue
        groups.setdefault(header.series_uid, []).append(header)
    series = []
    for uid, headers in groups.items():
        ordered = _sorted_by_position(headers)
        first = ordered[0]
        series.append(
            DicomSeries(
                folder=folder,
                series_uid=uid,
                modality=first.modality,
                description=first.description,
                files=tuple(h.path for h in ordered),
                num_frames=max(h.num_frames for h in ordered),
                headers=tuple(ordered),
            )
        )
    return sorted(series, key=lambda s: (-s.num_slices, s.series_uid))


def select_series(folder: str | Path, series_uid: str | None = None) -> DicomSeries:
    """The series ``series_uid`` of ``folder`` or, by default, its largest CT series.

    Without CT series the largest series is taken. When the folder holds several series the choice
    is logged (once per folder and process) with the alternatives, so that a wrong default is seen.
    Raises :class:`DataError` naming the folder if it holds no series or not ``series_uid``.
    """
    folder = Path(folder)
    all_series = list_series(folder)
    if not all_series:
        raise DataError(f"{folder}: no readable DICOM image series in this folder")
    if series_uid is not None:
        chosen = next((s for s in all_series if s.series_uid == series_uid), None)
        if chosen is None:
            available = "; ".join(s.summary() for s in all_series)
            raise DataError(f"{folder}: no DICOM series with SeriesInstanceUID {series_uid}; available: {available}")
        reason = "as requested"
    else:
        ct = [s for s in all_series if s.modality == "CT"]
        # all_series is sorted largest first, so the first candidate is the largest.
        chosen = ct[0] if ct else all_series[0]
        reason = "the largest CT series" if ct else "the largest series (none is CT)"
    if len(all_series) > 1 and (str(folder), chosen.series_uid) not in _logged_choices:
        _logged_choices.add((str(folder), chosen.series_uid))
        others = "; ".join(s.summary() for s in all_series if s is not chosen)
        log.info(
            "%s: %d DICOM series, reading %s, %s; not read: %s (set series_uid to choose another)",
            folder,
            len(all_series),
            chosen.summary(),
            reason,
            others,
        )
    return chosen


def _mm(value: float) -> str:
    return f"{round(float(value), 3)} mm"


def series_problems(series: DicomSeries) -> list[str]:
    """Why ``series`` cannot be read as one regular volume; empty if it can.

    Checks, from headers: every slice has a position and orientation; orientation, size and pixel
    spacing agree across slices; no two slices share a position; consecutive slices are evenly
    spaced (a larger gap usually means a missing slice); the stack is not sheared (gantry tilt).
    Each message starts with the folder path.
    """
    prefix = f"{series.folder}: series {series.series_uid}"
    headers = series.headers
    if series.is_multiframe:
        spacing = series.headers[0].geometry[1]
        if min(spacing) <= 0:
            return [f"{prefix} (multi-frame file {series.files[0].name}) has no valid voxel spacing: {spacing}"]
        return []
    problems: list[str] = []
    if series.num_frames > 1:
        multi = [h.path.name for h in headers if h.num_frames > 1]
        problems.append(
            f"{prefix} mixes {len(multi)} multi-frame file(s) ({', '.join(multi[:3])}) with other files; "
            "cannot assemble one volume"
        )
        return problems
    if len(headers) < 2:
        problems.append(f"{prefix} has a single slice ({headers[0].path.name}); a volume needs at least 2")
        return problems

    missing = [h.path.name for h in headers if h.position is None or h.orientation is None]
    if missing:
        problems.append(
            f"{prefix}: {len(missing)} slice(s) lack ImagePositionPatient (0020,0032) or "
            f"ImageOrientationPatient (0020,0037), e.g. {', '.join(missing[:3])}"
        )
        return problems

    first = headers[0]
    assert first.orientation is not None
    for h in headers[1:]:
        assert h.orientation is not None
        if not np.allclose(h.orientation, first.orientation, atol=ORIENTATION_ATOL):
            problems.append(
                f"{prefix} has inconsistent orientation: {h.path.name} is {h.orientation}, "
                f"{first.path.name} is {first.orientation}"
            )
            break
    for h in headers[1:]:
        if (h.columns, h.rows) != (first.columns, first.rows):
            problems.append(
                f"{prefix} has inconsistent slice size: {h.path.name} is {h.columns}x{h.rows}, "
                f"{first.path.name} is {first.columns}x{first.rows}"
            )
            break
    for h in headers[1:]:
        if not np.allclose(h.pixel_spacing, first.pixel_spacing, rtol=PIXEL_SPACING_RTOL, atol=0):
            problems.append(
                f"{prefix} has inconsistent pixel spacing: {h.path.name} is {h.pixel_spacing}, "
                f"{first.path.name} is {first.pixel_spacing}"
            )
            break
    no_spacing = [h.path.name for h in headers if not h.has_pixel_spacing]
    if no_spacing:
        problems.append(
            f"{prefix}: {len(no_spacing)} slice(s) have no PixelSpacing (0028,0030), e.g. {', '.join(no_spacing[:3])}"
        )
    if problems:
        return problems

    normal = _normal(first.orientation)
    positions = np.array([h.position for h in headers], dtype=np.float64)
    along = positions @ normal
    gaps = np.diff(along)
    names = [h.path.name for h in headers]

    duplicates = np.flatnonzero(gaps <= GAP_ATOL_MM)
    if duplicates.size:
        i = int(duplicates[0])
        more = f" (and {duplicates.size - 1} more)" if duplicates.size > 1 else ""
        problems.append(
            f"{prefix} has duplicate slice positions: {names[i]} and {names[i + 1]} are both at "
            f"{_mm(along[i])} along the slice normal{more}"
        )
        return problems

    expected = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - expected) > max(GAP_ATOL_MM, GAP_RTOL * expected))
    if uneven.size:
        i = int(uneven[0])
        gap = float(gaps[i])
        hint = " (missing slice?)" if gap > 1.5 * expected else ""
        more = f"; {uneven.size - 1} other uneven gap(s)" if uneven.size > 1 else ""
        problems.append(
            f"{prefix} has uneven slice spacing: gap of {_mm(gap)} between slices {i + 1} and {i + 2} "
            f"({names[i]}, {names[i + 1]}) where {_mm(expected)} is expected{hint}{more}"
        )

    drift = (positions[-1] - positions[0]) - (along[-1] - along[0]) * normal
    if np.linalg.norm(drift) > MAX_SHEAR_PIXELS * min(first.pixel_spacing):
        problems.append(
            f"{prefix} is sheared: slice positions drift {_mm(float(np.linalg.norm(drift)))} "
            "across the stack, off the slice normal (gantry tilt?); resample it before use"
        )
    return problems


def series_geometry(series: DicomSeries) -> Geometry:
    """Size (x, y, z), spacing (x, y, z), origin and direction (row-major 3x3) of the volume.

    From headers only, in SimpleITK's LPS convention, as :func:`read_dicom` will produce them;
    used to check a folder up front without reading pixels. The z spacing of a classic series is
    the mean gap between its first and last slice (the thickness, or 1, for a single slice).
    """
    first = series.headers[0]
    if series.is_multiframe:
        return first.geometry
    size = (first.columns, first.rows, len(series.files))
    if first.orientation is None or first.position is None:
        return (size, (*first.pixel_spacing, first.slice_thickness or 1.0), first.geometry[2], first.geometry[3])
    row, col, normal = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:6]), _normal(first.orientation)
    last = series.headers[-1]
    if len(series.files) > 1 and last.position is not None:
        z_spacing = float(np.dot(np.subtract(last.position, first.position), normal)) / (len(series.files) - 1)
    else:
        z_spacing = first.slice_thickness or 1.0
    direction = np.stack([row, col, normal], axis=1)  # columns: x, y, z axes
    return (
        size,
        (first.pixel_spacing[0], first.pixel_spacing[1], z_spacing),
        tuple(float(p) for p in first.position),  # type: ignore[return-value]
        tuple(float(d) for d in direction.ravel()),
    )


def read_dicom(folder: str | Path, series_uid: str | None = None) -> sitk.Image:
    """Read one series of a DICOM folder as a float32 volume in HU (rescale slope/intercept applied).

    The series is chosen by :func:`select_series`; raises :class:`DataError` naming the folder if it
    has any of :func:`series_problems`. Classic series are read from the position-sorted files,
    an enhanced (multi-frame) file as the volume it holds.
    """
    series = select_series(folder, series_uid)
    problems = series_problems(series)
    if problems:
        raise DataError(problems)
    try:
        if series.is_multiframe:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(series.files[0]))
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(f) for f in series.files])
        reader.SetImageIO("GDCMImageIO")
        reader.SetOutputPixelType(sitk.sitkFloat32)
        image = reader.Execute()
    except RuntimeError as err:
        raise DataError(f"{series.folder}: series {series.series_uid} could not be read: {err}") from err
    return image
