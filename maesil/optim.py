"""Learning-rate schedules and parameter groups shared by every method.

Schedulers are given to LightningModules as callables ``scheduler(optimizer, total_steps)``; the module
passes ``trainer.estimated_stepping_batches`` as ``total_steps`` so that a schedule follows
``--trainer.max_steps`` without being configured twice. torch schedulers whose second positional argument
is a step count (``CosineAnnealingLR``, ``PolynomialLR``) fit the same signature.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Callable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

OptimizerFactory = Callable[[Iterable], Optimizer]
SchedulerFactory = Callable[[Optimizer, int], LRScheduler]


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from ``warmup_start_ratio``·lr to lr, then cosine decay to ``min_lr_ratio``·lr.

    Args:
        optimizer: Wrapped optimizer.
        total_steps: Optimizer steps of the whole run (warm-up included).
        warmup_steps: Steps of linear warm-up. Capped at ``total_steps``.
        min_lr_ratio: Final learning rate as a fraction of the base rate.
        warmup_start_ratio: First learning rate as a fraction of the base rate.

    Example:
        >>> opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
        >>> sched = WarmupCosineLR(opt, total_steps=100, warmup_steps=10)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.0,
        warmup_start_ratio: float = 0.0,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.total_steps = int(total_steps)
        self.warmup_steps = min(int(warmup_steps), self.total_steps)
        self.min_lr_ratio = min_lr_ratio
        self.warmup_start_ratio = warmup_start_ratio
        super().__init__(optimizer, self.lr_factor)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimizer step ``step``."""
        if step < self.warmup_steps:
            fraction = (step + 1) / self.warmup_steps
            return self.warmup_start_ratio + (1.0 - self.warmup_start_ratio) * fraction
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


class PolyLR(LambdaLR):
    """nnU-Net's polynomial decay ``(1 − step / total)^exponent``, after an optional linear warm-up.

    With ``warmup_steps`` = w > 0 the factor rises linearly from ``warmup_start_ratio`` to 1 over the first w
    steps (as :class:`WarmupCosineLR`), then decays as ``(1 − (step − w) / (total − w))^exponent``, reaching
    0 at ``total_steps``. nnU-Net (and S3D) use exponent 0.9 and no warm-up.

    Args:
        optimizer: Wrapped optimizer.
        total_steps: Optimizer steps of the whole run (warm-up included).
        exponent: Power of the decay (0.9 in nnU-Net; 1 is linear, 0 constant).
        warmup_steps: Steps of linear warm-up. Capped at ``total_steps``.
        warmup_start_ratio: First learning rate as a fraction of the base rate.

    Example:
        >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-2, momentum=0.99, nesterov=True)
        >>> sched = PolyLR(opt, total_steps=1000, exponent=0.9)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        exponent: float = 0.9,
        warmup_steps: int = 0,
        warmup_start_ratio: float = 0.0,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if exponent < 0:
            raise ValueError(f"exponent must be >= 0, got {exponent}")
        if not 0.0 <= warmup_start_ratio <= 1.0:
            raise ValueError(f"warmup_start_ratio must be in [0, 1], got {warmup_start_ratio}")
        self.total_steps = int(total_steps)
        self.warmup_steps = min(int(warmup_steps), self.total_steps)
        self.exponent = float(exponent)
        self.warmup_start_ratio = warmup_start_ratio
        super().__init__(optimizer, self.lr_factor)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimizer step ``step``."""
        if step < self.warmup_steps:
            fraction = (step + 1) / self.warmup_steps
            return self.warmup_start_ratio + (1.0 - self.warmup_start_ratio) * fraction
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return (1.0 - progress) ** self.exponent


def adamw(params: Iterable) -> Optimizer:
    """AdamW as MAE-style pretraining uses it: lr 1.5e-4, betas (0.9, 0.95), weight decay 0.05."""
    return torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)


def warmup_cosine(optimizer: Optimizer, total_steps: int) -> LRScheduler:
    """Default schedule: 5% linear warm-up (at most 1000 steps), then cosine to zero."""
    warmup = min(1000, max(1, total_steps // 20))
    return WarmupCosineLR(optimizer, total_steps=total_steps, warmup_steps=warmup)


def decay_parameter_groups(module: nn.Module, no_decay_names: Iterable[str] = ()) -> list[dict]:
    """Split parameters into weight-decayed and not decayed groups.

    Biases, normalisation weights (every parameter with fewer than 2 dims) and parameters whose name
    contains one of ``no_decay_names`` (e.g. ``mask_token``) get no weight decay, as in MAE and BYOL.
    The optimizer's own ``weight_decay`` applies to the first group.
    """
    skip = tuple(no_decay_names)
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(token in name for token in skip):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


#: torch optimizers that have a fused (single-kernel) CUDA step.
FUSED_OPTIMIZERS: tuple[type[Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW)


def prefers_fused(optimizer_class: type[Optimizer], settings: dict, device: torch.device) -> bool:
    """Whether an optimizer of ``optimizer_class`` with ``settings`` (its ``defaults`` or one param group)
    should run its fused CUDA step: torch's Adam or AdamW, parameters on a CUDA ``device``, and neither
    ``fused`` nor ``foreach`` chosen by the user (both None), nor ``differentiable`` (which fused refuses)."""
    return (optimizer_class in FUSED_OPTIMIZERS and torch.device(device).type == "cuda"
            and settings.get("fused") is None and settings.get("foreach") is None
            and not settings.get("differentiable", False))


def with_fused_step(optimizer: Optimizer, clips_gradients: bool = False) -> Optimizer:
    """``optimizer`` rebuilt over the same param groups with ``fused=True`` (a new optimizer, no state), where
    :func:`prefers_fused` says so for its defaults and every group on the device of its parameters;
    otherwise ``optimizer`` itself. Call it right after building the optimizer, before any step.

    With ``clips_gradients`` (the trainer's ``gradient_clip_val``) the optimizer stays as it is: a fused step
    unscales gradients itself, and Lightning's mixed-precision plugin refuses to clip for such an optimizer."""
    parameters = [param for group in optimizer.param_groups for param in group["params"]]
    if not parameters or clips_gradients:
        return optimizer
    optimizer_class = type(optimizer)
    devices = {param.device for param in parameters}
    if len(devices) != 1 or optimizer.state:
        return optimizer
    device = devices.pop()
    if not all(prefers_fused(optimizer_class, settings, device)
               for settings in [optimizer.defaults, *optimizer.param_groups]):
        return optimizer
    accepted = inspect.signature(optimizer_class.__init__).parameters
    defaults = {key: value for key, value in optimizer.defaults.items() if key in accepted and key != "foreach"}
    groups = [{**group, "fused": True} for group in optimizer.param_groups]
    return optimizer_class(groups, **{**defaults, "fused": True})
