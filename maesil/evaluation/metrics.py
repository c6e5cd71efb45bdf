"""Reconstruction metrics: PSNR and 3D SSIM over whole superpatches and over masked voxels only.

Every method that reconstructs its input (MAE variants, AE baselines) logs the same metrics, so tables
compare like with like. ``data_range`` is always given explicitly: without it torchmetrics would use the
batch's own max − min and PSNR would change with the content of the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio


class ReconstructionMetrics(nn.Module):
    """Accumulates PSNR and SSIM of reconstructions against their inputs over a validation epoch.

    PSNR pools the squared error of all voxels seen (dataset PSNR, not a mean of per-patch PSNRs).
    SSIM is the mean of the 3D SSIM map (Gaussian window 11, σ 1.5) over all voxels, or over masked
    voxels only. The torchmetrics states synchronise across DDP processes.

    Args:
        data_range: Intensity range of the images (1.0 for CT windowed to [0, 1]).

    Example:
        >>> metrics = ReconstructionMetrics()
        >>> image = torch.rand(2, 1, 16, 16, 16)
        >>> metrics.update(image, image, mask=torch.rand(2, 1, 16, 16, 16) > 0.5)
        >>> sorted(metrics.compute())
        ['psnr', 'psnr_masked', 'ssim', 'ssim_masked']
    """

    def __init__(self, data_range: float = 1.0) -> None:
        super().__init__()
        if data_range <= 0:
            raise ValueError(f"data_range must be > 0, got {data_range}")
        self.data_range = float(data_range)
        self.psnr = PeakSignalNoiseRatio(data_range=self.data_range)
        self.psnr_masked = PeakSignalNoiseRatio(data_range=self.data_range)
        self.ssim = MeanMetric()
        self.ssim_masked = MeanMetric()

    @torch.no_grad()
    def update(self, reconstruction: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Adds a batch (B, C, X, Y, Z); ``mask`` is a boolean voxel mask (True = was hidden)."""
        reconstruction = reconstruction.detach().float()
        target = target.detach().float()
        self.psnr.update(reconstruction, target)
        _, ssim_map = structural_similarity_index_measure(
            reconstruction, target, data_range=self.data_range, return_full_image=True
        )
        self.ssim.update(ssim_map)
        if mask is not None:
            mask = mask.expand_as(target)
            if mask.any():
                self.psnr_masked.update(reconstruction[mask], target[mask])
                self.ssim_masked.update(ssim_map[mask])

    def compute(self) -> dict[str, Tensor]:
        """Returns the epoch's metrics; masked entries only when a mask was ever given."""
        results = {"psnr": self.psnr.compute(), "ssim": self.ssim.compute()}
        if self.psnr_masked.update_called:
            results["psnr_masked"] = self.psnr_masked.compute()
            results["ssim_masked"] = self.ssim_masked.compute()
        return results

    def reset(self) -> None:
        """Clears the accumulated state, at the start of each validation epoch."""
        for metric in (self.psnr, self.psnr_masked, self.ssim, self.ssim_masked):
            metric.reset()
