"""Train/validation/test split by subject: deterministic, and nearly unchanged when subjects are added."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

from maesil.data.records import DataError, SubjectRecord

__all__ = ["split_by_manifest", "split_subjects"]


def split_subjects(records: Sequence[SubjectRecord], val_fraction: float, seed: int
                   ) -> tuple[list[SubjectRecord], list[SubjectRecord]]:
    """Deterministic train/val split by subject.

    Subjects are ordered by ``sha1(f"{seed}:{subject_id}")`` and the first
    ``max(1, round(val_fraction * n))`` go to validation (at most ``n - 1``). Ordering by a
    hash of the id (not by position) keeps the split nearly unchanged when subjects are
    added. ``val_fraction == 0`` gives no validation subject. With a single subject it is used
    for both training and validation (and a warning is issued).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    records = sorted(records, key=lambda r: r.subject_id)
    n = len(records)
    if n == 0:
        raise ValueError("no subject to split")
    if val_fraction == 0.0:
        return records, []
    if n == 1:
        warnings.warn(
            f"Only one subject ({records[0].subject_id}); it is used for both training and validation.",
            UserWarning,
            stacklevel=2,
        )
        return records, list(records)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    ranked = sorted(records, key=lambda r: hashlib.sha1(f"{seed}:{r.subject_id}".encode()).hexdigest())
    val_ids = {r.subject_id for r in ranked[:n_val]}
    return [r for r in records if r.subject_id not in val_ids], [r for r in records if r.subject_id in val_ids]


def split_by_manifest(records: Sequence[SubjectRecord], val_fraction: float, seed: int
                      ) -> tuple[list[SubjectRecord], list[SubjectRecord], list[SubjectRecord]]:
    """Train/val/test split honouring a manifest's ``split`` column.

    Subjects marked ``test`` are held out of training and validation; ``val`` ones validate.
    If no subject is marked ``val``, the validation subjects are drawn from the rest by
    :func:`split_subjects`; subjects without a split train otherwise.
    """
    test = [r for r in records if r.split == "test"]
    marked_val = [r for r in records if r.split == "val"]
    pool = [r for r in records if r.split not in ("val", "test")]
    if marked_val:
        return sorted(pool, key=lambda r: r.subject_id), marked_val, test
    if not pool:
        raise DataError("no training subject: every subject is marked test in the manifest")
    train, val = split_subjects(pool, val_fraction, seed)
    return train, val, test
