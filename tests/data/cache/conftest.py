"""A cache of the tiny phantoms prepared once per module, and private copies of the phantoms."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from maesil.data.cache import PrepareReport, prepare_cache
from maesil.data.preprocess import PreprocessSettings
from maesil.data.records import SubjectRecord

SETTINGS = PreprocessSettings(modality="ct", target_spacing=(6.0, 6.0, 6.0))


def records_of(root: Path, splits: tuple[str | None, ...] = ("train", "val", None)) -> list[SubjectRecord]:
    images = sorted((root / "images").glob("*.nii.gz"))
    return [SubjectRecord(p.name[: -len(".nii.gz")], p, root / "labels" / p.name, split=split)
            for p, split in zip(images, splits)]


@pytest.fixture(scope="module")
def prepared(tiny_ct_dir: Path, tmp_path_factory) -> tuple[Path, list[SubjectRecord], PrepareReport]:
    """The tiny phantoms prepared once, in two worker processes."""
    out = tmp_path_factory.mktemp("cache")
    records = records_of(tiny_ct_dir)
    report = prepare_cache(records, out, SETTINGS, workers=2, progress=False)
    return out, records, report


@pytest.fixture
def own_copy(tiny_ct_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny phantoms, for tests that touch or break files."""
    return Path(shutil.copytree(tiny_ct_dir, tmp_path / "data"))
