"""Finding the subjects of a dataset: a folder of volumes, a CSV/JSON manifest, or DICOM studies.

Everything here runs *before* training starts and is cheap: it walks the folder (or reads the
manifest) and never decodes an image. All problems found are collected and raised together in one
:class:`DataError`, one line per problem, each naming the offending path and what is wrong with it.
Voxel-level validation lives in :mod:`maesil.data.checks`.

What ``data_dir`` may be (see :func:`discover_subjects`):

* a folder with ``images/`` (or ``imagesTr/``, the Medical Segmentation Decathlon / nnU-Net name)
  and an optional sibling ``labels/`` (or ``labelsTr/``): images are read from the images folder
  (recursively) and each label is paired with the image of the same subject id. Everything else
  directly inside ``data_dir`` (``dataset.json``, ``imagesTs/`` ...) is ignored.
* any other folder: every supported file below it (recursively) is an image; no labels.
  In both layouts a folder that directly holds DICOM files (``.dcm`` or extensionless files with
  the DICOM preamble) is one study, i.e. one subject; the series is chosen when it is read
  (:mod:`maesil.data.dicom`).
* a ``.csv`` or ``.json`` manifest listing the subjects (see :mod:`maesil.data.manifest`).

The subject id is the file name without its extension (``case_001.nii.gz`` -> ``case_001``); for a
DICOM study, its folder path below the scanned folder with ``/`` replaced by ``_``.

Symbolic links to files and folders are followed, inside or outside ``data_dir``, but each real
folder is read once: a link back to a folder that contains it (a loop) or a second way into a folder
already read is reported once, as a warning naming the link and the folder it leads to.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from maesil.data.dicom import is_dicom_file
from maesil.data.formats import MANIFEST_EXTENSIONS, SIDECAR_EXTENSIONS, SUPPORTED_EXTENSIONS, split_extension
from maesil.data.manifest import read_manifest
from maesil.data.records import DataError, Problem, SubjectRecord

log = logging.getLogger(__name__)

#: Files excluded by default (glob patterns, see :func:`discover_subjects`): hidden files and
#: folders (``.DS_Store``, macOS ``._case.nii.gz`` resource forks, ``.git``) and the plain-text
#: metadata that datasets commonly ship next to their images. Anything else that is not an image
#: is an error rather than silently skipped.
DEFAULT_EXCLUDE: tuple[str, ...] = (".*", "*.json", "*.csv", "*.tsv", "*.md", "*.txt")

IMAGE_DIR_NAMES: tuple[str, ...] = ("images", "imagesTr")
LABEL_DIR_NAMES: tuple[str, ...] = ("labels", "labelsTr")


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


_FolderKey = tuple[int, int]


def _folder_key(path: Path) -> _FolderKey:
    """The identity of the real folder behind ``path`` (symbolic links followed)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


@dataclass
class _Tree:
    """What a walk below one folder found: files in walk order, empty folders, and warnings
    (links not followed, folders that cannot be listed)."""

    files: list[Path] = field(default_factory=list)
    empty_dirs: list[Path] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)


def _walk(root: Path) -> _Tree:
    """Every file below ``root``, folders in name order, following symbolic links to folders and
    files but entering each real folder once.

    A folder reached again (through a symbolic link, or as the target of one already followed) is
    not walked twice: a link back to a folder that contains it (a loop, which would otherwise be
    walked until the path is too long) and a second way into a folder already walked are each
    reported once as a warning naming the link and the folder it leads to.
    """
    tree = _Tree()
    # Folders that contain the one being listed, by identity: the real ancestors of ``root`` (a link
    # may point above the data folder), then the chain walked from ``root``.
    containing: dict[_FolderKey, Path] = {}
    for parent in reversed(Path(os.path.realpath(root)).parents):
        try:
            containing[_folder_key(parent)] = parent
        except OSError:
            continue
    walked: dict[_FolderKey, Path] = {}

    def visit(folder: Path) -> None:
        try:
            key = _folder_key(folder)
        except OSError:  # removed while walking
            return
        if key in containing:
            tree.warnings.append(Problem(str(folder), f"symbolic link back to {containing[key]}, a folder that"
                                                      " contains it (a loop); not followed", "warning"))
            return
        if key in walked:
            tree.warnings.append(Problem(str(folder), f"the same folder as {walked[key]} (through a symbolic link);"
                                                      f" read once, as {walked[key]}", "warning"))
            return
        walked[key] = folder
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            tree.warnings.append(Problem(str(folder), f"cannot be listed ({error.strerror or error}); skipped",
                                         "warning"))
            return
        if not entries:
            tree.empty_dirs.append(folder)
            return
        subfolders = []
        for entry in entries:
            try:
                is_folder = entry.is_dir()  # follows symbolic links
            except OSError:
                is_folder = False
            (subfolders if is_folder else tree.files).append(folder / entry.name)
        containing[key] = folder
        for sub in subfolders:
            visit(sub)
        del containing[key]

    visit(root)
    return tree


def _study_id(folder: Path, root: Path) -> str:
    """Subject id of a DICOM study folder: its path below ``root`` joined by ``_``."""
    rel = folder.relative_to(root)
    return "_".join(rel.parts) if rel.parts else folder.resolve().name


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


def _scan_folder(root: Path, base: Path, exclude: Sequence[str], problems: list[Problem],
                 excluded: list[str]) -> dict[str, Path]:
    """Map subject id -> image path (a file, or a DICOM study folder) for everything under ``root``.

    Unsupported files, id collisions and unreadable entries are appended to ``problems`` as
    errors; empty folders, folders that cannot be listed and folders reached a second time through
    a symbolic link (see :func:`_walk`) as warnings.
    """
    by_id: dict[str, list[Path]] = {}
    unsupported: list[Path] = []
    sidecars: list[Path] = []
    studies: set[Path] = set()
    tree = _walk(root)
    for path in tree.files:
        rel = path.relative_to(base)
        pattern = _is_excluded(rel, exclude)
        if pattern is not None:
            excluded.append(f"{path} (pattern {pattern!r})")
            continue
        parsed = split_extension(path)
        if parsed is None:
            if path.name.lower().endswith(SIDECAR_EXTENSIONS):
                sidecars.append(path)
            elif path.is_file() and is_dicom_file(path):
                studies.add(path.parent)
            else:
                unsupported.append(path)
            continue
        if not path.is_file():
            problems.append(Problem(str(path), "not a regular file (broken link?)"))
            continue
        by_id.setdefault(parsed[0], []).append(path)
    for folder in sorted(studies):
        by_id.setdefault(_study_id(folder, root), []).append(folder)
    for folder in tree.empty_dirs:
        if folder != root and _is_excluded(folder.relative_to(base), exclude) is None:
            problems.append(Problem(str(folder), "empty folder (no file in it; an incomplete copy or export?)",
                                    "warning"))
    problems.extend(w for w in tree.warnings if _is_excluded(Path(w.path).relative_to(base), exclude) is None)

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
        problems.append(Problem(
            str(path),
            f"not a supported image file (supported: {', '.join(SUPPORTED_EXTENSIONS)}, DICOM;"
            f" .raw/.zraw only as data of an .mhd). Remove it, or exclude it with a glob pattern,"
            f" e.g. exclude=[{_pattern_for(path)!r}] (the `exclude` argument of VolumeDataModule;"
            f" --data.init_args.exclude on the command line)"
        ))

    result: dict[str, Path] = {}
    for subject_id, paths in sorted(by_id.items()):
        if len(paths) > 1:
            problems.append(Problem(
                str(paths[0]),
                f"duplicate subject id {subject_id!r}, also given by "
                + ", ".join(str(p) for p in paths[1:])
                + " (ids are file names without extension and must be unique; rename or exclude one)"
            ))
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


def scan_subjects(data_dir: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDE
                  ) -> tuple[list[SubjectRecord], list[Problem]]:
    """Like :func:`discover_subjects`, but returns the problems instead of raising.

    Subjects with a problem (e.g. a duplicate id) are left out of the records; everything else is
    listed, so that ``check-data`` can go on checking the rest and report all at once.
    """
    root = Path(data_dir).expanduser()
    if not root.exists():
        return [], [Problem(str(root), "data folder or manifest does not exist")]
    if root.is_file():
        if root.name.lower().endswith(MANIFEST_EXTENSIONS):
            return read_manifest(root)
        return [], [Problem(str(root), "is a file, not a data folder (data_dir must be a folder of images,"
                                       " a DICOM study folder, or a .csv/.json manifest)")]

    exclude = tuple(exclude)
    problems: list[Problem] = []
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

    if not images and not any(p.severity == "error" for p in problems):
        where = image_dir or root
        problems.insert(0, Problem(
            str(where),
            f"no image found (supported: {', '.join(SUPPORTED_EXTENSIONS)}, DICOM folders;"
            f" excluded by pattern: {len(excluded)} file(s))",
        ))

    if labels:
        for subject_id in sorted(set(labels) - set(images)):
            problems.append(Problem(str(labels[subject_id]), f"label without an image (no {subject_id}.* in {image_dir})"))
        for subject_id in sorted(set(images) - set(labels)):
            problems.append(Problem(
                str(images[subject_id]),
                f"image without a label (no {subject_id}.* in {label_dir}); either every image has a label or none",
            ))
    records = [SubjectRecord(sid, path, labels.get(sid)) for sid, path in sorted(images.items())]
    return records, problems


def discover_subjects(data_dir: str | Path, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[SubjectRecord]:
    """List the subjects of a data folder or manifest, sorted by subject id.

    Args:
        data_dir: folder with the images or a manifest, see the module docstring.
        exclude: glob patterns (``fnmatch``) of files to leave out of a folder scan. A pattern
            matches a file if it matches its path relative to ``data_dir``, its name or the name
            of any folder on the way (so ``".*"`` also excludes everything inside ``.git/``).
            Defaults to :data:`DEFAULT_EXCLUDE` (hidden files and text metadata). Excluded files
            are logged at INFO level. Pass ``[]`` to exclude nothing. Every other file must be
            an image or a DICOM file.

    Raises:
        DataError: listing every error found (missing folder, no image, unsupported files,
            duplicate subject ids, labels without image or images without label when some
            images do have labels, manifest rows with missing files ...). Warnings (empty
            sub-folders) are logged.
    """
    records, problems = scan_subjects(data_dir, exclude)
    errors = [p for p in problems if p.severity == "error"]
    for warning in (p for p in problems if p.severity != "error"):
        log.warning("%s", warning)
    if errors:
        if len(errors) == 1 and not records:
            raise DataError(errors)
        raise DataError(errors, header=f"Problems in {Path(data_dir).expanduser()}")
    return records
