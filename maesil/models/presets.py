"""Named network configurations: every network is built from a preset of its ``<NAME>_PRESETS`` the same way."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["from_preset"]

Network = TypeVar("Network")


def from_preset(network: Callable[..., Network], presets: Mapping[str, Mapping[str, Any]], name: str,
                **overrides: Any) -> Network:
    """``network(**presets[name], **overrides)``: a named configuration with some arguments replaced or added.

    Args:
        network: the network class (or builder function) the presets configure.
        presets: preset name -> constructor arguments, e.g. :data:`maesil.models.unet.UNET_PRESETS`.
        name: the preset to use.
        overrides: constructor arguments that replace the preset's or add to them (e.g. ``out_channels``).

    Raises:
        ValueError: on an unknown preset name or an argument ``network`` does not take; the message lists the
            choices.
    """
    label = getattr(network, "__name__", type(network).__name__)
    if name not in presets:
        raise ValueError(f"unknown {label} preset {name!r}; choose from {sorted(presets)}.")
    parameters = inspect.signature(network).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted = [n for n, p in parameters.items()
                    if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        unknown = sorted(set(overrides) - set(accepted))
        if unknown:
            raise ValueError(f"unknown {label} arguments {unknown}; {label} takes {sorted(accepted)}.")
    return network(**{**presets[name], **overrides})
