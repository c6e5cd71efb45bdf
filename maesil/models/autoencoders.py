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
16³ indices into 1 024 codes). Presets are sized to the parameter counts of MAESIL's presets
(:data:`maesil.models.mae.MAE_PRESETS`): "cpu" ≈ 3.79 M (the demo's 3D ViT MAE on 64³) and "paper"
≈ 50.5 M (experiments/pretrain/maesil.yaml on 128³); see :data:`MAESIL_PARAMETERS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from monai.networks import nets as monai_nets
from torch import nn

AutoencoderKind = Literal["ae", "vae", "vqvae"]

#: Parameters of MAESIL's presets, the counts the baselines' presets are sized to.
MAESIL_PARAMETERS: dict[str, int] = {"cpu": 3_794_240, "paper": 50_514_176}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (frozen ones too, unless ``trainable_only``).

    The VQ-VAE's codebook is a parameter without gradients (it is learned by moving averages), so it
    counts unless ``trainable_only``.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def as_size3(img_size: int | Sequence[int]) -> tuple[int, int, int]:
    """``64`` → ``(64, 64, 64)``; a 3-sequence is returned as a tuple."""
    if isinstance(img_size, int):
        return (img_size,) * 3
    size = tuple(int(s) for s in img_size)
    if len(size) != 3:
        raise ValueError(f"img_size must be an int or 3 ints, got {img_size!r}")
    return size  # type: ignore[return-value]


def _check_divisible(img_size: tuple[int, int, int], factor: int, what: str) -> None:
    if any(s % factor for s in img_size):
        raise ValueError(
            f"img_size {img_size} must be a multiple of {factor} on every axis: the {what} downsamples by "
            f"{factor} and must upsample back to the input size."
        )


def _check_strides(strides: Sequence[int]) -> None:
    if any(s < 1 for s in strides):
        raise ValueError(f"strides must be >= 1, got {list(strides)}")


# --------------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------------


def ae_latent_shape(
    img_size: int | Sequence[int], channels: Sequence[int], strides: Sequence[int]
) -> tuple[int, int, int, int]:
    """Latent (C, x, y, z) of :func:`build_ae`: the last channel count at the input size / prod(strides)."""
    size = as_size3(img_size)
    factor = math.prod(strides)
    return (int(channels[-1]), *(s // factor for s in size))  # type: ignore[return-value]


def build_ae(
    img_size: int | Sequence[int] = 64,
    in_channels: int = 1,
    channels: Sequence[int] = (8, 32, 96, 192, 64),
    strides: Sequence[int] = (2, 2, 2, 2, 1),
    num_res_units: int = 1,
) -> monai_nets.AutoEncoder:
    """MONAI ``AutoEncoder``: strided (residual) convolutions down, transposed convolutions up.

    The latent is the output of the last encoder level, ``channels[-1]`` × (img_size / prod(strides))³:
    with the defaults 64 × 4³ = 4 096 values for a 64³ input, 64× fewer than its voxels. A last level
    of stride 1 with few channels is the bottleneck. The output is linear (no final activation).
    """
    size = as_size3(img_size)
    if len(channels) != len(strides):
        raise ValueError(f"channels {list(channels)} and strides {list(strides)} must have the same length")
    _check_strides(strides)
    _check_divisible(size, math.prod(strides), "autoencoder")
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
    img_size: int | Sequence[int] = 64,
    in_channels: int = 1,
    channels: Sequence[int] = (8, 32, 80, 160, 32),
    strides: Sequence[int] = (2, 2, 2, 2, 1),
    num_res_units: int = 1,
    latent_size: int = 256,
) -> monai_nets.VarAutoEncoder:
    """MONAI ``VarAutoEncoder``: the AutoEncoder's convolutions around a ``latent_size``-dimensional Gaussian.

    The encoder's last feature map (``channels[-1]`` × (img_size / prod(strides))³, 32 × 4³ with the
    defaults) is flattened and mapped by linear layers to the posterior mean and log-variance; a latent
    vector is mapped back the same way. With the defaults a 64³ input (262 144 voxels) goes through 256
    dimensions, 1 024× fewer. The output passes through a sigmoid (MONAI's default), so it lies in
    [0, 1] like windowed CT.
    """
    size = as_size3(img_size)
    if len(channels) != len(strides):
        raise ValueError(f"channels {list(channels)} and strides {list(strides)} must have the same length")
    _check_strides(strides)
    _check_divisible(size, math.prod(strides), "variational autoencoder")
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


def vqvae_code_grid(img_size: int | Sequence[int], channels: Sequence[int]) -> tuple[int, int, int]:
    """Spatial shape of the code indices of :func:`build_vqvae`: every level of ``channels`` halves the size."""
    factor = 2 ** len(channels)
    return tuple(s // factor for s in as_size3(img_size))  # type: ignore[return-value]


def build_vqvae(
    img_size: int | Sequence[int] = 64,
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
    ``num_res_layers`` residual layers, so the encoder output is ``embedding_dim`` × (img_size / 2^levels)³
    and every position is replaced by the nearest of ``num_embeddings`` codebook vectors. With the
    defaults a 64³ input becomes 8³ = 512 indices into 256 codes (8 bits each), 512× fewer values than
    voxels. The codebook is learned by exponential moving averages (decay ``ema_decay``), the encoder by
    the commitment loss weighted by ``commitment_cost``. The output is linear.
    """
    size = as_size3(img_size)
    _check_divisible(size, 2 ** len(channels), "VQ-VAE")
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

#: Sizes per network and preset: "cpu" for 64³ superpatches (≈ MAESIL's 3.79 M cpu preset), "paper" for
#: 128³ (≈ the 50.5 M paper-sized MAESIL). The YAML files under experiments/pretrain/ spell them out.
AUTOENCODER_PRESETS: dict[AutoencoderKind, dict[str, dict[str, Any]]] = {
    "ae": {
        "cpu": dict(img_size=64, channels=(8, 32, 96, 192, 64), strides=(2, 2, 2, 2, 1), num_res_units=1),
        "paper": dict(img_size=128, channels=(32, 128, 320, 640, 64), strides=(2, 2, 2, 2, 1), num_res_units=2),
    },
    "vae": {
        "cpu": dict(img_size=64, channels=(8, 32, 80, 160, 32), strides=(2, 2, 2, 2, 1), num_res_units=1,
                    latent_size=256),
        "paper": dict(img_size=128, channels=(16, 64, 128, 256, 512, 64), strides=(2, 2, 2, 2, 2, 1),
                      num_res_units=1, latent_size=2048),
    },
    "vqvae": {
        "cpu": dict(img_size=64, channels=(8, 32, 112), num_res_layers=2, num_res_channels=(8, 32, 112),
                    num_embeddings=256, embedding_dim=64),
        "paper": dict(img_size=128, channels=(32, 128, 416), num_res_layers=2, num_res_channels=(32, 128, 416),
                      num_embeddings=1024, embedding_dim=64),
    },
}  # fmt: skip

_BUILDERS = {"ae": build_ae, "vae": build_vae, "vqvae": build_vqvae}


def build_autoencoder(kind: AutoencoderKind, preset: str = "cpu", **overrides: Any) -> nn.Module:
    """Builds network ``kind`` ("ae", "vae" or "vqvae") from a preset of :data:`AUTOENCODER_PRESETS`.

    Raises:
        ValueError: on an unknown kind or preset.
    """
    if kind not in AUTOENCODER_PRESETS:
        raise ValueError(f"unknown autoencoder {kind!r}; choose from {sorted(AUTOENCODER_PRESETS)}.")
    presets = AUTOENCODER_PRESETS[kind]
    if preset not in presets:
        raise ValueError(f"unknown {kind} preset {preset!r}; choose from {sorted(presets)}.")
    return _BUILDERS[kind](**{**presets[preset], **overrides})
