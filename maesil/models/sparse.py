"""Sparse masked convolutions for S3D: block masks, mask-aware layers and the masked ResEnc U-Net.

S3D (Wald et al., CVPR 2025, nnssl) pretrains a residual-encoder U-Net as a masked autoencoder. A CNN
cannot drop masked tokens the way a ViT does, so the encoder is made *sparse*: every layer behaves as if
only the visible voxels existed (SparK, Tian et al. 2023, in 3D).

Masks
    The input is cut into cubic cells of ``block_size`` voxels (16 in the paper); :func:`block_mask`
    hides exactly ``round(ratio · cells)`` cells of every sample (Python's :func:`round`, ties to even, as
    :mod:`maesil.models.masking`). Masks are boolean ``(B, 1, gx, gy, gz)`` tensors over the cell grid,
    True = masked; :func:`upsample_mask` turns them into voxel masks. At least one cell stays visible and
    at least one is hidden, else the loss or the sparse statistics would be undefined (``ValueError``).

Masks at other resolutions (:func:`visible_at`)
    A feature voxel of stride ``f`` is *visible if any input voxel it covers is visible*: the visible
    mask is max-pooled with kernel = stride ``f``. While ``f`` ≤ ``block_size`` every feature voxel lies
    inside one cell and the rule changes nothing. When the encoder's stride exceeds the block size
    (ResEnc-L: total stride 32 > 16) a deep voxel covers several cells; calling it visible when *any*
    of them is keeps every bit of visible information in the deep stages (an "all visible" rule would drop
    the visible cells whose neighbours are masked, and at ratio 0.9 most deep voxels would vanish). The
    price is that a deep voxel may mix visible content with zeros of masked cells; it never sees masked
    *content*, which is what matters for the pretext task.

Sparse layers (:class:`SparseLayerFactory`)
    * :class:`SparseConv3d`: zero the masked input voxels, convolve, zero the masked output voxels
      (the paper's "conv, then re-apply the mask"). Masking the input as well costs one multiply but makes
      every layer invariant to whatever lies at masked positions of its input, instead of relying on the
      previous layer to have zeroed them; the tests check this by injecting noise there.
    * :class:`SparseInstanceNorm3d`: mean and (biased) variance over the visible voxels of each sample and
      channel only, computed in float32; masked outputs are 0.
    * :class:`SparseAvgPool3d` (the strided residual shortcut): the average over the visible voxels of each
      window (a dense average would dilute visible values with the zeros of masked ones); masked outputs
      are 0.
    * LeakyReLU maps 0 to 0, so it stays dense.
    All of them are dense when no mask is set (and equal the dense layers when everything is visible),
    subclass the dense torch layers and keep their parameter names, so an S3D encoder's state dict loads
    into a dense :class:`~maesil.models.unet.ResEncUNet` with no missing or unexpected key.

The layers share one :class:`SparseContext`, which holds the visible cell mask of the current forward pass
and caches its resampling per feature shape; :class:`SparseMaskedUNet` sets it around the encoder.

Example:
    >>> net = SparseMaskedUNet(features=(4, 8, 16), blocks_per_stage=(1, 1, 1), strides=(1, 2, 2), block_size=8)
    >>> images = torch.rand(2, 1, 32, 32, 32)
    >>> mask = block_mask(2, mask_grid(images.shape[2:], 8), 0.75)
    >>> net(images, mask).shape
    torch.Size([2, 1, 32, 32, 32])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maesil.models.unet import ConvNormAct, LayerFactory, ResEncUNet

__all__ = [
    "mask_grid",
    "masked_cell_count",
    "draw_mask_ratio",
    "block_mask",
    "upsample_mask",
    "visible_at",
    "SparseContext",
    "SparseConv3d",
    "SparseInstanceNorm3d",
    "SparseAvgPool3d",
    "SparseLayerFactory",
    "SparseMaskedUNet",
    "masked_mse",
]


# --------------------------------------------------------------------------------------------------------------
# Masks: pure functions
# --------------------------------------------------------------------------------------------------------------


def mask_grid(spatial_shape: Sequence[int], block_size: int) -> tuple[int, int, int]:
    """Cells per axis of a ``spatial_shape`` (X, Y, Z) input cut into cubes of ``block_size`` voxels.

    Raises:
        ValueError: when ``block_size`` < 1 or does not divide every axis.
    """
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3:
        raise ValueError(f"expected a 3D spatial shape (X, Y, Z), got {shape}.")
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
        raise ValueError(f"mask block_size must be a positive int, got {block_size!r}.")
    block_size = int(block_size)
    if any(s < 1 or s % block_size for s in shape):
        raise ValueError(
            f"input size {shape} must be a positive multiple of the mask block size {block_size} on every axis; "
            f"change the superpatch size or mask_block_size."
        )
    return shape[0] // block_size, shape[1] // block_size, shape[2] // block_size


def masked_cell_count(grid: Sequence[int], ratio: float) -> int:
    """``round(ratio · cells)``: the number of cells :func:`block_mask` hides in every sample.

    Raises:
        ValueError: when the ratio is outside (0, 1) or rounds to no masked or no visible cell.
    """
    cells = math.prod(int(g) for g in grid)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}.")
    count = int(round(ratio * cells))
    if not 0 < count < cells:
        raise ValueError(
            f"mask ratio {ratio} hides {count} of {cells} cells (grid {tuple(grid)}); at least one cell must be "
            "masked and one visible: use a larger input, a smaller mask_block_size or another ratio."
        )
    return count


def draw_mask_ratio(
    ratio: float, ratio_range: Sequence[float] | None = None, generator: torch.Generator | None = None
) -> float:
    """The mask ratio of one batch: ``ratio``, or a draw from U(``ratio_range``) when a range is given.

    The draw uses torch's (CPU) random generator, or ``generator``, so ``seed_everything`` reproduces it.
    """
    if ratio_range is None:
        return float(ratio)
    low, high = (float(v) for v in ratio_range)
    return float(torch.empty(()).uniform_(low, high, generator=generator)) if high > low else low


def block_mask(
    batch_size: int,
    grid: Sequence[int],
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random block mask: exactly :func:`masked_cell_count` cells of each sample are masked.

    Args:
        batch_size: samples B.
        grid: cells per axis (gx, gy, gz), see :func:`mask_grid`.
        ratio: fraction of cells to mask, in (0, 1).
        generator: optional generator; a seeded generator gives the same mask every time.
        device: where to draw (default: the generator's device, else CPU).

    Returns:
        Boolean ``(B, 1, gx, gy, gz)``, True = masked.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or any(g < 1 for g in grid):
        raise ValueError(f"grid must be 3 positive ints, got {grid}.")
    count = masked_cell_count(grid, ratio)
    if device is None and generator is not None:
        device = generator.device
    noise = torch.rand(batch_size, math.prod(grid), generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each cell's noise: a random permutation per sample
    return (ranks < count).view(batch_size, 1, *grid)


def upsample_mask(mask: Tensor, block_size: int) -> Tensor:
    """Cell mask ``(B, C, gx, gy, gz)`` → voxel mask ``(B, C, gx·b, gy·b, gz·b)`` (nearest, same dtype)."""
    if mask.ndim != 5:
        raise ValueError(f"mask must be (B, C, gx, gy, gz), got shape {tuple(mask.shape)}.")
    b = int(block_size)
    B, C, gx, gy, gz = mask.shape
    expanded = mask[:, :, :, None, :, None, :, None].expand(B, C, gx, b, gy, b, gz, b)
    return expanded.reshape(B, C, gx * b, gy * b, gz * b)


def visible_at(visible: Tensor, block_size: int, shape: Sequence[int]) -> Tensor:
    """Visible cell mask ``(B, 1, gx, gy, gz)`` at a feature resolution ``shape``: True where any input voxel
    covered by the feature voxel is visible (max-pool with kernel = stride; see the module docstring).

    Raises:
        ValueError: when the input size (cells × block_size) is not a multiple of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    size = tuple(int(g) * int(block_size) for g in visible.shape[2:])
    if len(shape) != 3 or any(s < 1 or n % s for n, s in zip(size, shape)):
        raise ValueError(f"feature shape {shape} does not divide the masked input size {size}.")
    strides = [n // s for n, s in zip(size, shape)]
    out = visible
    if all(block_size % f == 0 for f in strides):  # each feature voxel inside one cell: repeat
        reps = [block_size // f for f in strides]
        for axis, rep in enumerate(reps):
            if rep > 1:
                out = out.repeat_interleave(rep, dim=2 + axis)
        return out
    if all(f % block_size == 0 for f in strides):  # each feature voxel covers whole cells: max-pool the cells
        kernel = [f // block_size for f in strides]
    else:  # mixed: through voxels
        out, kernel = upsample_mask(out, block_size), strides
    return F.max_pool3d(out.float(), kernel, kernel) > 0.5


# --------------------------------------------------------------------------------------------------------------
# Sparse layers
# --------------------------------------------------------------------------------------------------------------


class SparseContext:
    """The visible cell mask of the current forward pass, shared by all sparse layers of a network.

    :meth:`mask_for` resamples it to a feature map's shape (cached per shape, dtype and device until the
    mask changes). With no mask set, the sparse layers behave densely.

    Args:
        block_size: side of a mask cell in input voxels.
    """

    def __init__(self, block_size: int) -> None:
        if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}.")
        self.block_size = int(block_size)
        self.visible: Tensor | None = None
        self._cache: dict[tuple, Tensor] = {}

    def set(self, visible: Tensor | None) -> None:
        """Sets the visible cell mask ``(B, 1, gx, gy, gz)`` (bool, True = visible), or None (dense)."""
        if visible is not None and (visible.ndim != 5 or visible.shape[1] != 1):
            raise ValueError(f"visible mask must be (B, 1, gx, gy, gz), got shape {tuple(visible.shape)}.")
        self.visible = visible
        self._cache = {}

    @contextmanager
    def masked(self, visible: Tensor | None) -> Iterator[None]:
        """``with context.masked(visible): ...`` sets the mask and clears it (and its cache) afterwards."""
        self.set(visible)
        try:
            yield
        finally:
            self.set(None)

    def mask_for(self, x: Tensor) -> Tensor | None:
        """The visible mask at ``x``'s resolution, ``(B, 1, *x.shape[2:])`` in ``x``'s dtype (1 = visible),
        or None when no mask is set."""
        if self.visible is None:
            return None
        if x.shape[0] != self.visible.shape[0]:
            raise ValueError(f"batch of {x.shape[0]} features for a mask of {self.visible.shape[0]} samples.")
        key = (tuple(x.shape[2:]), x.dtype, x.device)
        mask = self._cache.get(key)
        if mask is None:
            mask = visible_at(self.visible.to(x.device), self.block_size, x.shape[2:]).to(x.dtype)
            self._cache[key] = mask
        return mask


class SparseConv3d(nn.Conv3d):
    """``Conv3d`` on visible voxels: masked inputs are zeroed, masked outputs set to 0.

    Same parameters (``weight``, ``bias``) as ``nn.Conv3d``; dense when the context holds no mask.
    """

    def __init__(self, context: SparseContext, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        mask_in = self.context.mask_for(x)
        if mask_in is None:
            return super().forward(x)
        out = super().forward(x * mask_in)
        return out * self.context.mask_for(out)


class SparseInstanceNorm3d(nn.InstanceNorm3d):
    """InstanceNorm whose statistics cover the visible voxels only (per sample and channel); masked
    outputs are 0.

    ``(x − mean_v) / sqrt(var_v + eps) · γ + β`` with the biased variance, as ``InstanceNorm3d``;
    statistics in float32 (also under mixed precision). Same parameters as ``nn.InstanceNorm3d``.
    """

    def __init__(self, context: SparseContext, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, affine=affine)
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        mask = self.context.mask_for(x)
        if mask is None:
            return super().forward(x)
        xf, mf = x.float(), mask.float()
        dims = (2, 3, 4)
        count = mf.sum(dim=dims, keepdim=True).clamp_min(1.0)
        mean = (xf * mf).sum(dim=dims, keepdim=True) / count
        centred = (xf - mean) * mf  # two-pass variance: exact also when |mean| >> std
        var = torch.linalg.vector_norm(centred, dim=dims, keepdim=True).square() / count
        scale = torch.rsqrt(var + self.eps)
        if not self.affine:
            return (centred * scale).to(x.dtype)
        scale = scale * self.weight.float().view(1, -1, 1, 1, 1)
        out = torch.addcmul(self.bias.float().view(1, -1, 1, 1, 1), centred, scale) * mf
        return out.to(x.dtype)


class SparseAvgPool3d(nn.AvgPool3d):
    """Average pooling (kernel = stride) over the visible voxels of each window; masked outputs are 0."""

    def __init__(self, context: SparseContext, stride: int) -> None:
        super().__init__(stride, stride)
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        mask = self.context.mask_for(x)
        if mask is None:
            return super().forward(x)
        total = super().forward(x * mask)
        fraction = super().forward(mask)  # visible fraction of each window (0 where all masked)
        return total / fraction.clamp_min(1e-6) * (fraction > 0).to(total.dtype)


class SparseLayerFactory(LayerFactory):
    """Builds :class:`SparseConv3d`, :class:`SparseInstanceNorm3d` and :class:`SparseAvgPool3d` sharing one
    :class:`SparseContext`; pass it as ``encoder_layers`` of a :class:`~maesil.models.unet.ResEncUNet`.

    Args:
        context: the shared mask holder (a new one with ``block_size`` when None).
        block_size: mask cell side, used when ``context`` is None.
        negative_slope: LeakyReLU slope.
        eps: InstanceNorm epsilon.
    """

    def __init__(
        self,
        context: SparseContext | None = None,
        block_size: int = 16,
        negative_slope: float = 0.01,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(negative_slope, eps)
        self.context = context if context is not None else SparseContext(block_size)

    def conv(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = True
    ) -> nn.Module:
        return SparseConv3d(
            self.context, in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias
        )

    def norm(self, channels: int) -> nn.Module:
        return SparseInstanceNorm3d(self.context, channels, eps=self.eps, affine=True)

    def pool(self, stride: int) -> nn.Module:
        return SparseAvgPool3d(self.context, stride)


# --------------------------------------------------------------------------------------------------------------
# The S3D network
# --------------------------------------------------------------------------------------------------------------


class SparseMaskedUNet(ResEncUNet):
    """ResEnc U-Net for masked image modelling: sparse encoder, mask tokens, densify convs, dense decoder.

    ``forward(images, mask)``:

    1. masked input voxels are set to 0;
    2. encoder: sparse layers (``sparse=True``) or the dense ones (``sparse=False``);
    3. every stage's skip features: masked positions (at that stage's resolution, :func:`visible_at`) are
       filled with the stage's learnable mask token ``(1, C_s, 1, 1, 1)`` (sparse only);
    4. a 3³ "densify" conv → InstanceNorm → LeakyReLU per stage;
    5. the dense decoder and a 1³ head predict the input intensities (``out_channels = in_channels``).

    ``sparse=False`` is the zero-fill MAE ablation: the same network and densify convs, the input's masked
    voxels set to 0 and then processed by ordinary dense conv / InstanceNorm (statistics over all voxels,
    zeros included), no re-masking inside the encoder, no mask tokens. Its parameters are those of the
    sparse network minus the mask tokens.

    State-dict keys are the dense :class:`ResEncUNet`'s (``encoder.``, ``decoder.``, ``head.``) plus
    ``mask_tokens.`` and ``densify.``; the ``encoder.`` keys load into a dense ResEncUNet unchanged.

    Args:
        in_channels: image channels (also the head's output channels).
        features / blocks_per_stage / strides / decoder_blocks / kernel_size / negative_slope: as
            :class:`ResEncUNet`; ``strides[0]`` must be 1, so that the head predicts at input resolution.
        block_size: mask cell side in voxels (16 in the paper).
        sparse: sparse encoder with mask tokens (S3D), or the dense zero-fill ablation.
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 320, 320),
        blocks_per_stage: Sequence[int] = (1, 3, 4, 6, 6, 6),
        strides: Sequence[int] = (1, 2, 2, 2, 2, 2),
        decoder_blocks: int = 1,
        kernel_size: int = 3,
        negative_slope: float = 0.01,
        *,
        block_size: int = 16,
        sparse: bool = True,
    ) -> None:
        context = SparseContext(block_size)
        encoder_layers = SparseLayerFactory(context, negative_slope=negative_slope) if sparse else None
        super().__init__(
            in_channels, in_channels, features, blocks_per_stage, strides, decoder_blocks, kernel_size,
            negative_slope, encoder_layers=encoder_layers,
        )  # fmt: skip
        if self.strides[0] != 1:
            raise ValueError(
                f"S3D predicts the input at full resolution: strides[0] must be 1, got strides {list(self.strides)}."
            )
        self.context = context
        self.block_size = context.block_size
        self.sparse = bool(sparse)
        self.mask_tokens: nn.ParameterList | None = (
            nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1, 1)) for c in self.features) if sparse else None
        )
        dense = LayerFactory(negative_slope)
        self.densify = nn.ModuleList(ConvNormAct(dense, c, c, kernel_size) for c in self.features)
        for m in self.densify.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=negative_slope)
                nn.init.zeros_(m.bias)
        if self.mask_tokens is not None:
            for token in self.mask_tokens:
                nn.init.trunc_normal_(token, std=0.02, a=-0.04, b=0.04)  # MAE / SparK token initialisation

    def check_mask(self, images: Tensor, mask: Tensor) -> None:
        """Raises ``ValueError`` unless ``mask`` is a ``(B, 1, gx, gy, gz)`` cell mask of ``images``."""
        grid = mask_grid(images.shape[2:], self.block_size)
        if mask.ndim != 5 or tuple(mask.shape) != (images.shape[0], 1, *grid):
            raise ValueError(
                f"mask must be (B, 1, gx, gy, gz) = {(images.shape[0], 1, *grid)} for images of shape "
                f"{tuple(images.shape)} and block size {self.block_size}, got {tuple(mask.shape)}."
            )

    def encode_masked(self, images: Tensor, mask: Tensor) -> list[Tensor]:
        """Encoder features of every stage (finest first) seeing only the visible cells.

        Args:
            images: ``(B, C, X, Y, Z)``.
            mask: boolean cell mask ``(B, 1, gx, gy, gz)``, True = masked.

        With ``sparse=True`` the masked positions of every stage are 0; with ``sparse=False`` they hold
        whatever the dense layers computed from the zero-filled input.
        """
        self.check_input(images)
        self.check_mask(images, mask)
        visible = ~mask.bool()
        x = images * upsample_mask(visible, self.block_size).to(images.dtype)
        if not self.sparse:
            return self.encoder(x)
        with self.context.masked(visible):
            return self.encoder(x)

    def fill_and_densify(self, skips: Sequence[Tensor], mask: Tensor) -> list[Tensor]:
        """Mask tokens at masked positions of each stage (sparse only), then the stage's densify conv."""
        visible = ~mask.bool()
        out = []
        for s, skip in enumerate(skips):
            if self.mask_tokens is not None:
                keep = visible_at(visible.to(skip.device), self.block_size, skip.shape[2:])
                skip = torch.where(keep, skip, self.mask_tokens[s].to(skip.dtype))
            out.append(self.densify[s](skip))
        return out

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Prediction of every voxel ``(B, C, X, Y, Z)`` from the visible cells (all visible when ``mask``
        is None)."""
        if mask is None:
            grid = mask_grid(images.shape[2:], self.block_size)
            mask = torch.zeros(images.shape[0], 1, *grid, dtype=torch.bool, device=images.device)
        skips = self.fill_and_densify(self.encode_masked(images, mask), mask)
        return self.head(self.decode(skips)[-1])


def masked_mse(prediction: Tensor, target: Tensor, voxel_mask: Tensor) -> Tensor:
    """Mean squared error over masked voxels only (float32).

    Args:
        prediction, target: ``(B, C, X, Y, Z)``.
        voxel_mask: boolean ``(B, 1 or C, X, Y, Z)``, True = masked (scored).
    """
    weight = voxel_mask.expand_as(target).to(torch.float32)
    squared = (prediction.float() - target.float()).square()
    return (squared * weight).sum() / weight.sum().clamp_min(1.0)
