"""One way to turn "one number or three" into a validated 3-tuple (sizes, spacings, windows per axis)."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real
from typing import TypeVar

__all__ = ["as_triple"]

Number = TypeVar("Number", int, float)


def as_triple(value: Real | Sequence[Real], name: str = "size", kind: type[Number] = int,
              positive: bool = True) -> tuple[Number, Number, Number]:
    """``128`` -> ``(128, 128, 128)``; ``(1.5, 1.5, 2)`` -> ``(1.5, 1.5, 2.0)`` with ``kind=float``.

    Args:
        value: one number (a cube) or three (X, Y, Z).
        name: what the value is, for the error message (``"superpatch_size"``, ``"target_spacing"``...).
        kind: ``int`` (sizes: a float such as 1.5 is refused) or ``float`` (spacings).
        positive: refuse zero and negative values.

    Raises:
        ValueError: not one number nor three, a non-integral size, or a value < 1 (int) / <= 0 (float)
            with ``positive``.
    """
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a number or three numbers, got {value!r}")
    values = (value,) * 3 if isinstance(value, Real) else tuple(value)  # type: ignore[arg-type]
    if len(values) != 3 or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be a number or three numbers, got {value!r}")
    if kind is int:
        if not all(isinstance(v, Integral) or float(v).is_integer() for v in values):
            raise ValueError(f"{name} must be whole numbers, got {value!r}")
        out = tuple(int(v) for v in values)
        if positive and any(v < 1 for v in out):
            raise ValueError(f"{name} must be a positive int or three positive ints, got {value!r}")
    else:
        out = tuple(float(v) for v in values)
        if positive and any(v <= 0 for v in out):
            raise ValueError(f"{name} must be positive, got {value!r}")
    return out  # type: ignore[return-value]
