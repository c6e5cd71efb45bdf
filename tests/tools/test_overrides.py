"""``KEY=VALUE`` overrides as the tools pass them to training runs."""

from __future__ import annotations

import pytest

from maesil.tools.overrides import is_override, override_arguments


@pytest.mark.parametrize(("item", "valid"), [
    ("data.init_args.batch_size=2", True),
    ("--trainer.max_steps=10", True),
    ("model.init_args.pretrained=", True),  # an empty value is a value (e.g. an empty string)
    ("trainer.max_steps", False),
    ("=3", False),
    ("--=3", False),
])
def test_an_override_needs_a_key_and_an_equals_sign(item, valid):
    assert is_override(item) is valid


def test_overrides_become_fit_arguments_in_order_with_values_kept_whole():
    assert override_arguments(["data.init_args.num_workers=4", "--trainer.precision=bf16-mixed",
                               "model.init_args.network_args={\"a\": \"b=c\"}"]) == [
        "--data.init_args.num_workers", "4", "--trainer.precision", "bf16-mixed",
        "--model.init_args.network_args", "{\"a\": \"b=c\"}"]
