"""CSV and JSON manifests: an explicit list of subjects instead of a folder scan.

A manifest is the way to train on images spread over several folders or disks, to pin a DICOM
series per study, or to fix the train/val/test split. Relative paths are relative to the folder of
the manifest.

CSV: a header row with the column ``image`` (required) and optionally ``label``, ``subject_id``,
``split`` (``train``, ``val`` or ``test``; empty = decided by ``val_fraction``) and
``series_uid`` (DICOM only)::

    subject_id,image,label,split
    liver_001,scans/liver_001.nii.gz,masks/liver_001.nii.gz,train
    liver_002,/mnt/pacs/study_17,,val

JSON: a list of objects with the same keys, or an object with a ``"subjects"`` list, or a Medical
Segmentation Decathlon ``dataset.json`` (``"training"``: objects with ``image``/``label``,
``"test"``: image paths, which get ``split: test``). A ``"labels"`` object in the JSON
(``{"0": "background", "1": "liver"}``) declares the label classes (:func:`manifest_classes`).

Without ``subject_id`` the id is the image file name without its extension (for a DICOM folder,
the folder name). Every row problem is reported with the manifest path and row number.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from maesil.data.formats import split_extension
from maesil.data.records import Problem, SubjectRecord

MANIFEST_COLUMNS: tuple[str, ...] = ("image", "label", "subject_id", "split", "series_uid")
SPLITS: dict[str, str] = {"train": "train", "training": "train", "val": "val", "valid": "val",
                          "validation": "val", "test": "test", "testing": "test"}


def _rows_from_csv(path: Path) -> tuple[list[dict[str, Any]], list[Problem]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return [], [Problem(str(path), "empty manifest (no header row)")]
        fields = [name.strip() for name in reader.fieldnames]
        if "image" not in fields:
            return [], [Problem(str(path), f"manifest has no 'image' column (columns: {fields}; expected"
                                           f" image and optionally {list(MANIFEST_COLUMNS[1:])})")]
        unknown = [name for name in fields if name not in MANIFEST_COLUMNS]
        problems = [Problem(str(path), f"unknown manifest column(s) {unknown} are ignored"
                                       f" (known: {list(MANIFEST_COLUMNS)})", "warning")] if unknown else []
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return rows, problems


def _rows_from_json(path: Path) -> tuple[list[dict[str, Any]], list[Problem]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return [], [Problem(str(path), f"not valid JSON ({error})")]
    if isinstance(data, list):
        return data, []
    if isinstance(data, dict) and isinstance(data.get("subjects"), list):
        return data["subjects"], []
    if isinstance(data, dict) and isinstance(data.get("training"), list):
        rows = list(data["training"])
        for item in data.get("test", []) or []:
            rows.append({"image": item, "split": "test"} if isinstance(item, str) else {**item, "split": "test"})
        return rows, []
    return [], [Problem(str(path), "JSON manifest must be a list of subjects, an object with a 'subjects'"
                                   " list, or a Decathlon dataset.json with a 'training' list")]


def _default_id(image: Path) -> str:
    parsed = split_extension(image)
    return parsed[0] if parsed is not None else image.name


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def read_manifest(path: str | Path) -> tuple[list[SubjectRecord], list[Problem]]:
    """Read a CSV/JSON manifest into subject records, collecting every problem.

    Checked here (cheaply, without reading images): the format, the required ``image`` entry,
    that every listed image and label exists, known split names and unique subject ids.
    """
    path = Path(path).expanduser()
    reader = _rows_from_csv if path.suffix.lower() == ".csv" else _rows_from_json
    try:
        rows, problems = reader(path)
    except OSError as error:
        return [], [Problem(str(path), f"cannot read the manifest ({error})")]
    if not rows and not problems:
        problems.append(Problem(str(path), "manifest lists no subject"))
    base = path.parent
    records: list[SubjectRecord] = []
    seen: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        where = f"{path} row {number}"
        if not isinstance(row, dict):
            problems.append(Problem(where, f"expected an object with an 'image' key, got {row!r}"))
            continue
        image_value = str(row.get("image") or "").strip()
        if not image_value:
            problems.append(Problem(where, "no image path"))
            continue
        image = _resolve(base, image_value)
        label_value = str(row.get("label") or "").strip()
        label = _resolve(base, label_value) if label_value else None
        row_problems = []
        for kind, file in (("image", image), ("label", label)):
            if file is not None and not file.exists():
                row_problems.append(Problem(str(file), f"{kind} listed in {where} does not exist"))
        split_value = str(row.get("split") or "").strip().lower()
        split = SPLITS.get(split_value) if split_value else None
        if split_value and split is None:
            row_problems.append(Problem(where, f"unknown split {row.get('split')!r} (use train, val or test)"))
        subject_id = str(row.get("subject_id") or "").strip() or _default_id(image)
        if subject_id in seen:
            row_problems.append(Problem(where, f"duplicate subject id {subject_id!r} (first in {seen[subject_id]});"
                                               " give each row a unique subject_id"))
        seen.setdefault(subject_id, where)
        problems.extend(row_problems)
        if row_problems:
            continue
        series_uid = str(row.get("series_uid") or "").strip() or None
        records.append(SubjectRecord(subject_id, image, label, series_uid=series_uid, split=split))
    return sorted(records, key=lambda r: r.subject_id), problems


def manifest_classes(path: str | Path) -> list[int] | None:
    """Label values declared by a JSON manifest's ``"labels"`` object (Decathlon style), else ``None``."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict):
        return None
    try:
        return sorted(int(k) for k in labels)
    except ValueError:
        return None


def declared_classes(data_dir: str | Path) -> list[int] | None:
    """Label values declared for a dataset: by its JSON manifest, or by a ``dataset.json`` in the folder."""
    path = Path(data_dir).expanduser()
    candidates: Iterable[Path] = [path] if path.is_file() else [path / "dataset.json"]
    for candidate in candidates:
        classes = manifest_classes(candidate)
        if classes is not None:
            return classes
    return None
