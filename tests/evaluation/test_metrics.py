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
