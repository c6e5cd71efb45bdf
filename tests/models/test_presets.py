"""from_preset: one way to build every network from a named configuration plus overrides."""

from __future__ import annotations

import pytest

from maesil.models.presets import from_preset
from maesil.models.sparse import SparseMaskedUNet
from maesil.models.unet import UNET_PRESETS, ResEncUNet, resenc_unet
from maesil.models.unetr import UNETR_PRESETS, UNETR


def test_overrides_replace_and_add_to_the_preset():
    net = from_preset(ResEncUNet, UNET_PRESETS, "tiny", in_channels=2, out_channels=None, strides=(1, 2, 1))
    assert net.features == (4, 8, 16) and net.strides == (1, 2, 1)
    assert net.in_channels == 2 and net.head is None
    assert UNET_PRESETS["tiny"]["strides"] == (1, 2, 2)  # the preset itself is left alone


def test_one_preset_table_serves_the_dense_and_the_sparse_u_net():
    sparse = from_preset(SparseMaskedUNet, UNET_PRESETS, "tiny", block_size=8)
    dense = resenc_unet("tiny", out_channels=None)
    assert {k for k in sparse.state_dict() if k.startswith("encoder.")} == {
        k for k in dense.state_dict() if k.startswith("encoder.")
    }


def test_unknown_preset_lists_the_presets():
    message = r"unknown ResEncUNet preset 'resenc_xl'; choose from \['cpu', 'resenc_l', 'tiny'\]"
    with pytest.raises(ValueError, match=message):
        resenc_unet("resenc_xl")


def test_unknown_argument_lists_the_accepted_ones():
    message = r"unknown UNETR arguments \['img_size', 'patch_size'\]; UNETR takes .*'token_size'"
    with pytest.raises(ValueError, match=message):
        from_preset(UNETR, UNETR_PRESETS, "tiny", patch_size=8, img_size=32)


def test_a_network_taking_any_keyword_gets_every_override():
    def network(**kwargs):
        return kwargs

    assert from_preset(network, {"small": {"width": 8}}, "small", depth=2) == {"width": 8, "depth": 2}
