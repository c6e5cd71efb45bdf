"""UNETR on ViTEncoder3D: shapes at patch 8/16, gradients, MAESIL weight transfer, skip layers, token layout,
layer-wise lr indices, validation and presets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maesil.models.parameters import count_parameters
from maesil.models.mae import MaskedAutoencoder3D
from maesil.models.unetr import (
    UNETR,
    UNETR_PRESETS,
    build_unetr,
    default_skip_layers,
    tokens_to_volume,
)
from maesil.models.vit3d import ViTEncoder3D, patchify, unpatchify

#: A tiny ViT shared by the MAE and the UNETR in the transfer tests.
VIT = dict(superpatch_size=32, token_size=8, embed_dim=48, depth=2, num_heads=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny inputs: one intra-op thread is as fast and does not spin-wait on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(**overrides) -> UNETR:
    torch.manual_seed(0)
    return UNETR(**{**VIT, "out_channels": 3, "feature_size": 4, **overrides})


@pytest.mark.parametrize(
    "config, levels",
    [
        (dict(token_size=8), 3),
        (dict(token_size=16, depth=3), 4),
        (dict(token_size=4, superpatch_size=(16, 16, 8)), 2),
    ],
    ids=["patch8", "patch16", "patch4-anisotropic"],
)
def test_forward_shape_and_every_parameter_gets_a_gradient(config, levels):
    net = _tiny(**config)
    assert net.num_levels == levels
    assert len(net.skip_blocks) == levels - 1 and len(net.up_blocks) == levels
    images = torch.rand(2, 1, *net.superpatch_size)
    logits = net(images)
    assert logits.shape == (2, 3, *net.superpatch_size)
    logits.square().mean().backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_decoder_widths_follow_monai_for_patch_16():
    net = _tiny(token_size=16, depth=3, feature_size=16)
    # MONAI UNETR: encoder2..4 give F·2, F·4, F·8 with 2, 1, 0 extra upsamplings; decoder5 reads the bottleneck
    assert [len(b.blocks) for b in net.skip_blocks] == [2, 1, 0]
    assert [b.transp_conv_init.conv.out_channels for b in net.skip_blocks] == [32, 64, 128]
    assert [b.transp_conv.conv.in_channels for b in net.up_blocks] == [32, 64, 128, 48]
    assert [b.transp_conv.conv.out_channels for b in net.up_blocks] == [16, 32, 64, 128]


def test_other_input_sizes_divisible_by_the_patch_work():
    net = _tiny().eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 48, 32, 16)).shape == (1, 3, 48, 32, 16)
    with pytest.raises(ValueError, match="multiple of token_size=8"):
        net(torch.rand(1, 1, 36, 32, 32))
    with pytest.raises(ValueError, match="images must be"):
        net(torch.rand(1, 2, 32, 32, 32))


# ---------------------------------------------------------------------------------------------------------------
# Pretrained encoder transfer
# ---------------------------------------------------------------------------------------------------------------


def test_encoder_keys_equal_the_mae_encoder_keys():
    mae = MaskedAutoencoder3D(**VIT, decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)
    net = _tiny()
    assert isinstance(net.encoder, ViTEncoder3D)
    assert net.encoder.state_dict().keys() == mae.encoder.state_dict().keys()
    mae_shapes = {k: v.shape for k, v in mae.encoder.state_dict().items()}
    assert {k: v.shape for k, v in net.encoder.state_dict().items()} == mae_shapes
    encoder_keys = {k for k in net.state_dict() if k.startswith(UNETR.encoder_prefix)}
    assert encoder_keys == {UNETR.encoder_prefix + k for k in mae.encoder.state_dict()}


def test_maesil_checkpoint_encoder_loads_strictly_and_reproduces_the_features():
    from maesil.methods import MAESIL

    torch.manual_seed(1)
    module = MAESIL(**VIT, decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)
    state = module.state_dict()  # what a Lightning checkpoint's "state_dict" holds
    prefix = "net.encoder."
    assert any(k.startswith(prefix) for k in state)
    encoder_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    net = _tiny()
    images = torch.rand(2, 1, 32, 32, 32)
    net.eval()
    with torch.no_grad():
        before = net(images)
    net.encoder.load_state_dict(encoder_state, strict=True)  # raises on any missing / unexpected key

    # the same weights loaded at the whole-network level: only decoder keys are missing, nothing is unexpected
    renamed = {UNETR.encoder_prefix + k: v for k, v in encoder_state.items()}
    result = net.load_state_dict(renamed, strict=False)
    assert result.unexpected_keys == []
    assert not any(k.startswith(UNETR.encoder_prefix) for k in result.missing_keys)

    mae_encoder = module.net.encoder.eval()
    with torch.no_grad():
        expected, expected_hidden = mae_encoder(images, return_hidden_states=True)
        got, got_hidden = net.encoder(images, return_hidden_states=True)
        after = net(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(got_hidden, expected_hidden):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(before, after)  # the decoder reads the loaded encoder


# ---------------------------------------------------------------------------------------------------------------
# Skip layers and validation
# ---------------------------------------------------------------------------------------------------------------


def test_default_skip_layers():
    assert default_skip_layers(12, 4) == (3, 6, 9)  # UNETR paper / SelfMedMAE: ViT-B at patch 16
    # depth 6 at patch 8 (MAESIL CPU): ceil(k·6/3), k = 1, 2 → blocks 2 and 4 (block 6 feeds the bottleneck)
    assert default_skip_layers(6, 3) == (2, 4)
    assert default_skip_layers(2, 3) == (1, 2)
    assert default_skip_layers(12, 3) == (4, 8)
    assert default_skip_layers(3, 4) == (1, 2, 3)
    for depth in range(1, 25):
        for levels in range(2, 6):
            if depth < levels - 1:
                continue
            skips = default_skip_layers(depth, levels)
            assert len(skips) == levels - 1 and all(1 <= s <= depth for s in skips)
            assert all(b > a for a, b in zip(skips, skips[1:]))
    with pytest.raises(ValueError, match="too shallow"):
        default_skip_layers(1, 4)
    assert build_unetr("selfmedmae", superpatch_size=32, depth=12, embed_dim=24, num_heads=2).skip_layers == (3, 6, 9)
    assert build_unetr("maesil_cpu", embed_dim=24, num_heads=2).skip_layers == (2, 4)
    assert UNETR(token_size=16, depth=12, embed_dim=24, num_heads=2, superpatch_size=32).skip_layers == (3, 6, 9)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(token_size=12), "power of two"),
        (dict(token_size=2), "power of two"),
        (dict(token_size=0), "token_size"),
        (dict(superpatch_size=36), r"superpatch_size \(36, 36, 36\)"),
        (dict(superpatch_size=(32, 32, 20)), r"\(32, 32, 20\)"),
        (dict(skip_layers=(1,)), "must hold 2 layers"),
        (dict(skip_layers=(1, 2, 3)), "must hold 2 layers"),
        (dict(skip_layers=(0, 2)), "skip layer 0"),
        (dict(skip_layers=(1, 3)), "skip layer 3"),
        (dict(skip_layers=(2, 1)), "strictly increasing"),
        (dict(skip_layers=(2, 2)), "strictly increasing"),
        (dict(depth=1), "too shallow"),
        (dict(out_channels=0), "out_channels"),
        (dict(feature_size=0), "feature_size"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        _tiny(**overrides)


def test_unknown_preset_or_argument_raises():
    with pytest.raises(ValueError, match="maesil_cpu.*selfmedmae.*tiny"):
        build_unetr("vit_huge")
    with pytest.raises(ValueError, match="hidden_size"):
        build_unetr("tiny", hidden_size=16)


# ---------------------------------------------------------------------------------------------------------------
# Token layout
# ---------------------------------------------------------------------------------------------------------------


def test_a_known_token_lands_at_its_spatial_block():
    p, (gx, gy, gz), d = 4, (3, 2, 5), 6
    images = torch.zeros(1, 1, gx * p, gy * p, gz * p)
    images[:, :, 2 * p : 3 * p, 1 * p : 2 * p, 3 * p : 4 * p] = 1.0  # patch (2, 1, 3)
    hot = patchify(images, p).sum(-1)[0].nonzero().flatten()  # the token that patchify gives that patch
    assert hot.tolist() == [(2 * gy + 1) * gz + 3]

    tokens = torch.zeros(1, gx * gy * gz, d)
    tokens[0, hot, :] = torch.arange(1.0, d + 1)
    volume = tokens_to_volume(tokens, (gx, gy, gz))
    assert volume.shape == (1, d, gx, gy, gz)
    assert volume[0, :, 2, 1, 3].tolist() == list(range(1, d + 1))
    assert volume.abs().sum() == volume[0, :, 2, 1, 3].sum()
    torch.testing.assert_close(volume, unpatchify(tokens, 1, (gx, gy, gz), d))


def test_token_map_of_patch_means_equals_average_pooling():
    p = 4
    images = torch.randn(2, 3, 12, 8, 16)
    grid = (3, 2, 4)
    patches = patchify(images, p).view(2, 24, 3, p**3)  # (B, N, C, p³)
    volume = tokens_to_volume(patches.mean(-1), grid)  # (B, C, gx, gy, gz)
    torch.testing.assert_close(volume, F.avg_pool3d(images, p))
    with pytest.raises(ValueError, match="do not fill"):
        tokens_to_volume(torch.zeros(1, 23, 2), grid)


# ---------------------------------------------------------------------------------------------------------------
# Layer-wise lr decay
# ---------------------------------------------------------------------------------------------------------------


def test_layer_index_covers_every_parameter():
    net = _tiny(depth=3, token_size=16)
    indices = {name: net.layer_index(name) for name, _ in net.named_parameters()}
    assert indices["encoder.patch_embed.proj.weight"] == 0
    assert indices["encoder.patch_embed.proj.bias"] == 0
    for i in range(3):
        block = {v for k, v in indices.items() if k.startswith(f"encoder.blocks.{i}.")}
        assert block == {i + 1}
    assert indices["encoder.norm.weight"] == 4
    rest = {v for k, v in indices.items() if not k.startswith("encoder.")}
    assert rest == {4} and any(k.startswith("head.") for k in indices)
    assert set(indices.values()) == set(range(net.num_lr_layers))
    with pytest.raises(ValueError, match="not a parameter"):
        net.layer_index("net.encoder.blocks.0.norm1.weight")


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


def test_presets_match_their_encoders():
    assert UNETR_PRESETS["maesil_cpu"]["token_size"] == 8
    cpu = build_unetr("maesil_cpu")
    mae = MaskedAutoencoder3D(superpatch_size=64, token_size=8, embed_dim=192, depth=6, num_heads=4, mlp_ratio=4.0)
    assert {k: v.shape for k, v in cpu.encoder.state_dict().items()} == {
        k: v.shape for k, v in mae.encoder.state_dict().items()
    }
    tiny = build_unetr("tiny")
    assert (tiny.token_size, tiny.embed_dim, tiny.depth, tiny.feature_size) == (8, 48, 2, 8)
    assert tiny.superpatch_size == (32,) * 3
    print(f"\nUNETR maesil_cpu: {count_parameters(cpu):,} parameters ({count_parameters(cpu.encoder):,} encoder)")
    print(f"UNETR tiny: {count_parameters(tiny):,} parameters ({count_parameters(tiny.encoder):,} encoder)")


def test_selfmedmae_preset_is_a_vit_b_unetr():
    torch.manual_seed(0)
    net = build_unetr("selfmedmae", out_channels=14)
    encoder_params = count_parameters(net.encoder)
    total = count_parameters(net)
    print(f"\nUNETR selfmedmae: {total:,} parameters ({encoder_params:,} ViT-B encoder)")
    assert 85e6 <= encoder_params <= 90e6
    assert 3e6 <= total - encoder_params <= 6e6  # MONAI's UNETR decoder at feature size 16
    assert (net.token_size, net.num_levels, net.skip_layers, net.superpatch_size) == (16, 4, (3, 6, 9), (96,) * 3)
    net.eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 32, 32, 32)).shape == (1, 14, 32, 32, 32)
