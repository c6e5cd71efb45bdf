"""``KEY=VALUE`` overrides that the tools pass on to the training runs they start, e.g.
``--set data.init_args.num_workers=4``: one place that reads them and turns them into ``fit`` arguments."""

from __future__ import annotations

from collections.abc import Sequence


def is_override(item: str) -> bool:
    """Whether ``item`` reads ``KEY=VALUE`` with a key (``data.init_args.batch_size=2``)."""
    key, equals, _ = item.partition("=")
    return bool(equals) and bool(key.strip("-"))


def override_arguments(items: Sequence[str]) -> list[str]:
    """``KEY=VALUE`` items as LightningCLI arguments: ``["--KEY", "VALUE", ...]`` (leading dashes of a key
    are allowed and kept once)."""
    arguments: list[str] = []
    for item in items:
        key, _, value = item.partition("=")
        arguments += [f"--{key.lstrip('-')}", value]
    return arguments
