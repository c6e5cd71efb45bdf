"""Every pretraining method exposes frozen encoder features for the probe (``probe_features``)."""

from __future__ import annotations

import pytest
import torch

from maesil.methods import AE, BYOL, MAESIL, PGL, S3D, VAE, VQVAE, MethodModule
from maesil.methods.segmentation import Segmentation

TINY_VIT = dict(superpatch_size=32, token_size=8, embed_dim=24, depth=1, num_heads=2, decoder_embed_dim=24,
                decoder_depth=1, decoder_num_heads=2)
TINY_HEADS = dict(projection_dim=16, hidden_dim=32)

#: method → (tiny constructor, expected feature map of a (2, 1, 32, 32, 32) batch). The tiny U-Net's stages are
#: 4 × 32³, 8 × 16³, 16 × 8³ (middle 16³ plus the deepest upsampled: 24 channels); the tiny AE/VAE levels are 16³,
#: 8³, 4³ (middle 8 × 8³ plus the 8-channel bottleneck); the tiny VQ-VAE has two levels, 16³ and the 8-dimensional
#: latent at 8³, which is both the middle and the deepest.
CASES = {
    "MAESIL": (lambda: MAESIL(**TINY_VIT), (2, 24, 4, 4, 4)),
    "SelfMedMAE": (lambda: MAESIL(**TINY_VIT, masking="random", mask_ratio=0.75, norm_pix_loss=True),
                   (2, 24, 4, 4, 4)),
    "S3D": (lambda: S3D(unet_preset="tiny", superpatch_size=32, mask_block_size=8), (2, 24, 16, 16, 16)),
    "BYOL": (lambda: BYOL(unet_preset="tiny", **TINY_HEADS), (2, 24, 16, 16, 16)),
    "PGL": (lambda: PGL(unet_preset="tiny", num_scales=2, **TINY_HEADS), (2, 24, 16, 16, 16)),
    "AE": (lambda: AE(superpatch_size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 1], num_res_units=1),
           (2, 16, 8, 8, 8)),
    "VAE": (lambda: VAE(superpatch_size=32, channels=[4, 8, 16, 8], strides=[2, 2, 2, 1], num_res_units=1,
                        latent_size=16), (2, 16, 8, 8, 8)),
    "VQVAE": (lambda: VQVAE(superpatch_size=32, channels=[8, 16], num_res_layers=1, num_res_channels=[8, 16],
                            num_embeddings=16, embedding_dim=8), (2, 8, 8, 8, 8)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_probe_features_are_a_frozen_feature_map(name):
    build, expected = CASES[name]
    torch.manual_seed(0)
    module = build().eval()
    images = torch.rand(2, 1, 32, 32, 32)
    features = module.probe_features(images)
    assert tuple(features.shape) == expected
    assert not features.requires_grad
    assert torch.isfinite(features).all()
    assert torch.equal(features, module.probe_features(images))  # deterministic: no mask, no sampling


def test_maesil_features_are_the_unmasked_encoder_tokens_on_the_token_grid():
    torch.manual_seed(0)
    module = MAESIL(**TINY_VIT).eval()
    images = torch.rand(2, 1, 32, 32, 32)
    tokens = module.net.forward_encoder(images, module.visible_mask(2))  # (B, N, D), N in grid order
    features = module.probe_features(images)
    assert torch.allclose(features[:, :, 1, 2, 3], tokens[:, 1 * 16 + 2 * 4 + 3], atol=1e-6)


def test_methods_without_encoder_features_say_so():
    with pytest.raises(NotImplementedError, match="Segmentation does not expose encoder features"):
        Segmentation.probe_features(object.__new__(Segmentation), torch.zeros(1, 1, 8, 8, 8))
    assert MethodModule.probe_features is Segmentation.probe_features
