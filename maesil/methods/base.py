"""The base LightningModule of every method: optimisation, figures, checkpointed state and the data it reads.

Methods own only their losses, metrics and pictures; models are plain ``nn.Module``s built in the
constructor. The optimizer and the schedule are injected as callables from YAML, so any torch optimizer
works without code changes::

    model:
      class_path: maesil.methods.MAESIL
      init_args:
        optimizer:
          class_path: torch.optim.AdamW
          init_args: {lr: 1.0e-4, weight_decay: 0.05, betas: [0.9, 0.95]}
        scheduler:
          class_path: maesil.optim.WarmupCosineLR
          init_args: {warmup_steps: 100}

The scheduler is called as ``scheduler(optimizer, total_steps)`` with the run's optimizer steps, taken
from the trainer (``max_steps`` or epochs × batches).

A method reads its data only through :attr:`MethodModule.data_spec`, the attached DataModule's
:class:`~maesil.data.spec.DataSpec`, and never drives the DataModule. Each method declares the data task it
needs (``accepted_tasks``) and the superpatch its network is built for (``superpatch_size``); ``setup`` checks
both against the spec before any step, naming the YAML keys to change.
"""

from __future__ import annotations

import inspect
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from torch import Tensor
from torch.optim import Optimizer
from matplotlib.figure import Figure

from maesil.checkpoints.layouts import TransferLayout, register_layout
from maesil.checkpoints.transfer import LoadReport
from maesil.data.spec import DataSpec
from maesil.evaluation.figures import save_figure
from maesil.evaluation.fills import FILLS
from maesil.evaluation.metrics import ReconstructionMetrics
from maesil.methods.speed import (SPEED_ARGUMENTS, SpeedOptions, accepts_speed_options, compile_networks,
                                  channels_last_networks, constructor_signatures, networks)
from maesil.nonfinite import guard_training_step, restore_learning_rates, skip_optimizer_update
from maesil.optim import (OptimizerFactory, SchedulerFactory, adamw, decay_parameter_groups, warmup_cosine,
                          with_fused_step)
from maesil.random_state import capture_rng_state, restore_rng_state
from maesil.trainer_attachment import attached_trainer


def datamodule_spec(trainer: object | None) -> DataSpec | None:
    """The :class:`DataSpec` of ``trainer``'s DataModule, or None (no trainer, no DataModule, or one that
    publishes no spec). The one place that reads the DataModule."""
    spec = getattr(getattr(trainer, "datamodule", None), "spec", None)
    return spec if isinstance(spec, DataSpec) else None


class ReconstructionEvaluationHooks:
    """Validation and test hooks shared by methods that reconstruct their input (MAESIL, S3D, AE, VAE, VQ-VAE).

    Each stage resets ``self.val_metrics`` and the figure candidate, scores every batch with the method's
    ``self._evaluation_step(batch, stage)``, and at ``_evaluation_epoch_end(stage)`` logs the metrics and
    draws the kept candidate with the method's ``_log_reconstruction``. Listed before
    :class:`MethodModule` in the bases so these hooks take effect.
    """

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()
        self._figure_candidate = None
        self._start_reference_fills("val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._evaluation_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self.val_metrics.reset()
        self._figure_candidate = None
        self._start_reference_fills("test")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._evaluation_epoch_end("test")

    #: The metric of ``val_metrics`` shown in the progress bar.
    progress_metric: str = "psnr_masked"

    def validation_generators(self, batch: dict) -> list[torch.Generator]:
        """One CPU generator per superpatch of ``batch``, seeded by ``crc32("val_mask_seed:subject:location")``.

        Masks drawn from them are the same for a superpatch in every epoch and run, whatever the batch size or
        the number of DDP processes, so validation curves and checkpoints compare on identical masks.
        """
        images = batch["image"]
        subjects = batch.get("subject_id") or ["?"] * images.shape[0]
        locations = batch.get("location")
        generators = []
        for index, subject in enumerate(subjects):
            where = locations[index].tolist() if locations is not None else index
            seed = zlib.crc32(f"{self.val_mask_seed}:{subject}:{where}".encode())
            generators.append(torch.Generator().manual_seed(seed))
        return generators

    def clamp_reconstruction(self, reconstruction: Tensor) -> Tensor:
        """A reconstruction clamped to the inputs' range before scoring: [0, 1] for windowed CT; as it is
        for MRI, whose z-normalised intensities have no fixed bounds (clipping would score a clipped
        reconstruction against an unclipped target)."""
        return reconstruction.clamp(0.0, 1.0) if self.data_modality == "ct" else reconstruction

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._reference_fill_scores: dict[str, dict[str, float]] = {}  # each fit, validate or test scores its data

    def _start_reference_fills(self, stage: str) -> None:
        """Prepares the reference fills of a stage: within one ``fit`` (or ``validate``/``test``) they are scored
        at the stage's first epoch only, since its data and masks are fixed, and the kept figures are logged at
        every epoch."""
        scores: dict[str, dict[str, float]] = self.__dict__.setdefault("_reference_fill_scores", {})
        self._reference_fill_metrics = (
            None if stage in scores
            else {name: ReconstructionMetrics(self.val_metrics.data_range).to(self.device) for name in FILLS}
        )

    @torch.no_grad()
    def score_reference_fills(self, images: Tensor, hidden: Tensor) -> None:
        """Scores the mean fill and the blur fill (:mod:`maesil.evaluation.fills`) of ``images`` on the very voxels
        the model had to predict (``hidden``, True = hidden), so each validation shows whether the model beats
        in-fillings that need no training. Masked methods call this from their evaluation step."""
        metrics = getattr(self, "_reference_fill_metrics", None)
        if metrics is None:
            return
        images = images.float()
        with torch.autocast(images.device.type, enabled=False):  # the references in float32 under bf16/fp16 runs
            for name, fill in FILLS.items():
                metrics[name].update(fill(images, hidden), images, hidden, modality=self.data_modality)

    def _log_reference_fills(self, stage: str) -> None:
        """Logs ``{stage}/psnr_masked_blur_fill``, ``..._mean_fill`` etc. (every metric of the fills' scores)."""
        scores: dict[str, dict[str, float]] = self.__dict__.setdefault("_reference_fill_scores", {})
        metrics = getattr(self, "_reference_fill_metrics", None)
        if metrics is not None and any(m.psnr_masked.update_called for m in metrics.values()):
            scores[stage] = {f"{metric}_{name.replace(' ', '_')}": float(value)
                             for name, m in metrics.items() for metric, value in m.compute().items()}
        self._reference_fill_metrics = None
        for key, value in scores.get(stage, {}).items():
            self.log(f"{stage}/{key}", value, sync_dist=False)

    def _evaluation_epoch_end(self, stage: str) -> None:
        """Logs the stage's metrics and the reference fills' and draws the kept figure candidate
        (``_log_reconstruction``)."""
        for name, value in self.val_metrics.compute().items():
            self.log(f"{stage}/{name}", value, prog_bar=name == self.progress_metric)
        self._log_reference_fills(stage)
        if self._figure_candidate is not None:
            self._log_reconstruction(**self._figure_candidate[1])
            self._figure_candidate = None

    def keep_figure_candidate(self, batch: dict, **volumes: Tensor) -> None:
        """Remembers the superpatch with the most structure (highest intensity std) for the picture.

        Validation data (and masks) are fixed, so the same superpatch wins at every validation and
        pictures from successive steps show the same anatomy. ``volumes`` are per-sample tensors
        (B, C, X, Y, Z) kept alongside the image (reconstruction, mask); the candidate's dict is passed
        to ``_log_reconstruction`` as keyword arguments at epoch end.
        """
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        images = batch["image"]
        scores = images.flatten(1).float().std(dim=1)
        index = int(scores.argmax())
        score = float(scores[index])
        if self._figure_candidate is None or score > self._figure_candidate[0]:
            kept = {name: v[index, 0].detach().cpu() for name, v in volumes.items()}
            kept = {name: v.float() if v.is_floating_point() else v for name, v in kept.items()}
            self._figure_candidate = (
                score,
                {
                    "image": images[index, 0].detach().float().cpu(),
                    **kept,
                    "subject": (batch.get("subject_id") or ["?"] * images.shape[0])[index],
                },
            )


class MethodModule(L.LightningModule):
    """Shared optimisation and plumbing for pretraining and fine-tuning methods.

    Args:
        optimizer: Callable building the optimizer from parameter groups. torch's Adam and AdamW run their
            fused CUDA step on a GPU unless the YAML sets ``fused`` or ``foreach``.
        scheduler: Callable ``(optimizer, total_steps)`` building a per-step LR schedule, or None.

    Every method also takes the keyword arguments of :class:`maesil.methods.speed.SpeedOptions`
    (``compile``, ``compile_mode``, ``compile_backend``, ``channels_last``), stored as ``speed_options``.
    """

    #: Parameter-name fragments excluded from weight decay besides biases and norms.
    no_weight_decay: Sequence[str] = ("mask_token", "pos_embed")

    #: Batches with a NaN/Inf loss the run may skip before it stops (set by
    #: :class:`maesil.nonfinite.NonFiniteSkipBudget`), and how many it has skipped (checkpointed).
    max_skipped_batches: int = 0
    skipped_batches: int = 0

    #: The DataModule tasks (``data.init_args.task``) whose batches this method trains on; empty: any.
    accepted_tasks: ClassVar[tuple[str, ...]] = ()

    #: The superpatch (X, Y, Z) the network is built for, which the DataModule must sample; None: any size.
    superpatch_size: tuple[int, int, int] | None = None

    #: Modality of the inputs when no DataModule is attached; ``benchmark-recon`` sets it from the
    #: checkpoint's data settings. None: CT.
    input_modality: str | None = None

    #: Which checkpoint keys are the encoder (and decoder) that fine-tuning takes, and how to recognise
    #: this method's checkpoints (:class:`maesil.checkpoints.layouts.TransferLayout`); None: nothing transfers.
    transfer_layout: ClassVar[TransferLayout | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        """Every method's ``training_step`` stops on a NaN/Inf loss, naming the step and the subjects
        (:func:`maesil.nonfinite.guard_training_step`), and its constructor takes the speed options
        (:func:`maesil.methods.speed.accepts_speed_options`)."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = accepts_speed_options(cls.__dict__["__init__"])
        if "training_step" in cls.__dict__:
            cls.training_step = guard_training_step(cls.__dict__["training_step"])
        if cls.transfer_layout is not None:  # checkpoint loading and export find the layout by class name
            register_layout(cls.__name__, cls.transfer_layout)

    def __init__(
        self,
        optimizer: OptimizerFactory = adamw,
        scheduler: SchedulerFactory | None = warmup_cosine,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.last_figure_path: Path | None = None
        # Multiplies the optimizer's configured learning rate (linear scaling rule, lr = base x
        # batch / 256). Set at run time by ``maesil.callbacks.LinearLRScaling``, which knows the
        # effective batch; 1.0 leaves the YAML's lr as it is. Not a hyperparameter: not checkpointed.
        self.batch_lr_factor: float = 1.0
        self.speed_options = SpeedOptions()
        #: Seconds of the first optimizer steps of a compiled run: the first includes the compilation.
        self.compiled_step_seconds: list[float] = []

    def save_hyperparameters(self, *args, ignore: Sequence[str] | str | None = None, frame=None,
                             logger: bool = True) -> None:
        """Lightning's, without the speed options, which are settings of the run, not of the network: a
        checkpoint does not carry them, and with ``--ckpt_path`` the command's values stand."""
        ignored = [ignore] if isinstance(ignore, str) else list(ignore or [])
        with constructor_signatures(type(self)):
            super().save_hyperparameters(*args, ignore=[*ignored, *SPEED_ARGUMENTS],
                                         frame=frame or inspect.currentframe().f_back, logger=logger)

    def reconstruct_for_evaluation(self, batch: dict) -> tuple[Tensor, Tensor | None]:
        """Reconstruct a batch of superpatches for whole-volume evaluation (``benchmark-recon``).

        Args:
            batch: the DataModule's batch dict: ``image`` (B, C, X, Y, Z) in [0, 1] (CT), ``subject_id``
                and ``location``, which masked methods use to seed their masks, so that every run and
                every checkpoint is scored on the same masks.

        Returns:
            ``(reconstruction, hidden)``: the reconstruction, same shape and range as ``image``, and a
            boolean voxel mask of what the model did not see (``None`` for methods that see the whole
            input, e.g. autoencoders).
        """
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct its input")

    def reconstruct_unmasked(self, batch: dict) -> Tensor:
        """Reconstruct a batch of superpatches with masking off (``benchmark-recon --protocol paper``).

        The protocol of the MAESIL group's public code: the model sees every voxel (every token), predicts
        every voxel, and nothing is pasted back from the input. Masked methods (MAESIL, S3D) override this;
        the default serves methods that see the whole input anyway (autoencoders): it returns
        :meth:`reconstruct_for_evaluation`'s reconstruction and refuses a method that reports a hidden mask.

        Returns:
            the reconstruction, same shape as ``batch["image"]``.
        """
        reconstruction, hidden = self.reconstruct_for_evaluation(batch)
        if hidden is not None:
            raise NotImplementedError(f"{type(self).__name__} masks its input but does not implement "
                                      "reconstruct_unmasked")
        return reconstruction

    @property
    def data_spec(self) -> DataSpec | None:
        """What the attached DataModule publishes about its data (task, modality, superpatch, preprocessing,
        batch size), or None outside a Trainer or with a DataModule that publishes no spec."""
        return datamodule_spec(attached_trainer(self))

    @property
    def data_modality(self) -> str:
        """``"ct"`` or ``"mri"``: the data spec's ``modality``, else ``input_modality``, else CT.

        The intensity conventions follow it, so one method YAML serves both: CT is windowed to [0, 1],
        MRI is z-normalised and unbounded (clamp in ``clamp_reconstruction``, metric range in
        :class:`~maesil.evaluation.metrics.ReconstructionMetrics`, picture range in
        :func:`~maesil.evaluation.figures.display_range`)."""
        spec = self.data_spec
        return str((spec.modality if spec is not None else None) or self.input_modality or "ct").lower()

    def setup(self, stage: str) -> None:
        """Checks the DataModule's spec against the method before any step: the task
        (``accepted_tasks``) and the superpatch (``superpatch_size``)."""
        spec = self.data_spec
        if spec is None:
            return
        self.check_task(spec.task)
        self.check_input_size(spec.superpatch_size)

    def load_pretrained_encoder(self, path: str | Path) -> LoadReport:
        """Continued pretraining: copies a pretrained encoder (and decoder) into the network this method's
        checkpoints transfer from (the module its :attr:`transfer_layout` maps to ``encoder.``, e.g.
        ``backbone``), through :func:`~maesil.checkpoints.load_pretrained` (every format it reads), prints the
        key report, then :meth:`after_pretrained_load`."""
        from maesil.checkpoints import load_pretrained

        layout = type(self).transfer_layout
        sources = [source for source, target in (layout.prefixes if layout else {}).items() if target == "encoder."]
        if not sources:
            raise ValueError(f"{type(self).__name__} has no encoder to continue pretraining from {path}.")
        owner = sources[0].removesuffix("encoder.").rstrip(".")
        report = load_pretrained(self.get_submodule(owner) if owner else self, path, decoder=None)
        self.after_pretrained_load()
        if attached_trainer(self) is not None:  # load_pretrained has logged it; a run prints it as fine-tuning does
            self.print(f"continued pretraining from {path}:\n{report.summary()}")
        return report

    def after_pretrained_load(self) -> None:
        """Called after :meth:`load_pretrained_encoder`: e.g. an EMA target takes the loaded weights."""

    def check_task(self, task: str) -> None:
        """Fails when the DataModule's batches are not of a task this method trains on (a PGL run with
        ``task: reconstruct`` would otherwise stop at the first step, missing ``view1``)."""
        if self.accepted_tasks and task not in self.accepted_tasks:
            needed = " or ".join(self.accepted_tasks)
            raise ValueError(f"{type(self).__name__} needs data.init_args.task: {needed} (the DataModule has task "
                             f"{task!r})")

    def check_input_size(self, size: Sequence[int]) -> None:
        """Fails when the DataModule samples superpatches of ``size`` but the network is built for another
        ``superpatch_size``."""
        expected = self.superpatch_size
        if expected is not None and tuple(size) != tuple(expected):
            raise ValueError(
                f"{type(self).__name__} was built for superpatches of {expected}, but the DataModule samples "
                f"{tuple(size)}. State the size once, as data.init_args.superpatch_size (the CLI passes it to the "
                f"model), and remove the deprecated model.init_args.img_size; in Python, build both with one size."
            )

    def describe(self) -> str | None:
        """One line printed at fit start: the network's size and the method's settings; None prints nothing."""
        return None

    def on_fit_start(self) -> None:
        """Continued pretraining: loads the ``pretrained`` hyperparameter of a method with a transfer layout
        (:meth:`load_pretrained_encoder`), unless the run resumes (``trainer.ckpt_path``, known from here on:
        the checkpoint's weights are restored after ``setup``); then prints :meth:`describe`."""
        pretrained = self.hparams.get("pretrained")
        if pretrained and type(self).transfer_layout is not None and self.trainer.ckpt_path is None:
            self.load_pretrained_encoder(pretrained)
        line = self.describe()
        if line:
            self.print(line)

    def configure_model(self) -> None:
        """Applies :attr:`speed_options` to the method's networks (:func:`maesil.methods.speed.networks`):
        channels_last_3d weights and inputs, then ``torch.compile`` in place (``state_dict`` keys stay as
        they are). Lightning calls it before each fit, validate, test or predict; it acts once."""
        if self.speed_options.channels_last:
            channels_last_networks(networks(self))
        if self.speed_options.compile:
            compile_networks(networks(self), self.speed_options)

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups: weight-decayed and not decayed trainable parameters (biases,
        norms and ``no_weight_decay`` names). A group's ``lr_scale`` (layer-wise decay) multiplies its rate."""
        return decay_parameter_groups(self, self.no_weight_decay)

    def scale_learning_rates(self, optimizer: Optimizer) -> None:
        """Multiplies every param group's ``lr`` by ``batch_lr_factor`` and by the group's ``lr_scale``, and
        records the result as the group's ``initial_lr``.

        Called right after the optimizer is built and before the scheduler, so that the scheduler's
        ``base_lrs`` are the scaled rates and :class:`~maesil.callbacks.EncoderWarmup` has them without a
        scheduler.
        """
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self.batch_lr_factor * group.get("lr_scale", 1.0)
            group["initial_lr"] = group["lr"]

    def configure_optimizers(self):
        """Builds the injected optimizer over :meth:`parameter_groups` and a per-step schedule.

        The configured lr is multiplied by ``batch_lr_factor`` (see ``LinearLRScaling``) and each group's
        ``lr_scale``.
        """
        trainer = attached_trainer(self)
        clips = bool(trainer is not None and trainer.gradient_clip_val)
        optimizer = with_fused_step(self.optimizer_factory(self.parameter_groups()), clips_gradients=clips)
        self.scale_learning_rates(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step; for a batch the non-finite guard skipped, the optimizer runs with a learning
        rate of 0, so the weights stay exactly as they were (:mod:`maesil.nonfinite`)."""
        if optimizer_closure is None:
            super().optimizer_step(epoch, batch_idx, optimizer)
            return
        rates: list[float] | None = None
        timed = self.speed_options.compile and len(self.compiled_step_seconds) < 2
        if timed:
            self._synchronize()
            started = time.perf_counter()

        def closure():
            nonlocal rates
            result = optimizer_closure()
            if getattr(self, "_skip_optimizer_update", False):
                self._skip_optimizer_update = False
                rates = skip_optimizer_update(optimizer)
            return result

        try:
            super().optimizer_step(epoch, batch_idx, optimizer, closure)
        finally:
            if rates is not None:
                restore_learning_rates(optimizer, rates)
        if timed:
            self._synchronize()
            self._report_compiled_step(time.perf_counter() - started)

    def _synchronize(self) -> None:
        """Waits for the GPU's queued work (timing of the first compiled steps only)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _report_compiled_step(self, seconds: float) -> None:
        """Records a compiled step's time and, after the second, prints both: their difference is about the
        compile time (``torch.compile`` compiles at the first call of each network)."""
        self.compiled_step_seconds.append(seconds)
        if len(self.compiled_step_seconds) == 2:
            first, second = self.compiled_step_seconds
            self.print(f"torch.compile ({self.speed_options.compile_backend}): first step {first:.2f} s "
                       f"(compilation included), second step {second:.2f} s; compile time about "
                       f"{first - second:.2f} s")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Stores every process's RNG state and the count of skipped non-finite batches, so that
        ``--ckpt_path last`` continues the random streams instead of replaying them from the seed."""
        state = capture_rng_state()
        trainer = attached_trainer(self)
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            states: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["maesil_rng"] = states
        checkpoint["maesil_skipped_batches"] = int(self.skipped_batches)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Keeps this process's RNG state (when the checkpoint has one for its rank) for the first
        training batch, and restores the skip count.

        The state is set at the first resumed batch, not here: building the training iterator draws a
        worker seed from the global RNG, which the interrupted run did at its epoch start, long before
        the checkpoint. Restoring after that draw makes a resumed run with a prepared cache continue
        the very same random stream (masks, dropout) as an uninterrupted one.
        """
        self.skipped_batches = int(checkpoint.get("maesil_skipped_batches", 0))
        states = checkpoint.get("maesil_rng")
        trainer = attached_trainer(self)
        world_size = trainer.world_size if trainer is not None else 1
        if states and len(states) == world_size:
            self._pending_rng_state = states[trainer.global_rank if trainer is not None else 0]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Restores the RNG state of a checkpoint being resumed (see :meth:`on_load_checkpoint`)."""
        state = getattr(self, "_pending_rng_state", None)
        if state is not None:
            restore_rng_state(state)
            self._pending_rng_state = None

    def run_folder(self) -> Path:
        """Folder of this run's logs: the first logger's ``log_dir`` (or ``save_dir``), else
        ``default_root_dir``.

        Reads the logger directly: ``Trainer.log_dir`` broadcasts across DDP processes and would
        deadlock when only rank 0 saves a picture.
        """
        logger = self.logger
        folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        return Path(folder or self.trainer.default_root_dir)

    def log_figure(self, name: str, figure: Figure) -> Path:
        """Saves ``figure`` as PNG in the run folder and sends it to the logger when it takes images.

        Call it on global rank 0 only (it does no collective operation).
        """
        root = self.run_folder()
        path = save_figure(figure, root / name / f"step_{self.global_step:07d}.png")
        self.last_figure_path = path
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=name, images=[str(path)], step=self.global_step)
        return path

    def probe_features(self, images: Tensor) -> Tensor:
        """Frozen encoder features of ``images`` (B, C, X, Y, Z) as a feature map ``(B, C', x, y, z)`` over the
        superpatch, which :class:`maesil.probing.LinearProbe` fits a light probe on while pretraining runs.
        Pretraining methods override it; the caller sets eval mode and disables gradients."""
        raise NotImplementedError(f"{type(self).__name__} does not expose encoder features for a probe "
                                  "(probe_features)")
