"""MAESIL: masked-autoencoder pretraining of a 3D ViT on superpatches with dual masking.

Each training superpatch (default 128³ voxels, 8³ patches → 16³ tokens) is masked with one of three
token masks (see :mod:`maesil.models.masking`):

* ``dual`` (default): an in-plane *tube* mask shared by every axial slice, then a further per-slice
  *axial* mask over the remaining visible tokens. With ratios r₁ and r₂ the masked fraction is
  1 − (1 − r₁)(1 − r₂); the default r₁ = r₂ = 0.5 hides 75 %.
* ``tube``: the in-plane mask alone; ``random``: MAE's uniform token mask.

The loss is the MSE over masked patches only. Validation reconstructs every superpatch of the held-out
volumes with masks drawn from a fixed seed (identical across epochs and runs, so curves compare), and logs
PSNR and 3D SSIM over the whole superpatch and over the masked voxels, plus a picture.

Intensities follow the DataModule's modality (:attr:`~maesil.methods.base.ReconstructionEvaluationHooks.data_modality`):
for CT, windowed to [0, 1], reconstructions are clamped to [0, 1] and scored with range 1; for z-normalised
MRI they are not clamped, the range is each superpatch's own (or ``metric_data_range``), and pictures
show the input's 1st–99th percentile.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from maesil.checkpoints.layouts import TransferLayout, any_key_starts_with
from maesil.evaluation.figures import display_range, masked_reconstruction_figure
from maesil.evaluation.metrics import ReconstructionMetrics
from maesil.methods.arguments import renamed_argument, superpatch_argument
from maesil.methods.base import MethodModule, ReconstructionEvaluationHooks
from maesil.models.mae import MAEOutput, MaskedAutoencoder3D, patch_stats
from maesil.models.parameters import count_parameters
from maesil.models.masking import MaskingMode, TokenMask, expected_mask_ratio, make_mask
from maesil.models.vit3d import patchify, unpatchify
from maesil.optim import OptimizerFactory, SchedulerFactory, adamw, warmup_cosine


class MAESIL(ReconstructionEvaluationHooks, MethodModule):
    """3D ViT masked autoencoder with tube, dual or random masking.

    Args:
        superpatch_size: Superpatch the model is built for, the DataModule's ``superpatch_size`` (the CLI sets
            it from ``data.init_args.superpatch_size``); None: 128.
        token_size: Side of a cubic ViT token (patch embedding) in voxels; None: 8.
        in_channels: Image channels.
        embed_dim: Encoder width.
        depth: Encoder transformer blocks.
        num_heads: Encoder attention heads.
        mlp_ratio: Hidden width of the transformer MLPs relative to their input.
        decoder_embed_dim: Decoder width.
        decoder_depth: Decoder transformer blocks.
        decoder_num_heads: Decoder attention heads.
        norm_pix_loss: Regress per-patch normalised voxels (MAE's option) instead of raw intensities.
        decoder_local_mixing: A depthwise 3×3×3 convolution of the decoder's tokens on their grid before each
            decoder block (:class:`~maesil.models.mae.MaskedAutoencoder3D`): the decoder reads neighbouring tokens
            from the first step instead of learning locality from data. Pretraining-only; the encoder is unchanged.
        visible_loss_weight: Weight of the visible patches' MSE added to the masked patches' loss; 0 (default) is
            MAE's loss. A positive weight teaches the decoder to reproduce visible patches too, which the
            masking-off ``paper`` protocol of ``benchmark-recon`` scores (docs/methods.md).
        masking: ``dual``, ``tube`` or ``random``.
        mask_ratio: Masked fraction of the first mask (the in-plane tube mask for ``dual``/``tube``).
        axial_mask_ratio: ``dual`` only: masked fraction of each slice's remaining visible tokens;
            None uses ``mask_ratio``.
        val_mask_seed: Seed of the validation masks, so every epoch and run sees the same masks.
        metric_data_range: Intensity range for PSNR/SSIM; None (default) follows the data: 1.0 for CT
            windowed to [0, 1], each superpatch's own max − min for z-normalised MRI
            (:class:`~maesil.evaluation.metrics.ReconstructionMetrics`).
        optimizer: Optimizer factory (default AdamW lr 1.5e-4, betas (0.9, 0.95), wd 0.05).
        scheduler: ``(optimizer, total_steps)`` → schedule (default warm-up + cosine).
        pretrained: continued pretraining: a checkpoint or export whose encoder (and decoder, where this method
            trains one) initialises this network at the start of ``fit`` (any format ``load_pretrained`` reads,
            nnssl and MONAI included); not when resuming with ``--ckpt_path``.
        img_size: Deprecated name of ``superpatch_size`` (older YAMLs and checkpoints).
        patch_size: Deprecated name of ``token_size``.
    """

    accepted_tasks = ("reconstruct",)

    #: The ViT encoder transfers (to UNETR); the MAE decoder is pretraining-only.
    transfer_layout: ClassVar[TransferLayout | None] = TransferLayout(
        prefixes={"net.encoder.": "encoder."},
        network="vit",
        recognise=lambda state: any_key_starts_with(state, "net.encoder.patch_embed."),
    )

    def __init__(
        self,
        superpatch_size: int | tuple[int, int, int] | None = None,
        token_size: int | None = None,
        in_channels: int = 1,
        embed_dim: int = 768,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 384,
        decoder_depth: int = 4,
        decoder_num_heads: int = 8,
        norm_pix_loss: bool = False,
        decoder_local_mixing: bool = False,
        visible_loss_weight: float = 0.0,
        masking: MaskingMode = "dual",
        mask_ratio: float = 0.5,
        axial_mask_ratio: float | None = None,
        val_mask_seed: int = 0,
        metric_data_range: float | None = None,
        optimizer: OptimizerFactory = adamw,
        scheduler: SchedulerFactory | None = warmup_cosine,
        pretrained: str | None = None,
        img_size: int | tuple[int, int, int] | None = None,
        patch_size: int | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler)
        superpatch_size = superpatch_argument(type(self).__name__, superpatch_size, img_size, default=128)
        token_size = renamed_argument(type(self).__name__, "token_size", token_size, "patch_size", patch_size,
                                      default=8, yaml_key="model.init_args.token_size")
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "img_size", "patch_size"])
        # Under LightningCLI the hyperparameters are the parsed config: store the resolved values, under their new names.
        self.hparams.update(superpatch_size=superpatch_size, token_size=token_size)
        self.net = MaskedAutoencoder3D(
            superpatch_size,
            token_size=token_size,
            in_channels=in_channels,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            norm_pix_loss=norm_pix_loss,
            decoder_local_mixing=decoder_local_mixing,
            visible_loss_weight=visible_loss_weight,
        )
        self.masking = masking
        self.mask_ratio = mask_ratio
        self.axial_mask_ratio = axial_mask_ratio if masking == "dual" else None
        self.token_size = int(token_size)
        self.superpatch_size = tuple(self.net.encoder.superpatch_size)
        self.grid = tuple(self.net.encoder.grid)
        # Validates the ratios now rather than at the first step.
        self.effective_mask_ratio = expected_mask_ratio(masking, self.grid, mask_ratio, self.axial_mask_ratio)
        self.val_mask_seed = val_mask_seed
        self.val_metrics = ReconstructionMetrics(data_range=metric_data_range)
        self._figure_candidate: tuple[float, dict] | None = None

    def draw_mask(self, batch_size: int, generator: torch.Generator | None = None) -> TokenMask:
        """A token mask for a batch, drawn with the configured mode and ratios.

        Without a generator the mask is drawn directly on the model's device (no host-to-device copy
        per step); a seeded generator lives on the CPU, so those masks are drawn there and moved.
        """
        device = self.device if generator is None else None
        mask = make_mask(
            self.masking, batch_size, self.grid, self.mask_ratio, self.axial_mask_ratio,
            generator=generator, device=device,
        )  # fmt: skip
        return mask.to(self.device)

    def forward(self, images: Tensor, mask: TokenMask | None = None) -> MAEOutput:
        return self.net(images, mask if mask is not None else self.draw_mask(images.shape[0]))

    def describe(self) -> str:
        return (f"MAESIL: {count_parameters(self.net) / 1e6:.2f} M parameters, input {self.superpatch_size}, "
                f"{self.net.encoder.num_tokens} tokens, {self.masking} masking, masked fraction "
                f"{self.effective_mask_ratio:.3f}")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["image"]
        output = self(images)
        self.log("train/loss", output.loss, prog_bar=True, batch_size=images.shape[0])
        return output.loss

    def voxel_mask(self, mask: TokenMask, channels: int) -> Tensor:
        """Token mask (B, N) → boolean voxel mask (B, channels, X, Y, Z)."""
        token_voxels = channels * self.token_size**3
        tokens = mask.mask[..., None].expand(-1, -1, token_voxels).float()
        return unpatchify(tokens, self.token_size, self.grid, channels) > 0.5

    def validation_mask(self, batch: dict) -> TokenMask:
        """Masks seeded by each superpatch's subject and location (:meth:`validation_generators`)."""
        masks = [self.draw_mask(1, generator) for generator in self.validation_generators(batch)]
        return TokenMask(
            ids_keep=torch.cat([m.ids_keep for m in masks]),
            ids_restore=torch.cat([m.ids_restore for m in masks]),
            mask=torch.cat([m.mask for m in masks]),
        )

    @torch.no_grad()
    def reconstruct_for_evaluation(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Masked reconstruction with the validation masks (seeded by subject and location): visible
        patches copied from the input, masked ones predicted (clamped to [0, 1] for CT only); the mask
        marks the predicted voxels."""
        images = batch["image"]
        output = self(images, self.validation_mask(batch))
        reconstruction = self.clamp_reconstruction(self.net.reconstruct(images, output))
        return reconstruction, self.voxel_mask(output.mask, images.shape[1])

    def visible_mask(self, batch_size: int) -> TokenMask:
        """A mask that hides nothing: every token visible, in grid order."""
        n = self.net.encoder.num_tokens
        ids = torch.arange(n, device=self.device).expand(batch_size, n)
        return TokenMask(ids_keep=ids, ids_restore=ids, mask=torch.zeros(batch_size, n, dtype=torch.bool,
                                                                          device=self.device))

    @torch.no_grad()
    def reconstruct_unmasked(self, batch: dict) -> Tensor:
        """Masking off (``benchmark-recon --protocol paper``): the encoder sees every token, the decoder predicts
        every token, and the prediction is returned un-patchified, nothing pasted back from the input (clamped to
        [0, 1] for CT only). With ``norm_pix_loss`` the patches are de-normalised with the input's per-patch mean
        and std, as :meth:`~maesil.models.mae.MaskedAutoencoder3D.reconstruct` does."""
        images = batch["image"]
        output = self(images, self.visible_mask(images.shape[0]))
        prediction = output.pred
        if self.net.norm_pix_loss:
            mean, std = patch_stats(patchify(images, self.token_size).to(prediction.dtype))
            prediction = prediction * std + mean
        reconstruction = unpatchify(prediction.to(images.dtype), self.token_size, self.grid, images.shape[1])
        return self.clamp_reconstruction(reconstruction)

    def _evaluation_step(self, batch: dict, stage: str) -> None:
        images = batch["image"]
        output = self(images, self.validation_mask(batch))
        reconstruction = self.clamp_reconstruction(self.net.reconstruct(images, output))
        voxel_mask = self.voxel_mask(output.mask, images.shape[1])
        self.val_metrics.update(reconstruction, images, voxel_mask, modality=self.data_modality)
        self.score_reference_fills(images, voxel_mask)
        self.log(f"{stage}/loss", output.loss, batch_size=images.shape[0], sync_dist=True)
        self.keep_figure_candidate(batch, mask=voxel_mask, reconstruction=reconstruction)

    def _log_reconstruction(self, image: Tensor, mask: Tensor, reconstruction: Tensor, subject: str) -> None:
        figure = masked_reconstruction_figure(
            image.numpy(), mask.numpy(), reconstruction.numpy(),
            title=f"{subject} · step {self.global_step} · {self.masking} mask {self.effective_mask_ratio:.0%}",
            value_range=display_range(image.numpy(), self.data_modality),
        )
        self.log_figure("reconstructions", figure)

    @torch.no_grad()
    def probe_features(self, images: Tensor) -> Tensor:
        """Frozen encoder features for a probe (:class:`maesil.probing.LinearProbe`): the ViT encoder's output
        tokens with every token visible (no mask, as :meth:`reconstruct_unmasked`), on the token grid,
        ``(B, embed_dim, X / token_size, Y / token_size, Z / token_size)``."""
        from maesil.evaluation.probe import token_feature_map

        grid = [edge // self.token_size for edge in images.shape[2:]]
        return token_feature_map(self.net.encoder(images), grid)
