"""Callbacks shared by every method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
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
