"""What BYOL-style methods share: an online network trained to predict an EMA target network's
projection of another view, the momentum schedule, the loss, and the collapse indicator.

Global BYOL (:mod:`maesil.methods.byol`) and PGL (:mod:`maesil.methods.pgl`) differ only in *which*
features they compare (pooled ones, or aligned voxels of the views' overlap); everything else lives here:

* online = ``backbone`` → ``projector`` → ``predictor``; target = copies of ``backbone`` and
  ``projector`` that never receive gradients and follow the online weights by an exponential moving
  average, ``θ_target ← τ·θ_target + (1 − τ)·θ_online``, after every optimizer step;
* τ rises from ``base_momentum`` to ``final_momentum`` on BYOL's cosine schedule,
  ``τ_k = 1 − (1 − τ_base)·(cos(π k / K) + 1) / 2`` over the run's K optimizer steps;
* loss ``2 − 2·cos(p, z)`` between the online prediction of one view and the target projection of the
  other, symmetric over the two views (0 when they agree, at most 4);
* collapse indicator: the per-channel standard deviation of L2-normalised online embeddings, times
  √dim. It is about 1 for embeddings spread over the sphere and falls to 0 when every input maps to the
  same vector (the failure BYOL's predictor and EMA are there to prevent).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maesil.methods.arguments import unet_overrides
from maesil.methods.base import MethodModule
from maesil.models.parameters import count_parameters
from maesil.models.unet import resenc_unet
from maesil.optim import OptimizerFactory, SchedulerFactory


def cosine_momentum(step: int, total_steps: int, base: float = 0.99, final: float = 1.0) -> float:
    """BYOL's target momentum at optimizer step ``step`` of ``total_steps``: ``base`` at 0, ``final`` at the end."""
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target ← momentum·target + (1 − momentum)·online`` for parameters; buffers (e.g. BatchNorm
    running statistics) are copied."""
    for target_param, online_param in zip(target.parameters(), online.parameters(), strict=True):
        target_param.lerp_(online_param.detach().to(target_param.dtype), 1.0 - momentum)
    for target_buffer, online_buffer in zip(target.buffers(), online.buffers(), strict=True):
        target_buffer.copy_(online_buffer)


def bootstrap_loss(prediction: Tensor, target: Tensor, dim: int = 1) -> Tensor:
    """Mean of ``2 − 2·cos`` between ``prediction`` and ``target`` along ``dim`` (channels)."""
    prediction = F.normalize(prediction.float(), dim=dim)
    target = F.normalize(target.float(), dim=dim)
    return (2.0 - 2.0 * (prediction * target).sum(dim=dim)).mean()


@torch.no_grad()
def embedding_spread(embeddings: Tensor) -> Tensor:
    """Collapse indicator of (N, D) embeddings: mean over channels of the std over N of the
    L2-normalised embeddings, times √D (about 1 when spread, 0 when collapsed)."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) embeddings, got shape {tuple(embeddings.shape)}")
    normalised = F.normalize(embeddings.float(), dim=1)
    return normalised.std(dim=0).mean() * math.sqrt(embeddings.shape[1])


class BootstrapModule(MethodModule):
    """Online/target training loop of BYOL-style methods (see the module docstring).

    Subclasses build ``backbone``, ``projector`` and ``predictor`` and pass them here, and implement
    :meth:`view_loss`. Batches come from the DataModule's ``two_view`` task.

    Args:
        backbone: the network being pretrained (its weights are what fine-tuning loads).
        projector: online projection head (copied for the target).
        predictor: online prediction head (online only).
        base_momentum: target EMA momentum at the first step.
        final_momentum: momentum at the last step (1.0 freezes the target at the end).
        optimizer: optimizer factory over the online parameters.
        scheduler: ``(optimizer, total_steps)`` → per-step schedule.
    """

    accepted_tasks = ("two_view",)

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        predictor: nn.Module,
        base_momentum: float,
        final_momentum: float,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None,
    ) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler)
        if not 0.0 <= base_momentum <= final_momentum <= 1.0:
            raise ValueError(f"need 0 <= base_momentum <= final_momentum <= 1, got {base_momentum} and "
                             f"{final_momentum}")
        self.base_momentum = float(base_momentum)
        self.final_momentum = float(final_momentum)
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(projector)
        for param in self.target_parameters():
            param.requires_grad_(False)
        self.momentum = self.base_momentum
        self._total_steps = 1
        self._ema_step = -1
        self._figure_batch: dict | None = None

    def after_pretrained_load(self) -> None:
        """The EMA target starts from the loaded online network, as it starts from the initial one."""
        with torch.no_grad():
            self.target_backbone.load_state_dict(self.backbone.state_dict())

    def target_parameters(self):
        """Parameters of the EMA target network (never trained by the optimizer)."""
        yield from self.target_backbone.parameters()
        yield from self.target_projector.parameters()

    def view_loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """The symmetric loss of a two-view batch and the statistics to log (``embedding_spread``...)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        self._total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        self.momentum = cosine_momentum(self.global_step, self._total_steps, self.base_momentum, self.final_momentum)
        self._ema_step = self.global_step
        super().on_fit_start()

    def describe(self) -> str:
        online = count_parameters(self, trainable_only=True)
        return (f"{type(self).__name__}: backbone {count_parameters(self.backbone) / 1e6:.2f} M parameters, "
                f"online network {online / 1e6:.2f} M trained, target momentum "
                f"{self.base_momentum} → {self.final_momentum} over {self._total_steps} steps")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, stats = self.view_loss(batch)
        batch_size = batch["view1"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/momentum", self.momentum, batch_size=batch_size)
        for name, value in stats.items():
            self.log(f"train/{name}", value, batch_size=batch_size, prog_bar=name == "embedding_spread")
        return loss

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """EMA update of the target after each optimizer step (``global_step`` counts them, so
        gradient accumulation updates once per step, and a resumed run continues the schedule)."""
        if self.global_step > self._ema_step:
            self._ema_step = self.global_step
            ema_update(self.target_backbone, self.backbone, self.momentum)
            ema_update(self.target_projector, self.projector, self.momentum)
            self.momentum = cosine_momentum(self.global_step, self._total_steps, self.base_momentum,
                                            self.final_momentum)

    # --------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch, "val", batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch, "test", batch_idx)

    def _evaluation_step(self, batch: dict, stage: str, batch_idx: int) -> None:
        """Loss and statistics on the fixed validation views (seeded by subject and location)."""
        loss, stats = self.view_loss(batch)
        batch_size = batch["view1"].shape[0]
        self.log(f"{stage}/loss", loss, batch_size=batch_size, sync_dist=True, prog_bar=stage == "val")
        for name, value in stats.items():
            self.log(f"{stage}/{name}", value, batch_size=batch_size, sync_dist=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._keep_figure_candidate(batch)

    def _keep_figure_candidate(self, batch: dict) -> None:
        """Keeps the validation pair whose superpatch has the most structure (highest intensity std):
        validation views are fixed, so successive pictures show the same pair."""
        scores = batch["image"].flatten(1).float().std(dim=1)
        index = int(scores.argmax())
        score = float(scores[index])
        if self._figure_batch is None or score > self._figure_batch["score"]:
            self._figure_batch = {key: value[index:index + 1].detach().cpu() if isinstance(value, Tensor)
                                  else value[index:index + 1] for key, value in batch.items()}
            self._figure_batch["score"] = score

    def on_validation_epoch_end(self) -> None:
        if self._figure_batch is not None and getattr(self.hparams, "log_views_figure", False):
            self._log_views(self._figure_batch)
        self._figure_batch = None

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def _log_views(self, batch: dict) -> None:
        from maesil.evaluation.figures import display_range, two_view_figure
        from maesil.data.views import box_intersection

        overlap = box_intersection(batch["box1"], batch["box2"])[0]
        image = batch["image"][0, 0].float().numpy()
        figure = two_view_figure(
            image,
            [batch["view1"][0, 0].float().numpy(), batch["view2"][0, 0].float().numpy()],
            [batch["box1"][0].numpy(), batch["box2"][0].numpy()],
            [batch["flip1"][0].numpy(), batch["flip2"][0].numpy()],
            overlap.numpy(),
            title=f"{batch['subject_id'][0]} · step {self.global_step} · overlap "
                  f"{float(batch['overlap'][0]):.0%}",
            value_range=display_range(image, self.data_modality),  # (0, 1) for CT; percentiles for z-normalised MRI
        )
        self.log_figure("views", figure)

    @torch.no_grad()
    def probe_features(self, images: Tensor) -> Tensor:
        """Frozen encoder features for a probe (:class:`maesil.probing.LinearProbe`): the online backbone's encoder
        (what BYOL and PGL both train and fine-tuning loads), its middle stage and its deepest upsampled to it
        (:func:`~maesil.evaluation.probe.mid_and_deepest`), ``(B, C_mid + C_deep, x, y, z)``."""
        from maesil.evaluation.probe import mid_and_deepest

        return mid_and_deepest(self.backbone.encode(images))


def unet_backbone(preset: str, in_channels: int, features: Sequence[int] | None,
                  blocks_per_stage: Sequence[int] | None, strides: Sequence[int] | None) -> nn.Module:
    """A feature-extracting ResEnc U-Net (no output head) from a preset plus optional overrides; the
    same class and key names (``encoder.``, ``decoder.``) that segmentation fine-tuning loads."""
    return resenc_unet(preset, in_channels=in_channels, out_channels=None,
                       **unet_overrides(features, blocks_per_stage, strides))
