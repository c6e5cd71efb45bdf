"""Constructor arguments that several methods share: renamed arguments and U-Net overrides.

Renamed arguments: methods take ``superpatch_size`` (the cube the network is built for, which the CLI links to
``data.init_args.superpatch_size``) and MAESIL ``token_size`` (the ViT token edge). Their older names,
``img_size`` and ``patch_size``, stay accepted because YAML files and the hyperparameters of existing
checkpoints use them; :func:`renamed_argument` resolves the pair with a ``FutureWarning`` that names the new
key (FutureWarning, not DeprecationWarning, so that users of ``python -m maesil`` see it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from maesil.shapes import as_triple

__all__ = ["renamed_argument", "superpatch_argument", "unet_overrides"]

Value = TypeVar("Value")


def renamed_argument(owner: str, name: str, value: Value | None, old_name: str, old_value: Value | None,
                     default: Value, yaml_key: str, same: Callable[[Any], Any] = lambda v: v) -> Value:
    """The value of argument ``name`` that was called ``old_name`` before.

    Args:
        owner: who takes the argument (class name), for the messages.
        name, value: the argument and its value (None: not given).
        old_name, old_value: the deprecated name and its value (None: not given).
        default: the value when neither is given.
        yaml_key: where a YAML states the value now, for the warning (``data.init_args.superpatch_size``).
        same: normalises values before comparing them (e.g. ``32`` and ``[32, 32, 32]`` for sizes).

    Returns:
        ``value``, else ``old_value``, else ``default``; as given, not normalised. A given ``old_value`` warns
        (``FutureWarning``) even when ``value`` repeats it.

    Raises:
        ValueError: both names are given with different values.
    """
    if old_value is None:
        return default if value is None else value
    if value is not None and same(value) != same(old_value):
        raise ValueError(f"{owner} got {old_name}={old_value!r} and {name}={value!r}; {old_name} is the deprecated "
                         f"name of {name}: give {name} only")
    warnings.warn(f"{owner}: {old_name} is deprecated, use {name} (in YAML: {yaml_key})", FutureWarning, stacklevel=3)
    return old_value if value is None else value


def superpatch_argument(owner: str, superpatch_size: int | Sequence[int] | None, img_size: int | Sequence[int] | None,
                        default: int | Sequence[int]) -> int | Sequence[int]:
    """``superpatch_size``, or the deprecated ``img_size`` (see :func:`renamed_argument`), or ``default``."""
    return renamed_argument(owner, "superpatch_size", superpatch_size, "img_size", img_size, default,
                            yaml_key="data.init_args.superpatch_size, which the model follows",
                            same=lambda size: as_triple(size, "superpatch_size"))


def unet_overrides(features: Sequence[int] | None, blocks_per_stage: Sequence[int] | None,
                   strides: Sequence[int] | None) -> dict[str, list[int]]:
    """The U-Net preset arguments a method's YAML replaces (the given ones, as lists), for
    :func:`maesil.models.presets.from_preset`."""
    given = {"features": features, "blocks_per_stage": blocks_per_stage, "strides": strides}
    return {name: list(value) for name, value in given.items() if value is not None}
