"""Reconstruction baselines: typed builders over MONAI's ``AutoEncoder``, ``VarAutoEncoder`` and ``VQVAE``.

The networks are MONAI's reference implementations (``monai.networks.nets``); this module only picks
their sizes, checks that a superpatch size fits them, and describes their latent codes. Every network
has a real bottleneck, so none of them can copy its input:

========  ======================================  ===========================  ==================
network   latent of one 64³ superpatch ("cpu")    values                       fewer than input
========  ======================================  ===========================  ==================
AE        64 channels × 4³ (stride 16 per axis)   4 096 floats                 64×
VAE       one Gaussian, 256 dimensions            256 means (+ 256 variances)  1 024×
VQ-VAE    8³ code indices (stride 8 per axis)     512 indices into 256 codes   512× (values)
========  ======================================  ===========================  ==================

The "paper" presets keep these ratios on 128³ superpatches (AE 64 × 8³, VAE 2 048 dimensions, VQ-VAE
16³ indices into 1 024 codes). Presets are sized to the parameter counts of the MAESIL configurations
(:data:`MAESIL_PARAMETERS`): "cpu" ≈ 3.79 M (experiments/pretrain/maesil_demo.yaml, a 3D ViT MAE on
64³) and "paper" ≈ 50.5 M (experiments/pretrain/maesil.yaml on 128³).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from monai.networks import nets as monai_nets

from maesil.shapes import as_triple

__all__ = [
    "AutoencoderKind",
    "MAESIL_PARAMETERS",
    "ae_latent_shape",
    "build_ae",
    "build_vae",
    "vqvae_code_grid",
    "build_vqvae",
    "AE_PRESETS",
    "VAE_PRESETS",
    "VQVAE_PRESETS",
    "AUTOENCODER_PRESETS",
]

AutoencoderKind = Literal["ae", "vae", "vqvae"]

#: Parameters of the MAESIL configurations the baselines' presets are sized to.
MAESIL_PARAMETERS: dict[str, int] = {"cpu": 3_794_240, "paper": 50_514_176}


def _checked_size(superpatch_size: int | Sequence[int], factor: int, what: str) -> tuple[int, int, int]:
    """``superpatch_size`` as a 3-tuple; raises ``ValueError`` unless every axis is a multiple of ``factor``."""
    size = as_triple(superpatch_size, "superpatch_size")
    if any(s % factor for s in size):
        raise ValueError(
            f"superpatch_size {size} must be a multiple of {factor} on every axis: the {what} downsamples by "
            f"{factor} and must upsample back to the input size."
        )
    return size


def _checked_levels(superpatch_size: int | Sequence[int], channels: Sequence[int], strides: Sequence[int],
                    what: str) -> tuple[int, int, int]:
    """The size check of the strided (variational) autoencoders: one stride per level, each >= 1, and a
    ``superpatch_size`` divisible by their product."""
    if len(channels) != len(strides):
        raise ValueError(f"channels {list(channels)} and strides {list(strides)} must have the same length")
    if any(s < 1 for s in strides):
        raise ValueError(f"strides must be >= 1, got {list(strides)}")
    return _checked_size(superpatch_size, math.prod(strides), what)


# --------------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------------


def ae_latent_shape(
    superpatch_size: int | Sequence[int], channels: Sequence[int], strides: Sequence[int]
) -> tuple[int, int, int, int]:
    """Latent (C, x, y, z) of :func:`build_ae`: the last channel count at the input size / prod(strides)."""
    size = as_triple(superpatch_size, "superpatch_size")
    factor = math.prod(strides)
    return (int(channels[-1]), *(s // factor for s in size))  # type: ignore[return-value]


def build_ae(
    superpatch_size: int | Sequence[int] = 64,
    in_channels: int = 1,
    channels: Sequence[int] = (8, 32, 96, 192, 64),
    strides: Sequence[int] = (2, 2, 2, 2, 1),
    num_res_units: int = 1,
) -> monai_nets.AutoEncoder:
    """MONAI ``AutoEncoder``: strided (residual) convolutions down, transposed convolutions up.

    The latent is the output of the last encoder level, ``channels[-1]`` × (superpatch_size / prod(strides))³:
    with the defaults 64 × 4³ = 4 096 values for a 64³ input, 64× fewer than its voxels. A last level
    of stride 1 with few channels is the bottleneck. The output is linear (no final activation).
    """
    _checked_levels(superpatch_size, channels, strides, "autoencoder")
    return monai_nets.AutoEncoder(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
    )


# --------------------------------------------------------------------------------------------
# Variational autoencoder
# --------------------------------------------------------------------------------------------


def build_vae(
    superpatch_size: int | Sequence[int] = 64,
    in_channels: int = 1,
    channels: Sequence[int] = (8, 32, 80, 160, 32),
    strides: Sequence[int] = (2, 2, 2, 2, 1),
    num_res_units: int = 1,
    latent_size: int = 256,
) -> monai_nets.VarAutoEncoder:
    """MONAI ``VarAutoEncoder``: the AutoEncoder's convolutions around a ``latent_size``-dimensional Gaussian.

    The encoder's last feature map (``channels[-1]`` × (superpatch_size / prod(strides))³, 32 × 4³ with the
    defaults) is flattened and mapped by linear layers to the posterior mean and log-variance; a latent
    vector is mapped back the same way. With the defaults a 64³ input (262 144 voxels) goes through 256
    dimensions, 1 024× fewer. The output passes through a sigmoid (MONAI's default), so it lies in
    [0, 1] like windowed CT.
    """
    size = _checked_levels(superpatch_size, channels, strides, "variational autoencoder")
    if latent_size < 1:
        raise ValueError(f"latent_size must be >= 1, got {latent_size}")
    return monai_nets.VarAutoEncoder(
        spatial_dims=3,
        in_shape=(in_channels, *size),
        out_channels=in_channels,
        latent_size=latent_size,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        use_sigmoid=True,
    )


# --------------------------------------------------------------------------------------------
# VQ-VAE
# --------------------------------------------------------------------------------------------


def vqvae_code_grid(superpatch_size: int | Sequence[int], channels: Sequence[int]) -> tuple[int, int, int]:
    """Spatial shape of the code indices of :func:`build_vqvae`: every level of ``channels`` halves the size."""
    factor = 2 ** len(channels)
    return tuple(s // factor for s in as_triple(superpatch_size, "superpatch_size"))  # type: ignore[return-value]


def build_vqvae(
    superpatch_size: int | Sequence[int] = 64,
    in_channels: int = 1,
    channels: Sequence[int] = (8, 32, 112),
    num_res_layers: int = 2,
    num_res_channels: Sequence[int] | int = (8, 32, 112),
    num_embeddings: int = 256,
    embedding_dim: int = 64,
    commitment_cost: float = 0.25,
    ema_decay: float = 0.99,
) -> monai_nets.VQVAE:
    """MONAI ``VQVAE`` (Tudosiu et al. 2022): convolutional encoder, EMA vector quantizer, decoder.

    Each level of ``channels`` is a stride-2 convolution (kernel 4, MONAI's default) followed by
    ``num_res_layers`` residual layers, so the encoder output is ``embedding_dim`` × (superpatch_size / 2^levels)³
    and every position is replaced by the nearest of ``num_embeddings`` codebook vectors. With the
    defaults a 64³ input becomes 8³ = 512 indices into 256 codes (8 bits each), 512× fewer values than
    voxels. The codebook is learned by exponential moving averages (decay ``ema_decay``), the encoder by
    the commitment loss weighted by ``commitment_cost``. The output is linear.
    """
    _checked_size(superpatch_size, 2 ** len(channels), "VQ-VAE")
    if num_embeddings < 2:
        raise ValueError(f"num_embeddings must be >= 2, got {num_embeddings}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    levels = len(channels)
    return monai_nets.VQVAE(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=tuple(channels),
        num_res_layers=num_res_layers,
        num_res_channels=num_res_channels if isinstance(num_res_channels, int) else tuple(num_res_channels),
        downsample_parameters=((2, 4, 1, 1),) * levels,
        upsample_parameters=((2, 4, 1, 1, 0),) * levels,
        num_embeddings=num_embeddings,
        embedding_dim=embedding_dim,
        commitment_cost=commitment_cost,
        decay=ema_decay,
    )


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

#: Presets of :func:`build_ae`, :func:`build_vae` and :func:`build_vqvae` (applied with
#: :func:`maesil.models.presets.from_preset`): "cpu" for 64³ superpatches (≈ the 3.79 M MAESIL demo), "paper" for
#: 128³ (≈ the 50.5 M paper-sized MAESIL). The YAML files under experiments/pretrain/ spell them out.
AE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(superpatch_size=64, channels=(8, 32, 96, 192, 64), strides=(2, 2, 2, 2, 1), num_res_units=1),
    "paper": dict(superpatch_size=128, channels=(32, 128, 320, 640, 64), strides=(2, 2, 2, 2, 1), num_res_units=2),
}  # fmt: skip
VAE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(superpatch_size=64, channels=(8, 32, 80, 160, 32), strides=(2, 2, 2, 2, 1), num_res_units=1,
                latent_size=256),
    "paper": dict(superpatch_size=128, channels=(16, 64, 128, 256, 512, 64), strides=(2, 2, 2, 2, 2, 1),
                  num_res_units=1, latent_size=2048),
}  # fmt: skip
VQVAE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(superpatch_size=64, channels=(8, 32, 112), num_res_layers=2, num_res_channels=(8, 32, 112),
                num_embeddings=256, embedding_dim=64),
    "paper": dict(superpatch_size=128, channels=(32, 128, 416), num_res_layers=2, num_res_channels=(32, 128, 416),
                  num_embeddings=1024, embedding_dim=64),
}  # fmt: skip

#: The presets by network, for checks that go over all three baselines.
AUTOENCODER_PRESETS: dict[AutoencoderKind, dict[str, dict[str, Any]]] = {
    "ae": AE_PRESETS,
    "vae": VAE_PRESETS,
    "vqvae": VQVAE_PRESETS,
}
