"""A non-finite training loss stops the run loudly, naming the step and the subjects of the batch.

A NaN loss usually comes from the data (a NaN or Inf voxel that slipped past ``check_voxels: false``, a
corrupt volume), sometimes from the optimisation (a learning rate that is too high). Either way, training
on would silently turn every weight into NaN and the run would go on for hours producing nothing.
Every method's ``training_step`` is guarded (:class:`maesil.methods.base.MethodModule` wraps it with
:func:`guard_training_step`): when the loss is NaN or Inf the run raises :class:`NonFiniteLossError` with the
global step, the epoch, the batch index and the subject ids of the batch.

A run may instead skip up to K such batches, each one logged as a warning and counted in
``train/skipped_batches``; the (K+1)-th raises. A skipped batch leaves the weights exactly as they were: its
loss is replaced by a zero that gives every parameter a zero gradient (so DDP's gradient all-reduce still sees
every parameter on every process, which returning ``None`` would break) and the optimizer steps with a learning
rate of 0 (:func:`skip_optimizer_update`). The step counter and the schedule advance, and momentum-type optimizer
state decays by one step. With gradient accumulation the whole accumulated step is skipped. The budget K is set
by the :class:`NonFiniteSkipBudget` callback (the guard itself is always on)::

    trainer:
      callbacks:
        - class_path: maesil.nonfinite.NonFiniteSkipBudget
          init_args: {max_skipped_batches: 10}

``NonFiniteLossGuard``, the callback's former name, is still accepted in YAML (with a ``FutureWarning``).

Under DDP the check is agreed across processes (one all-reduce of a flag per step), so every process raises
or skips together and none waits forever for the others.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from maesil.trainer_attachment import attached_trainer

__all__ = ["NonFiniteLossError", "NonFiniteSkipBudget", "NonFiniteLossGuard", "guard_training_step", "batch_subjects",
           "skip_optimizer_update", "restore_learning_rates"]

log = logging.getLogger("maesil")


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or Inf (more often than the run allows)."""


def batch_subjects(batch: Any) -> list[str]:
    """Subject ids of a batch (``subject_id`` of the DataModule's batch dict), or ``[]`` if it has none."""
    if isinstance(batch, dict):
        ids = batch.get("subject_id")
        if isinstance(ids, str):
            return [ids]
        if isinstance(ids, Sequence):
            return [str(i) for i in ids]
    return []


def _loss_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    return None


class NonFiniteSkipBudget(Callback):
    """Lets a run skip up to ``max_skipped_batches`` batches whose loss is NaN/Inf instead of stopping.

    The guard is always on; without this callback the budget is 0: the first non-finite loss raises
    :class:`NonFiniteLossError`. The number of skipped batches is saved in checkpoints, so a resumed run does
    not get a fresh budget.
    """

    def __init__(self, max_skipped_batches: int = 0) -> None:
        if max_skipped_batches < 0:
            raise ValueError(f"max_skipped_batches must be >= 0, got {max_skipped_batches}")
        self.max_skipped_batches = int(max_skipped_batches)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.max_skipped_batches = self.max_skipped_batches


class NonFiniteLossGuard(NonFiniteSkipBudget):
    """Deprecated name of :class:`NonFiniteSkipBudget`, kept for trainer YAMLs that name it."""

    def __init__(self, max_skipped_batches: int = 0) -> None:
        warnings.warn("maesil.nonfinite.NonFiniteLossGuard is deprecated; use maesil.nonfinite.NonFiniteSkipBudget "
                      "(the same callback: it sets the skip budget of the always-on guard)", FutureWarning,
                      stacklevel=2)
        super().__init__(max_skipped_batches)


def _all_finite(module: L.LightningModule, trainer: L.Trainer | None, finite: bool) -> bool:
    """``finite`` agreed across DDP processes (False if any process saw a non-finite loss)."""
    if trainer is None or trainer.world_size <= 1:
        return finite
    flag = torch.tensor(1.0 if finite else 0.0, device=module.device)
    return bool(trainer.strategy.reduce(flag, reduce_op="min") > 0.5)


def _gathered_subjects(trainer: L.Trainer | None, subjects: list[str]) -> list[str]:
    if trainer is None or trainer.world_size <= 1 or not torch.distributed.is_initialized():
        return subjects
    gathered: list[list[str] | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, subjects)
    return [s for part in gathered for s in (part or [])]


def _zero_loss(module: L.LightningModule, like: Tensor) -> Tensor:
    """0, with a zero gradient for every trainable parameter (and no path through the NaN computation)."""
    zero = torch.zeros((), device=like.device, dtype=torch.float32)
    for parameter in module.parameters():
        if parameter.requires_grad:
            zero = zero + parameter.sum() * 0.0
    return zero


def skip_optimizer_update(optimizer: torch.optim.Optimizer) -> list[float]:
    """Sets every param group's learning rate to 0 (so neither the update nor decoupled weight decay
    moves a weight) and returns the previous rates for :func:`restore_learning_rates`."""
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    return rates


def restore_learning_rates(optimizer: torch.optim.Optimizer, rates: Sequence[float]) -> None:
    """Undoes :func:`skip_optimizer_update`."""
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate


def guard_training_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a LightningModule's ``training_step``: a NaN/Inf loss raises or, within the module's
    ``max_skipped_batches`` budget, returns a zero loss and flags the module so that its optimizer step
    changes nothing (see the module docstring)."""

    if getattr(step, "_maesil_guarded", False):
        return step

    @functools.wraps(step)
    def guarded(self: L.LightningModule, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        output = step(self, batch, batch_idx, *args, **kwargs)
        loss = _loss_tensor(output)
        if loss is None:
            return output
        trainer = attached_trainer(self)
        finite = _all_finite(self, trainer, bool(torch.isfinite(loss.detach()).all()))
        if finite:
            return output
        subjects = _gathered_subjects(trainer, batch_subjects(batch))
        value = float(loss.detach().float().reshape(-1)[0]) if loss.numel() else math.nan
        where = (f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
                 if trainer is not None else f"batch {batch_idx}")
        names = ", ".join(subjects) if subjects else "unknown (the batch has no subject_id)"
        skipped = int(getattr(self, "skipped_batches", 0))
        budget = int(getattr(self, "max_skipped_batches", 0))
        if skipped < budget:
            self.skipped_batches = skipped + 1
            if trainer is None or trainer.is_global_zero:
                log.warning("non-finite loss (%s) at %s; subjects: %s. Batch skipped (%d of at most %d).",
                            value, where, names, skipped + 1, budget)
            if trainer is not None:
                self.log("train/skipped_batches", float(skipped + 1), on_step=True, on_epoch=False, sync_dist=False)
            self._skip_optimizer_update = True
            return _zero_loss(self, loss)
        allowance = (f" {skipped} such batches were already skipped (max_skipped_batches={budget})." if budget
                     else " To skip such batches instead, add the callback maesil.nonfinite.NonFiniteSkipBudget "
                          "with max_skipped_batches > 0.")
        raise NonFiniteLossError(
            f"non-finite training loss ({value}) at {where}. Subjects in this batch: {names}. "
            f"Check these volumes for NaN/Inf voxels (python -m maesil check-data DIR reads every voxel), "
            f"or lower the learning rate if the data are clean.{allowance}"
        )

    guarded._maesil_guarded = True  # type: ignore[attr-defined]
    return guarded
