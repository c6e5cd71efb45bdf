"""UNETR (Hatamizadeh et al. 2021) on maesil's own :class:`~maesil.models.vit3d.ViTEncoder3D`.

Why not MONAI's ``UNETR``: it builds its own ViT (class-free, learnable or fixed positions, other parameter names)
and hard-codes 16³ tokens and 12 layers. Here the encoder is exactly the ``ViTEncoder3D`` that MAESIL / SelfMedMAE
pretrain (stored at ``encoder``), so a pretrained MAE's ``net.encoder.*`` weights load with a plain prefix rename,
strict and with no missing key; the decoder reuses MONAI's UNETR blocks unchanged.

Layout for the token edge ``p = 2**L`` (``token_size``; ``L`` = :attr:`UNETR.num_levels`; MONAI's layout for
``p = 16``, ``L = 4``)::

    level 0 (full res, F ch)       input_block    UnetrBasicBlock(C → F) on the image
    level k (res / 2**k, F·2**k)   skip_blocks[k-1]  UnetrPrUpBlock(D → F·2**k), L-k transposed convs (k = 1..L-1)
                                                  on the hidden state of ViT block skip_layers[k-1]
    level L (res / p, D ch)        bottleneck: the encoder's final (LayerNorm-ed) output
    decoding                       up_blocks[k]   UnetrUpBlock(F·2**(k+1) → F·2**k) for k = L-1..0, where the input
                                                  of up_blocks[L-1] is the bottleneck (D channels)
    head                           UnetOutBlock(F → out_channels), a 1³ conv giving logits

``F`` = ``feature_size``, ``D`` = ``embed_dim``. Shallower skips feed finer levels, as in UNETR.

Skip layers are 1-based block numbers: layer ``l`` is the output of ``encoder.blocks[l - 1]``, taken *before* the
encoder's final LayerNorm (as MONAI's ViT returns its hidden states); only the bottleneck uses the normed output,
which is what the encoder was trained to emit at its top. The default is ``ceil(k * depth / L)`` for
``k = 1..L-1``: evenly spaced, giving the paper's 3/6/9 for depth 12 with 16³ tokens, 2/4 for depth 6 with 8³
tokens, and strictly increasing for every depth >= L-1. Note that MONAI's (and SelfMedMAE's) code indexes
``hidden_states_out[3, 6, 9]`` 0-based, i.e. blocks 4/7/10 (MONAI issue #4520); pass ``skip_layers=(4, 7, 10)`` to
reproduce that code rather than the paper.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import Tensor, nn

from maesil.models.presets import from_preset
from maesil.models.vit3d import ViTEncoder3D, token_grid
from maesil.shapes import as_triple

__all__ = ["tokens_to_volume", "default_skip_layers", "UNETR", "UNETR_PRESETS", "build_unetr"]


def tokens_to_volume(tokens: Tensor, grid: Sequence[int]) -> Tensor:
    """Lay tokens out as a feature map: ``(B, N, D) -> (B, D, gx, gy, gz)``.

    Tokens are in :func:`~maesil.models.vit3d.patchify` order (flat index ``(ix * gy + iy) * gz + iz``, z fastest),
    so token ``(ix, iy, iz)`` lands at voxel ``[..., ix, iy, iz]``: the one covering image block
    ``[ix*p:(ix+1)*p, iy*p:(iy+1)*p, iz*p:(iz+1)*p]``. This equals ``unpatchify(tokens, 1, grid, D)``.
    """
    gx, gy, gz = (int(g) for g in grid)
    b, n, d = tokens.shape
    if n != gx * gy * gz:
        raise ValueError(f"{n} tokens do not fill the token grid {tuple(grid)} ({gx * gy * gz} tokens).")
    return tokens.reshape(b, gx, gy, gz, d).permute(0, 4, 1, 2, 3).contiguous()


def default_skip_layers(depth: int, num_levels: int) -> tuple[int, ...]:
    """Evenly spaced 1-based skip layers ``ceil(k * depth / num_levels)``, ``k = 1..num_levels-1``.

    Examples: depth 12 / 4 levels (16³ tokens) → (3, 6, 9); depth 6 / 3 levels (8³ tokens) → (2, 4); depth 2 / 3 levels
    → (1, 2). Strictly increasing and within ``1..depth`` whenever ``depth >= num_levels - 1``.

    Raises:
        ValueError: if ``depth < num_levels - 1`` (not enough blocks for distinct skips).
    """
    if depth < num_levels - 1:
        raise ValueError(
            f"depth={depth} is too shallow for {num_levels - 1} distinct skip layers ({num_levels} decoder levels)."
        )
    return tuple((k * depth + num_levels - 1) // num_levels for k in range(1, num_levels))


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


class UNETR(nn.Module):
    """UNETR segmentation network whose encoder is a :class:`ViTEncoder3D` at ``encoder`` (see module docstring).

    Args:
        superpatch_size: training input ``(X, Y, Z)`` or one int; divisible by ``token_size``. Other input sizes
            work as long as they are divisible by ``token_size`` (the ViT rebuilds its sin-cos positions for the grid).
        token_size: ViT token edge, a power of two >= 4 (must equal the pretrained encoder's); ``log2`` of it is the
            number of decoder levels.
        in_channels: image channels.
        out_channels: classes (logit channels).
        embed_dim, depth, num_heads, mlp_ratio: ViT size (as in :class:`ViTEncoder3D`).
        feature_size: decoder width ``F`` at full resolution; level ``k`` has ``F * 2**k`` channels.
        skip_layers: 1-based ViT blocks feeding levels ``1..L-1``, finest first: ``L - 1`` strictly increasing
            values in ``1..depth``. ``None``: :func:`default_skip_layers`.
        norm_name: MONAI norm of the decoder blocks (e.g. ``"instance"``, ``"batch"``).
        res_block: residual conv blocks in the decoder (MONAI's default ``True``).
        dropout: dropout on the encoder features entering the decoder (skips and bottleneck). ``ViTEncoder3D`` has
            no dropout of its own, so the encoder computes exactly what it computed during pretraining.

    Example:
        >>> import torch
        >>> net = build_unetr("tiny", out_channels=3)
        >>> net(torch.rand(1, 1, 32, 32, 32)).shape
        torch.Size([1, 3, 32, 32, 32])
    """

    encoder_prefix: ClassVar[str] = "encoder."

    def __init__(
        self,
        superpatch_size: int | tuple[int, int, int] = 96,
        token_size: int = 16,
        in_channels: int = 1,
        out_channels: int = 2,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        feature_size: int = 16,
        skip_layers: Sequence[int] | None = None,
        norm_name: str = "instance",
        res_block: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        token_size = _positive_int(token_size, "token_size")
        if token_size < 4 or token_size & (token_size - 1):
            raise ValueError(f"token_size must be a power of two >= 4, got {token_size}.")
        for value, name in ((in_channels, "in_channels"), (out_channels, "out_channels"), (depth, "depth"),
                            (feature_size, "feature_size"), (embed_dim, "embed_dim")):  # fmt: skip
            _positive_int(value, name)
        self.superpatch_size = as_triple(superpatch_size, "superpatch_size")
        if any(s % token_size for s in self.superpatch_size):
            raise ValueError(
                f"superpatch_size {self.superpatch_size} must be divisible by token_size={token_size} on every axis."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        num_levels = int(math.log2(token_size))
        if skip_layers is None:
            skip_layers = default_skip_layers(depth, num_levels)
        skips = tuple(skip_layers)
        if len(skips) != num_levels - 1:
            raise ValueError(
                f"skip_layers {list(skips)} must hold {num_levels - 1} layers (one per decoder level below the "
                f"bottleneck for token_size={token_size}), got {len(skips)}."
            )
        for layer in skips:
            if not isinstance(layer, numbers.Integral) or isinstance(layer, bool) or not 1 <= layer <= depth:
                raise ValueError(f"skip layer {layer!r} in {list(skips)} must be an int in 1..depth={depth}.")
        for a, b in zip(skips, skips[1:]):
            if b <= a:
                raise ValueError(f"skip_layers {list(skips)} must be strictly increasing ({b} follows {a}).")

        self.token_size = token_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.embed_dim = embed_dim
        self.depth = depth
        self.feature_size = feature_size
        self.skip_layers: tuple[int, ...] = tuple(int(s) for s in skips)

        self.encoder = ViTEncoder3D(
            self.superpatch_size, token_size=token_size, in_channels=in_channels, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio,
        )  # fmt: skip
        self.feature_dropout = nn.Dropout(dropout)
        width = [feature_size * 2**k for k in range(num_levels)]  # channels of level k
        self.input_block = UnetrBasicBlock(
            spatial_dims=3, in_channels=in_channels, out_channels=feature_size, kernel_size=3, stride=1,
            norm_name=norm_name, res_block=res_block,
        )  # fmt: skip
        self.skip_blocks = nn.ModuleList(
            UnetrPrUpBlock(
                spatial_dims=3, in_channels=embed_dim, out_channels=width[k], num_layer=num_levels - 1 - k,
                kernel_size=3, stride=1, upsample_kernel_size=2, norm_name=norm_name, conv_block=True,
                res_block=res_block,
            )  # fmt: skip
            for k in range(1, num_levels)
        )
        self.up_blocks = nn.ModuleList(
            UnetrUpBlock(
                spatial_dims=3, in_channels=embed_dim if k == num_levels - 1 else width[k + 1],
                out_channels=width[k], kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                res_block=res_block,
            )  # fmt: skip
            for k in range(num_levels)
        )
        self.head = UnetOutBlock(spatial_dims=3, in_channels=feature_size, out_channels=out_channels)
        self._parameter_names = frozenset(name for name, _ in self.named_parameters())

    @property
    def num_levels(self) -> int:
        """Upsampling levels ``L = log2(token_size)`` between the token grid and full resolution."""
        return int(math.log2(self.token_size))

    @property
    def num_lr_layers(self) -> int:
        """Number of :meth:`layer_index` values, ``depth + 2``; layer-wise decay scales layer ``i`` by
        ``decay ** (num_lr_layers - 1 - i)``."""
        return self.depth + 2

    def layer_index(self, parameter_name: str) -> int:
        """Depth of a parameter for layer-wise lr decay (BEiT / MAE fine-tuning recipe).

        ``0``: patch embedding (and any other encoder parameter before block 0); ``i + 1``: ``encoder.blocks[i]``;
        ``depth + 1``: the encoder's final norm, the decoder and the head (full lr).

        Args:
            parameter_name: a name from this module's ``named_parameters()`` (no wrapper prefix such as ``net.``).

        Raises:
            ValueError: if the name is not a parameter of this network (catches a forgotten prefix, which would
                otherwise silently give every parameter the full learning rate).
        """
        if parameter_name not in self._parameter_names:
            raise ValueError(
                f"{parameter_name!r} is not a parameter of this UNETR; pass names relative to it "
                f"(e.g. 'encoder.blocks.0.attn.qkv.weight')."
            )
        blocks = self.encoder_prefix + "blocks."
        if parameter_name.startswith(blocks):
            return int(parameter_name[len(blocks) :].split(".", 1)[0]) + 1
        if parameter_name.startswith(self.encoder_prefix + "norm."):
            return self.depth + 1
        if parameter_name.startswith(self.encoder_prefix):
            return 0
        return self.depth + 1

    def check_input(self, images: Tensor) -> None:
        """Raises ``ValueError`` unless ``images`` is ``(B, in_channels, X, Y, Z)``, sizes divisible by the token."""
        if images.ndim != 5 or images.shape[1] != self.in_channels:
            raise ValueError(f"images must be (B, {self.in_channels}, X, Y, Z), got shape {tuple(images.shape)}.")
        if any(s == 0 or s % self.token_size for s in images.shape[2:]):
            raise ValueError(
                f"input spatial size {tuple(images.shape[2:])} must be a positive multiple of "
                f"token_size={self.token_size} on every axis (the ViT cuts it into {self.token_size}³ tokens)."
            )

    def forward(self, images: Tensor) -> Tensor:
        """``(B, C, X, Y, Z) -> (B, out_channels, X, Y, Z)`` logits."""
        self.check_input(images)
        grid = token_grid(images.shape[2:], self.token_size)
        tokens, hidden = self.encoder(images, return_hidden_states=True)  # (B, N, D), depth × (B, N, D) pre-norm
        features = [self.input_block(images)]  # level 0: (B, F, X, Y, Z)
        for layer, block in zip(self.skip_layers, self.skip_blocks):
            volume = tokens_to_volume(self.feature_dropout(hidden[layer - 1]), grid)  # (B, D, gx, gy, gz)
            features.append(block(volume))  # level k: (B, F·2^k, X/2^k, ...)
        x = tokens_to_volume(self.feature_dropout(tokens), grid)  # bottleneck, level L
        for k in range(self.num_levels - 1, -1, -1):
            x = self.up_blocks[k](x, features[k])  # (B, F·2^k, X/2^k, ...)
        return self.head(x)


#: Architectures of :func:`build_unetr`. "selfmedmae": SelfMedMAE's fine-tuning net (ViT-B/16 on 96³, F 16, skips
#: 3/6/9); "maesil_cpu": the encoder of experiments/pretrain/maesil_demo.yaml (8³ tokens on 64³) with a decoder of
#: F 8, a third of F 16's training FLOPs (67 against 191 GFLOP per step of two 64³ patches), so that few-label
#: fine-tuning fits on 2 CPU cores; "tiny": unit tests.
UNETR_PRESETS: dict[str, dict[str, Any]] = {
    "selfmedmae": dict(superpatch_size=96, token_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                       feature_size=16, skip_layers=(3, 6, 9)),
    "maesil_cpu": dict(superpatch_size=64, token_size=8, embed_dim=192, depth=6, num_heads=4, mlp_ratio=4.0,
                       feature_size=8),
    "tiny": dict(superpatch_size=32, token_size=8, embed_dim=48, depth=2, num_heads=2, feature_size=8),
}  # fmt: skip


def build_unetr(preset: str, **overrides: Any) -> UNETR:
    """A :class:`UNETR` from :data:`UNETR_PRESETS` with keyword overrides (e.g. ``out_channels``), see
    :func:`~maesil.models.presets.from_preset`."""
    return from_preset(UNETR, UNETR_PRESETS, preset, **overrides)
