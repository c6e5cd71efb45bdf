"""Transfer layouts: which keys of a method's checkpoint are the encoder and decoder that fine-tuning takes.

Each method declares its layout next to its own code (``transfer_layout`` on the LightningModule class);
the base class registers it here under the class name when the class is defined. Checkpoint loading and
export find it through the checkpoint's class path (LightningCLI's ``_class_path``, an export's ``method``),
or, for a checkpoint that carries no class path, by asking every registered layout whether it recognises
the keys. Nothing in :mod:`maesil.checkpoints` lists the methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

__all__ = ["TransferLayout", "register_layout", "registered_layouts"]

Network = Literal["vit", "resenc", "none"]


@dataclass(frozen=True)
class TransferLayout:
    """How a method's checkpoint maps onto a downstream network.

    Attributes:
        prefixes: checkpoint key prefix -> downstream prefix, e.g. ``{"net.encoder.": "encoder."}``. The
            downstream names are those of :class:`maesil.models.unet.ResEncUNet` (``encoder.``, ``decoder.``)
            and of networks holding a :class:`maesil.models.vit3d.ViTEncoder3D` at ``encoder`` (UNETR). Empty:
            the method has nothing that transfers (the AE/VAE/VQ-VAE baselines).
        network: the encoder family the prefixes describe: ``"vit"``, ``"resenc"`` or ``"none"``.
        untrained: prefixes present in the checkpoint but never trained (BYOL's U-Net decoder): exported only
            on explicit request, with a warning.
        recognise: for checkpoints without a class path: True when the keys are this method's.
    """

    prefixes: Mapping[str, str]
    network: Network
    untrained: Mapping[str, str] = field(default_factory=dict)
    recognise: Callable[[Mapping[str, Tensor]], bool] | None = None


_LAYOUTS: dict[str, TransferLayout] = {}


def register_layout(method: str, layout: TransferLayout) -> None:
    """Registers ``layout`` under the LightningModule class name ``method`` (a later class of the same name,
    e.g. a user's subclass defined in a notebook twice, replaces the earlier one)."""
    _LAYOUTS[method] = layout


def registered_layouts() -> dict[str, TransferLayout]:
    """Method class name -> layout, for every method class defined so far (``maesil.methods`` imported)."""
    return dict(_LAYOUTS)
