"""Sparse masking for S3D: exact block masks, masks at every resolution, sparse InstanceNorm, no leakage from
masked regions through the sparse encoder (also against injected noise), and weight transfer to a dense U-Net."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maesil.models.sparse import (
    SparseAvgPool3d,
    SparseContext,
    SparseConv3d,
    SparseInstanceNorm3d,
    SparseMaskedUNet,
    block_mask,
    draw_mask_ratio,
    mask_grid,
    masked_cell_count,
    masked_mse,
    upsample_mask,
    visible_at,
)
from maesil.models.unet import UNET_PRESETS, ResidualBlock, resenc_unet

TINY = UNET_PRESETS["tiny"]  # features (4, 8, 16), strides (1, 2, 2): total stride 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny inputs: one intra-op thread is as fast and immune to OpenMP spin-waiting under CPU contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_net(block_size: int, sparse: bool = True, seed: int = 0) -> SparseMaskedUNet:
    torch.manual_seed(seed)
    return SparseMaskedUNet(**TINY, block_size=block_size, sparse=sparse).eval()


# Masks --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(4, 4, 4), (2, 3, 5), (10, 10, 10)])
@pytest.mark.parametrize("ratio", [0.6, 0.75, 0.9])
def test_block_mask_hides_exactly_round_ratio_cells(grid, ratio):
    cells = grid[0] * grid[1] * grid[2]
    mask = block_mask(5, grid, ratio, generator=torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (5, 1, *grid)
    assert mask.flatten(1).sum(dim=1).tolist() == [round(ratio * cells)] * 5
    assert masked_cell_count(grid, ratio) == round(ratio * cells)
    assert not torch.equal(mask[0], mask[1])  # samples get their own masks


def test_ratio_drawn_from_the_range_lies_in_it_and_gives_an_exact_count():
    generator = torch.Generator().manual_seed(0)
    ratios = [draw_mask_ratio(0.75, (0.6, 0.9), generator) for _ in range(200)]
    assert all(0.6 <= r <= 0.9 for r in ratios)
    assert max(ratios) - min(ratios) > 0.2  # actually spread over the range
    assert draw_mask_ratio(0.75, None, generator) == 0.75
    for ratio in ratios[:10]:
        mask = block_mask(3, (4, 4, 4), ratio, generator=generator)
        assert mask.flatten(1).sum(dim=1).tolist() == [round(ratio * 64)] * 3


def test_same_generator_seed_gives_the_same_mask():
    first = block_mask(2, (4, 4, 4), 0.75, generator=torch.Generator().manual_seed(7))
    second = block_mask(2, (4, 4, 4), 0.75, generator=torch.Generator().manual_seed(7))
    other = block_mask(2, (4, 4, 4), 0.75, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_mask_arguments_are_validated():
    assert mask_grid((32, 48, 16), 16) == (2, 3, 1)
    with pytest.raises(ValueError, match="multiple of the mask block size 16"):
        mask_grid((32, 40, 32), 16)
    with pytest.raises(ValueError, match="block_size"):
        mask_grid((32, 32, 32), 0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        block_mask(1, (4, 4, 4), 1.0)
    with pytest.raises(ValueError, match="one cell must be masked and one visible"):
        masked_cell_count((2, 2, 2), 0.97)  # rounds to all 8 cells


def test_upsample_mask_repeats_cells_to_voxels():
    mask = block_mask(2, (2, 3, 1), 0.5, generator=torch.Generator().manual_seed(0))
    voxels = upsample_mask(mask, 4)
    assert voxels.shape == (2, 1, 8, 12, 4) and voxels.dtype == torch.bool
    assert torch.equal(voxels[:, :, ::4, ::4, ::4], mask)
    assert torch.equal(voxels, F.interpolate(mask.float(), scale_factor=4, mode="nearest").bool())


@pytest.mark.parametrize("shape", [(16, 16, 16), (8, 8, 8), (4, 4, 4), (2, 2, 2), (1, 1, 1), (4, 2, 8)])
def test_visible_at_is_the_max_pool_of_the_visible_voxels(shape):
    """Block 4 on a 16³ input: finer features repeat cells; coarser ones (stride 8, 16 > block) are visible where
    any covered voxel is visible."""
    visible = ~block_mask(3, (4, 4, 4), 0.75, generator=torch.Generator().manual_seed(3))
    voxels = upsample_mask(visible, 4).float()
    kernel = [16 // s for s in shape]
    expected = F.max_pool3d(voxels, kernel, kernel) > 0.5
    assert torch.equal(visible_at(visible, 4, shape), expected)
    with pytest.raises(ValueError, match="does not divide"):
        visible_at(visible, 4, (3, 3, 3))


def test_coarse_features_keep_every_visible_cell():
    """Stride 8 > block 4: a coarse voxel covering a visible cell next to masked ones stays visible."""
    visible = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    visible[0, 0, 1, 2, 3] = True  # a single visible cell
    coarse = visible_at(visible, 4, (2, 2, 2))
    assert coarse.sum() == 1 and coarse[0, 0, 0, 1, 1]


# Sparse layers ------------------------------------------------------------------------------------------------


def test_sparse_instance_norm_uses_visible_statistics_only():
    torch.manual_seed(0)
    context = SparseContext(block_size=2)
    norm = SparseInstanceNorm3d(context, 3, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        norm.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
    visible = ~block_mask(2, (4, 4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 8, 8, 8) * 3 + 5
    with context.masked(visible):
        out = norm(x)
    keep = upsample_mask(visible, 2).expand_as(x)
    for b in range(2):
        for c in range(3):
            values = x[b, c][keep[b, c]]
            mean, var = values.mean(), values.var(unbiased=False)
            expected = (values - mean) / torch.sqrt(var + 1e-5) * norm.weight[c] + norm.bias[c]
            torch.testing.assert_close(out[b, c][keep[b, c]], expected, atol=1e-5, rtol=1e-5)
    assert torch.all(out[~keep] == 0)
    # The dense InstanceNorm (statistics over all voxels) gives something else on the visible voxels.
    dense = F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=1e-5)
    assert not torch.allclose(dense[keep], out[keep], atol=1e-2)


def test_sparse_layers_are_dense_without_a_mask_and_when_all_is_visible():
    torch.manual_seed(0)
    context = SparseContext(block_size=4)
    conv = SparseConv3d(context, 2, 3, 3, stride=2, padding=1)
    norm = SparseInstanceNorm3d(context, 2)
    pool = SparseAvgPool3d(context, 2)
    dense_conv = nn.Conv3d(2, 3, 3, stride=2, padding=1)
    dense_conv.load_state_dict(conv.state_dict())
    x = torch.randn(2, 2, 8, 8, 8)
    everything = torch.ones(2, 1, 2, 2, 2, dtype=torch.bool)
    for visible in (None, everything):
        with context.masked(visible):
            torch.testing.assert_close(conv(x), dense_conv(x))
            torch.testing.assert_close(norm(x), F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps))
            torch.testing.assert_close(pool(x), F.avg_pool3d(x, 2, 2))


def test_sparse_conv_and_pool_ignore_masked_inputs_and_zero_masked_outputs():
    torch.manual_seed(0)
    context = SparseContext(block_size=4)
    conv = SparseConv3d(context, 2, 3, 3, padding=1)
    pool = SparseAvgPool3d(context, 2)
    visible = ~block_mask(1, (2, 2, 2), 0.5, generator=torch.Generator().manual_seed(1))
    hidden = ~upsample_mask(visible, 4)
    x = torch.randn(1, 2, 8, 8, 8)
    noisy = x + 100 * torch.randn_like(x) * hidden
    with context.masked(visible):
        for layer in (conv, pool):
            clean_out, noisy_out = layer(x), layer(noisy)
            torch.testing.assert_close(clean_out, noisy_out)
        out = conv(x)
        assert torch.all(out[hidden.expand_as(out)] == 0)
        # pool: the average over the visible voxels of each 2³ window (here every window is in one cell)
        torch.testing.assert_close(pool(x), F.avg_pool3d(x, 2, 2) * visible_at(visible, 4, (4, 4, 4)))


# The sparse encoder -------------------------------------------------------------------------------------------


def encoder_features(net: SparseMaskedUNet, images: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return net.encode_masked(images, mask)


def assert_visible_equal(net, first, second, mask) -> None:
    for stage, (a, b) in enumerate(zip(first, second)):
        keep = visible_at(~mask, net.block_size, a.shape[2:]).expand_as(a)
        assert keep.any() and (~keep).any(), f"stage {stage}: vacuous comparison"
        torch.testing.assert_close(a[keep], b[keep], atol=1e-6, rtol=0, msg=f"stage {stage}")


@pytest.mark.parametrize("block_size", [8, 2], ids=["block>stride", "block<stride"])
def test_masked_input_cannot_reach_visible_encoder_features(block_size):
    net = tiny_net(block_size)
    images = torch.rand(2, 1, 32, 32, 32)
    mask = block_mask(2, mask_grid(images.shape[2:], block_size), 0.75, generator=torch.Generator().manual_seed(0))
    hidden = upsample_mask(mask, block_size)
    perturbed = images + (torch.randn_like(images) * 10) * hidden
    clean, noisy = encoder_features(net, images, mask), encoder_features(net, perturbed, mask)
    assert_visible_equal(net, clean, noisy, mask)
    for features in clean:  # sparse features are exactly zero where masked
        keep = visible_at(~mask, block_size, features.shape[2:]).expand_as(features)
        assert torch.all(features[~keep] == 0)


def add_noise_at_masked_positions(net: SparseMaskedUNet, mask: torch.Tensor, scale: float = 10.0) -> list:
    """Forward hooks on the stem, every conv and every residual block of the encoder that add noise at the
    masked positions of their output (at the output's resolution)."""
    generator = torch.Generator().manual_seed(123)

    def hook(module, inputs, output):
        hidden = ~visible_at(~mask, net.block_size, output.shape[2:])
        noise = torch.randn(output.shape, generator=generator) * scale
        return output + noise * hidden

    modules = [net.encoder.stem] + [m for m in net.encoder.modules() if isinstance(m, (nn.Conv3d, ResidualBlock))]
    return [m.register_forward_hook(hook) for m in modules]


@pytest.mark.parametrize("block_size", [8, 2], ids=["block>stride", "block<stride"])
def test_noise_in_masked_activations_cannot_reach_visible_features_only_when_sparse(block_size):
    images = torch.rand(2, 1, 32, 32, 32)
    mask = block_mask(2, mask_grid(images.shape[2:], block_size), 0.75, generator=torch.Generator().manual_seed(0))
    for sparse in (True, False):
        net = tiny_net(block_size, sparse=sparse)
        clean = encoder_features(net, images, mask)
        handles = add_noise_at_masked_positions(net, mask)
        try:
            noisy = encoder_features(net, images, mask)
        finally:
            for handle in handles:
                handle.remove()
        if sparse:
            assert_visible_equal(net, clean, noisy, mask)
            # the noise did get in: the stage outputs differ at masked positions
            assert all(not torch.equal(a, b) for a, b in zip(clean, noisy))
        else:  # the dense zero-fill encoder lets masked activations flow into visible ones
            for a, b in zip(clean[1:], noisy[1:]):
                keep = visible_at(~mask, block_size, a.shape[2:]).expand_as(a)
                assert (a[keep] - b[keep]).abs().max() > 1e-2


def test_mask_tokens_fill_masked_positions_of_every_stage():
    net = tiny_net(8)
    with torch.no_grad():
        for s, token in enumerate(net.mask_tokens):
            token.fill_(float(s + 1))
    images = torch.rand(2, 1, 32, 32, 32)
    mask = block_mask(2, (4, 4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    captured = []
    handles = [d.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0])) for d in net.densify]
    with torch.no_grad():
        prediction = net(images, mask)
    for handle in handles:
        handle.remove()
    assert prediction.shape == images.shape
    for s, filled in enumerate(captured):
        hidden = ~visible_at(~mask, 8, filled.shape[2:]).expand_as(filled)
        assert torch.all(filled[hidden] == s + 1)


def test_zero_fill_variant_has_no_mask_tokens_and_the_same_other_parameters():
    sparse, plain = tiny_net(8, sparse=True), tiny_net(8, sparse=False)
    assert plain.mask_tokens is None
    sparse_keys = {k for k in sparse.state_dict() if not k.startswith("mask_tokens.")}
    assert sparse_keys == set(plain.state_dict())
    assert all(type(m) in (nn.Conv3d, nn.InstanceNorm3d, nn.AvgPool3d) for m in plain.encoder.modules()
               if isinstance(m, (nn.Conv3d, nn.InstanceNorm3d, nn.AvgPool3d)))


def test_s3d_encoder_state_dict_loads_into_a_dense_resenc_unet():
    torch.manual_seed(0)
    s3d = SparseMaskedUNet(**UNET_PRESETS["cpu"], block_size=16)
    dense = resenc_unet("cpu", out_channels=None)
    encoder_state = {k[len("encoder."):]: v for k, v in s3d.state_dict().items() if k.startswith("encoder.")}
    result = dense.encoder.load_state_dict(encoder_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # The whole network's encoder.* keys also fit a dense ResEncUNet (decoder/head keys match too).
    full = dense.load_state_dict({k: v for k, v in s3d.state_dict().items() if k.startswith("encoder.")},
                                 strict=False)
    assert not [k for k in full.missing_keys if k.startswith("encoder.")] and not full.unexpected_keys
    # Same weights, nothing masked: the sparse encoder computes the dense one.
    images = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        nothing = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
        for a, b in zip(s3d.encode_masked(images, nothing), dense.encode(images)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_network_arguments_are_validated():
    with pytest.raises(ValueError, match="strides\\[0\\] must be 1"):
        SparseMaskedUNet(features=(4, 8), blocks_per_stage=(1, 1), strides=(2, 2), block_size=8)
    net = tiny_net(8)
    with pytest.raises(ValueError, match="mask must be"):
        net(torch.rand(1, 1, 32, 32, 32), torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of the mask block size"):
        net(torch.rand(1, 1, 36, 32, 32), torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool))


def test_masked_mse_scores_masked_voxels_only():
    target = torch.rand(2, 1, 8, 8, 8)
    mask = upsample_mask(block_mask(2, (2, 2, 2), 0.5, generator=torch.Generator().manual_seed(0)), 4)
    prediction = target.clone()
    prediction[mask] += 0.5
    assert float(masked_mse(prediction, target, mask)) == pytest.approx(0.25)
    prediction[~mask] = 100.0
    assert float(masked_mse(prediction, target, mask)) == pytest.approx(0.25)
