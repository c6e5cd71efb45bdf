"""Callbacks shared by every method."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning, Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from maesil.methods.base import MethodModule, datamodule_spec


#: The history key of the seconds spent training (validation excluded) at each validation.
TRAINING_SECONDS = "time/training_seconds"


class RunSummary(Callback):
    """Prints where a finished run left its outputs and how the monitored metrics moved; writes ``summary.json``.

    At the end of ``fit`` (rank 0 only) it prints the last checkpoint, the metrics CSV, the latest
    picture a method saved, and the first and last validation values of each key in ``monitor``, so a
    user sees at a glance whether the run learned.

    It also writes ``<trainer.default_root_dir>/summary.json``: ``status`` (``finished``, ``interrupted`` or,
    from :meth:`on_exception`, ``failed`` with the ``error``), ``global_step``, ``metrics`` (the final value of
    every scalar in ``trainer.callback_metrics``: every validation metric's last value, the last training
    loss), ``history`` (``[step, value]`` pairs of every validation metric, ``val/...``, and of the seconds spent
    training at each validation, ``time/training_seconds``) and, for masked
    methods, ``effective_mask_ratio``. Tools read this file instead of a logger's files, so it works the same
    with the CSV logger, W&B or no logger (``python -m maesil sweep-local`` collects each run's results from
    it). Non-finite values are written as JSON ``NaN``/``Infinity``, which Python's ``json`` reads back.

    Args:
        monitor: Metric keys to report first → last, e.g. ``["val/psnr_masked", "val/ssim"]``.
        summary_file: File name of the summary in ``default_root_dir``; None writes none.
    """

    def __init__(
        self,
        monitor: Sequence[str] = ("val/psnr_masked", "val/psnr", "val/ssim"),
        summary_file: str | None = "summary.json",
    ) -> None:
        self.monitor = list(monitor)
        self.summary_file = summary_file
        # Every monitored key and every validation metric seen, in the order first logged.
        self.history: dict[str, list[tuple[int, float]]] = {key: [] for key in self.monitor}

    @staticmethod
    def _scalar(value: object) -> float | None:
        """A logged metric as a float, or None when it is not a single number."""
        try:
            return float(value)  # tensors with one element, numbers
        except (TypeError, ValueError, RuntimeError):
            return None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_started = time.perf_counter()
        self._evaluation_seconds = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def training_seconds(self) -> float | None:
        """Seconds spent in ``fit`` so far outside validation (None before ``fit`` starts)."""
        started = getattr(self, "_fit_started", None)
        return None if started is None else time.perf_counter() - started - self._evaluation_seconds

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        validation_started = getattr(self, "_validation_started", None)
        if validation_started is not None and getattr(self, "_fit_started", None) is not None:
            self._evaluation_seconds += time.perf_counter() - validation_started
        if trainer.sanity_checking:
            return
        for key, value in trainer.callback_metrics.items():
            if key in self.monitor or key.startswith(("val/", "val_")):
                number = self._scalar(value)
                if number is not None:
                    self.history.setdefault(key, []).append((trainer.global_step, number))
        seconds = self.training_seconds()
        if seconds is not None:
            self.history.setdefault(TRAINING_SECONDS, []).append((trainer.global_step, seconds))

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
        for key in self.monitor:
            values = self.history.get(key)
            if values:
                (first_step, first), (last_step, last) = values[0], values[-1]
                lines.append(f"{key}: {first:.4f} (step {first_step}) -> {last:.4f} (step {last_step})")
                lines.extend(self.reference_lines(key, last))
        seconds = self.history.get(TRAINING_SECONDS)
        if seconds:
            step, value = seconds[-1]
            lines.append(f"training time:   {value:.0f} s to step {step} ({value / max(step, 1):.3f} s/step, "
                         "validation excluded)")
        return lines

    def reference_lines(self, key: str, model_value: float) -> list[str]:
        """The reference fills of ``key`` (``<key>_blur_fill``, ``<key>_mean_fill``, logged by masked methods on
        the same masks) beside the model's last value, so a user sees at once whether the model beats them."""
        lines = []
        for fill in ("blur_fill", "mean_fill"):
            values = self.history.get(f"{key}_{fill}")
            if values:
                reference = values[-1][1]
                lines.append(f"  {fill.replace('_', ' ')} on the same masks: {reference:.4f} "
                             f"(model {model_value - reference:+.4f})")
        return lines

    def summary_record(self, trainer: L.Trainer, pl_module: L.LightningModule, status: str) -> dict:
        """The content of ``summary.json`` (see the class docstring)."""
        metrics = {}
        for key, value in trainer.callback_metrics.items():
            number = self._scalar(value)
            if number is not None:
                metrics[key] = number
        record: dict = {
            "status": status,
            "global_step": int(trainer.global_step),
            "metrics": metrics,
            "history": {key: [[step, value] for step, value in values] for key, values in self.history.items()
                        if values},
        }
        effective = self._scalar(getattr(pl_module, "effective_mask_ratio", None))
        if effective is not None:
            record["effective_mask_ratio"] = effective
        return record

    def write_summary(self, trainer: L.Trainer, record: dict) -> Path | None:
        """Writes ``record`` to ``default_root_dir/summary_file`` (rank 0); returns the path."""
        import json

        if self.summary_file is None or not trainer.is_global_zero:
            return None
        path = Path(trainer.default_root_dir) / self.summary_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            lines = self.summary_lines(trainer, pl_module)
            if lines:
                print("\n== run summary ==\n" + "\n".join(lines), flush=True)
            status = "interrupted" if trainer.interrupted else "finished"
            self.write_summary(trainer, self.summary_record(trainer, pl_module, status))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
            record = self.summary_record(trainer, pl_module, status)
            record["error"] = f"{type(exception).__name__}: {exception}"
            self.write_summary(trainer, record)


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

    A module whose encoder is frozen for the whole run (``freeze_encoder``, see
    :class:`maesil.methods.Segmentation`) is left as it is: the callback never unfreezes that encoder.

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
        if getattr(pl_module, "freeze_encoder", False):
            return  # the module keeps its encoder frozen for the whole run: never unfrozen here
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


class LinearLRScaling(Callback):
    """Linear learning-rate scaling rule: lr = configured lr × effective batch / ``base_batch_size``.

    MAE and SelfMedMAE give a *base* rate for a batch of 256 and scale it with the batch actually used.
    The optimizer comes from the YAML as a factory, and the effective batch is only known at run time
    (it depends on ``--data.init_args.batch_size``, gradient accumulation and the number of processes), so
    this callback computes it in ``setup`` (which Lightning runs before ``configure_optimizers``) as::

        effective batch = datamodule.spec.batch_size × trainer.accumulate_grad_batches × trainer.world_size

    and sets the module's ``batch_lr_factor`` to ``effective / base_batch_size``. The module multiplies
    every param group's rate by it before building the scheduler, so the schedule's base rates are the
    scaled ones and ``LearningRateMonitor`` logs the scaled rate.

    On resume (``--ckpt_path``) Lightning restores the optimizer and scheduler state after
    ``configure_optimizers``, so the rates are those of the checkpoint, scaled for the batch it was trained
    with; a resume with a different effective batch keeps the old rates and warns.

    Args:
        base_batch_size: the batch the configured lr refers to (256 in MAE and SelfMedMAE).

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: maesil.callbacks.LinearLRScaling
              init_args: {base_batch_size: 256}
    """

    def __init__(self, base_batch_size: int = 256) -> None:
        if int(base_batch_size) != base_batch_size or base_batch_size < 1:
            raise ValueError(f"base_batch_size must be a positive integer, got {base_batch_size!r}")
        self.base_batch_size = int(base_batch_size)
        self.effective_batch_size: int | None = None
        self.factor: float | None = None

    def effective_batch(self, trainer: L.Trainer) -> tuple[int, str]:
        """The effective batch and how it was formed (``"4 per device × 1 accumulated × 1 process(es)"``)."""
        spec = datamodule_spec(trainer)
        batch_size = spec.batch_size if spec is not None else None
        if not isinstance(batch_size, int) or batch_size < 1:
            datamodule = getattr(trainer, "datamodule", None)
            raise ValueError(
                "LinearLRScaling needs a DataModule with an integer `batch_size` (per device) in its `spec` to "
                f"compute the effective batch; got datamodule {type(datamodule).__name__} with batch_size "
                f"{batch_size!r}. Run through maesil.data.VolumeDataModule, or remove the callback."
            )
        accumulate = int(trainer.accumulate_grad_batches)
        processes = int(trainer.world_size)
        how = f"{batch_size} per device × {accumulate} accumulated × {processes} process(es)"
        return batch_size * accumulate * processes, how

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, MethodModule):
            raise TypeError(
                f"LinearLRScaling scales the optimizer of maesil's methods (MethodModule subclasses, which "
                f"apply `batch_lr_factor` in configure_optimizers); got {type(pl_module).__name__}"
            )
        self.effective_batch_size, how = self.effective_batch(trainer)
        self.factor = self.effective_batch_size / self.base_batch_size
        pl_module.batch_lr_factor = self.factor
        if trainer.is_global_zero:
            print(
                f"lr scaled by {self.effective_batch_size}/{self.base_batch_size} = {self.factor:.3g} "
                f"(linear scaling rule, base batch {self.base_batch_size}; effective batch = {how})",
                flush=True,
            )

    def state_dict(self) -> dict:
        return {"effective_batch_size": self.effective_batch_size, "base_batch_size": self.base_batch_size}

    def load_state_dict(self, state_dict: dict) -> None:
        """Warns when a resumed run's effective batch differs from the checkpoint's (its rates are kept)."""
        import warnings

        saved = state_dict.get("effective_batch_size")
        if saved is not None and self.effective_batch_size is not None and saved != self.effective_batch_size:
            warnings.warn(
                f"LinearLRScaling: resuming with effective batch {self.effective_batch_size}, but the checkpoint "
                f"was trained with {saved}. The optimizer and scheduler state of the checkpoint are restored, so "
                f"the learning rates stay scaled for batch {saved}.",
                stacklevel=2,
            )
