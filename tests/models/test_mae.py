import math

import pytest
import torch

from maesil.models.mae import MaskedAutoencoder3D
from maesil.models.masking import make_mask
from maesil.models.vit3d import patchify, unpatchify

TINY = dict(superpatch_size=16, token_size=4, embed_dim=24, depth=2, num_heads=4, decoder_embed_dim=24, decoder_depth=2,
            decoder_num_heads=4)  # fmt: skip


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models run fastest on one thread, and are not slowed down by other processes on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(**kw) -> MaskedAutoencoder3D:
    torch.manual_seed(0)
    return MaskedAutoencoder3D(**{**TINY, **kw})


def _mask(model: MaskedAutoencoder3D, batch: int = 2, ratio: float = 0.75, seed: int = 0):
    return make_mask("random", batch, model.grid, ratio, generator=torch.Generator().manual_seed(seed))


def _smooth_image(size: int = 16) -> torch.Tensor:
    c = torch.linspace(0, math.pi, size)
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    return (torch.sin(x) * torch.cos(0.5 * y) + 0.5 * torch.sin(z + 0.3 * x))[None, None]


def test_forward_shapes_and_determinism():
    model = _tiny()
    x = torch.randn(2, 1, 16, 16, 16)
    mask = _mask(model)
    out = model(x, mask)
    assert out.loss.ndim == 0 and out.pred.shape == (2, 64, 64) and out.mask is mask
    assert model.forward_encoder(x, mask).shape == (2, 16, 24)
    torch.testing.assert_close(model(x, mask).pred, out.pred, rtol=0, atol=0)
    # the loss is the mean over masked tokens of the per-patch MSE
    per_patch = (out.pred - patchify(x, 4)).square().mean(-1)
    torch.testing.assert_close(out.loss, per_patch[mask.mask].mean())


def test_masked_query_decoder_equals_full_decoder():
    fast, full = _tiny().double(), _tiny(decode_visible=True).double()
    full.load_state_dict(fast.state_dict())
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    mask = _mask(fast)
    a, b = fast(x, mask), full(x, mask)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.pred[mask.mask], b.pred[mask.mask])
    assert (a.pred[~mask.mask] == 0).all()
    a.loss.backward()
    b.loss.backward()
    for (name, pa), pb in zip(fast.named_parameters(), full.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_masked_patches_are_never_seen_by_the_encoder():
    model = _tiny()
    x = torch.randn(2, 1, 16, 16, 16)
    mask = _mask(model)
    tokens = patchify(x, 4).clone()
    tokens[mask.mask] += 10 * torch.randn_like(tokens[mask.mask])
    x_perturbed = unpatchify(tokens, 4, model.grid, 1)
    assert not torch.equal(x, x_perturbed)
    torch.testing.assert_close(model.forward_encoder(x_perturbed, mask), model.forward_encoder(x, mask), rtol=0, atol=0)


@pytest.mark.parametrize("decode_visible", [False, True])
def test_loss_gradient_is_zero_at_visible_tokens(decode_visible):
    model = _tiny(decode_visible=decode_visible)
    x = torch.randn(2, 1, 16, 16, 16)
    mask = _mask(model)
    out = model(x, mask)
    out.pred.retain_grad()
    out.loss.backward()
    assert (out.pred.grad[~mask.mask] == 0).all()
    assert (out.pred.grad[mask.mask].abs().sum(-1) > 0).all()
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_overfit_one_image():
    model = _tiny(embed_dim=48, decoder_embed_dim=48, decoder_depth=1)
    x = _smooth_image()
    mask = _mask(model, batch=1, ratio=0.5, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = model(x, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruct_keeps_visible_patches(norm_pix_loss):
    model = _tiny(norm_pix_loss=norm_pix_loss)
    x = torch.randn(2, 1, 16, 16, 16)
    mask = _mask(model)
    with torch.no_grad():
        out = model(x, mask)
        rec = model.reconstruct(x, out)
    assert rec.shape == x.shape
    rec_tokens, x_tokens = patchify(rec, 4), patchify(x, 4)
    assert torch.equal(rec_tokens[~mask.mask], x_tokens[~mask.mask])
    assert not torch.allclose(rec_tokens[mask.mask], x_tokens[mask.mask])
    if norm_pix_loss:  # de-normalised with the true patch statistics
        mean = x_tokens[mask.mask].mean(-1)
        torch.testing.assert_close(rec_tokens[mask.mask].mean(-1), mean + out.pred[mask.mask].mean(-1) * x_tokens[
            mask.mask].std(-1, unbiased=False), rtol=1e-4, atol=1e-4)  # fmt: skip


def test_norm_pix_loss_targets_normalised_patches():
    model = _tiny(norm_pix_loss=True)
    x = 5 + 3 * torch.randn(1, 1, 16, 16, 16)
    mask = _mask(model, batch=1)
    target = patchify(x, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    loss = model.forward_loss(x, target, mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-8)


def test_state_dict_prefix_and_init():
    model = _tiny()
    keys = model.state_dict().keys()
    assert "encoder.patch_embed.proj.weight" in keys and "mask_token" in keys
    assert all(not k.startswith("encoder.") or k[8:] in model.encoder.state_dict() for k in keys)
    assert model.mask_token.std() < 0.1 and model.decoder_embed.bias.abs().sum() == 0


def test_invalid_configurations_and_inputs_raise():
    with pytest.raises(ValueError, match=r"decoder_embed_dim \(24\) must be divisible by decoder_num_heads \(5\)"):
        MaskedAutoencoder3D(**{**TINY, "decoder_num_heads": 5})
    with pytest.raises(ValueError, match="decoder_depth must be positive"):
        MaskedAutoencoder3D(**{**TINY, "decoder_depth": 0})
    model = _tiny()
    with pytest.raises(ValueError):
        model(torch.randn(2, 1, 16, 16, 16), make_mask("random", 2, (2, 2, 2), 0.5))
    with pytest.raises(ValueError):
        model(torch.randn(2, 1, 8, 8, 8), make_mask("random", 2, (2, 2, 2), 0.5))


def test_zero_ratio_mask_gives_zero_loss_not_nan():
    model = _tiny()
    out = model(torch.randn(1, 1, 16, 16, 16), make_mask("random", 1, model.grid, 0.0))
    assert out.loss.item() == 0.0 and out.pred.shape == (1, 64, 64)


def test_visible_loss_weight_adds_the_weighted_visible_mse():
    plain = _tiny()
    weighted = _tiny(visible_loss_weight=0.25)
    assert weighted.decode_visible and not plain.decode_visible
    x = torch.randn(2, 1, 16, 16, 16)
    mask = _mask(weighted)
    out = weighted(x, mask)
    per_patch = (out.pred - patchify(x, 4)).square().mean(dim=-1)
    expected = per_patch[mask.mask].mean() + 0.25 * per_patch[~mask.mask].mean()
    torch.testing.assert_close(out.loss, expected)
    out = weighted(x, mask)  # visible rows now carry gradient
    out.pred.retain_grad()
    out.loss.backward()
    assert (out.pred.grad[~mask.mask].abs().sum(-1) > 0).all()
    with pytest.raises(ValueError, match="visible_loss_weight"):
        _tiny(visible_loss_weight=-1.0)


def test_decoder_local_mixing_reads_neighbouring_tokens_and_keeps_the_masked_query_shortcut_exact():
    model = _tiny(decoder_local_mixing=True)
    assert len(model.decoder_local_mixing) == TINY["decoder_depth"]
    x = torch.randn(2, 1, 16, 16, 16)
    mask = _mask(model)
    fast = model(x, mask)
    model.decode_visible = True
    full = model(x, mask)
    torch.testing.assert_close(fast.pred[mask.mask], full.pred[mask.mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.loss, full.loss, atol=1e-6, rtol=1e-5)
    # With attention switched off (zero residual branches) only the convolution mixes tokens: a masked token's
    # prediction then depends on its grid neighbours and not on a token two cells away.
    for block in model.decoder_blocks:
        for parameter in block.parameters():
            parameter.data.zero_()
    latent = model.forward_encoder(x, mask).detach().requires_grad_(True)
    pred = model.forward_decoder(latent, mask)
    grid = model.grid
    target = int(mask.ids_masked[0, 0])
    pred[0, target].sum().backward()
    kept = mask.ids_keep[0].tolist()
    tz, ty, tx = target // (grid[1] * grid[2]), target // grid[2] % grid[1], target % grid[2]
    for slot, token in enumerate(kept):
        z, y, x_ = token // (grid[1] * grid[2]), token // grid[2] % grid[1], token % grid[2]
        distance = max(abs(z - tz), abs(y - ty), abs(x_ - tx))
        touched = bool(latent.grad[0, slot].abs().sum() > 0)
        assert touched == (distance <= TINY["decoder_depth"]), (token, distance)
