"""Segmentation fine-tuning of a pretrained encoder: UNETR on a ViT, or the ResEnc U-Net.

The pretrained weights come in through the ``pretrained:`` init argument (a maesil checkpoint or an
encoder exported with ``python -m maesil export-encoder``), never through ``--ckpt_path``, which resumes
a run. :func:`maesil.checkpoints.load_pretrained` maps the keys and prints loaded / missing / unexpected
counts; it fails when nothing matched. The preprocessing the encoder was pretrained with (spacing, CT
window, superpatch) is compared with this run's and every mismatch is warned about.

* ``architecture: unetr``: :class:`~maesil.models.unetr.UNETR` on maesil's ``ViTEncoder3D``: MAESIL and
  SelfMedMAE checkpoints transfer their encoder. Layer-wise learning-rate decay (``layer_decay``, 0.75 in
  SelfMedMAE) scales block ``i`` of ``L`` by ``decay^(L − i)``; the decoder gets the full rate.
* ``architecture: unet``: :class:`~maesil.models.unet.ResEncUNet`. PGL, S3D and BYOL checkpoints transfer the
  encoder; ``transfer_decoder: true`` also loads the U-Net decoder PGL and S3D pretrained (left out by default,
  as nnssl's fine-tuning does: here it costs Dice, docs/evidence.md).

Training patches come from the DataModule's ``task: segment`` (label-centred). Loss: MONAI's
``DiceCELoss`` (softmax, one-hot targets). Validation and test run over whole volumes: a TorchIO
grid with overlap and Hann blending, aggregated on the CPU, scored per class with Dice (torchmetrics) and
HD95 in mm (MONAI). ``predict`` writes label maps as NIfTI in each input's original geometry.

The decoder-only warm-up and the linear warm-up of the encoder are the
:class:`~maesil.callbacks.EncoderWarmup` callback (in the fine-tuning YAMLs). ``freeze_encoder: true`` keeps the
encoder fixed for the whole run instead (a linear-probe-like reading of what the pretrained features alone are
worth): its parameters take no gradient and are not in the optimizer, and it stays in eval mode, so nothing in
it changes; only the decoder and the head learn.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from monai.losses import DiceCELoss
from torch import Tensor, nn

from maesil.methods.arguments import renamed_argument, superpatch_argument
from maesil.methods.base import MethodModule
from maesil.models.parameters import count_parameters
from maesil.optim import OptimizerFactory, SchedulerFactory, adamw, warmup_cosine
from maesil.shapes import as_triple

if TYPE_CHECKING:
    import torchio as tio

log = logging.getLogger(__name__)

Architecture = Literal["unet", "unetr"]


def build_segmentation_network(architecture: Architecture, preset: str, num_classes: int, in_channels: int,
                               superpatch_size: Sequence[int], network_args: dict[str, Any] | None) -> nn.Module:
    """The segmentation network: a UNETR (ViT encoder) or a ResEnc U-Net, from a preset plus overrides."""
    overrides = dict(network_args or {})
    if architecture == "unetr":
        from maesil.models.unetr import build_unetr

        return build_unetr(preset, superpatch_size=tuple(superpatch_size), in_channels=in_channels,
                           out_channels=num_classes, **overrides)
    if architecture == "unet":
        from maesil.models.unet import resenc_unet

        return resenc_unet(preset, in_channels=in_channels, out_channels=num_classes, **overrides)
    raise ValueError(f"architecture must be 'unet' or 'unetr', got {architecture!r}")


class Segmentation(MethodModule):
    """Fine-tunes a (pretrained) encoder for segmentation; see the module docstring.

    Args:
        num_classes: output classes including background (label values 0 .. num_classes − 1).
        architecture: ``unet`` (ResEnc U-Net) or ``unetr`` (ViT encoder + UNETR decoder).
        preset: network preset (:data:`maesil.models.unet.UNET_PRESETS` or
            :data:`maesil.models.unetr.UNETR_PRESETS`), e.g. ``cpu``, ``resenc_l``, ``maesil_cpu``,
            ``selfmedmae``.
        network_args: constructor arguments overriding the preset (e.g. ``token_size``, ``features``); the
            deprecated ``patch_size`` is read as ``token_size``.
        superpatch_size: training superpatch and sliding-window size, the DataModule's ``superpatch_size`` (the
            CLI sets it from ``data.init_args.superpatch_size``); None: 64.
        in_channels: image channels.
        pretrained: checkpoint or exported encoder to start from; ``None`` trains from scratch.
        pretrained_mapping: explicit ``{checkpoint prefix: model prefix}``; ``None`` detects the layout.
        transfer_decoder: also load the U-Net decoder a PGL or S3D checkpoint pretrained (``architecture: unet``;
            an error for a checkpoint without one). False: the encoder only, the decoder starts at random.
        layer_decay: layer-wise lr decay of the ViT encoder (UNETR only; ``None``: no decay).
        freeze_encoder: keep the encoder (pretrained or random) fixed: no gradient, not in the optimizer, always
            in eval mode; the decoder and head train.
        class_names: names of classes 1 .. num_classes − 1 for logs and tables.
        overlap: sliding-window overlap of whole-volume inference (fraction of the patch).
        blend: ``hann`` or ``average`` weighting of overlapping windows.
        inference_batch_size: windows per forward pass in whole-volume inference.
        output_dir: where ``predict`` writes label maps; ``None``: ``<default_root_dir>/predictions``.
        optimizer: optimizer factory.
        scheduler: ``(optimizer, total_steps)`` → per-step schedule.
        img_size: deprecated name of ``superpatch_size`` (older YAMLs and checkpoints).
    """

    #: Settings of the command that runs the model rather than of the trained network: with ``--ckpt_path``
    #: the command's config wins over the checkpoint's for these (see :class:`maesil.lightning_cli.MaesilCLI`).
    runtime_hparams: tuple[str, ...] = ("output_dir", "overlap", "blend", "inference_batch_size")

    accepted_tasks = ("segment",)

    def __init__(
        self,
        num_classes: int,
        architecture: Architecture = "unet",
        preset: str = "cpu",
        network_args: dict[str, Any] | None = None,
        superpatch_size: int | tuple[int, int, int] | None = None,
        in_channels: int = 1,
        pretrained: str | None = None,
        pretrained_mapping: dict[str, str] | None = None,
        transfer_decoder: bool = False,
        layer_decay: float | None = None,
        freeze_encoder: bool = False,
        class_names: list[str] | None = None,
        overlap: float = 0.5,
        blend: Literal["hann", "average"] = "hann",
        inference_batch_size: int = 2,
        output_dir: str | None = None,
        optimizer: OptimizerFactory = adamw,
        scheduler: SchedulerFactory | None = warmup_cosine,
        img_size: int | tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler)
        superpatch_size = superpatch_argument(type(self).__name__, superpatch_size, img_size, default=64)
        if network_args and "patch_size" in network_args:
            network_args = dict(network_args)
            network_args["token_size"] = renamed_argument(
                type(self).__name__, "network_args.token_size", network_args.get("token_size"),
                "network_args.patch_size", network_args.pop("patch_size"), default=None,
                yaml_key="model.init_args.network_args.token_size")
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "img_size"])
        # Under LightningCLI the hyperparameters are the parsed config: store the resolved values, under their new names.
        self.hparams.update(superpatch_size=superpatch_size, network_args=network_args)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        if layer_decay is not None and architecture != "unetr":
            warnings.warn("layer_decay applies to the ViT encoder of architecture 'unetr' only; ignored",
                          UserWarning, stacklevel=2)
        if transfer_decoder and architecture != "unet":
            raise ValueError(f"transfer_decoder applies to architecture 'unet' (a PGL or S3D U-Net decoder); no method "
                             f"pretrains the decoder of {architecture!r}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if blend not in ("hann", "average"):
            raise ValueError(f"blend must be 'hann' or 'average', got {blend!r}")
        if class_names is not None and len(class_names) != num_classes - 1:
            raise ValueError(f"class_names must name the {num_classes - 1} foreground classes, got {class_names}")
        self.num_classes = int(num_classes)
        self.architecture = architecture
        self.superpatch_size = as_triple(superpatch_size, "superpatch_size")
        self.net = build_segmentation_network(architecture, preset, num_classes, in_channels, self.superpatch_size,
                                              network_args)
        self.layer_decay = layer_decay if architecture == "unetr" else None
        self.freeze_encoder = bool(freeze_encoder)
        if self.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        self.class_names = list(class_names) if class_names else [f"class_{c}" for c in range(1, num_classes)]
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.pretrained_report = None
        self._scoreboard = None
        self._check_batch_labels = True

    # ------------------------------------------------------------------ setup
    @property
    def encoder(self) -> nn.Module:
        """The transferable encoder (``net.encoder``)."""
        return self.net.encoder

    def setup(self, stage: str) -> None:
        """The base checks (task, superpatch), then the DataModule's classes."""
        super().setup(stage)
        spec = self.data_spec
        declared = spec.num_classes if spec is not None else None
        if declared is not None and int(declared) != self.num_classes:
            raise ValueError(f"the model predicts {self.num_classes} classes but the DataModule declares "
                             f"num_classes={declared}; set model.init_args.num_classes and "
                             f"data.init_args.num_classes to the same value")
        # The DataModule checked every label map against its declared classes in its setup; only data
        # without declared classes is checked batch by batch (a device sync per step).
        self._check_batch_labels = declared is None

    def on_fit_start(self) -> None:
        """Loads ``pretrained`` unless the run resumes: ``trainer.ckpt_path`` is known from here on, not in
        ``setup``, and the run's own checkpoint has been restored already (its weights win)."""
        if self.hparams.pretrained and self.trainer.ckpt_path is None:
            self.load_pretrained_weights()
        super().on_fit_start()

    def load_pretrained_weights(self) -> None:
        """Loads ``pretrained`` into the network (not when resuming: the run's checkpoint wins), prints
        the key report and warns where the pretraining preprocessing differs from this run's."""
        from maesil.checkpoints import check_preprocessing, load_pretrained

        path = self.hparams.pretrained
        report = load_pretrained(self.net, path, mapping=self.hparams.pretrained_mapping,
                                 decoder=self.hparams.transfer_decoder)
        self.pretrained_report = report
        self.print(f"pretrained weights from {path}:\n{report.summary()}")
        spec = self.data_spec
        if spec is not None:
            actual = {"modality": spec.modality, "target_spacing": spec.target_spacing, "hu_window": spec.hu_window,
                      "superpatch_size": spec.superpatch_size}
            for message in check_preprocessing(report.metadata, **{k: v for k, v in actual.items() if v is not None}):
                warnings.warn(f"{path}: {message}", UserWarning, stacklevel=2)

    def train(self, mode: bool = True) -> Segmentation:
        """Lightning's train/eval switch; a frozen encoder stays in eval mode (no dropout, no statistics)."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def describe(self) -> str:
        source = self.hparams.pretrained or "random initialisation (from scratch)"
        frozen = ", frozen" if self.freeze_encoder else ""
        return (f"Segmentation ({self.architecture}, {self.hparams.preset}): "
                f"{count_parameters(self.net) / 1e6:.2f} M parameters, encoder "
                f"{count_parameters(self.encoder) / 1e6:.2f} M from {source}{frozen}; {self.num_classes} classes")

    # --------------------------------------------------------------- optimiser
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Decay / no-decay groups, split into encoder and decoder; with ``layer_decay`` one group per
        ViT layer, scaled by ``layer_decay^(L − 1 − layer)`` (``lr_scale``, applied by the base class's
        ``configure_optimizers`` with ``batch_lr_factor``). ``is_encoder`` marks the groups
        :class:`~maesil.callbacks.EncoderWarmup` holds back. A frozen encoder has no group."""
        groups: dict[tuple, dict[str, Any]] = {}
        num_layers = getattr(self.net, "num_lr_layers", None)
        for name, param in self.net.named_parameters():
            is_encoder = name.startswith("encoder.")
            if is_encoder and self.freeze_encoder:
                continue
            no_decay = param.ndim < 2 or any(token in name for token in self.no_weight_decay)
            if self.layer_decay is not None and num_layers is not None:
                layer = self.net.layer_index(name)
                scale = self.layer_decay ** (num_layers - 1 - layer)
            else:
                layer, scale = 0, 1.0
            key = (is_encoder, layer, no_decay)
            group = groups.setdefault(key, {"params": [], "lr_scale": scale, "is_encoder": is_encoder,
                                            "layer": layer, **({"weight_decay": 0.0} if no_decay else {})})
            group["params"].append(param)
        return list(groups.values())

    # ----------------------------------------------------------------- training
    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images, labels = batch["image"], batch["label"]
        if self._check_batch_labels and (int(labels.max()) >= self.num_classes or int(labels.min()) < 0):
            raise ValueError(f"label values {sorted(labels.unique().tolist())} in subjects {batch.get('subject_id')} "
                             f"are outside 0..{self.num_classes - 1} (num_classes={self.num_classes})")
        loss = self.loss_fn(self(images), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    # ------------------------------------------------------ whole-volume scoring
    def volume_probabilities(self, image: Tensor) -> Tensor:
        """Softmax probabilities (K, X, Y, Z) of one preprocessed volume (C, X, Y, Z), on the CPU."""
        from maesil.evaluation.segmentation import sliding_window_probabilities

        return sliding_window_probabilities(
            lambda patches: self.net(patches), image, self.superpatch_size, overlap=self.hparams.overlap,
            blend=self.hparams.blend, batch_size=self.hparams.inference_batch_size, device=self.device,
        )

    def on_validation_epoch_start(self) -> None:
        from maesil.evaluation.segmentation import SegmentationScoreboard

        self._scoreboard = SegmentationScoreboard(self.num_classes)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._score_volumes(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._score_volumes(batch)

    def _score_volumes(self, batch: dict) -> None:
        from maesil.evaluation.segmentation import segmentation_scores

        for index in range(batch["image"].shape[0]):
            probabilities = self.volume_probabilities(batch["image"][index])
            prediction = probabilities.argmax(dim=0)
            target = batch["label"][index, 0].cpu()
            spacing = tuple(float(s) for s in batch["spacing"][index])
            scores = segmentation_scores(prediction, target, self.num_classes, spacing)
            self._scoreboard.add(scores, batch["subject_id"][index])

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def _gathered_scoreboard(self):
        """The scores of every process, with subjects that DDP's sampler repeated counted once."""
        import torch.distributed as dist

        board = self._scoreboard
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            boards: list = [None] * dist.get_world_size()
            dist.all_gather_object(boards, board)
            board = type(board)(self.num_classes)
            for other in boards:
                board.merge(other)
        return board

    def _log_scores(self, stage: str) -> None:
        if self._scoreboard is None or self.trainer.sanity_checking:
            return
        board = self._gathered_scoreboard()
        if not len(board):
            return
        per_class, mean = board.per_class(), board.mean()
        # Identical on every rank after the gather: no further reduction.
        self.log(f"{stage}/dice", mean["dice"], prog_bar=True)
        self.log(f"{stage}/hd95", mean["hd95"])
        for index, name in enumerate(self.class_names):
            self.log(f"{stage}/dice_{name}", per_class["dice"][index])
            self.log(f"{stage}/hd95_{name}", per_class["hd95"][index])
        if stage == "test" and self.trainer.is_global_zero:
            self.print(board.format_table(self.class_names))

    # ------------------------------------------------------------------ predict
    def predict_output_dir(self) -> Path:
        if self.hparams.output_dir:
            return Path(self.hparams.output_dir)
        return Path(self.trainer.default_root_dir) / "predictions"

    def source_image(self, subject_id: str) -> tio.ScalarImage:
        """The original image of a predicted subject: its label map is written on this image's grid.

        Asked of the :class:`~maesil.data.VolumeDataModule`, not read from the batch's ``source`` path, because
        the DataModule knows how to read it (the DICOM series of a folder, the source of a cached subject).
        """
        from maesil.data import VolumeDataModule

        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, VolumeDataModule):
            raise TypeError(f"Segmentation predicts with maesil.data.VolumeDataModule, which reads each input's "
                            f"original image; got {type(datamodule).__name__}")
        return datamodule.source_image(subject_id)

    def predict_step(self, batch: dict, batch_idx: int) -> list[Path]:
        """Writes each input's label map, resampled back to its original geometry, as NIfTI."""
        from maesil.evaluation.segmentation import to_original_geometry, write_label_map

        written = []
        folder = self.predict_output_dir()
        for index in range(batch["image"].shape[0]):
            probabilities = self.volume_probabilities(batch["image"][index])
            source = self.source_image(batch["subject_id"][index])
            label = to_original_geometry(probabilities, batch["subject"][index], source)
            path = folder / f"{batch['subject_id'][index]}.nii.gz"
            write_label_map(label, path)
            written.append(path)
        return written

    def on_predict_epoch_end(self) -> None:
        if self.trainer.is_global_zero:
            self.print(f"label maps written to {self.predict_output_dir().resolve()}")
