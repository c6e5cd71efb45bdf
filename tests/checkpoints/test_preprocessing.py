"""Preprocessing drift between pretraining and fine-tuning, as readable warnings."""

from __future__ import annotations

import pytest

from maesil.checkpoints import check_preprocessing


def test_check_preprocessing() -> None:
    sidecar = {"preprocessing": {"modality": "ct", "target_spacing": 1.5, "hu_window": [-175.0, 250.0],
                                 "superpatch_size": 128}}  # fmt: skip
    assert check_preprocessing(sidecar, modality="ct", target_spacing=[1.5, 1.5, 1.5], hu_window=(-175, 250),
                               superpatch_size=128) == []  # fmt: skip
    assert check_preprocessing(sidecar, target_spacing=2.0) == ["pretrained at 1.5 mm spacing, fine-tuning at 2 mm"]
    assert check_preprocessing(sidecar, target_spacing=(1.5, 1.5, 3.0)) == [
        "pretrained at 1.5 mm spacing, fine-tuning at 1.5×1.5×3 mm"
    ]
    warnings = check_preprocessing(sidecar, modality="mri", hu_window=(-1000, 1000), patch_size=96)
    assert warnings == ["pretrained on CT, fine-tuning on MRI", "pretrained on 128³ superpatches, fine-tuning on 96³ "
                        "patches"]  # HU windows do not apply to MRI  # fmt: skip
    assert check_preprocessing(sidecar, hu_window=(-1000, 1000)) == [
        "pretrained with HU window [-175, 250], fine-tuning with [-1000, 1000]"
    ]
    assert check_preprocessing({}, target_spacing=2.0) == []  # nothing recorded: nothing to compare
    assert check_preprocessing({"preprocessing": {"modality": "ct"}}, target_spacing=2.0) == []
    with pytest.raises(TypeError, match="spacing"):
        check_preprocessing(sidecar, spacing=2.0)
