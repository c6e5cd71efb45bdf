"""A residual-encoder 3D U-Net (nnU-Net "ResEnc" layout): the CNN backbone of PGL/BYOL, S3D and segmentation.

Layout (``S`` stages, widths ``features``, ``blocks_per_stage`` residual blocks, ``strides`` per stage)::

    encoder.stem          conv k³ (in → features[0]) → InstanceNorm → LeakyReLU
    encoder.stages[s]     blocks_per_stage[s] × ResidualBlock; the first one has stride strides[s]
                          and maps features[s-1] → features[s]
    decoder.upsamples[i]  transposed conv (kernel = stride = strides[s+1]), features[s+1] → features[s]
    decoder.stages[i]     concat(skip s) → decoder_blocks × (conv k³ → InstanceNorm → LeakyReLU);
                          the first conv maps 2·features[s] → features[s]
    head                  conv 1³, features[0] → out_channels (absent when out_channels is None)

with decoder index ``i = S - 2 - s`` (coarsest first). Every encoder parameter lives under ``encoder.``, every
decoder one under ``decoder.`` and the head under ``head.``, so ``{k: v for k, v in sd.items() if
k.startswith("encoder.")}`` moves a pretrained encoder into a segmentation network with another head.

Residual blocks follow nnU-Net's ``BasicBlockD`` (ResNet-D): conv k³ (stride) → norm → LeakyReLU → conv k³ →
norm, plus a shortcut, then LeakyReLU. The shortcut is the identity when the shape is kept; otherwise it is an average
pool (kernel = stride) when the block strides, followed by a bias-free 1³ conv + norm when the width changes. We
keep nnU-Net's choice rather than a strided 1³ conv: the 1³ projection then sees every input voxel instead of one
in stride³, at the same parameter count (pooling has none).

Layers are built by a :class:`LayerFactory` (one for the encoder, one for the decoder), so a subclass can swap the
convolutions, norms and pooling for sparse masked ones (S3D) without touching the block structure or the
state-dict keys.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from maesil.models.presets import from_preset

__all__ = [
    "LayerFactory",
    "ConvNormAct",
    "ResidualBlock",
    "ResidualStage",
    "ResEncoder",
    "UNetDecoder",
    "ResEncUNet",
    "UNET_PRESETS",
    "resenc_unet",
]


class LayerFactory:
    """Builds the network's convolutions, norms, nonlinearities, pools and upsamplings.

    Override a method in a subclass (e.g. sparse masked conv / sparse InstanceNorm for S3D) and pass an instance
    as ``encoder_layers`` or ``decoder_layers``: the blocks only call these methods, so names and shapes of the
    parameters stay the same and weights transfer between the dense and the swapped network.

    Args:
        negative_slope: LeakyReLU slope (nnU-Net: 0.01).
        eps: InstanceNorm epsilon.
    """

    def __init__(self, negative_slope: float = 0.01, eps: float = 1e-5) -> None:
        self.negative_slope = negative_slope
        self.eps = eps

    def conv(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True
    ) -> nn.Module:
        """A "same"-padded ``Conv3d`` (odd kernel): the output size is the input size / ``stride``."""
        return nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)

    def norm(self, channels: int) -> nn.Module:
        """``InstanceNorm3d(affine=True)`` as in nnU-Net: per-sample statistics, independent of the batch size."""
        return nn.InstanceNorm3d(channels, eps=self.eps, affine=True)

    def act(self) -> nn.Module:
        return nn.LeakyReLU(self.negative_slope, inplace=True)

    def pool(self, stride: int) -> nn.Module:
        """Downsampling of a strided residual block's shortcut."""
        return nn.AvgPool3d(stride, stride)

    def upsample(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        """Decoder upsampling: ``ConvTranspose3d`` with kernel = stride (an exact inverse of the stride)."""
        return nn.ConvTranspose3d(in_channels, out_channels, stride, stride=stride)


class ConvNormAct(nn.Module):
    """conv k³ (stride) → norm → LeakyReLU: the stem and the decoder's conv blocks."""

    def __init__(
        self, layers: LayerFactory, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1
    ) -> None:
        super().__init__()
        self.conv = layers.conv(in_channels, out_channels, kernel_size, stride)
        self.norm = layers.norm(out_channels)
        self.act = layers.act()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class ResidualBlock(nn.Module):
    """nnU-Net ``BasicBlockD``: ``act(norm2(conv2(act(norm1(conv1(x))))) + shortcut(x))``.

    The shortcut is ``Identity`` when stride is 1 and the width is kept; otherwise ``pool`` (stride > 1) and/or a
    bias-free 1³ conv + norm (width change), see the module docstring.
    """

    def __init__(
        self, layers: LayerFactory, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.conv1 = layers.conv(in_channels, out_channels, kernel_size, stride)
        self.norm1 = layers.norm(out_channels)
        self.act1 = layers.act()
        self.conv2 = layers.conv(out_channels, out_channels, kernel_size, 1)
        self.norm2 = layers.norm(out_channels)
        self.act2 = layers.act()
        shortcut: list[nn.Module] = []
        if stride != 1:
            shortcut.append(layers.pool(stride))
        if in_channels != out_channels:
            shortcut += [layers.conv(in_channels, out_channels, 1, 1, bias=False), layers.norm(out_channels)]
        self.shortcut: nn.Module = nn.Sequential(*shortcut) if shortcut else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResidualStage(nn.Sequential):
    """``num_blocks`` residual blocks; only the first strides and changes the width."""

    def __init__(
        self,
        layers: LayerFactory,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        stride: int = 1,
        kernel_size: int = 3,
    ) -> None:
        super().__init__(
            *(
                ResidualBlock(
                    layers, in_channels if b == 0 else out_channels, out_channels, kernel_size, stride if b == 0 else 1
                )
                for b in range(num_blocks)
            )
        )
        self.out_channels = out_channels
        self.stride = stride


class ResEncoder(nn.Module):
    """Stem + residual stages; ``forward`` returns the output of every stage (finest first)."""

    def __init__(
        self,
        layers: LayerFactory,
        in_channels: int,
        features: Sequence[int],
        blocks_per_stage: Sequence[int],
        strides: Sequence[int],
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.stem = ConvNormAct(layers, in_channels, features[0], kernel_size)
        self.stages = nn.ModuleList(
            ResidualStage(
                layers, features[max(s - 1, 0)], features[s], blocks_per_stage[s], strides[s], kernel_size
            )
            for s in range(len(features))
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        skips: list[Tensor] = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """nnU-Net decoder: upsample, concatenate the skip, conv blocks; ``forward`` returns every level, coarsest first."""

    def __init__(
        self,
        layers: LayerFactory,
        features: Sequence[int],
        strides: Sequence[int],
        decoder_blocks: int = 1,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        levels = range(len(features) - 2, -1, -1)  # target stage s, coarsest first
        self.upsamples = nn.ModuleList(layers.upsample(features[s + 1], features[s], strides[s + 1]) for s in levels)
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(
                    ConvNormAct(layers, 2 * features[s] if b == 0 else features[s], features[s], kernel_size)
                    for b in range(decoder_blocks)
                )
            )
            for s in levels
        )

    def forward(self, skips: Sequence[Tensor]) -> list[Tensor]:
        if len(skips) != len(self.stages) + 1:
            raise ValueError(f"expected {len(self.stages) + 1} skip features (one per stage), got {len(skips)}.")
        x = skips[-1]
        outs: list[Tensor] = []
        for i, (up, stage) in enumerate(zip(self.upsamples, self.stages)):
            x = stage(torch.cat([up(x), skips[-2 - i]], dim=1))
            outs.append(x)
        return outs


def _positive_ints(values: Sequence[int], name: str) -> tuple[int, ...]:
    values = tuple(values)
    if any(not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1 for v in values):
        raise ValueError(f"{name} must be positive ints, got {list(values)}.")
    return tuple(int(v) for v in values)


class ResEncUNet(nn.Module):
    """Residual-encoder 3D U-Net (nnU-Net ResEnc style), see the module docstring for the layout.

    Args:
        in_channels: image channels.
        out_channels: channels of the 1³ head on the finest decoder level; ``None`` builds no head (a dense
            feature extractor: use :meth:`forward_features`).
        features: width of each stage (``S >= 2`` stages).
        blocks_per_stage: residual blocks per stage.
        strides: stride of each stage's first block (1 or more; nnU-Net uses 1 then 2s). Inputs must be a
            multiple of their product, :attr:`total_stride`, on every axis.
        decoder_blocks: conv blocks per decoder level.
        kernel_size: odd kernel of every k³ conv.
        negative_slope: LeakyReLU slope.
        encoder_layers / decoder_layers: layer factories (default: dense :class:`LayerFactory`).
        zero_init_residual: zero the last norm of every residual block (nnU-Net's ``init_last_bn_before_add_to_0``),
            so each block starts as its shortcut. Off by default: then every parameter receives a gradient on the
            first step.
    """

    encoder_prefix: ClassVar[str] = "encoder."
    decoder_prefix: ClassVar[str] = "decoder."
    head_prefix: ClassVar[str] = "head."

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = 1,
        features: Sequence[int] = (32, 64, 128, 256, 320, 320),
        blocks_per_stage: Sequence[int] = (1, 3, 4, 6, 6, 6),
        strides: Sequence[int] = (1, 2, 2, 2, 2, 2),
        decoder_blocks: int = 1,
        kernel_size: int = 3,
        negative_slope: float = 0.01,
        *,
        encoder_layers: LayerFactory | None = None,
        decoder_layers: LayerFactory | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        features = _positive_ints(features, "features")
        blocks_per_stage = _positive_ints(blocks_per_stage, "blocks_per_stage")
        strides = _positive_ints(strides, "strides")
        if not len(features) == len(blocks_per_stage) == len(strides):
            raise ValueError(
                f"features {list(features)}, blocks_per_stage {list(blocks_per_stage)} and strides {list(strides)} "
                "must have the same length (one entry per stage)."
            )
        if len(features) < 2:
            raise ValueError(f"a U-Net needs at least 2 stages, got {len(features)} (features {list(features)}).")
        _positive_ints((in_channels,), "in_channels")
        if out_channels is not None:
            _positive_ints((out_channels,), "out_channels")
        _positive_ints((decoder_blocks,), "decoder_blocks")
        _positive_ints((kernel_size,), "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (for 'same' padding), got {kernel_size}.")
        if negative_slope < 0:
            raise ValueError(f"negative_slope must be >= 0, got {negative_slope}.")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.blocks_per_stage = blocks_per_stage
        self.strides = strides
        self.decoder_blocks = decoder_blocks
        self.kernel_size = kernel_size
        self.negative_slope = negative_slope

        enc_layers = encoder_layers if encoder_layers is not None else LayerFactory(negative_slope)
        dec_layers = decoder_layers if decoder_layers is not None else LayerFactory(negative_slope)
        self.encoder = ResEncoder(enc_layers, in_channels, features, blocks_per_stage, strides, kernel_size)
        self.decoder = UNetDecoder(dec_layers, features, strides, decoder_blocks, kernel_size)
        self.head: nn.Module | None = (
            nn.Conv3d(features[0], out_channels, kernel_size=1) if out_channels is not None else None
        )
        self.init_weights(zero_init_residual)

    # ----------------------------------------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.features)

    @property
    def total_stride(self) -> int:
        """Product of the strides: the downsampling of the deepest stage, and the multiple inputs must be."""
        return math.prod(self.strides)

    @property
    def feature_channels(self) -> list[int]:
        """Channels of the :meth:`decode` outputs, coarsest first."""
        return [self.features[s] for s in range(self.num_stages - 2, -1, -1)]

    def init_weights(self, zero_init_residual: bool = False) -> None:
        """nnU-Net initialisation: He-normal conv weights (LeakyReLU slope), zero biases, unit/zero norm affine."""
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, a=self.negative_slope)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.InstanceNorm3d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.encoder.modules():
                if isinstance(m, ResidualBlock) and getattr(m.norm2, "weight", None) is not None:
                    nn.init.zeros_(m.norm2.weight)

    def check_input(self, x: Tensor) -> None:
        """Raises ``ValueError`` unless ``x`` is ``(B, in_channels, X, Y, Z)`` with sizes multiples of the stride
        and more than one voxel at the deepest stage (InstanceNorm needs two)."""
        if x.ndim != 5:
            raise ValueError(f"input must be (B, C, X, Y, Z), got shape {tuple(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got shape {tuple(x.shape)}.")
        m = self.total_stride
        if any(s == 0 or s % m for s in x.shape[2:]):
            raise ValueError(
                f"input spatial size {tuple(x.shape[2:])} (shape {tuple(x.shape)}) must be a positive multiple of "
                f"{m} on every axis: the network downsamples by total_stride={m} (strides {list(self.strides)})."
            )
        if all(s == m for s in x.shape[2:]):
            raise ValueError(
                f"input spatial size {tuple(x.shape[2:])} (shape {tuple(x.shape)}) leaves a single voxel at the "
                f"deepest stage (total_stride={m}); InstanceNorm cannot normalise one voxel: "
                f"use at least {2 * m} on one axis."
            )

    def encode(self, x: Tensor) -> list[Tensor]:
        """Skip features of every stage, finest first: ``S`` tensors of ``features[s]`` channels at
        ``size / prod(strides[:s+1])``."""
        self.check_input(x)
        return self.encoder(x)

    def decode(self, skips: Sequence[Tensor]) -> list[Tensor]:
        """Decoder outputs, coarsest first, finest (input resolution / strides[0]) last: ``S - 1`` tensors with
        :attr:`feature_channels` channels, the multi-scale dense features (e.g. for PGL)."""
        return self.decoder(skips)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """``decode(encode(x))``."""
        return self.decode(self.encode(x))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, X, Y, Z) → (B, out_channels, X / strides[0], ...)``: the head on the finest level."""
        if self.head is None:
            raise RuntimeError(
                "this ResEncUNet was built with out_channels=None (no head); use forward_features() for its "
                "decoder features or build it with out_channels set."
            )
        return self.head(self.forward_features(x)[-1])


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------

#: Architectures of :func:`resenc_unet`. "resenc_l" is nnU-Net's ResEnc-L layout (6 stages, 32…320 channels);
#: "cpu" is a small network for 64³ CPU demos; "tiny" is for unit tests.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "resenc_l": dict(features=(32, 64, 128, 256, 320, 320), blocks_per_stage=(1, 3, 4, 6, 6, 6),
                     strides=(1, 2, 2, 2, 2, 2), kernel_size=3),
    "cpu": dict(features=(16, 32, 64, 128), blocks_per_stage=(1, 2, 2, 2), strides=(1, 2, 2, 2), kernel_size=3),
    "tiny": dict(features=(4, 8, 16), blocks_per_stage=(1, 1, 1), strides=(1, 2, 2), kernel_size=3),
}  # fmt: skip


def resenc_unet(preset: str = "cpu", **overrides: Any) -> ResEncUNet:
    """A :class:`ResEncUNet` from :data:`UNET_PRESETS` with keyword overrides (e.g. ``in_channels``,
    ``out_channels=None``), see :func:`~maesil.models.presets.from_preset`."""
    return from_preset(ResEncUNet, UNET_PRESETS, preset, **overrides)
