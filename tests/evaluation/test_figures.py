import numpy as np
import pytest

from maesil.evaluation.figures import (
    comparison_figure,
    display_range,
    masked_reconstruction_figure,
    orthogonal_slices,
    save_figure,
    volume_panels_figure,
)


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


def z_normalised_volume() -> np.ndarray:
    """An MRI-like volume after z-normalisation: a bright ellipsoid on a dark background, about [−2, 4]."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, 24),) * 3, indexing="ij")
    rng = np.random.default_rng(0)
    volume = np.where(x**2 + y**2 + z**2 < 0.6, 1.5, -1.0) + 0.4 * rng.standard_normal((24, 24, 24))
    volume[0, 0, :4] = 40.0  # a few outliers must not set the range
    return volume.astype(np.float32)


def test_display_range_is_the_window_for_ct_and_robust_percentiles_for_mri():
    volume = z_normalised_volume()
    assert display_range(volume, "ct") == (0.0, 1.0)
    low, high = display_range(volume, "mri")
    assert (low, high) == pytest.approx(tuple(np.percentile(volume, [1, 99])))
    assert -2.5 < low < -1.5 and 2.0 < high < 3.0  # the outliers at 40 are ignored
    with_nan = volume.copy()
    with_nan[:2] = np.nan  # hidden patches of a masked input
    assert all(np.isfinite(display_range(with_nan, "mri")))
    assert display_range(np.full((4, 4, 4), -0.7, np.float32), "mri") == pytest.approx((-1.2, -0.2))


def test_mri_picture_spans_the_data_instead_of_saturating():
    volume = z_normalised_volume()
    mask = np.zeros(volume.shape, dtype=bool)
    mask[:, :12] = True
    figure = masked_reconstruction_figure(volume, mask, volume, value_range=display_range(volume, "mri"))
    axial = figure.axes[0].images[0]
    low, high = axial.get_clim()
    pixels = axial.get_array().filled(np.nan)
    assert np.nanmean((pixels <= low) | (pixels >= high)) < 0.05
    assert np.nanmean((pixels <= 0.0) | (pixels >= 1.0)) > 0.5  # what a (0, 1) range would clip
    assert {im.get_clim() for ax in figure.axes for im in ax.images} == {(low, high)}
    ct = masked_reconstruction_figure(volume, mask, volume)
    assert ct.axes[0].images[0].get_clim() == (0.0, 1.0)  # the default stays CT's window


def test_row_ranges_override_the_shared_range():
    volume = z_normalised_volume()
    figure = volume_panels_figure({"input": volume, "|difference|": np.abs(volume)}, value_range=(-2.0, 3.0),
                                  row_ranges={"|difference|": (0.0, 5.0)})
    assert [figure.axes[i].images[0].get_clim() for i in (0, 3)] == [(-2.0, 3.0), (0.0, 5.0)]


def test_comparison_figure_has_a_column_per_method():
    image = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32)
    figure = comparison_figure(image, {"a": image, "b": image * 0.5}, spacing=(1.0, 1.0, 2.0))
    image_axes = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 4 * 3
