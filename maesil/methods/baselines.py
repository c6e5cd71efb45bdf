"""Reconstruction baselines for MAESIL: autoencoder (AE), variational autoencoder (VAE) and VQ-VAE.

Each baseline trains MONAI's reference network (built by :mod:`maesil.models.autoencoders`) to
reconstruct the whole superpatch through a bottleneck, on the same DataModule and with the same
optimisation plumbing as MAESIL. Validation and test log what MAESIL logs over whole superpatches
(``val/loss``, ``val/psnr``, ``val/ssim``; nothing is masked, so there are no ``*_masked`` entries) and
save a picture of input, reconstruction and absolute difference. As for MAESIL, the intensity conventions
follow the DataModule's modality: reconstructions are clamped to [0, 1] for windowed CT only, the metric
range is 1 for CT and each superpatch's own for z-normalised MRI (unless ``metric_data_range`` fixes it),
and MRI pictures show the input's 1st–99th percentile.

Losses, logged as ``train/<name>`` (``loss`` is the total):

* AE: ``recon`` (MSE or L1 over voxels).
* VAE: ``recon`` + w(step) · ``kl`` / voxels, with ``kl`` the KL divergence of the posterior from
  N(0, I) in nats per superpatch (summed over latent dimensions). Dividing by the voxels of a
  superpatch keeps ``kl_weight`` independent of the superpatch size; w rises linearly from 0 to
  ``kl_weight`` over ``kl_warmup_steps`` (see :meth:`VAE.kl_weight_at`). Evaluation decodes the
  posterior mean, without sampling.
* VQ-VAE: ``recon`` + ``quantization`` (MONAI's commitment loss, ``commitment_cost`` · ‖z − sg(e)‖²);
  the codebook follows the encoder by moving averages. Training also logs the batch ``perplexity`` and
  ``codes_restarted``. Validation logs ``codebook_usage`` (fraction of the codebook used over the
  epoch), ``codes_used`` and ``perplexity`` (exp of the entropy of code usage) and warns with
  :class:`CodebookCollapseWarning` when usage < :data:`MIN_CODEBOOK_USAGE` (10 %) or perplexity <
  :data:`MIN_CODEBOOK_PERPLEXITY` (2).

MONAI's EMA quantizer, trained as is, collapses onto a handful of codes within a few steps: its moving
averages start at zero, so every code missing from the first batch is divided by ~epsilon and thrown
far from the data, and its random codebook lies far from the encoder outputs anyway. :class:`VQVAE`
therefore starts every code's moving-average count at one, initialises the codebook from encoder
outputs of the first training batch, and moves codes that fall out of use back onto the data (dead-code
restarts); each can be turned off in YAML.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from maesil.checkpoints.layouts import TransferLayout, any_key_starts_with
from maesil.evaluation.figures import display_range, volume_panels_figure
from maesil.evaluation.metrics import ReconstructionMetrics
from maesil.methods.arguments import superpatch_argument
from maesil.methods.base import MethodModule, ReconstructionEvaluationHooks
from maesil.models.autoencoders import ae_latent_shape, build_ae, build_vae, build_vqvae, vqvae_code_grid
from maesil.models.parameters import count_parameters
from maesil.optim import OptimizerFactory, SchedulerFactory, adamw, warmup_cosine
from maesil.shapes import as_triple
from maesil.trainer_attachment import attached_trainer

ReconstructionLoss = Literal["mse", "l1"]

#: A VQ-VAE codebook counts as collapsed when a validation epoch uses fewer than this fraction of its codes…
MIN_CODEBOOK_USAGE = 0.10
#: …or when the perplexity of code usage (the effective number of codes in use) is below this.
MIN_CODEBOOK_PERPLEXITY = 2.0


@dataclass
class AutoencoderOutput:
    """One forward pass of a baseline.

    Attributes:
        reconstruction: The network output, (B, C, X, Y, Z) like the input (not clamped).
        losses: ``"loss"`` (the total to minimise) and its components, scalar tensors.
        codes: VQ-VAE code indices (B, x, y, z); None for the other baselines.
    """

    reconstruction: Tensor
    losses: dict[str, Tensor]
    codes: Tensor | None = None


class _AutoencoderModule(ReconstructionEvaluationHooks, MethodModule):
    """Training, validation, pictures and ``reconstruct_for_evaluation`` shared by the baselines.

    Subclasses build ``self.net`` and implement :meth:`forward`, returning an :class:`AutoencoderOutput`.

    Args:
        superpatch_size: Superpatch the network is built for (the DataModule's ``superpatch_size``).
        in_channels: Image channels.
        loss: Reconstruction loss over voxels, ``mse`` or ``l1``.
        metric_data_range: Intensity range for PSNR/SSIM; None follows the data (1.0 for windowed CT, each
            superpatch's own max − min for z-normalised MRI).
        optimizer: Optimizer factory.
        scheduler: ``(optimizer, total_steps)`` → schedule, or None.
    """

    progress_metric = "psnr"  # autoencoders see every voxel: no masked region
    accepted_tasks = ("reconstruct",)

    net: nn.Module

    def __init__(
        self,
        superpatch_size: int | tuple[int, int, int],
        in_channels: int,
        loss: ReconstructionLoss,
        metric_data_range: float | None,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None,
    ) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler)
        if loss not in ("mse", "l1"):
            raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
        self.superpatch_size = as_triple(superpatch_size, "superpatch_size")
        self.in_channels = in_channels
        self.loss_name = loss
        self.val_metrics = ReconstructionMetrics(data_range=metric_data_range)
        self._figure_candidate: tuple[float, dict] | None = None

    def forward(self, images: Tensor, deterministic: bool = False) -> AutoencoderOutput:
        """Reconstructs ``images``; ``deterministic`` disables sampling and codebook updates (evaluation)."""
        raise NotImplementedError

    def latent_description(self) -> str:
        """What one superpatch is compressed to, for the message at fit start."""
        raise NotImplementedError

    def reconstruction_loss(self, reconstruction: Tensor, images: Tensor) -> Tensor:
        """Mean voxel-wise MSE or L1, computed in float32."""
        loss_fn = F.mse_loss if self.loss_name == "mse" else F.l1_loss
        return loss_fn(reconstruction.float(), images.float())

    @property
    def voxels_per_sample(self) -> int:
        """Values in one input superpatch (channels × X × Y × Z)."""
        return self.in_channels * math.prod(self.superpatch_size)

    def describe(self) -> str:
        return (f"{type(self).__name__}: {count_parameters(self.net) / 1e6:.2f} M parameters, "
                f"input {self.superpatch_size}, latent {self.latent_description()}")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["image"]
        output = self(images)
        for name, value in output.losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=images.shape[0])
        return output.losses["loss"]

    @torch.no_grad()
    def reconstruct_for_evaluation(self, batch: dict) -> tuple[Tensor, None]:
        """Deterministic reconstruction of the whole superpatch (clamped to [0, 1] for windowed CT only);
        nothing is hidden."""
        output = self(batch["image"], deterministic=True)
        return self.clamp_reconstruction(output.reconstruction), None

    # Validation and test ----------------------------------------------------------------------

    def _evaluation_step(self, batch: dict, stage: str) -> AutoencoderOutput:
        images = batch["image"]
        output = self(images, deterministic=True)
        reconstruction = self.clamp_reconstruction(output.reconstruction)
        self.val_metrics.update(reconstruction, images, modality=self.data_modality)
        for name, value in output.losses.items():
            self.log(f"{stage}/{name}", value, batch_size=images.shape[0], sync_dist=True)
        self.keep_figure_candidate(batch, reconstruction=reconstruction)
        return output

    def _log_reconstruction(self, image: Tensor, reconstruction: Tensor, subject: str) -> None:
        low, high = display_range(image.numpy(), self.data_modality)
        figure = volume_panels_figure(
            {
                "input": image.numpy(),
                "reconstruction": reconstruction.numpy(),
                "|difference|": (reconstruction - image).abs().numpy(),
            },
            title=f"{type(self).__name__} · {subject} · step {self.global_step}",
            value_range=(low, high),
            row_ranges={"|difference|": (0.0, high - low)},
        )
        self.log_figure("reconstructions", figure)

    @torch.no_grad()
    def probe_features(self, images: Tensor) -> Tensor:
        """Frozen encoder features for a probe (:class:`maesil.probing.LinearProbe`): the outputs of the levels of
        MONAI's ``encode`` (AE, VAE: the last is the bottleneck before the VAE's linear layers), the middle one and
        the deepest upsampled to it (:func:`~maesil.evaluation.probe.mid_and_deepest`), ``(B, C_mid + C_deep, x, y,
        z)``."""
        from maesil.evaluation.probe import mid_and_deepest, stage_outputs

        return mid_and_deepest(stage_outputs(self.net.encode, images))


class AE(_AutoencoderModule):
    """Convolutional autoencoder baseline (MONAI ``AutoEncoder``), trained to reconstruct whole superpatches.

    The latent is ``channels[-1]`` × (superpatch_size / prod(strides))³; the defaults (the "paper" preset of
    :data:`maesil.models.autoencoders.AUTOENCODER_PRESETS`, 51.2 M parameters) give 64 × 8³ for 128³
    superpatches, 64× fewer values than voxels.

    Args:
        superpatch_size: Superpatch the network is built for, the DataModule's ``superpatch_size`` (the CLI sets
            it from ``data.init_args.superpatch_size``; None: 128), a multiple of prod(strides).
        in_channels: Image channels.
        channels: Output channels of each encoder level (the decoder mirrors them).
        strides: Stride of each encoder level; the last level (stride 1, few channels) is the bottleneck.
        num_res_units: Residual sub-units per level (0: plain convolutions).
        loss: ``mse`` or ``l1``.
        metric_data_range: Intensity range for PSNR/SSIM; None (default) follows the data (1.0 for CT, each
            superpatch's own max − min for MRI).
        optimizer: Optimizer factory (default AdamW).
        scheduler: ``(optimizer, total_steps)`` → schedule (default warm-up + cosine).
        img_size: Deprecated name of ``superpatch_size`` (older YAMLs and checkpoints).
    """

    #: Nothing transfers (a MONAI network, no U-Net or ViT encoder); the layout names AE checkpoints in errors.
    transfer_layout: ClassVar[TransferLayout | None] = TransferLayout(
        prefixes={},
        network="none",
        recognise=lambda state: any_key_starts_with(state, "net.encode.") and not any_key_starts_with(state, "net.mu."),
    )

    def __init__(
        self,
        superpatch_size: int | tuple[int, int, int] | None = None,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 128, 320, 640, 64),
        strides: Sequence[int] = (2, 2, 2, 2, 1),
        num_res_units: int = 2,
        loss: ReconstructionLoss = "mse",
        metric_data_range: float | None = None,
        optimizer: OptimizerFactory = adamw,
        scheduler: SchedulerFactory | None = warmup_cosine,
        img_size: int | tuple[int, int, int] | None = None,
    ) -> None:
        superpatch_size = superpatch_argument(type(self).__name__, superpatch_size, img_size, default=128)
        super().__init__(superpatch_size, in_channels, loss, metric_data_range, optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "img_size"])
        # Under LightningCLI the hyperparameters are the parsed config: store the resolved value, under its new name.
        self.hparams.update(superpatch_size=superpatch_size)
        self.net = build_ae(self.superpatch_size, in_channels, channels, strides, num_res_units)
        self.latent_shape = ae_latent_shape(self.superpatch_size, channels, strides)

    def latent_description(self) -> str:
        values = math.prod(self.latent_shape)
        return (
            f"{'×'.join(map(str, self.latent_shape))} = {values} values "
            f"({self.voxels_per_sample / values:.0f}× fewer than voxels)"
        )

    def forward(self, images: Tensor, deterministic: bool = False) -> AutoencoderOutput:
        reconstruction = self.net(images)
        recon = self.reconstruction_loss(reconstruction, images)
        return AutoencoderOutput(reconstruction, {"loss": recon, "recon": recon})


class VAE(_AutoencoderModule):
    """Variational autoencoder baseline (MONAI ``VarAutoEncoder``) with a linearly warmed-up KL weight.

    Loss: ``recon + kl_weight_at(step) · KL / voxels`` (see the module docstring). The defaults (the
    "paper" preset, 50.4 M parameters) encode a 128³ superpatch into a 2 048-dimensional Gaussian.

    Args:
        superpatch_size: Superpatch the network is built for, the DataModule's ``superpatch_size`` (the CLI sets
            it from ``data.init_args.superpatch_size``; None: 128), a multiple of prod(strides).
        in_channels: Image channels.
        channels: Output channels of each encoder level (the decoder mirrors them).
        strides: Stride of each encoder level.
        num_res_units: Residual sub-units per level (0: plain convolutions).
        latent_size: Dimensions of the latent Gaussian.
        kl_weight: Final weight of the per-voxel KL term (β of a per-voxel β-VAE objective; for MSE it
            plays the role of 2σ² of a Gaussian decoder with noise σ).
        kl_warmup_steps: Optimizer steps over which the KL weight rises linearly from 0 (0: no warm-up).
        loss: ``mse`` or ``l1``.
        metric_data_range: Intensity range for PSNR/SSIM; None (default) follows the data (1.0 for CT, each
            superpatch's own max − min for MRI).
        optimizer: Optimizer factory (default AdamW).
        scheduler: ``(optimizer, total_steps)`` → schedule (default warm-up + cosine).
        img_size: Deprecated name of ``superpatch_size`` (older YAMLs and checkpoints).
    """

    #: Nothing transfers (a MONAI network, no U-Net or ViT encoder); the layout names VAE checkpoints in errors.
    transfer_layout: ClassVar[TransferLayout | None] = TransferLayout(
        prefixes={},
        network="none",
        recognise=lambda state: any_key_starts_with(state, "net.encode.") and any_key_starts_with(state, "net.mu."),
    )

    def __init__(
        self,
        superpatch_size: int | tuple[int, int, int] | None = None,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 64, 128, 256, 512, 64),
        strides: Sequence[int] = (2, 2, 2, 2, 2, 1),
        num_res_units: int = 1,
        latent_size: int = 2048,
        kl_weight: float = 1.0e-3,
        kl_warmup_steps: int = 10000,
        loss: ReconstructionLoss = "mse",
        metric_data_range: float | None = None,
        optimizer: OptimizerFactory = adamw,
        scheduler: SchedulerFactory | None = warmup_cosine,
        img_size: int | tuple[int, int, int] | None = None,
    ) -> None:
        superpatch_size = superpatch_argument(type(self).__name__, superpatch_size, img_size, default=128)
        super().__init__(superpatch_size, in_channels, loss, metric_data_range, optimizer, scheduler)
        if kl_weight < 0 or kl_warmup_steps < 0:
            raise ValueError(f"kl_weight and kl_warmup_steps must be >= 0, got {kl_weight}, {kl_warmup_steps}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "img_size"])
        # Under LightningCLI the hyperparameters are the parsed config: store the resolved value, under its new name.
        self.hparams.update(superpatch_size=superpatch_size)
        self.net = build_vae(self.superpatch_size, in_channels, channels, strides, num_res_units, latent_size)
        self.kl_weight = float(kl_weight)
        self.kl_warmup_steps = int(kl_warmup_steps)

    def latent_description(self) -> str:
        size = self.hparams.latent_size
        return f"Gaussian of {size} dimensions ({self.voxels_per_sample / size:.0f}× fewer than voxels)"

    def kl_weight_at(self, step: int) -> float:
        """KL weight after ``step`` optimizer steps: ``kl_weight · min(1, step / kl_warmup_steps)``."""
        if self.kl_warmup_steps <= 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, step / self.kl_warmup_steps)

    @staticmethod
    def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(mu, exp(logvar)) ‖ N(0, I)) in nats, summed over latent dimensions, averaged over the batch."""
        mu, logvar = mu.float(), logvar.float()
        return (-0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()

    def forward(self, images: Tensor, deterministic: bool = False) -> AutoencoderOutput:
        if deterministic or not self.training:
            mu, logvar = self.net.encode_forward(images)
            reconstruction = self.net.decode_forward(mu, self.net.use_sigmoid)  # posterior mean, no sampling
        else:
            reconstruction, mu, logvar, _ = self.net(images)  # reparameterised sample
        recon = self.reconstruction_loss(reconstruction, images)
        kl = self.kl_divergence(mu, logvar)
        weight = self.kl_weight_at(self.global_step)
        loss = recon + weight * kl / self.voxels_per_sample
        losses = {"loss": loss, "recon": recon, "kl": kl, "kl_weight": torch.tensor(weight, device=loss.device)}
        return AutoencoderOutput(reconstruction, losses)


class CodebookCollapseWarning(UserWarning):
    """A VQ-VAE uses only a small part of its codebook (see :func:`codebook_collapse_message`)."""


def codebook_statistics(counts: Tensor) -> dict[str, Tensor]:
    """Usage statistics of a histogram of code indices (one count per codebook entry).

    Returns:
        ``codebook_usage`` (fraction of codes used at least once), ``codes_used`` and ``perplexity``
        (exp of the entropy of the code frequencies: 1 when a single code is used, ``len(counts)`` when
        all are used equally).
    """
    counts = counts.detach().double()
    total = counts.sum()
    used = (counts > 0).sum()
    if total > 0:
        probs = counts[counts > 0] / total
        perplexity = torch.exp(-(probs * probs.log()).sum())
    else:
        perplexity = counts.new_zeros(())
    return {
        "codebook_usage": (used / counts.numel()).float(),
        "codes_used": used.float(),
        "perplexity": perplexity.float(),
    }


def codebook_collapse_message(
    usage: float,
    perplexity: float,
    num_embeddings: int,
    min_usage: float = MIN_CODEBOOK_USAGE,
    min_perplexity: float = MIN_CODEBOOK_PERPLEXITY,
) -> str | None:
    """A warning text when usage < ``min_usage`` or perplexity < ``min_perplexity``, else None."""
    if usage >= min_usage and perplexity >= min_perplexity:
        return None
    return (
        f"VQ-VAE codebook collapse: {usage:.1%} of {num_embeddings} codes used ({round(usage * num_embeddings)}), "
        f"perplexity {perplexity:.2f} (thresholds: usage {min_usage:.0%}, perplexity {min_perplexity:g}). "
        "Reconstructions draw on few codes; consider a smaller num_embeddings or embedding_dim, a lower "
        "ema_decay, or a higher commitment_cost."
    )


class CodebookUsage(Metric):
    """Histogram of the code indices seen over an epoch, summed across DDP processes."""

    full_state_update = False

    def __init__(self, num_embeddings: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.add_state("counts", default=torch.zeros(num_embeddings, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        self.counts += torch.bincount(codes.flatten().long(), minlength=self.num_embeddings)

    def compute(self) -> dict[str, Tensor]:
        return codebook_statistics(self.counts)


class VQVAE(_AutoencoderModule):
    """VQ-VAE baseline (MONAI ``VQVAE``: EMA codebook, commitment loss), with codebook monitoring.

    The defaults (the "paper" preset, 50.0 M parameters) turn a 128³ superpatch into 16³ indices into
    1 024 codes of 64 dimensions.

    Args:
        superpatch_size: Superpatch the network is built for, the DataModule's ``superpatch_size`` (the CLI sets
            it from ``data.init_args.superpatch_size``; None: 128), a multiple of 2^len(channels).
        in_channels: Image channels.
        channels: Channels of each level; every level halves the spatial size.
        num_res_layers: Residual layers per level.
        num_res_channels: Hidden channels of the residual layers, per level or one for all.
        num_embeddings: Codebook size.
        embedding_dim: Dimension of a code vector (channels of the quantized latent).
        commitment_cost: Weight of the commitment loss pulling encoder outputs towards their codes.
        ema_decay: Decay of the moving averages that update the codebook.
        init_codebook_from_data: Replace the random codebook by encoder outputs of the first training
            batch (drawn at random), so that codes start where the data lies instead of far from it.
        dead_code_threshold: A code whose moving-average use count (code positions per training step)
            falls below this is moved onto a random encoder output of the current batch; 0 disables it.
        loss: ``mse`` or ``l1``.
        metric_data_range: Intensity range for PSNR/SSIM; None (default) follows the data (1.0 for CT, each
            superpatch's own max − min for MRI).
        optimizer: Optimizer factory (default AdamW).
        scheduler: ``(optimizer, total_steps)`` → schedule (default warm-up + cosine).
        img_size: Deprecated name of ``superpatch_size`` (older YAMLs and checkpoints).
    """

    #: Nothing transfers (a MONAI network, no U-Net or ViT encoder); the layout names VQ-VAE checkpoints in errors.
    transfer_layout: ClassVar[TransferLayout | None] = TransferLayout(
        prefixes={},
        network="none",
        recognise=lambda state: any_key_starts_with(state, "net.quantizer."),
    )

    def __init__(
        self,
        superpatch_size: int | tuple[int, int, int] | None = None,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 128, 416),
        num_res_layers: int = 2,
        num_res_channels: Sequence[int] | int = (32, 128, 416),
        num_embeddings: int = 1024,
        embedding_dim: int = 64,
        commitment_cost: float = 0.25,
        ema_decay: float = 0.99,
        init_codebook_from_data: bool = True,
        dead_code_threshold: float = 0.1,
        loss: ReconstructionLoss = "mse",
        metric_data_range: float | None = None,
        optimizer: OptimizerFactory = adamw,
        scheduler: SchedulerFactory | None = warmup_cosine,
        img_size: int | tuple[int, int, int] | None = None,
    ) -> None:
        superpatch_size = superpatch_argument(type(self).__name__, superpatch_size, img_size, default=128)
        super().__init__(superpatch_size, in_channels, loss, metric_data_range, optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "img_size"])
        # Under LightningCLI the hyperparameters are the parsed config: store the resolved value, under its new name.
        self.hparams.update(superpatch_size=superpatch_size)
        self.net = build_vqvae(
            self.superpatch_size, in_channels, channels, num_res_layers, num_res_channels,
            num_embeddings, embedding_dim, commitment_cost, ema_decay,
        )  # fmt: skip
        self.num_embeddings = num_embeddings
        self.init_codebook_from_data = init_codebook_from_data
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold}")
        self.dead_code_threshold = float(dead_code_threshold)
        quantizer = self.net.quantizer.quantizer
        # Every code starts with a moving-average count of one (MONAI starts from zero): otherwise a code
        # missing from the first batch is divided by ~epsilon at the first update and never used again.
        quantizer.ema_cluster_size.fill_(1.0)
        quantizer.ema_w.copy_(quantizer.embedding.weight.detach())
        # Saved in checkpoints, so that a resumed run does not initialise its codebook a second time.
        self.register_buffer("codebook_initialised", torch.tensor(not init_codebook_from_data))
        self.code_grid = vqvae_code_grid(self.superpatch_size, channels)
        self.codebook_usage = CodebookUsage(num_embeddings)
        self.last_collapse_message: str | None = None

    def latent_description(self) -> str:
        positions = math.prod(self.code_grid)
        return (
            f"{'×'.join(map(str, self.code_grid))} = {positions} indices into {self.num_embeddings} codes of "
            f"{self.hparams.embedding_dim} dimensions ({self.voxels_per_sample / positions:.0f}× fewer values "
            "than voxels)"
        )

    def forward(self, images: Tensor, deterministic: bool = False) -> AutoencoderOutput:
        # MONAI's VQVAE.forward without its VectorQuantizer wrapper, whose only addition is a perplexity
        # attribute: the EMAQuantizer itself also returns the code indices, which usage monitoring needs.
        quantizer = self.net.quantizer.quantizer
        latents = self.net.encode(images)
        if self.training and not deterministic and not bool(self.codebook_initialised):
            self.initialise_codebook(latents)
        was_training = quantizer.training
        quantizer.train(was_training and not deterministic)  # no codebook update when deterministic
        try:
            quantized, quantization_loss, codes = quantizer(latents)
        finally:
            quantizer.train(was_training)
        reconstruction = self.net.decode(quantized)
        recon = self.reconstruction_loss(reconstruction, images)
        losses = {"loss": recon + quantization_loss, "recon": recon, "quantization": quantization_loss}
        if not deterministic:
            counts = torch.bincount(codes.flatten(), minlength=self.num_embeddings)
            losses["perplexity"] = codebook_statistics(counts)["perplexity"].to(recon.device)
            if self.training and self.dead_code_threshold > 0:
                restarted = self.restart_dead_codes(latents)
                losses["codes_restarted"] = torch.tensor(float(restarted), device=recon.device)
        return AutoencoderOutput(reconstruction, losses, codes)

    def _draw_encoder_outputs(self, latents: Tensor, count: int) -> Tensor:
        """``count`` encoder output vectors of ``latents`` (B, D, x, y, z), drawn at random on rank 0 and
        broadcast under DDP, so that every process writes the same codes."""
        vectors = latents.detach().float().movedim(1, -1).reshape(-1, latents.shape[1])
        picks = torch.randint(vectors.shape[0], (count,), device=vectors.device)
        drawn = vectors[picks]
        if vectors.shape[0] < count:  # repeated picks: separate them slightly
            drawn = drawn + 1e-3 * drawn.std().clamp_min(1e-6) * torch.randn_like(drawn)
        trainer = attached_trainer(self)
        if trainer is not None and trainer.world_size > 1:
            drawn = trainer.strategy.broadcast(drawn, src=0).to(vectors.device)
        return drawn

    @torch.no_grad()
    def initialise_codebook(self, latents: Tensor) -> None:
        """Sets every code to an encoder output of ``latents`` (B, D, x, y, z) drawn at random."""
        quantizer = self.net.quantizer.quantizer
        codes = self._draw_encoder_outputs(latents, self.num_embeddings)
        quantizer.embedding.weight.copy_(codes)
        quantizer.ema_w.copy_(codes)
        quantizer.ema_cluster_size.fill_(1.0)
        self.codebook_initialised.fill_(True)

    @torch.no_grad()
    def restart_dead_codes(self, latents: Tensor) -> int:
        """Moves codes used less than ``dead_code_threshold`` times per step (moving average) onto random
        encoder outputs of ``latents``; returns how many were moved.

        The moving averages are summed across DDP processes by MONAI's quantizer, so every process finds
        the same dead codes and takes part in the same broadcast.
        """
        quantizer = self.net.quantizer.quantizer
        dead = quantizer.ema_cluster_size < self.dead_code_threshold
        count = int(dead.sum())
        if count:
            codes = self._draw_encoder_outputs(latents, count)
            quantizer.embedding.weight[dead] = codes
            quantizer.ema_w[dead] = codes
            quantizer.ema_cluster_size[dead] = 1.0
        return count

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self.codebook_usage.reset()

    def _evaluation_step(self, batch: dict, stage: str) -> AutoencoderOutput:
        output = super()._evaluation_step(batch, stage)
        self.codebook_usage.update(output.codes)
        return output

    def _evaluation_epoch_end(self, stage: str) -> None:
        super()._evaluation_epoch_end(stage)
        statistics = self.codebook_usage.compute()
        for name, value in statistics.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "codebook_usage")
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        self.warn_on_collapse(float(statistics["codebook_usage"]), float(statistics["perplexity"]))

    def warn_on_collapse(self, usage: float, perplexity: float) -> str | None:
        """Warns with :class:`CodebookCollapseWarning` when the codebook collapsed; returns the message."""
        message = codebook_collapse_message(usage, perplexity, self.num_embeddings)
        self.last_collapse_message = message
        if message is not None:
            warnings.warn(f"step {self.global_step}: {message}", CodebookCollapseWarning, stacklevel=2)
        return message

    @torch.no_grad()
    def probe_features(self, images: Tensor) -> Tensor:
        """Frozen encoder features for a probe (:class:`maesil.probing.LinearProbe`): the outputs of the encoder's
        blocks (the last is the latent before quantisation), the middle level and the deepest upsampled to it
        (:func:`~maesil.evaluation.probe.mid_and_deepest`), ``(B, C_mid + C_deep, x, y, z)``."""
        from maesil.evaluation.probe import mid_and_deepest, stage_outputs

        return mid_and_deepest(stage_outputs(self.net.encoder.blocks, images))
