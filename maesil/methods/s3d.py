"""S3D: sparse masked-autoencoder pretraining of a residual-encoder 3D U-Net (Wald et al., CVPR 2025; nnssl).

Each training batch draws one mask ratio from U(``mask_ratio_range``) (default U(0.6, 0.9), the paper's) or
uses the fixed ``mask_ratio`` when the range is None; every superpatch then hides exactly
``round(ratio · cells)`` cubic cells of ``mask_block_size`` voxels (16³ in the paper). The sparse ResEnc
encoder sees only the visible cells, mask tokens fill the rest of every stage's features, a densify conv per
stage and the dense decoder predict the intensities, and the loss is the MSE over masked voxels (see
:mod:`maesil.models.sparse`). ``sparse: false`` trains the plain zero-fill MAE with the same network, for the
ablation.

Optimisation follows the paper by default: SGD with Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5 and
nnU-Net's poly schedule ``(1 − step / total)^0.9`` (:class:`maesil.optim.PolyLR`); AdamW (or any torch
optimizer) is selected in YAML like every other method's. Mask tokens, biases and norm weights get no
weight decay.

Validation and test reconstruct every held-out superpatch with masks seeded by subject and location
(``crc32("val_mask_seed:subject:location")``, as MAESIL), so every epoch, run and checkpoint is scored on the
same masks. The paper fixes no validation ratio; we use a fixed one, the middle of ``mask_ratio_range``
(0.75 for U(0.6, 0.9)) or ``mask_ratio`` when no range is set, so that scores do not fluctuate with the
ratio drawn. They log ``loss``, PSNR and 3D SSIM over the whole superpatch (visible voxels copied from the
input) and over the masked voxels, and a picture (input / masked input / reconstruction). Intensity
conventions follow the DataModule's modality, as MAESIL's: predictions are clamped to [0, 1] for windowed CT
only, the metric range is 1 for CT and each superpatch's own for z-normalised MRI (unless
``metric_data_range`` fixes it), and MRI pictures show the input's 1st–99th percentile.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from maesil.checkpoints.layouts import TransferLayout, any_key_starts_with
from maesil.evaluation.figures import display_range, masked_reconstruction_figure
from maesil.evaluation.metrics import ReconstructionMetrics
from maesil.methods.arguments import superpatch_argument, unet_overrides
from maesil.methods.base import MethodModule, ReconstructionEvaluationHooks
from maesil.models.parameters import count_parameters
from maesil.models.presets import from_preset
from maesil.models.sparse import (
    SparseMaskedUNet,
    block_mask,
    draw_mask_ratio,
    mask_grid,
    masked_cell_count,
    masked_mse,
    upsample_mask,
)
from maesil.models.unet import UNET_PRESETS
from maesil.optim import OptimizerFactory, PolyLR, SchedulerFactory
from maesil.shapes import as_triple

__all__ = ["S3D", "nesterov_sgd", "poly_lr"]


def nesterov_sgd(params: Iterable) -> Optimizer:
    """S3D's optimizer (as nnU-Net's): SGD, Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5."""
    return torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)


def poly_lr(optimizer: Optimizer, total_steps: int) -> LRScheduler:
    """S3D's schedule: nnU-Net's poly decay ``(1 − step / total)^0.9``, no warm-up."""
    return PolyLR(optimizer, total_steps, exponent=0.9, warmup_steps=0)


class S3D(ReconstructionEvaluationHooks, MethodModule):
    """Sparse masked image modelling with a ResEnc U-Net (see the module docstring).

    Args:
        unet_preset: preset of :data:`maesil.models.unet.UNET_PRESETS` (``resenc_l`` as the paper, ``cpu``,
            ``tiny``).
        features: per-stage widths overriding the preset.
        blocks_per_stage: residual blocks per encoder stage overriding the preset.
        strides: per-stage strides overriding the preset (the first must be 1).
        superpatch_size: superpatch the model is built for, the DataModule's ``superpatch_size`` (the CLI sets
            it from ``data.init_args.superpatch_size``), a multiple of ``mask_block_size`` and of the U-Net's total
            stride; None: 160.
        in_channels: image channels (also predicted).
        mask_block_size: side of a mask cell in voxels (paper: 16).
        mask_ratio: masked fraction of cells when ``mask_ratio_range`` is None.
        mask_ratio_range: ``(low, high)``: a ratio drawn from U(low, high) once per training batch (paper:
            (0.6, 0.9)); when set it wins over ``mask_ratio``.
        sparse: sparse encoder with mask tokens (S3D); False: the dense zero-fill MAE ablation.
        val_mask_seed: seed of the validation masks.
        metric_data_range: intensity range for PSNR/SSIM; None (default) follows the data: 1.0 for windowed CT,
            each superpatch's own max − min for z-normalised MRI.
        optimizer: optimizer factory (default :func:`nesterov_sgd`).
        scheduler: ``(optimizer, total_steps)`` → schedule (default :func:`poly_lr`), or None.
        pretrained: continued pretraining: a checkpoint or export whose encoder (and decoder, where this method
            trains one) initialises this network at the start of ``fit`` (any format ``load_pretrained`` reads,
            nnssl and MONAI included); not when resuming with ``--ckpt_path``.
        img_size: deprecated name of ``superpatch_size`` (older YAMLs and checkpoints).
    """

    accepted_tasks = ("reconstruct",)

    #: The encoder transfers, the decoder on request (``transfer_decoder``); the mask tokens and densify convs are
    #: pretraining-only (and recognise it).
    transfer_layout: ClassVar[TransferLayout | None] = TransferLayout(
        prefixes={"net.encoder.": "encoder.", "net.decoder.": "decoder."},
        network="resenc",
        recognise=lambda state: any_key_starts_with(state, "net.mask_tokens.", "net.densify."),
    )

    def __init__(
        self,
        unet_preset: str = "resenc_l",
        features: Sequence[int] | None = None,
        blocks_per_stage: Sequence[int] | None = None,
        strides: Sequence[int] | None = None,
        superpatch_size: int | tuple[int, int, int] | None = None,
        in_channels: int = 1,
        mask_block_size: int = 16,
        mask_ratio: float = 0.75,
        mask_ratio_range: tuple[float, float] | None = (0.6, 0.9),
        sparse: bool = True,
        val_mask_seed: int = 0,
        metric_data_range: float | None = None,
        optimizer: OptimizerFactory = nesterov_sgd,
        scheduler: SchedulerFactory | None = poly_lr,
        pretrained: str | None = None,
        img_size: int | tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler)
        superpatch_size = superpatch_argument(type(self).__name__, superpatch_size, img_size, default=160)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "img_size"])
        # Under LightningCLI the hyperparameters are the parsed config: store the resolved value, under its new name.
        self.hparams.update(superpatch_size=superpatch_size)
        if unet_preset not in UNET_PRESETS:
            raise ValueError(f"unknown U-Net preset {unet_preset!r}; choose from {sorted(UNET_PRESETS)}.")
        self.net = from_preset(SparseMaskedUNet, UNET_PRESETS, unet_preset, in_channels=in_channels,
                               block_size=mask_block_size, sparse=sparse,
                               **unet_overrides(features, blocks_per_stage, strides))
        self.superpatch_size = as_triple(superpatch_size, "superpatch_size")
        self.in_channels = in_channels
        self.block_size = self.net.block_size
        self.grid = mask_grid(self.superpatch_size, self.block_size)
        # Fails now on a size the U-Net cannot take (stride multiple, > 1 voxel at the deepest stage).
        self.net.check_input(torch.empty(1, in_channels, *self.superpatch_size, device="meta"))

        if mask_ratio_range is not None:
            low, high = (float(v) for v in mask_ratio_range)
            if not 0.0 < low <= high < 1.0:
                raise ValueError(f"mask_ratio_range must satisfy 0 < low <= high < 1, got {tuple(mask_ratio_range)}.")
            self.mask_ratio_range: tuple[float, float] | None = (low, high)
            self.val_mask_ratio = (low + high) / 2
            ratios = (low, high, self.val_mask_ratio)
        else:
            self.mask_ratio_range = None
            self.val_mask_ratio = float(mask_ratio)
            ratios = (self.val_mask_ratio,)
        for ratio in ratios:
            masked_cell_count(self.grid, ratio)  # ValueError when a ratio hides no or every cell of the superpatch
        self.mask_ratio = float(mask_ratio)
        self.sparse = bool(sparse)
        self.val_mask_seed = val_mask_seed
        self.val_metrics = ReconstructionMetrics(data_range=metric_data_range)
        self._figure_candidate: tuple[float, dict] | None = None

    def describe(self) -> str:
        """One line: parameters, input, masking, variant (printed at fit start)."""
        count = count_parameters(self.net)
        ratio = (f"U({self.mask_ratio_range[0]:g}, {self.mask_ratio_range[1]:g}) per batch"
                 if self.mask_ratio_range is not None else f"{self.mask_ratio:g}")  # fmt: skip
        variant = "sparse encoder + mask tokens" if self.sparse else "dense zero-fill (sparse: false)"
        return (
            f"S3D: {count / 1e6:.2f} M parameters, input {self.superpatch_size}, {self.block_size}³ mask blocks "
            f"(grid {self.grid}), mask ratio {ratio}, validation {self.val_mask_ratio:g}, {variant}"
        )

    def draw_mask(
        self, batch_size: int, spatial_shape: Sequence[int] | None = None, ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:  # fmt: skip
        """A cell mask ``(B, 1, gx, gy, gz)`` (True = masked) for inputs of ``spatial_shape`` (default
        ``superpatch_size``), with ``ratio`` (default: drawn as configured).

        Without a generator it is drawn on the model's device; a seeded generator draws on the CPU.
        """
        grid = mask_grid(spatial_shape if spatial_shape is not None else self.superpatch_size, self.block_size)
        if ratio is None:
            ratio = draw_mask_ratio(self.mask_ratio, self.mask_ratio_range)
        device = self.device if generator is None else None
        return block_mask(batch_size, grid, ratio, generator=generator, device=device).to(self.device)

    def voxel_mask(self, mask: Tensor, channels: int = 1) -> Tensor:
        """Cell mask ``(B, 1, gx, gy, gz)`` → boolean voxel mask ``(B, channels, X, Y, Z)``."""
        voxels = upsample_mask(mask, self.block_size)
        return voxels.expand(-1, channels, -1, -1, -1).contiguous()

    def loss(self, prediction: Tensor, images: Tensor, mask: Tensor) -> Tensor:
        """MSE over the masked voxels only (the cell ``mask`` upsampled to voxels)."""
        return masked_mse(prediction, images, upsample_mask(mask, self.block_size))

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        """Predicted intensities of every voxel, ``(B, C, X, Y, Z)``, from the cells visible in ``mask``."""
        return self.net(images, mask)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["image"]
        ratio = draw_mask_ratio(self.mask_ratio, self.mask_ratio_range)
        mask = self.draw_mask(images.shape[0], images.shape[2:], ratio)
        loss = self.loss(self(images, mask), images, mask)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        self.log("train/mask_ratio", ratio, batch_size=images.shape[0])
        return loss

    def validation_mask(self, batch: dict) -> Tensor:
        """Cell masks at ``val_mask_ratio`` seeded by each superpatch's subject and location
        (:meth:`validation_generators`, as MAESIL's)."""
        shape = batch["image"].shape[2:]
        return torch.cat([self.draw_mask(1, shape, self.val_mask_ratio, generator)
                          for generator in self.validation_generators(batch)])

    def masked_reconstruction(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """``(reconstruction, hidden voxel mask, loss)`` with the validation masks; the reconstruction is the
        prediction on hidden voxels (clamped to [0, 1] for windowed CT only, as MAESIL) and the input elsewhere."""
        images = batch["image"]
        mask = self.validation_mask(batch)
        prediction = self(images, mask)
        hidden = self.voxel_mask(mask, images.shape[1])
        reconstruction = torch.where(hidden, self.clamp_reconstruction(prediction).to(images.dtype), images)
        return reconstruction, hidden, self.loss(prediction, images, mask)

    @torch.no_grad()
    def reconstruct_for_evaluation(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Masked reconstruction with the validation masks (seeded by subject and location): visible voxels
        copied from the input, hidden ones predicted; the mask (B, C, X, Y, Z) marks the predicted voxels."""
        reconstruction, hidden, _ = self.masked_reconstruction(batch)
        return reconstruction, hidden

    @torch.no_grad()
    def reconstruct_unmasked(self, batch: dict) -> Tensor:
        """Masking off (``benchmark-recon --protocol paper``): the network's prediction of every voxel from an
        all-visible cell mask, nothing pasted back from the input (clamped to [0, 1] for CT only)."""
        images = batch["image"]
        grid = mask_grid(images.shape[2:], self.block_size)
        mask = torch.zeros(images.shape[0], 1, *grid, dtype=torch.bool, device=images.device)
        return self.clamp_reconstruction(self(images, mask)).to(images.dtype)

    def _evaluation_step(self, batch: dict, stage: str) -> None:
        images = batch["image"]
        reconstruction, hidden, loss = self.masked_reconstruction(batch)
        self.val_metrics.update(reconstruction, images, hidden, modality=self.data_modality)
        self.score_reference_fills(images, hidden)
        self.log(f"{stage}/loss", loss, batch_size=images.shape[0], sync_dist=True)
        self.keep_figure_candidate(batch, mask=hidden, reconstruction=reconstruction)

    def _log_reconstruction(self, image: Tensor, mask: Tensor, reconstruction: Tensor, subject: str) -> None:
        variant = "sparse" if self.sparse else "zero-fill"
        figure = masked_reconstruction_figure(
            image.numpy(), mask.numpy(), reconstruction.numpy(),
            title=f"{subject} · step {self.global_step} · S3D {variant}, {self.block_size}³ blocks, "
            f"mask {self.val_mask_ratio:.0%}",
            value_range=display_range(image.numpy(), self.data_modality),
        )
        self.log_figure("reconstructions", figure)

    @torch.no_grad()
    def probe_features(self, images: Tensor) -> Tensor:
        """Frozen encoder features for a probe (:class:`maesil.probing.LinearProbe`): the encoder run densely, every
        cell visible (``net.encoder``, the weights fine-tuning loads), its middle stage and its deepest upsampled
        to it (:func:`~maesil.evaluation.probe.mid_and_deepest`), ``(B, C_mid + C_deep, x, y, z)``."""
        from maesil.evaluation.probe import mid_and_deepest

        return mid_and_deepest(self.net.encode(images))
