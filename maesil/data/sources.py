"""Finding and validating the image files of a data folder.

Everything here runs *before* training starts and is cheap: it walks the folder and reads
file headers only, so a folder of thousands of CT volumes is checked in seconds. All problems
found are collected and raised together in one :class:`DataError`, one line per problem, each
line naming the offending path and what is wrong with it.

Folder layouts (see :func:`discover_subjects`):

* ``data_dir/images/`` (or ``imagesTr/``, the Medical Segmentation Decathlon / nnU-Net name)
  with an optional sibling ``data_dir/labels/`` (or ``labelsTr/``): images are read from the
  images folder (recursively) and each label is paired with the image of the same subject id.
  Everything else directly inside ``data_dir`` (``dataset.json``, ``imagesTs/`` ...) is ignored.
* anything else: every supported file below ``data_dir`` (recursively) is an image; no labels.

The subject id is the file name without its extension (``case_001.nii.gz`` -> ``case_001``).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

log = logging.getLogger(__name__)

#: Image file extensions read by the pipeline (SimpleITK / TorchIO). Longest first, so that
#: ``.nii.gz`` wins over ``.gz``.
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

#: Raw-data sidecar extensions of ``.mhd`` headers. They are accepted when an ``.mhd`` in the
#: same folder references them (``ElementDataFile``) or has the same stem.
SIDECAR_EXTENSIONS: tuple[str, ...] = (".raw", ".zraw")

#: Files excluded by default (glob patterns, see :func:`discover_subjects`): hidden files and
#: folders (``.DS_Store``, macOS ``._case.nii.gz`` resource forks, ``.git``) and the plain-text
#: metadata that datasets commonly ship next to their images. Anything else that is not an image
#: is an error rather than silently skipped.
DEFAULT_EXCLUDE: tuple[str, ...] = (".*", "*.json", "*.csv", "*.tsv", "*.md", "*.txt")

IMAGE_DIR_NAMES: tuple[str, ...] = ("images", "imagesTr")
LABEL_DIR_NAMES: tuple[str, ...] = ("labels", "labelsTr")

# Geometry tolerances for label-vs-image checks. NIfTI stores geometry as float32 and tools
# round differently, so exact comparison is too strict; 0.1% of the spacing, 1% of a voxel of
# origin shift and 1e-3 in the direction cosines are far below anything that would misalign a
# label visibly. (Labels within tolerance get the image's exact affine when loaded.)
SPACING_RTOL = 1e-3
ORIGIN_VOXEL_FRACTION = 1e-2
DIRECTION_ATOL = 1e-3


class DataError(ValueError):
    """Invalid input data. The message names every offending path and the problem with it."""

    def __init__(self, problems: str | Sequence[str], header: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = list(problems)
        if len(self.problems) == 1 and header is None:
            message = self.problems[0]
        else:
            n = len(self.problems)
            head = header or f"Found {n} problem{'s' if n != 1 else ''} with the input data"
            message = head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


@dataclass(frozen=True)
class SubjectRecord:
    """One subject: its id, image and optional label map.

    ``image`` (and ``label``) is a volume file or, for DICOM, the folder of one study;
    ``series_uid`` then picks the series in that folder (``None``: the largest CT series).
    ``split`` is the split given by a manifest (``"train"``, ``"val"`` or ``"test"``), if any.
    """

    subject_id: str
    image: Path
    label: Path | None = None
    series_uid: str | None = None
    split: str | None = None


def split_extension(path: str | Path) -> tuple[str, str] | None:
    """Return ``(stem, extension)`` for a supported image file, else ``None``."""
    name = Path(path).name
    lower = name.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return None


def _is_excluded(rel: Path, patterns: Sequence[str]) -> str | None:
    """Return the first pattern matching the relative path, its name or a parent folder."""
    rel_posix = rel.as_posix()
    for pattern in patterns:
        if fnmatch.fnmatch(rel_posix, pattern):
            return pattern
        for part in rel.parts:
            if fnmatch.fnmatch(part, pattern):
                return pattern
    return None


def _walk_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            files.append(Path(dirpath) / name)
    return files


def _mhd_data_files(mhd: Path) -> set[Path]:
    """Data files referenced by an ``.mhd`` header (``ElementDataFile = x.raw``)."""
    referenced = set()
    try:
        with open(mhd, encoding="latin-1") as f:
            for line in f.read(65536).splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "ElementDataFile":
                    value = value.strip()
                    if value and value != "LOCAL" and not value.startswith("LIST"):
                        referenced.add((mhd.parent / value).resolve())
    except OSError:
        pass
    referenced.add(mhd.with_suffix(".raw").resolve())
    referenced.add(mhd.with_suffix(".zraw").resolve())
    return referenced


def _scan_folder(root: Path, base: Path, exclude: Sequence[str], problems: list[str],
                 excluded: list[str]) -> dict[str, Path]:
    """Map subject id -> image path for every supported file under ``root``.

    Unsupported files, id collisions and unreadable entries are appended to ``problems``.
    """
    by_id: dict[str, list[Path]] = {}
    unsupported: list[Path] = []
    sidecars: list[Path] = []
    for path in _walk_files(root):
        rel = path.relative_to(base)
        pattern = _is_excluded(rel, exclude)
        if pattern is not None:
            excluded.append(f"{path} (pattern {pattern!r})")
            continue
        parsed = split_extension(path)
        if parsed is None:
            if path.name.lower().endswith(SIDECAR_EXTENSIONS):
                sidecars.append(path)
            else:
                unsupported.append(path)
            continue
        if not path.is_file():
            problems.append(f"{path}: not a regular file (broken link?)")
            continue
        by_id.setdefault(parsed[0], []).append(path)

    if sidecars:
        referenced: set[Path] = set()
        for paths in by_id.values():
            for p in paths:
                if p.name.lower().endswith(".mhd"):
                    referenced |= _mhd_data_files(p)
        for path in sidecars:
            if path.resolve() not in referenced:
                unsupported.append(path)

    for path in unsupported:
        problems.append(
            f"{path}: not a supported image file (supported: {', '.join(SUPPORTED_EXTENSIONS)};"
            f" .raw/.zraw only as data of an .mhd). Remove it, or exclude it with a glob pattern,"
            f" e.g. exclude=[{_pattern_for(path)!r}] (the `exclude` argument of VolumeDataModule;"
            f" --data.init_args.exclude on the command line)"
        )

    result: dict[str, Path] = {}
    for subject_id, paths in sorted(by_id.items()):
        if len(paths) > 1:
            problems.append(
                f"subject id {subject_id!r} is given by several files: "
                + ", ".join(str(p) for p in paths)
                + " (ids are file names without extension and must be unique; rename or exclude one)"
            )
            continue
        result[subject_id] = paths[0]
    return result


def _pattern_for(path: Path) -> str:
    return f"*{path.suffix}" if path.suffix else path.name


def _find_subfolder(root: Path, names: Iterable[str]) -> Path | None:
    for name in names:
        candidate = root / name
        if candidate.is_dir():
            return candidate
    return None


def discover_subjects(data_dir: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[SubjectRecord]:
    """List the subjects of a data folder, sorted by subject id.

    Args:
        data_dir: folder with the images, see the module docstring for the two layouts.
        exclude: glob patterns (``fnmatch``) of files to leave out. A pattern matches a file if it
            matches its path relative to ``data_dir``, its name or the name of any folder on the
            way (so ``".*"`` also excludes everything inside ``.git/``). Defaults to
            :data:`DEFAULT_EXCLUDE` (hidden files and text metadata). Excluded files are logged
            at INFO level. Pass ``[]`` to exclude nothing. Every other file must be an image.

    Raises:
        DataError: listing every problem found (missing folder, a file instead of a folder,
            no image, unsupported files, duplicate subject ids, labels without image or images
            without label when some images do have labels).
    """
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: is a file, not a data folder (data_dir must be a folder of images)")

    exclude = tuple(exclude)
    problems: list[str] = []
    excluded: list[str] = []
    image_dir = _find_subfolder(root, IMAGE_DIR_NAMES)
    label_dir = _find_subfolder(root, LABEL_DIR_NAMES) if image_dir is not None else None

    images = _scan_folder(image_dir or root, root, exclude, problems, excluded)
    labels: dict[str, Path] = {}
    if label_dir is not None:
        labels = _scan_folder(label_dir, root, exclude, problems, excluded)
        log.info("Reading images from %s and labels from %s", image_dir, label_dir)
    elif image_dir is not None:
        log.info("Reading images from %s (no labels folder)", image_dir)

    if excluded:
        log.info("Excluded %d file(s) under %s by the exclude patterns %s:\n  %s",
                 len(excluded), root, list(exclude), "\n  ".join(excluded))

    if not images and not problems:
        where = image_dir or root
        raise DataError(
            f"{where}: no image found (supported: {', '.join(SUPPORTED_EXTENSIONS)};"
            f" excluded by pattern: {len(excluded)} file(s))"
        )

    if labels:
        for subject_id in sorted(set(labels) - set(images)):
            problems.append(f"{labels[subject_id]}: label without an image (no {subject_id}.* in {image_dir})")
        missing = sorted(set(images) - set(labels))
        for subject_id in missing:
            problems.append(
                f"{images[subject_id]}: image without a label (no {subject_id}.* in {label_dir});"
                " either every image has a label or none"
            )

    if problems:
        raise DataError(problems, header=f"Problems in data folder {root}")
    return [SubjectRecord(sid, path, labels.get(sid)) for sid, path in sorted(images.items())]


# --------------------------------------------------------------------------------------------
# Header checks
# --------------------------------------------------------------------------------------------


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


def _check_one(path: Path) -> tuple[_Header | None, list[str]]:
    header, error = _read_header(path)
    if error is not None:
        return None, [f"{path}: {error}"]
    problems = []
    shape_problem = _shape_problem(header)
    if shape_problem is not None:
        problems.append(f"{path}: {shape_problem}")
    data_problem = _nifti_data_problem(path)
    if data_problem is not None:
        problems.append(f"{path}: {data_problem}")
    return header, problems


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


def check_headers(records: Sequence[SubjectRecord], max_threads: int = 8) -> None:
    """Validate every image and label file by reading its header only.

    Checks that each file can be read, is a single-channel 3D volume (a singleton axis such as
    512x512x1 counts as 2D), that NIfTI files hold as much data as their header announces
    (catches truncated downloads; for ``.nii.gz`` via the gzip trailer, no decompression), and
    that every label has the size and geometry (spacing, origin, direction, with the tolerances
    above) of its image.

    Raises:
        DataError: listing every problem found, one line each, naming the path(s).
    """
    paths = [r.image for r in records] + [r.label for r in records if r.label is not None]
    threads = max(1, min(max_threads, len(paths)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = dict(zip(paths, pool.map(_check_one, paths)))
    problems: list[str] = []
    for record in records:
        image_header, image_problems = results[record.image]
        problems.extend(image_problems)
        if record.label is None:
            continue
        label_header, label_problems = results[record.label]
        problems.extend(label_problems)
        if image_header is not None and label_header is not None and not image_problems and not label_problems:
            geometry = _geometry_problem(image_header, label_header)
            if geometry is not None:
                problems.append(f"{record.label}: label does not match its image {record.image}: {geometry}")
    if problems:
        raise DataError(problems, header=f"Found {len(problems)} problem(s) in {len(paths)} file(s)")
