"""Callbacks shared by every method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning, Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger


class RunSummary(Callback):
    """Prints where a finished run left its outputs, and how the monitored metrics moved.

    At the end of ``fit`` (rank 0 only) it prints the last checkpoint, the metrics CSV, the latest
    picture a method saved, and the first and last validation values of each key in ``monitor``, so a
    user sees at a glance whether the run learned.

    Args:
        monitor: Metric keys to report first → last, e.g. ``["val/psnr_masked", "val/ssim"]``.
    """

    def __init__(self, monitor: Sequence[str] = ("val/psnr_masked", "val/psnr", "val/ssim")) -> None:
        self.monitor = list(monitor)
        self.history: dict[str, list[tuple[int, float]]] = {key: [] for key in self.monitor}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key in self.monitor:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.history[key].append((trainer.global_step, float(value)))

    def summary_lines(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        """The lines :meth:`on_fit_end` prints."""
        lines = []
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint):
            path = checkpoint.last_model_path or checkpoint.best_model_path
            if path:
                lines.append(f"checkpoint:      {Path(path).resolve()}")
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                lines.append(f"metrics CSV:     {Path(logger.experiment.metrics_file_path).resolve()}")
        figure = getattr(pl_module, "last_figure_path", None)
        if figure:
            lines.append(f"last picture:    {Path(figure).resolve()}")
        for key, values in self.history.items():
            if values:
                (first_step, first), (last_step, last) = values[0], values[-1]
                lines.append(f"{key}: {first:.4f} (step {first_step}) -> {last:.4f} (step {last_step})")
        return lines

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            lines = self.summary_lines(trainer, pl_module)
            if lines:
                print("\n== run summary ==\n" + "\n".join(lines), flush=True)


class EncoderWarmup(BaseFinetuning):
    """Decoder-only warm-up, then the whole network with a linear warm-up of the encoder's learning rate.

    For the first ``decoder_only_steps`` optimizer steps the encoder (``pl_module.encoder``) is frozen and
    only the freshly initialised decoder learns, so that its random gradients do not wreck the pretrained
    features. Then the encoder is unfrozen and its learning rate rises linearly from 0 to the scheduled
    rate over ``encoder_warmup_steps``. The encoder's parameter groups (``is_encoder`` in the optimizer,
    see :meth:`maesil.methods.Segmentation.parameter_groups`) are in the optimizer from the start, so the
    module's schedule (cosine, layer-wise decay) keeps governing them; this callback multiplies their rate
    by the warm-up factor before every step.

    Under DDP the encoder is not frozen (DDP fixes the set of synchronised parameters when it wraps the
    model, and parameters unfrozen later would silently stop being averaged across processes); its
    learning rate is held at 0 instead, which gives the same updates at the cost of its backward pass.

    Args:
        decoder_only_steps: steps with a frozen encoder.
        encoder_warmup_steps: steps of linear encoder warm-up after that (0: full rate at once).
    """

    def __init__(self, decoder_only_steps: int = 100, encoder_warmup_steps: int = 100) -> None:
        super().__init__()
        if decoder_only_steps < 0 or encoder_warmup_steps < 0:
            raise ValueError(f"steps must be >= 0, got {decoder_only_steps} and {encoder_warmup_steps}")
        self.decoder_only_steps = int(decoder_only_steps)
        self.encoder_warmup_steps = int(encoder_warmup_steps)
        self._frozen = False
        self._distributed = False

    def encoder_factor(self, step: int) -> float:
        """Multiplier of the encoder's scheduled learning rate at optimizer step ``step``."""
        if step < self.decoder_only_steps:
            return 0.0
        if self.encoder_warmup_steps == 0:
            return 1.0
        return min(1.0, (step - self.decoder_only_steps + 1) / self.encoder_warmup_steps)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._distributed = trainer.world_size > 1
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if not hasattr(pl_module, "encoder"):
            raise TypeError(f"EncoderWarmup needs a module with an `encoder`, got {type(pl_module).__name__}")
        if self.decoder_only_steps > 0 and not self._distributed:
            self.freeze(pl_module.encoder, train_bn=False)
            self._frozen = True

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
        """Epoch hook of ``BaseFinetuning``; this schedule is per step (:meth:`on_train_batch_start`)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Per-step schedule only: the epoch-based parameter-group bookkeeping of the base class is not used."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._frozen and step >= self.decoder_only_steps:
            self.make_trainable(pl_module.encoder)
            self._frozen = False
            pl_module.print(f"step {step}: encoder unfrozen, learning rate warming up over "
                            f"{self.encoder_warmup_steps} steps")
        factor = self.encoder_factor(step)
        schedulers = {id(config.scheduler.optimizer): config.scheduler for config in trainer.lr_scheduler_configs}
        for optimizer in trainer.optimizers:
            scheduler = schedulers.get(id(optimizer))
            # The scheduled rate (not the group's current one, which this hook already scaled), so that
            # repeated calls before one optimizer step (gradient accumulation) do not compound.
            scheduled = scheduler.get_last_lr() if scheduler is not None else [g.get("initial_lr", g["lr"])
                                                                               for g in optimizer.param_groups]
            for group, rate in zip(optimizer.param_groups, scheduled):
                if group.get("is_encoder"):
                    group["lr"] = rate * factor
