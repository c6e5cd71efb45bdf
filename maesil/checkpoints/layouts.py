"""Transfer layouts: which keys of a method's checkpoint are the encoder and decoder that fine-tuning takes.

Each method declares its layout next to its own code (``transfer_layout`` on the LightningModule class);
the base class registers it here under the class name when the class is defined. Checkpoint loading and
export find it through the checkpoint's class path (LightningCLI's ``_class_path``, an export's ``method``),
or, for a checkpoint that carries no class path, by asking every registered layout whether it recognises
the keys. Nothing in :mod:`maesil.checkpoints` lists the methods.

The lookups (:func:`method_layouts`, :func:`identify_method`) import :mod:`maesil.methods` with
:func:`importlib.import_module` first, so that the built-in methods have registered themselves even when
the caller never imported them. The import is dynamic on purpose: :mod:`maesil.methods` imports this
module (its base class registers the layouts), so a static import here would be a cycle, and
``maesil.checkpoints`` stays usable without the methods loaded. A class path from a checkpoint is never
imported here: only the names of classes already defined are looked up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

__all__ = [
    "TransferLayout",
    "any_key_starts_with",
    "identify_method",
    "layout_name",
    "method_layouts",
    "named_method",
    "register_layout",
    "registered_layouts",
    "transferable_layouts",
]

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


def method_layouts() -> dict[str, TransferLayout]:
    """:func:`registered_layouts` after importing :mod:`maesil.methods`, in the order the classes were defined."""
    importlib.import_module("maesil.methods")
    return registered_layouts()


def any_key_starts_with(state: Mapping[str, Any], *prefixes: str) -> bool:
    """True when a key of ``state`` starts with one of ``prefixes``: the usual test of a ``recognise``."""
    return any(key.startswith(prefixes) for key in state)


def layout_name(method: str) -> str:
    """The name a method's layout is reported under (:class:`~maesil.checkpoints.transfer.LoadReport`, the
    export sidecar): the class name in lower case, e.g. ``"pgl"``."""
    return method.lower()


def named_method(metadata: Mapping[str, Any]) -> str | None:
    """The method class name a checkpoint's metadata states: an export's ``method``, else the last part of
    LightningCLI's ``hyper_parameters["_class_path"]``; None when it states none."""
    named = metadata.get("method")
    if isinstance(named, str) and named:
        return named
    class_path = (metadata.get("hyper_parameters") or {}).get("_class_path")
    if isinstance(class_path, str) and class_path:
        return class_path.rsplit(".", 1)[-1]
    return None


def identify_method(state: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None) -> str | None:
    """The method (LightningModule class name) of a checkpoint, or None when unknown.

    The class the metadata names wins when it has a registered layout. Otherwise the first class, in the
    order the classes were defined, whose layout's ``recognise`` accepts the keys: maesil's own methods
    (whose recognisers exclude each other) come before any class defined later, so a broader recogniser of
    a user's method never captures their old checkpoints. Failing that, the name the metadata states as it
    is (a class without a layout, e.g. a user's method), else None.
    """
    named = named_method(metadata or {})
    layouts = method_layouts()
    if named in layouts:
        return named
    for method, layout in layouts.items():
        if layout.recognise is not None and layout.recognise(state):
            return method
    return named


def transferable_layouts() -> dict[str, TransferLayout]:
    """The layouts of :func:`method_layouts` that transfer something, each under the first class declaring it."""
    layouts: dict[str, TransferLayout] = {}
    for method, layout in method_layouts().items():
        if layout.prefixes and all(layout is not seen for seen in layouts.values()):
            layouts[method] = layout
    return layouts
