"""Reconstruction metrics: PSNR and 3D SSIM over whole superpatches and over masked voxels only.

Every method that reconstructs its input (MAE variants, AE baselines) logs the same metrics, so tables
compare like with like. The data range (the peak of PSNR, and what SSIM's stabilising constants scale
with) follows the modality of the inputs unless a method fixes it (``metric_data_range``):

* CT, windowed to [0, 1]: 1.0. Without a fixed range torchmetrics would use the batch's own
  max − min and PSNR would change with the content of the batch.
* MRI, z-normalised over the foreground (about [−5, 6], varying per volume): there is no fixed range,
  so each target's own max − min is used (each superpatch in validation, each volume in
  ``benchmark-recon``, as fastMRI scores each volume against its own range), floored at
  :data:`MIN_MRI_DATA_RANGE`. Reconstructions are not clipped for MRI either. A fixed
  ``metric_data_range`` remains the choice for curves that compare across data sets.

Scores are computed on :func:`normalise_intensities`: both volumes divided by the data range (so
torchmetrics always works with range 1) and, for MRI, first shifted by the target's minimum. PSNR does
not change with the shift; SSIM's luminance term assumes intensities ≥ 0 like windowed CT's, and
without the shift float32 SSIM of a volume with itself drops below 1 on the constant negative
background of z-normalised volumes (torchmetrics clamps the variances but not the covariance).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio

Modality = Literal["ct", "mri"]

#: Smallest per-target data range of MRI's default: one foreground standard deviation after
#: z-normalisation, so that a near-constant background superpatch does not get a vanishing range
#: (its small errors would then count as huge and dominate the pooled PSNR).
MIN_MRI_DATA_RANGE = 1.0


def check_data_range(data_range: float | None) -> float | None:
    """``data_range`` as a float, or None (= from the modality); raises ``ValueError`` unless > 0."""
    if data_range is None:
        return None
    if not float(data_range) > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    return float(data_range)


def resolve_data_range(target: Tensor, data_range: float | None = None, modality: Modality = "ct") -> Tensor:
    """The PSNR/SSIM data range of each sample of ``target`` (B, ...), as a (B,) float tensor.

    An explicit ``data_range`` is used as it is. ``None`` follows the modality: 1.0 for CT (windowed to
    [0, 1]); for MRI each sample's own max − min, at least :data:`MIN_MRI_DATA_RANGE`.
    """
    data_range = check_data_range(data_range)
    if modality not in ("ct", "mri"):
        raise ValueError(f"modality must be 'ct' or 'mri', got {modality!r}")
    batch = target.shape[0]
    if data_range is None and modality == "mri":
        flat = target.detach().flatten(1).float()
        return (flat.amax(dim=1) - flat.amin(dim=1)).clamp_min(MIN_MRI_DATA_RANGE)
    return torch.full((batch,), 1.0 if data_range is None else data_range, device=target.device)


def normalise_intensities(reconstruction: Tensor, target: Tensor, data_range: float | None = None,
                          modality: Modality = "ct") -> tuple[Tensor, Tensor]:
    """``reconstruction`` and ``target`` (B, ...) as float32 in units of each sample's data range
    (:func:`resolve_data_range`); for MRI first shifted by each target's minimum (see the module
    docstring). Scored with range 1 they give the PSNR/SSIM of the data range."""
    target = target.detach().float()
    reconstruction = reconstruction.detach().float()
    shape = (-1,) + (1,) * (target.ndim - 1)
    scale = resolve_data_range(target, data_range, modality).view(shape)
    if modality == "mri":
        offset = target.flatten(1).amin(dim=1).view(shape)
        return (reconstruction - offset) / scale, (target - offset) / scale
    return reconstruction / scale, target / scale


def ssim_map_3d(preds: Tensor, target: Tensor, data_range: float = 1.0, sigma: float = 1.5,
                k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """The 3D SSIM map of ``preds`` against ``target`` (B, C, X, Y, Z): the same numbers as torchmetrics'
    ``structural_similarity_index_measure(..., gaussian_kernel=True, sigma=sigma, return_full_image=True)``
    (reflection padding, the Gaussian window of its size, its constants), with the window applied as three
    1-D convolutions.

    Why not torchmetrics itself here: its 3D Gaussian window is one dense ``conv3d`` (11³ = 1331 products per
    voxel for σ 1.5); the window is the outer product of 1-D Gaussians, so three passes of 11 give the same
    result for 33. On a whole 153 × 121 × 120 phantom it took 2.2 s against torchmetrics' 11.1 s (2 CPU cores,
    2026-11-30); ``tests/evaluation/test_metrics.py`` checks that the maps agree (within 2e-5 in float32).
    """
    if preds.shape != target.shape or preds.ndim != 5:
        raise ValueError(f"expected two (B, C, X, Y, Z) tensors of one shape, got {tuple(preds.shape)} and "
                         f"{tuple(target.shape)}")
    size = int(3.5 * sigma + 0.5) * 2 + 1  # torchmetrics' Gaussian window size
    pad = (size - 1) // 2
    offsets = torch.arange((1 - size) / 2, (1 + size) / 2, 1, dtype=preds.dtype, device=preds.device)
    gauss = torch.exp(-((offsets / sigma) ** 2) / 2)
    gauss = gauss / gauss.sum()
    channels = preds.shape[1]
    preds = nn.functional.pad(preds, (pad,) * 6, mode="reflect")
    target = nn.functional.pad(target, (pad,) * 6, mode="reflect")
    stack = torch.cat((preds, target, preds * preds, target * target, preds * target))
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = size
        kernel = gauss.reshape(1, 1, *shape).expand(channels, 1, *shape)
        stack = nn.functional.conv3d(stack, kernel, groups=channels)
    mu_pred, mu_target, pred_sq, target_sq, pred_target = stack.split(preds.shape[0])
    mu_pred_sq, mu_target_sq, mu_pred_target = mu_pred.pow(2), mu_target.pow(2), mu_pred * mu_target
    sigma_pred_sq = torch.clamp(pred_sq - mu_pred_sq, min=0.0)
    sigma_target_sq = torch.clamp(target_sq - mu_target_sq, min=0.0)
    sigma_pred_target = pred_target - mu_pred_target
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    upper = 2 * sigma_pred_target + c2
    lower = sigma_pred_sq + sigma_target_sq + c2
    return ((2 * mu_pred_target + c1) * upper) / ((mu_pred_sq + mu_target_sq + c1) * lower)


class ReconstructionMetrics(nn.Module):
    """Accumulates PSNR and SSIM of reconstructions against their inputs over a validation epoch.

    PSNR pools the squared error of all voxels seen (dataset PSNR, not a mean of per-patch PSNRs).
    SSIM is the mean of the 3D SSIM map (Gaussian window 11, σ 1.5; torchmetrics' numbers, computed by
    :func:`ssim_map_3d`) over all voxels, or over masked voxels only. The torchmetrics states synchronise
    across DDP processes.

    Each superpatch is scored in units of its data range (:func:`normalise_intensities`) with range 1:
    the same numbers as scoring with that range (PSNR and SSIM are scale-invariant given the range), and
    it lets MRI's per-superpatch ranges pool into one PSNR.

    Args:
        data_range: Intensity range of the images; ``None`` (default) = from the modality given to
            :meth:`update`: 1.0 for CT windowed to [0, 1], each target superpatch's max − min for MRI.

    Example:
        >>> metrics = ReconstructionMetrics()
        >>> image = torch.rand(2, 1, 16, 16, 16)
        >>> metrics.update(image, image, mask=torch.rand(2, 1, 16, 16, 16) > 0.5)
        >>> sorted(metrics.compute())
        ['psnr', 'psnr_masked', 'ssim', 'ssim_masked']
    """

    def __init__(self, data_range: float | None = None) -> None:
        super().__init__()
        self.data_range = check_data_range(data_range)
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.psnr_masked = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = MeanMetric()
        self.ssim_masked = MeanMetric()

    @torch.no_grad()
    def update(self, reconstruction: Tensor, target: Tensor, mask: Tensor | None = None,
               modality: Modality = "ct") -> None:
        """Adds a batch (B, C, X, Y, Z); ``mask`` is a boolean voxel mask (True = was hidden); ``modality``
        of the inputs decides the data range when none was fixed."""
        reconstruction, target = normalise_intensities(reconstruction, target, self.data_range, modality)
        self.psnr.update(reconstruction, target)
        ssim_map = ssim_map_3d(reconstruction, target, data_range=1.0, sigma=1.5)  # torchmetrics' map, ~5x faster
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
