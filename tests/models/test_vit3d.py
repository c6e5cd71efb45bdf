import pytest
import torch
import torch.nn.functional as F

from maesil.models.masking import random_mask
from maesil.models.vit3d import (
    PatchEmbed3D,
    TransformerBlock,
    ViTEncoder3D,
    gather_tokens,
    patchify,
    sincos_pos_embed_3d,
    unpatchify,
)


@pytest.mark.parametrize(("shape", "p"), [((2, 1, 16, 16, 16), 4), ((1, 3, 8, 12, 20), 4), ((2, 2, 16, 8, 24), 8)])
def test_patchify_roundtrip_and_layout(shape, p):
    x = torch.randn(shape)
    b, c, sx, sy, sz = shape
    grid = (sx // p, sy // p, sz // p)
    tokens = patchify(x, p)
    assert tokens.shape == (b, grid[0] * grid[1] * grid[2], c * p**3)
    assert torch.equal(unpatchify(tokens, p, grid, c), x)
    # token (ix, iy, iz) sits at (ix * gy + iy) * gz + iz and is flattened as (C, px, py, pz)
    ix, iy, iz = grid[0] - 1, 0, grid[2] - 1
    idx = (ix * grid[1] + iy) * grid[2] + iz
    patch = x[0, :, ix * p : (ix + 1) * p, iy * p : (iy + 1) * p, iz * p : (iz + 1) * p]
    assert torch.equal(tokens[0, idx], patch.reshape(-1))


def test_patchify_errors():
    with pytest.raises(ValueError):
        patchify(torch.zeros(1, 1, 16, 16, 15), 4)
    with pytest.raises(ValueError):
        patchify(torch.zeros(1, 16, 16, 16), 4)
    with pytest.raises(ValueError):
        unpatchify(torch.zeros(1, 10, 64), 4, (2, 2, 2), 1)


def test_patch_embed_equals_conv_on_kept_patches():
    torch.manual_seed(0)
    embed = PatchEmbed3D(token_size=4, in_channels=2, embed_dim=24)
    x = torch.randn(2, 2, 16, 12, 8)
    conv = embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), z fastest
    torch.testing.assert_close(embed(x), conv, rtol=1e-5, atol=1e-5)
    mask = random_mask(2, (4, 3, 2), 0.75, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(embed(x, mask.ids_keep), gather_tokens(conv, mask.ids_keep), rtol=1e-5, atol=1e-5)
    assert set(embed.state_dict()) == {"proj.weight", "proj.bias"}


def test_sincos_pos_embed():
    emb = sincos_pos_embed_3d(48, (3, 4, 5))
    assert emb.shape == (60, 48)
    assert torch.cdist(emb, emb).add(torch.eye(60) * 1e3).min() > 1e-3  # all rows distinct
    padded = sincos_pos_embed_3d(64, (2, 2, 2))  # 64 % 6 == 4 -> last 4 channels zero
    assert padded.shape == (8, 64) and torch.equal(padded[:, 60:], torch.zeros(8, 4))
    with pytest.raises(ValueError):
        sincos_pos_embed_3d(4, (2, 2, 2))


def test_block_query_subset_matches_full():
    torch.manual_seed(0)
    blk = TransformerBlock(24, 4).double()
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    ids = torch.tensor([[1, 4, 7], [0, 2, 9]])
    torch.testing.assert_close(blk(x, query_ids=ids), gather_tokens(blk(x), ids))


def test_encoder_shapes_hidden_states_and_grid():
    torch.manual_seed(0)
    enc = ViTEncoder3D((16, 16, 8), token_size=4, embed_dim=24, depth=2, num_heads=4)
    assert enc.grid == (4, 4, 2) and enc.num_tokens == 32
    x = torch.randn(2, 1, 16, 16, 8)
    out, hidden = enc(x, return_hidden_states=True)
    assert out.shape == (2, 32, 24) and len(hidden) == 2 and all(h.shape == (2, 32, 24) for h in hidden)
    mask = random_mask(2, enc.grid, 0.75)
    assert enc(x, mask.ids_keep).shape == (2, 8, 24)
    # a different input size works with a sin-cos embedding computed for its own grid
    assert enc(torch.randn(1, 1, 8, 8, 8)).shape == (1, 8, 24)
    assert "pos_embed" not in enc.state_dict()


def test_encoder_subset_equals_full_without_attention_mixing():
    # with one token visible per sample, attention is trivial: encoding only it equals a depth-0-context run
    torch.manual_seed(0)
    enc = ViTEncoder3D(8, token_size=4, embed_dim=24, depth=1, num_heads=2)
    x = torch.randn(1, 1, 8, 8, 8)
    ids = torch.tensor([[5]])
    single = enc(x, ids)
    patches = F.linear(patchify(x, 4), enc.patch_embed.proj.weight.flatten(1), enc.patch_embed.proj.bias)
    expected = enc.norm(enc.blocks[0](patches[:, 5:6] + enc.pos_embed[5]))
    torch.testing.assert_close(single, expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(superpatch_size=15, token_size=4),
        dict(superpatch_size=16, token_size=4, embed_dim=30, num_heads=4),
        dict(superpatch_size=16, token_size=4, depth=0),
        dict(superpatch_size=(16, 16), token_size=4),
    ],
)
def test_encoder_value_errors(kwargs):
    with pytest.raises(ValueError):
        ViTEncoder3D(**kwargs)
