"""The index of a prepared cache: what it records about each subject, and the checks a training run
answers from it alone.

Layout of a cache folder::

    index.json                          # format, version, preprocessing settings (see below)
    index.sqlite                        # one row per subject: its entry (see below)
    subjects/<id>/image.npy             # float32 (X, Y, Z), C order, preprocessed, *not* padded
    subjects/<id>/label.npy             # uint8 (int16/int32 if the values need it), same grid
    subjects/<id>/label_points.npz      # per label value: up to 4096 voxel coordinates (N, 3)

(or ``image.b2nd``/``label.b2nd``, chunked and compressed: :mod:`~maesil.data.cache.volumes`).

``index.json`` is ``{"format": "maesil-cache", "version": 2, "settings": PreprocessSettings.to_dict(),
"subjects": "index.sqlite"}``. The SQLite file has one table ``subjects(subject_id TEXT PRIMARY KEY,
entry TEXT)`` whose ``entry`` is a JSON object with the relative file paths, the preprocessed
``shape``/``spacing``/``affine``, the ``original_shape``/``original_spacing``/``original_affine``, the
``source`` (image, label, series_uid and a fingerprint of the files), intensity ``stats`` of the
preprocessed image (min, max, mean, std, foreground_fraction), ``label_values``/``label_counts`` and
the manifest ``split``. (Version 1 kept ``{subject_id: entry}`` inline in ``index.json``; ``prepare``
upgrades such a cache without preparing its subjects again.)

Why SQLite: opening the index reads the settings and the subject ids only, and an entry is parsed when
it is asked for, so opening a cache of 50,000 subjects takes a fraction of a second and a few MB where
the same index as one JSON document took seconds and over a GB to parse (figures: docs/data.md,
``benchmarks/index_scale.py``). It is in Python's standard library, and it is opened read-only and
``immutable`` (no locks, which network file systems handle badly): ``prepare`` writes a new file and
renames it over the old one, so a reader sees one whole index or the other.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maesil.data.preprocess import PreprocessSettings
from maesil.data.records import DataError, Problem

__all__ = [
    "CACHE_FORMAT", "CACHE_VERSION", "INDEX_NAME", "SUBJECTS_DIR", "CacheEntry", "CacheIndex", "CacheSource",
    "CacheStats", "SUBJECTS_TABLE", "SubjectTable", "cache_problems", "is_cache", "read_index_json", "read_subjects",
    "write_subjects",
]

CACHE_FORMAT = "maesil-cache"
CACHE_VERSION = 2
INDEX_NAME = "index.json"
SUBJECTS_TABLE = "index.sqlite"
SUBJECTS_DIR = "subjects"



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


class SubjectTable:
    """The subjects table of a cache (``index.sqlite``), addressed by subject id or row number.

    Picklable and small: what a DataLoader worker keeps of the index is this (two paths); each process
    opens its own read-only connection when it first reads.
    """

    def __init__(self, root: Path, database: Path) -> None:
        self.root, self.database = root, database
        self._connection: sqlite3.Connection | None = None

    def __getstate__(self) -> dict:  # a connection is not picklable
        return {**self.__dict__, "_connection": None}

    def query(self, sql: str, *args: Any) -> list[tuple]:
        """The rows of ``sql``; ``DataError`` naming the file if it cannot be read."""
        try:
            if self._connection is None:
                self._connection = open_subjects(self.database)
            return self._connection.execute(sql, args).fetchall()
        except sqlite3.Error as error:
            raise DataError(f"{self.database}: unreadable cache index ({error}); run `prepare` again") from None

    def parse(self, subject_id: str, text: str) -> CacheEntry:
        """The :class:`CacheEntry` of a row's JSON; ``DataError`` naming the subject if it is invalid."""
        try:
            return CacheEntry.from_json(subject_id, self.root, json.loads(text))
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{self.database}: invalid entry for subject {subject_id!r} ({error!r})") from error

    def entry(self, row: int) -> CacheEntry:
        """The entry at row number ``row`` (see :meth:`rows`)."""
        found = self.query("SELECT subject_id, entry FROM subjects WHERE rowid = ?", int(row))
        if not found:
            raise DataError(f"{self.database}: no row {row} (the index changed while it was read?)")
        return self.parse(*found[0])

    def rows(self, subject_ids: Sequence[str]) -> np.ndarray:
        """The row numbers of ``subject_ids`` (int64), in their order; ``DataError`` for unknown ids."""
        known = dict(self.query("SELECT subject_id, rowid FROM subjects"))
        missing = [sid for sid in subject_ids if sid not in known]
        if missing:
            raise DataError(f"{self.database}: no subject {missing[0]!r} in this cache"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return np.array([known[sid] for sid in subject_ids], dtype=np.int64)

    def unlabeled(self, rows: np.ndarray) -> list[int]:
        """Those of ``rows`` whose subject has no label map."""
        without = {row for row, in self.query("SELECT rowid FROM subjects WHERE json_extract(entry, '$.label') IS NULL")}
        return [int(row) for row in rows if int(row) in without]


class _Entries(Mapping):
    """The subjects of an index, read from its table when asked for (ids are loaded at open)."""

    def __init__(self, table: SubjectTable, ids: list[str]) -> None:
        self.table, self.ids = table, ids
        self._known = set(ids)

    def __getitem__(self, subject_id: str) -> CacheEntry:
        rows = self.table.query("SELECT entry FROM subjects WHERE subject_id = ?", subject_id) \
            if subject_id in self._known else []
        if not rows:
            raise KeyError(subject_id)
        return self.table.parse(subject_id, rows[0][0])

    def __contains__(self, subject_id: object) -> bool:
        return subject_id in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def values(self) -> Iterator[CacheEntry]:  # type: ignore[override]
        """Every entry, in subject id order, in one pass over the table."""
        return (self.table.parse(sid, text) for sid, text in
                self.table.query("SELECT subject_id, entry FROM subjects ORDER BY subject_id"))

    def items(self) -> Iterator[tuple[str, CacheEntry]]:  # type: ignore[override]
        return ((entry.subject_id, entry) for entry in self.values())


class CacheIndex:
    """A prepared cache folder: its settings and subjects (``entries``, a mapping subject id ->
    :class:`CacheEntry`, in id order; an entry is read from the index when asked for).

    Use :meth:`load`; it checks the format and the version; with ``check_files`` also that every indexed
    file exists (a stat per file: for large caches, leave it to the reads, which name a missing file).
    """

    def __init__(self, root: Path, settings: PreprocessSettings, table: SubjectTable, ids: list[str]) -> None:
        self.root = root
        self.settings = settings
        self.table = table
        self.entries: Mapping[str, CacheEntry] = _Entries(table, ids)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, subject_id: str) -> CacheEntry:
        try:
            return self.entries[subject_id]
        except KeyError:
            raise DataError(f"{self.root / INDEX_NAME}: no subject {subject_id!r} in this cache") from None

    @classmethod
    def load(cls, cache_dir: str | Path, check_files: bool = False) -> CacheIndex:
        """Open ``cache_dir``'s index; raises ``DataError`` naming the problem path (and subject)."""
        root = Path(cache_dir).expanduser().absolute()
        path = root / INDEX_NAME
        data = read_index_json(path)
        if data["version"] != CACHE_VERSION:
            raise DataError(f"{path}: cache version {data['version']} is not supported by this reader (expected"
                            f" {CACHE_VERSION}); run `python -m maesil prepare` on it again to upgrade it")
        try:
            settings = PreprocessSettings.from_dict(data["settings"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{path}: invalid preprocessing settings ({error})") from error
        database = root / SUBJECTS_TABLE
        table = SubjectTable(root, database)
        entries = _Entries(table, _read_ids(database))
        if check_files:
            missing = [f"{file}: indexed file of subject {entry.subject_id!r} is missing"
                       for entry in entries.values()
                       for file in (entry.image_path, entry.label_path, entry.label_points_path)
                       if file is not None and not file.is_file()]
            if missing:
                raise DataError(missing, header=f"Cache {root} is incomplete; run `prepare` again")
        return cls(root, settings, table, entries.ids)

    def require_settings(self, settings: PreprocessSettings) -> None:
        """Raise ``DataError`` unless the cache was prepared with ``settings`` (a run never reads voxels
        preprocessed otherwise than it asks)."""
        if settings != self.settings:
            raise DataError(
                f"{self.root}: the cache was prepared with {self.settings.to_dict()}, but this run asks for"
                f" {settings.to_dict()}; prepare another cache (or re-run prepare with --force)"
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


def read_index_json(path: Path) -> dict:
    """The parsed ``index.json`` at ``path``, its format and version checked; ``DataError`` naming ``path``."""
    if not path.is_file():
        raise DataError(f"{path}: no cache index (prepare the cache first: python -m maesil prepare)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: unreadable cache index ({error})") from error
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise DataError(f"{path}: not a maesil cache index (expected \"format\": \"{CACHE_FORMAT}\")")
    if data.get("version") not in (1, CACHE_VERSION):
        raise DataError(f"{path}: cache version {data.get('version')!r} is not supported "
                        f"(expected {CACHE_VERSION}); prepare the cache again")
    subjects = dict if data["version"] == 1 else str
    if not isinstance(data.get("subjects"), subjects) or not isinstance(data.get("settings"), dict):
        raise DataError(f"{path}: invalid cache index (\"settings\" must be an object, \"subjects\" "
                        f"{'an object' if subjects is dict else 'the name of the SQLite file'})")
    return data


def open_subjects(database: Path) -> sqlite3.Connection:
    """A read-only connection to the subjects table (``immutable``: no locks; the file is only ever
    replaced whole)."""
    if not database.is_file():
        raise DataError(f"{database}: the cache index's subject table is missing; run `prepare` again")
    return sqlite3.connect(f"{database.as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False)


def _read_ids(database: Path) -> list[str]:
    try:
        with contextlib.closing(open_subjects(database)) as connection:
            return [row[0] for row in connection.execute("SELECT subject_id FROM subjects ORDER BY subject_id")]
    except sqlite3.Error as error:
        raise DataError(f"{database}: unreadable cache index ({error}); run `prepare` again") from None


def read_subjects(root: Path, data: dict) -> dict[str, dict]:
    """The JSON entries of every subject of the cache at ``root`` whose ``index.json`` holds ``data``
    (version 1: inline; version 2: the SQLite table)."""
    if data["version"] == 1:
        return dict(data["subjects"])
    database = root / SUBJECTS_TABLE
    try:
        with contextlib.closing(open_subjects(database)) as connection:
            return {sid: json.loads(text) for sid, text in connection.execute("SELECT subject_id, entry FROM subjects")}
    except (sqlite3.Error, ValueError) as error:
        raise DataError(f"{database}: unreadable cache index ({error}); run `prepare` again") from None


def write_subjects(path: Path, subjects: dict[str, dict]) -> None:
    """Write the SQLite subjects table to ``path`` whole (a temporary file renamed over it)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(temporary)) as connection:
            connection.execute("PRAGMA journal_mode = OFF")
            connection.execute("CREATE TABLE subjects (subject_id TEXT PRIMARY KEY, entry TEXT NOT NULL)")
            connection.executemany("INSERT INTO subjects VALUES (?, ?)",
                                   ((k, json.dumps(subjects[k], allow_nan=False)) for k in sorted(subjects)))
            connection.commit()
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
