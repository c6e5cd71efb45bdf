"""Builders of the AE, VAE and VQ-VAE baselines: sizes comparable to MAESIL, a real bottleneck, shapes."""

from __future__ import annotations

import math

import pytest
import torch

from maesil.models.autoencoders import (
    AUTOENCODER_PRESETS,
    MAESIL_PARAMETERS,
    ae_latent_shape,
    build_ae,
    build_autoencoder,
    build_vae,
    build_vqvae,
    count_parameters,
    vqvae_code_grid,
)
from maesil.models.mae import build_mae

#: Each baseline preset has within this factor of the parameters of the MAESIL preset of the same name.
PARAMETER_FACTOR = 1.15


def latent_values(kind: str, config: dict) -> int:
    """Values one superpatch is compressed to (indices for the VQ-VAE)."""
    if kind == "ae":
        return math.prod(ae_latent_shape(config["img_size"], config["channels"], config["strides"]))
    if kind == "vae":
        return config["latent_size"]
    return math.prod(vqvae_code_grid(config["img_size"], config["channels"]))


def test_maesil_parameter_counts_are_those_of_its_presets():
    assert count_parameters(build_mae("cpu")) == MAESIL_PARAMETERS["cpu"]
    with torch.device("meta"):
        assert count_parameters(build_mae("maesil")) == MAESIL_PARAMETERS["paper"]


@pytest.mark.parametrize("preset", ["cpu", "paper"])
@pytest.mark.parametrize("kind", ["ae", "vae", "vqvae"])
def test_presets_are_comparable_to_maesil_and_compress(kind, preset):
    with torch.device("meta"):
        net = build_autoencoder(kind, preset)
    parameters = count_parameters(net)
    reference = MAESIL_PARAMETERS[preset]
    assert reference / PARAMETER_FACTOR < parameters < reference * PARAMETER_FACTOR, (parameters, reference)
    config = AUTOENCODER_PRESETS[kind][preset]
    voxels = config["img_size"] ** 3
    assert latent_values(kind, config) * 64 <= voxels  # at least 64× fewer values than voxels


def test_latent_sizes_of_the_cpu_presets():
    ae, vae, vq = (AUTOENCODER_PRESETS[k]["cpu"] for k in ("ae", "vae", "vqvae"))
    assert ae_latent_shape(ae["img_size"], ae["channels"], ae["strides"]) == (64, 4, 4, 4)
    assert vae["latent_size"] == 256
    assert vqvae_code_grid(vq["img_size"], vq["channels"]) == (8, 8, 8)


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
        lambda: build_autoencoder("gan"),
        lambda: build_autoencoder("ae", "huge"),
    ],
)
def test_invalid_sizes_fail_at_construction(build):
    with pytest.raises(ValueError):
        build()
