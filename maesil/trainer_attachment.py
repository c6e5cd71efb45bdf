"""Whether a LightningModule runs under a Trainer, asked through Lightning's public API.

Methods and the non-finite guard also run outside a Trainer (unit tests, ``benchmark-recon`` calling
``reconstruct_for_evaluation``). ``LightningModule.trainer`` raises ``RuntimeError`` there; this module is the
one place that turns that into ``None``, instead of reading Lightning's private ``module._trainer``.
"""

from __future__ import annotations

import lightning as L

__all__ = ["attached_trainer"]


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """``module.trainer``, or None when no Trainer is attached."""
    try:
        return module.trainer
    except RuntimeError:
        return None
