"""Builders of the AE, VAE and VQ-VAE baselines: sizes comparable to MAESIL, a real bottleneck, shapes."""

from __future__ import annotations

import math

import pytest
import torch

from maesil.models.autoencoders import (
    AE_PRESETS,
    AUTOENCODER_PRESETS,
    MAESIL_PARAMETERS,
    ae_latent_shape,
    build_ae,
    build_vae,
    build_vqvae,
    vqvae_code_grid,
)
from maesil.models.mae import MaskedAutoencoder3D
from maesil.models.parameters import count_parameters
from maesil.models.presets import from_preset

#: Each baseline preset has within this factor of the parameters of the MAESIL configuration of the same name.
PARAMETER_FACTOR = 1.15

#: The networks of experiments/pretrain/maesil_demo.yaml ("cpu") and maesil.yaml ("paper").
MAESIL_NETWORKS = {
    "cpu": dict(superpatch_size=64, token_size=8, embed_dim=192, depth=6, num_heads=4,
                decoder_embed_dim=192, decoder_depth=2, decoder_num_heads=4),
    "paper": dict(superpatch_size=128, token_size=8, embed_dim=768, depth=6, num_heads=8,
                  decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=8),
}  # fmt: skip

BUILDERS = {"ae": build_ae, "vae": build_vae, "vqvae": build_vqvae}


def latent_values(kind: str, config: dict) -> int:
    """Values one superpatch is compressed to (indices for the VQ-VAE)."""
    if kind == "ae":
        return math.prod(ae_latent_shape(config["superpatch_size"], config["channels"], config["strides"]))
    if kind == "vae":
        return config["latent_size"]
    return math.prod(vqvae_code_grid(config["superpatch_size"], config["channels"]))


@pytest.mark.parametrize("name", ["cpu", "paper"])
def test_maesil_parameter_counts_are_those_of_its_configurations(name):
    with torch.device("meta"):
        assert count_parameters(MaskedAutoencoder3D(**MAESIL_NETWORKS[name])) == MAESIL_PARAMETERS[name]


@pytest.mark.parametrize("preset", ["cpu", "paper"])
@pytest.mark.parametrize("kind", ["ae", "vae", "vqvae"])
def test_presets_are_comparable_to_maesil_and_compress(kind, preset):
    with torch.device("meta"):
        net = from_preset(BUILDERS[kind], AUTOENCODER_PRESETS[kind], preset)
    parameters = count_parameters(net)
    reference = MAESIL_PARAMETERS[preset]
    assert reference / PARAMETER_FACTOR < parameters < reference * PARAMETER_FACTOR, (parameters, reference)
    config = AUTOENCODER_PRESETS[kind][preset]
    voxels = config["superpatch_size"] ** 3
    assert latent_values(kind, config) * 64 <= voxels  # at least 64× fewer values than voxels


def test_latent_sizes_of_the_cpu_presets():
    ae, vae, vq = (AUTOENCODER_PRESETS[k]["cpu"] for k in ("ae", "vae", "vqvae"))
    assert ae_latent_shape(ae["superpatch_size"], ae["channels"], ae["strides"]) == (64, 4, 4, 4)
    assert vae["latent_size"] == 256
    assert vqvae_code_grid(vq["superpatch_size"], vq["channels"]) == (8, 8, 8)


@torch.no_grad()
def test_networks_reconstruct_the_input_shape_through_a_smaller_latent():
    images = torch.rand(2, 1, 32, 32, 32)
    ae = build_ae(32, channels=(4, 8, 16, 8), strides=(2, 2, 2, 1), num_res_units=1)
    assert ae(images).shape == images.shape
    assert ae.intermediate(ae.encode(images)).shape == (2, *ae_latent_shape(32, (4, 8, 16, 8), (2, 2, 2, 1)))

    vae = build_vae(32, channels=(4, 8, 16, 8), strides=(2, 2, 2, 1), num_res_units=1, latent_size=12)
    reconstruction, mu, logvar, _ = vae(images)
    assert reconstruction.shape == images.shape and mu.shape == logvar.shape == (2, 12)
    assert 0.0 <= float(reconstruction.min()) and float(reconstruction.max()) <= 1.0  # sigmoid output

    vq = build_vqvae(32, channels=(8, 16), num_res_layers=1, num_res_channels=(8, 16), num_embeddings=16,
                     embedding_dim=4)  # fmt: skip
    reconstruction, loss = vq(images)
    assert reconstruction.shape == images.shape and loss.ndim == 0
    assert vq.index_quantize(images).shape == (2, *vqvae_code_grid(32, (8, 16)))


def test_codebook_counts_as_parameters_but_not_as_trainable():
    vq = build_vqvae(16, channels=(4, 8), num_res_layers=1, num_res_channels=4, num_embeddings=32, embedding_dim=8)
    assert count_parameters(vq) - count_parameters(vq, trainable_only=True) == 32 * 8


@pytest.mark.parametrize(
    "build",
    [
        lambda: build_ae(36, channels=(4, 8, 16, 8), strides=(2, 2, 2, 1)),
        lambda: build_vae(28, channels=(4, 8, 16, 8), strides=(2, 2, 2, 1), latent_size=8),
        lambda: build_vqvae(20, channels=(4, 8, 16)),
        lambda: build_ae(32, channels=(4, 8), strides=(2,)),
        lambda: build_vqvae(16, channels=(4, 8), num_embeddings=1),
        lambda: build_ae(32, channels=(4, 8), strides=(2, 0)),
        lambda: build_ae((32, 32), channels=(4, 8), strides=(2, 2)),
    ],
)
def test_invalid_sizes_fail_at_construction(build):
    with pytest.raises(ValueError):
        build()


def test_a_size_that_does_not_fit_is_named_with_its_factor():
    with pytest.raises(ValueError, match=r"superpatch_size \(36, 36, 36\) must be a multiple of 8 .* autoencoder"):
        build_ae(36, channels=(4, 8, 16, 8), strides=(2, 2, 2, 1))


def test_unknown_presets_and_arguments_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown build_ae preset 'huge'; choose from \['cpu', 'paper'\]"):
        from_preset(build_ae, AE_PRESETS, "huge")
    with pytest.raises(ValueError, match=r"unknown build_ae arguments \['img_size'\]; build_ae takes .*superpatch_size"):
        from_preset(build_ae, AE_PRESETS, "cpu", img_size=32)
