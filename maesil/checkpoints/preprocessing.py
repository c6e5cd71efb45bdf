"""Preprocessing drift between pretraining and fine-tuning, in readable sentences.

An encoder pretrained on 1.5 mm CT windowed to [-175, 250] HU sees different images when fine-tuned at
2 mm or on MRI, and nothing fails: it just transfers worse. The exported sidecar and the checkpoint keep the
pretraining preprocessing (modality, spacing, HU window, superpatch size, foreground cropping);
:func:`check_preprocessing` compares it with a fine-tuning run's and returns one warning per difference.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from maesil.shapes import as_triple

__all__ = ["PREPROCESSING_FIELDS", "check_preprocessing"]

#: The DataModule settings that describe the preprocessing (recorded in exports, compared here).
PREPROCESSING_FIELDS = ("modality", "target_spacing", "hu_window", "superpatch_size", "crop_foreground")


def _optional_triple(value: Any, name: str) -> tuple[float, float, float] | None:
    return None if value is None else as_triple(value, name, kind=float)


def _spacing_text(spacing: tuple[float, float, float] | None) -> str:
    if spacing is None:
        return "native spacing"
    if len(set(spacing)) == 1:
        return f"{spacing[0]:g} mm"
    return "×".join(f"{s:g}" for s in spacing) + " mm"


def _size_text(size: tuple[float, float, float]) -> str:
    return f"{int(size[0])}³" if len(set(size)) == 1 else "×".join(str(int(s)) for s in size)


def _close(a: Iterable[float], b: Iterable[float]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-6) for x, y in zip(a, b))


def check_preprocessing(metadata: Mapping[str, Any], **actual: Any) -> list[str]:
    """Warnings where a fine-tuning run preprocesses differently from pretraining.

    Args:
        metadata: the metadata of :func:`~maesil.checkpoints.load_checkpoint_state` (an exported sidecar's
            ``preprocessing``, or a checkpoint's ``datamodule_hyper_parameters``), or a plain preprocessing
            dict.
        **actual: the fine-tuning values, any of ``modality``, ``target_spacing`` (mm, one value or three; None
            = native), ``hu_window``, ``superpatch_size`` (deprecated alias ``patch_size``), ``crop_foreground``.

    Returns:
        One readable line per mismatch, e.g. ``"pretrained at 1.5 mm spacing, fine-tuning at 2 mm"``; empty when
        they agree or the metadata lacks the field. The HU window is compared for CT only.

    Raises:
        TypeError: an unknown keyword.
        ValueError: a spacing or size that is neither one number nor three.
    """
    if "patch_size" in actual:
        warnings.warn("check_preprocessing(patch_size=...) is deprecated: pass superpatch_size=...",
                      DeprecationWarning, stacklevel=2)
        actual.setdefault("superpatch_size", actual.pop("patch_size"))
    unknown = set(actual) - set(PREPROCESSING_FIELDS)
    if unknown:
        raise TypeError(f"check_preprocessing() got unknown field(s) {sorted(unknown)}; "
                        f"known: {list(PREPROCESSING_FIELDS)} and patch_size.")
    if isinstance(metadata.get("preprocessing"), Mapping):
        pretrained = dict(metadata["preprocessing"])
    elif isinstance(metadata.get("datamodule_hyper_parameters"), Mapping):
        pretrained = dict(metadata["datamodule_hyper_parameters"])
    else:
        pretrained = dict(metadata)
    messages: list[str] = []
    both = [name for name in PREPROCESSING_FIELDS if name in actual and name in pretrained]

    def modality(value: Any) -> str:
        return str(value).lower()

    if "modality" in both and actual["modality"] is not None:
        if modality(pretrained["modality"]) != modality(actual["modality"]):
            messages.append(f"pretrained on {modality(pretrained['modality']).upper()}, fine-tuning on "
                             f"{modality(actual['modality']).upper()}")
    if "target_spacing" in both:
        before = _optional_triple(pretrained["target_spacing"], "target_spacing")
        now = _optional_triple(actual["target_spacing"], "target_spacing")
        if (before is None) != (now is None) or (before is not None and now is not None and not _close(before, now)):
            messages.append(f"pretrained at {_spacing_text(before)} spacing, fine-tuning at {_spacing_text(now)}")
    if "hu_window" in both and actual["hu_window"] is not None and pretrained["hu_window"] is not None:
        is_mri = "mri" in {modality(pretrained.get("modality", "ct")), modality(actual.get("modality", "ct"))}
        before, now = [float(v) for v in pretrained["hu_window"]], [float(v) for v in actual["hu_window"]]
        if not is_mri and (len(before) != len(now) or not _close(before, now)):
            messages.append(f"pretrained with HU window [{before[0]:g}, {before[1]:g}], fine-tuning with "
                             f"[{now[0]:g}, {now[1]:g}]")
    if "superpatch_size" in both and actual["superpatch_size"] is not None:
        before = _optional_triple(pretrained["superpatch_size"], "superpatch_size")
        now = _optional_triple(actual["superpatch_size"], "superpatch_size")
        if before is not None and now is not None and not _close(before, now):
            messages.append(f"pretrained on {_size_text(before)} superpatches, fine-tuning on {_size_text(now)} "
                             "patches")
    if "crop_foreground" in both and actual["crop_foreground"] is not None:
        if bool(pretrained["crop_foreground"]) != bool(actual["crop_foreground"]):
            state = {True: "with", False: "without"}
            messages.append(f"pretrained {state[bool(pretrained['crop_foreground'])]} foreground cropping, "
                             f"fine-tuning {state[bool(actual['crop_foreground'])]}")
    return messages
