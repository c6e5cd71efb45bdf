import numpy as np
import pytest

from maesil.evaluation.figures import orthogonal_slices, save_figure, volume_panels_figure


def test_orthogonal_slices_follow_radiological_orientation():
    volume = np.zeros((8, 6, 4), dtype=np.float32)
    volume[7, 0, 2] = 1.0  # patient's far right (max X in RAS), posterior, mid Z
    slices = orthogonal_slices(volume, center=(7, 0, 2))
    assert slices["axial"].shape == (6, 8)
    # patient's right is on the viewer's left (column 0); posterior is the bottom row (origin="lower")
    assert slices["axial"][0, 0] == 1.0
    assert slices["coronal"].shape == (4, 8) and slices["coronal"][2, 0] == 1.0
    assert slices["sagittal"].shape == (4, 6) and slices["sagittal"][2, 5] == 1.0


def test_orthogonal_slices_reject_non_3d():
    with pytest.raises(ValueError, match="X, Y, Z"):
        orthogonal_slices(np.zeros((4, 4)))


def test_figure_with_nan_masked_patches_saves_png(tmp_path):
    volume = np.random.rand(16, 16, 16).astype(np.float32)
    masked = volume.copy()
    masked[:8] = np.nan
    figure = volume_panels_figure({"input": volume, "masked input": masked}, title="check")
    path = save_figure(figure, tmp_path / "sub" / "fig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000
