"""PGL: prior-guided local self-supervision (Xie et al., 2020) on the 3D ResEnc U-Net.

The original code was never released; this is maesil's design, each choice stated:

* **Views and prior.** The DataModule's ``two_view`` task cuts two boxes (independent scale per axis)
  from one superpatch, resizes both to the model input, flips them per axis and jitters intensities
  (:mod:`maesil.data.views`). The boxes and flips are the prior: they locate the same anatomy in both.
* **Dense features.** Both views go through the U-Net; the ``num_scales`` finest decoder outputs are
  used (default 3: 1/4, 1/2 and full resolution for the 4-stage CPU preset).
* **Alignment** (:func:`maesil.models.roi_align3d.roi_align3d`). At each scale, the overlap box of the
  two views, in superpatch coordinates, is sampled from each view's feature map with trilinear
  ``grid_sample`` (flips undone), onto one grid. The grid has ``align_fraction`` of the feature map's
  size per axis (capped at ``max_align_size``): the overlap covers at least ``min_overlap`` of each
  view, so this keeps the grid near the features' own resolution. Each grid voxel averages
  ``sampling_ratio³`` samples, as RoIAlign does.
* **Heads.** Per scale, a local projector and predictor that are 1×1×1 conv MLPs (conv → BatchNorm →
  ReLU → conv), i.e. BYOL's MLPs applied to every aligned voxel. They run on the aligned features, so
  every voxel of the loss is a voxel of the shared region.
* **Loss.** ``2 − 2·cos`` between the online prediction of view 1 and the target projection of view 2
  at each aligned voxel, and the reverse, averaged (symmetric), then averaged over scales with equal
  weights. The target (EMA) network follows BYOL (:mod:`maesil.methods.bootstrap`).
* **What transfers.** The whole U-Net (encoder and decoder) learns, unlike global BYOL, whose pooled
  loss trains only the encoder. Fine-tuning loads the encoder; the pretrained decoder only with
  ``transfer_decoder: true`` (it costs Dice in few-label fine-tuning here, docs/evidence.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from maesil.checkpoints.layouts import TransferLayout, any_key_starts_with
from maesil.data.views import box_intersection
from maesil.methods.bootstrap import BootstrapModule, bootstrap_loss, embedding_spread, unet_backbone
from maesil.models.roi_align3d import roi_align3d
from maesil.optim import OptimizerFactory, SchedulerFactory, adamw, warmup_cosine


def conv_mlp_head(in_channels: int, hidden_channels: int, out_channels: int) -> nn.Sequential:
    """A 1×1×1 conv MLP (conv → BatchNorm3d → ReLU → conv): BYOL's head applied per voxel."""
    return nn.Sequential(
        nn.Conv3d(in_channels, hidden_channels, kernel_size=1),
        nn.BatchNorm3d(hidden_channels),
        nn.ReLU(inplace=True),
        nn.Conv3d(hidden_channels, out_channels, kernel_size=1),
    )


class PGL(BootstrapModule):
    """Prior-guided local consistency between two views' aligned decoder features (see module docstring).

    Args:
        unet_preset: preset of :func:`maesil.models.unet.resenc_unet` (``cpu``, ``resenc_l``, ...).
        features: per-stage widths overriding the preset.
        blocks_per_stage: residual blocks per encoder stage overriding the preset.
        strides: per-stage strides overriding the preset.
        in_channels: image channels.
        num_scales: how many of the finest decoder outputs are aligned (1 .. stages − 1).
        projection_dim: channels out of the local projector and predictor.
        hidden_dim: hidden channels of the local heads.
        align_fraction: aligned grid size as a fraction of each scale's feature-map size.
        max_align_size: cap on the aligned grid size per axis (memory).
        sampling_ratio: samples per aligned voxel and axis (RoIAlign's sampling ratio).
        base_momentum: target EMA momentum at the start (BYOL: 0.99).
        final_momentum: momentum at the end (BYOL: 1.0).
        log_views_figure: save a picture of the first validation pair with its boxes and overlap.
        optimizer: optimizer factory.
        scheduler: ``(optimizer, total_steps)`` → per-step schedule.
        pretrained: continued pretraining: a checkpoint or export whose encoder (and decoder, where this method
            trains one) initialises this network at the start of ``fit`` (any format ``load_pretrained`` reads,
            nnssl and MONAI included); not when resuming with ``--ckpt_path``.
    """

    #: The online U-Net: encoder, and decoder on request (``transfer_decoder``). Recognised by its projector:
    #: one 1×1×1 conv MLP per decoder scale (``projector.0.0.weight``).
    transfer_layout: ClassVar[TransferLayout | None] = TransferLayout(
        prefixes={"backbone.encoder.": "encoder.", "backbone.decoder.": "decoder."},
        network="resenc",
        recognise=lambda state: any_key_starts_with(state, "backbone.encoder.") and "projector.0.0.weight" in state,
    )

    def __init__(
        self,
        unet_preset: str = "cpu",
        features: Sequence[int] | None = None,
        blocks_per_stage: Sequence[int] | None = None,
        strides: Sequence[int] | None = None,
        in_channels: int = 1,
        num_scales: int = 3,
        projection_dim: int = 128,
        hidden_dim: int = 256,
        align_fraction: float = 0.5,
        max_align_size: int = 16,
        sampling_ratio: int = 2,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        log_views_figure: bool = True,
        optimizer: OptimizerFactory = adamw,
        scheduler: SchedulerFactory | None = warmup_cosine,
        pretrained: str | None = None,
    ) -> None:
        backbone = unet_backbone(unet_preset, in_channels, features, blocks_per_stage, strides)
        channels = list(backbone.feature_channels)  # coarsest first
        if not 1 <= num_scales <= len(channels):
            raise ValueError(f"num_scales must be in 1..{len(channels)} for this U-Net "
                             f"({len(channels)} decoder outputs), got {num_scales}")
        if not 0.0 < align_fraction <= 1.0:
            raise ValueError(f"align_fraction must be in (0, 1], got {align_fraction}")
        if max_align_size < 1 or sampling_ratio < 1:
            raise ValueError(f"max_align_size and sampling_ratio must be >= 1, got {max_align_size} and "
                             f"{sampling_ratio}")
        used = channels[-num_scales:]
        super().__init__(
            backbone=backbone,
            projector=nn.ModuleList(conv_mlp_head(c, hidden_dim, projection_dim) for c in used),
            predictor=nn.ModuleList(conv_mlp_head(projection_dim, hidden_dim, projection_dim) for _ in used),
            base_momentum=base_momentum,
            final_momentum=final_momentum,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.num_scales = int(num_scales)
        self.align_fraction = float(align_fraction)
        self.max_align_size = int(max_align_size)
        self.sampling_ratio = int(sampling_ratio)

    def align_size(self, feature_shape: Sequence[int]) -> tuple[int, int, int]:
        """Aligned grid size for a feature map of spatial shape ``feature_shape``."""
        return tuple(max(1, min(self.max_align_size, round(n * self.align_fraction)))  # type: ignore[return-value]
                     for n in feature_shape)

    def aligned_features(self, backbone: nn.Module, views: Tensor, boxes: Tensor, flips: Tensor,
                         rois: Tensor) -> list[Tensor]:
        """The ``num_scales`` finest decoder outputs of ``views``, each sampled over ``rois`` onto
        one grid per scale in superpatch orientation (coarsest first)."""
        features = backbone.forward_features(views)[-self.num_scales:]
        return [roi_align3d(f, boxes, flips, rois, self.align_size(f.shape[2:]), self.sampling_ratio)
                for f in features]

    def view_loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        views = torch.cat([batch["view1"], batch["view2"]])
        boxes = torch.cat([batch["box1"], batch["box2"]]).float()
        flips = torch.cat([batch["flip1"], batch["flip2"]]).bool()
        overlap = box_intersection(batch["box1"], batch["box2"]).float()
        rois = torch.cat([overlap, overlap])
        online = self.aligned_features(self.backbone, views, boxes, flips, rois)
        with torch.no_grad():
            target = self.aligned_features(self.target_backbone, views, boxes, flips, rois)
        losses = []
        for scale, (online_features, target_features) in enumerate(zip(online, target)):
            projection = self.projector[scale](online_features)
            prediction = self.predictor[scale](projection)
            with torch.no_grad():
                target_projection = self.target_projector[scale](target_features)
            first, second = prediction.chunk(2)
            target_first, target_second = target_projection.chunk(2)
            losses.append(0.5 * (bootstrap_loss(first, target_second) + bootstrap_loss(second, target_first)))
        # Collapse indicator on the finest scale's projections (the loop's last), one embedding per voxel.
        embeddings = projection.detach().movedim(1, -1).reshape(-1, projection.shape[1])
        stats = {f"loss_scale{index}": loss.detach() for index, loss in enumerate(losses)}
        stats["embedding_spread"] = embedding_spread(embeddings)
        stats["overlap"] = batch["overlap"].float().mean()
        return torch.stack(losses).mean(), stats
