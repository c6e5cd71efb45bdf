"""Global BYOL on the 3D ResEnc U-Net: the baseline PGL is measured against.

Both views of a superpatch go through the U-Net encoder; its deepest feature map is average-pooled to
one vector per view, projected and predicted by MLPs (Linear → BatchNorm → ReLU → Linear, as in BYOL),
and the online prediction of each view regresses the target projection of the other. Only the encoder
learns: a pooled global vector gives the decoder no signal, which is exactly the gap PGL's local
alignment fills (the decoder is kept, frozen, so checkpoints have PGL's keys). Same backbone, views,
momentum schedule and optimizer as :class:`~maesil.methods.PGL`.

Both views are stacked into one batch of 2B, so BatchNorm in the heads always sees at least two samples
and the two views share its statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from maesil.checkpoints.layouts import TransferLayout, any_key_starts_with
from maesil.methods.bootstrap import BootstrapModule, bootstrap_loss, embedding_spread, unet_backbone
from maesil.optim import OptimizerFactory, SchedulerFactory, adamw, warmup_cosine


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector/predictor: Linear → BatchNorm1d → ReLU → Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class BYOL(BootstrapModule):
    """Global BYOL: pooled U-Net encoder features of two views, online predicts target.

    Args:
        unet_preset: preset of :func:`maesil.models.unet.resenc_unet` (``cpu``, ``resenc_l``, ...).
        features: per-stage widths overriding the preset.
        blocks_per_stage: residual blocks per encoder stage overriding the preset.
        strides: per-stage strides overriding the preset.
        in_channels: image channels.
        projection_dim: output size of projector and predictor (BYOL: 256).
        hidden_dim: hidden width of the MLP heads (BYOL: 4096).
        base_momentum: target EMA momentum at the start (BYOL: 0.99).
        final_momentum: momentum at the end (BYOL: 1.0).
        log_views_figure: save a picture of the first validation pair with its crop boxes.
        optimizer: optimizer factory.
        scheduler: ``(optimizer, total_steps)`` → per-step schedule.
        pretrained: continued pretraining: a checkpoint or export whose encoder (and decoder, where this method
            trains one) initialises this network at the start of ``fit`` (any format ``load_pretrained`` reads,
            nnssl and MONAI included); not when resuming with ``--ckpt_path``.
    """

    #: The online encoder transfers; the U-Net decoder stays at its random initialisation (the pooled loss
    #: never reaches it), so it is exported only on request. Recognised by its projector, an MLP of ``Linear``.
    transfer_layout: ClassVar[TransferLayout | None] = TransferLayout(
        prefixes={"backbone.encoder.": "encoder."},
        network="resenc",
        untrained={"backbone.decoder.": "decoder."},
        recognise=lambda state: (any_key_starts_with(state, "backbone.encoder.") and "projector.0.weight" in state
                                 and state["projector.0.weight"].ndim == 2),
    )

    def __init__(
        self,
        unet_preset: str = "cpu",
        features: Sequence[int] | None = None,
        blocks_per_stage: Sequence[int] | None = None,
        strides: Sequence[int] | None = None,
        in_channels: int = 1,
        projection_dim: int = 256,
        hidden_dim: int = 4096,
        base_momentum: float = 0.99,
        final_momentum: float = 1.0,
        log_views_figure: bool = True,
        optimizer: OptimizerFactory = adamw,
        scheduler: SchedulerFactory | None = warmup_cosine,
        pretrained: str | None = None,
    ) -> None:
        backbone = unet_backbone(unet_preset, in_channels, features, blocks_per_stage, strides)
        width = backbone.features[-1]
        super().__init__(
            backbone=backbone,
            projector=mlp_head(width, hidden_dim, projection_dim),
            predictor=mlp_head(projection_dim, hidden_dim, projection_dim),
            base_momentum=base_momentum,
            final_momentum=final_momentum,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        # The pooled loss never reaches the decoder: freeze it, so that the optimizer and DDP (which
        # rejects parameters without gradients) skip it. It stays in the checkpoint under the same keys
        # as PGL's, so fine-tuning loads either the same way (BYOL's decoder is untrained).
        for param in [*self.backbone.decoder.parameters(), *self.target_backbone.decoder.parameters()]:
            param.requires_grad_(False)

    @staticmethod
    def pooled(backbone: nn.Module, views: Tensor) -> Tensor:
        """(N, C) global average of the deepest encoder feature map."""
        return backbone.encode(views)[-1].mean(dim=(2, 3, 4))

    def view_loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        views = torch.cat([batch["view1"], batch["view2"]])
        projection = self.projector(self.pooled(self.backbone, views))
        prediction = self.predictor(projection)
        with torch.no_grad():
            target = self.target_projector(self.pooled(self.target_backbone, views))
        first, second = prediction.chunk(2)
        target_first, target_second = target.chunk(2)
        loss = 0.5 * (bootstrap_loss(first, target_second) + bootstrap_loss(second, target_first))
        stats = {"embedding_spread": embedding_spread(projection.detach()),
                 "overlap": batch["overlap"].float().mean()}
        return loss, stats
