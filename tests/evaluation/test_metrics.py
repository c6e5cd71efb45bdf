import math

import pytest
import torch

from maesil.evaluation.metrics import ReconstructionMetrics


def test_identity_reconstruction_is_perfect_ssim_and_infinite_psnr():
    metrics = ReconstructionMetrics()
    image = torch.rand(2, 1, 16, 16, 16)
    metrics.update(image, image, mask=torch.rand(2, 1, 16, 16, 16) > 0.5)
    result = metrics.compute()
    assert math.isinf(result["psnr"]) and math.isinf(result["psnr_masked"])
    assert result["ssim"] == pytest.approx(1.0) and result["ssim_masked"] == pytest.approx(1.0)


def test_psnr_matches_formula_and_masked_region_is_separate():
    target = torch.zeros(1, 1, 12, 12, 12)
    reconstruction = target.clone()
    mask = torch.zeros_like(target, dtype=torch.bool)
    mask[..., :6] = True
    reconstruction[mask] = 0.1  # error only inside the mask
    metrics = ReconstructionMetrics(data_range=1.0)
    metrics.update(reconstruction, target, mask)
    result = metrics.compute()
    assert result["psnr_masked"] == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-5)
    assert result["psnr"] == pytest.approx(10 * math.log10(1 / 0.005), rel=1e-5)
    assert result["ssim_masked"] < result["ssim"] + 1e-6


def test_without_mask_only_whole_metrics_and_reset_clears():
    metrics = ReconstructionMetrics()
    image = torch.rand(1, 1, 16, 16, 16)
    metrics.update(image.flip(-1), image)
    assert set(metrics.compute()) == {"psnr", "ssim"}
    metrics.reset()
    metrics.update(image, image)
    assert math.isinf(metrics.compute()["psnr"])


def test_data_range_must_be_positive():
    with pytest.raises(ValueError, match="data_range"):
        ReconstructionMetrics(data_range=0)


@pytest.mark.parametrize("shape", [(1, 1, 24, 19, 17), (2, 1, 16, 16, 30)])
def test_separable_ssim_map_equals_torchmetrics(shape):
    from torchmetrics.functional.image import structural_similarity_index_measure

    from maesil.evaluation.metrics import ssim_map_3d

    generator = torch.Generator().manual_seed(0)
    target = torch.rand(shape, generator=generator)
    preds = (target + 0.2 * torch.randn(shape, generator=generator)).clamp(0, 1)
    _, expected = structural_similarity_index_measure(preds, target, data_range=1.0, gaussian_kernel=True, sigma=1.5,
                                                      kernel_size=11, return_full_image=True)
    actual = ssim_map_3d(preds, target, data_range=1.0, sigma=1.5)
    assert actual.shape == expected.shape == shape
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=0)
    assert float(ssim_map_3d(target, target).mean()) == pytest.approx(1.0, abs=1e-5)


def test_separable_ssim_map_refuses_other_shapes():
    from maesil.evaluation.metrics import ssim_map_3d

    with pytest.raises(ValueError, match=r"\(B, C, X, Y, Z\)"):
        ssim_map_3d(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_metric_ssim_is_torchmetrics_mean_ssim_over_all_and_masked_voxels():
    from torchmetrics.functional.image import structural_similarity_index_measure

    generator = torch.Generator().manual_seed(1)
    target = torch.rand(2, 1, 20, 18, 16, generator=generator)
    reconstruction = (target + 0.3 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    mask = torch.rand(target.shape, generator=generator) > 0.6
    metrics = ReconstructionMetrics()
    metrics.update(reconstruction, target, mask)
    result = metrics.compute()
    _, expected = structural_similarity_index_measure(reconstruction, target, data_range=1.0, return_full_image=True)
    assert float(result["ssim"]) == pytest.approx(float(expected.mean()), abs=1e-5)
    assert float(result["ssim_masked"]) == pytest.approx(float(expected[mask].mean()), abs=1e-5)
