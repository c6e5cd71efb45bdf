"""A plain 3D Vision Transformer encoder whose patch embedding only pays for the tokens it is given.

Conventions (shared with :mod:`maesil.models.masking`):

* images are ``(B, C, X, Y, Z)``; ``p`` is the token edge ``token_size``; the token grid is
  ``(gx, gy, gz) = (X / p, Y / p, Z / p)``;
* the flattened token index is ``(ix * gy + iy) * gz + iz`` (``z`` fastest);
* a patch vector is flattened in order ``(C, px, py, pz)``, exactly the flatten order of a ``Conv3d`` weight of shape
  ``(D, C, p, p, p)``, so ``conv(x)`` equals ``F.linear(patchify(x), conv.weight.flatten(1), conv.bias)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maesil.shapes import as_triple

__all__ = [
    "patchify",
    "unpatchify",
    "token_grid",
    "sincos_pos_embed_3d",
    "gather_tokens",
    "PatchEmbed3D",
    "Attention",
    "Mlp",
    "TransformerBlock",
    "transformer_blocks",
    "ViTEncoder3D",
    "init_vit_weights",
]


def token_grid(spatial_size: Sequence[int], token_size: int) -> tuple[int, int, int]:
    """Token grid ``(X / p, Y / p, Z / p)``; raises ``ValueError`` when a size is not divisible by ``p``."""
    if token_size < 1:
        raise ValueError(f"token_size must be positive, got {token_size}.")
    if len(spatial_size) != 3 or any(s % token_size for s in spatial_size):
        raise ValueError(
            f"spatial size {tuple(spatial_size)} must be three sizes divisible by token_size={token_size}."
        )
    return spatial_size[0] // token_size, spatial_size[1] // token_size, spatial_size[2] // token_size


def patchify(images: Tensor, token_size: int) -> Tensor:
    """Cut images into non-overlapping cubic tokens (patches of ``token_size`` voxels per axis).

    Args:
        images: ``(B, C, X, Y, Z)``.
        token_size: token edge ``p``; every spatial size must be divisible by it.

    Returns:
        ``(B, N, C * p**3)`` with ``N = gx * gy * gz`` (z fastest) and each patch flattened as ``(C, px, py, pz)``.
    """
    if images.ndim != 5:
        raise ValueError(f"images must be (B, C, X, Y, Z), got shape {tuple(images.shape)}.")
    b, c = images.shape[:2]
    gx, gy, gz = token_grid(images.shape[2:], token_size)
    p = token_size
    x = images.reshape(b, c, gx, p, gy, p, gz, p)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, gx, gy, gz, C, px, py, pz)
    return x.reshape(b, gx * gy * gz, c * p**3)


def unpatchify(tokens: Tensor, token_size: int, grid: Sequence[int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`.

    Args:
        tokens: ``(B, N, C * p**3)``.
        token_size: token edge ``p``.
        grid: token grid ``(gx, gy, gz)`` with ``gx * gy * gz == N``.
        channels: ``C``.

    Returns:
        ``(B, C, gx * p, gy * p, gz * p)``.
    """
    gx, gy, gz = (int(g) for g in grid)
    p = token_size
    b, n, d = tokens.shape
    if n != gx * gy * gz or d != channels * p**3:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not match grid {tuple(grid)}, "
            f"token_size={p}, channels={channels}."
        )
    x = tokens.reshape(b, gx, gy, gz, channels, p, p, p)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, gx, px, gy, py, gz, pz)
    return x.reshape(b, channels, gx * p, gy * p, gz * p)


def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """Select tokens per sample: ``(B, N, D)`` gathered with ``(B, n)`` indices -> ``(B, n, D)``."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def sincos_pos_embed_3d(embed_dim: int, grid: Sequence[int]) -> Tensor:
    """Fixed 3D sine-cosine position embedding (the MAE 2D recipe extended to three axes).

    The channels are split into three equal even-sized groups, one per axis ``(x, y, z)``; each group holds
    ``sin`` then ``cos`` of the grid coordinate at geometrically spaced frequencies. When ``embed_dim`` is not a
    multiple of 6 the last ``embed_dim % 6`` channels are zero (so any width works, e.g. 64).

    Args:
        embed_dim: ``D``, at least 6.
        grid: ``(gx, gy, gz)``.

    Returns:
        ``(N, D)`` float32, rows in token order (z fastest).
    """
    if embed_dim < 6:
        raise ValueError(f"embed_dim must be at least 6 for a 3D sin-cos embedding, got {embed_dim}.")
    gx, gy, gz = (int(g) for g in grid)
    half = embed_dim // 6  # frequencies per axis
    omega = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64) / half)  # (half,)
    coords = torch.meshgrid(
        torch.arange(gx, dtype=torch.float64),
        torch.arange(gy, dtype=torch.float64),
        torch.arange(gz, dtype=torch.float64),
        indexing="ij",
    )
    parts = []
    for c in coords:
        angles = c.reshape(-1, 1) * omega  # (N, half)
        parts += [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(parts, dim=1)  # (N, 6 * half)
    if emb.shape[1] < embed_dim:
        emb = F.pad(emb, (0, embed_dim - emb.shape[1]))
    return emb.float()


class PatchEmbed3D(nn.Module):
    """Conv-style patch embedding that embeds only the requested tokens.

    Holds a ``Conv3d(C, D, p, stride=p)`` as ``proj`` (state-dict keys ``proj.weight``/``proj.bias``, as in a usual
    conv patch embedding) but applies it as ``F.linear`` on patchified, gathered patches, which is exactly the conv
    on those patches while masked patches cost nothing in the forward or backward pass.
    """

    def __init__(self, token_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        if token_size < 1 or in_channels < 1 or embed_dim < 1:
            raise ValueError(
                f"token_size, in_channels and embed_dim must be positive, got {token_size}, {in_channels}, {embed_dim}."
            )
        self.token_size = token_size
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=token_size, stride=token_size)

    def forward(self, images: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """Embed patches.

        Args:
            images: ``(B, C, X, Y, Z)``.
            ids_keep: optional ``(B, n)`` token indices to embed; ``None`` embeds all ``N`` tokens.

        Returns:
            ``(B, n, D)``.
        """
        if images.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {images.shape[1]}.")
        patches = patchify(images, self.token_size)  # (B, N, C*p^3)
        if ids_keep is not None:
            patches = gather_tokens(patches, ids_keep)  # (B, n, C*p^3)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and ``scaled_dot_product_attention``.

    ``forward(x, queries)`` lets only a subset of tokens query (keys/values still come from all of ``x``): a
    decoder's last block then skips the work for outputs nobody reads, with identical results for the others.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}).")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, queries: Tensor | None = None) -> Tensor:
        """Attend ``(B, n, D) -> (B, n, D)``, or ``(B, m, D)`` for the ``m`` normalised ``queries`` tokens."""
        b, n, d = x.shape
        h, hd = self.num_heads, self.head_dim
        if queries is None:
            qkv = self.qkv(x).view(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)  # (3, B, H, n, hd)
            q, k, v = qkv.unbind(0)
            m = n
        else:
            m = queries.shape[1]
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(queries, w[:d], None if bias is None else bias[:d])  # (B, m, D)
            q = q.view(b, m, h, hd).transpose(1, 2)  # (B, H, m, hd)
            kv = F.linear(x, w[d:], None if bias is None else bias[d:]).view(b, n, 2, h, hd).permute(2, 0, 3, 1, 4)
            k, v = kv.unbind(0)  # (B, H, n, hd) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, m, hd)
        return self.proj(out.transpose(1, 2).reshape(b, m, d))


class Mlp(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}.")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, query_ids: Tensor | None = None) -> Tensor:
        """``(B, n, D) -> (B, n, D)``; with ``query_ids`` ``(B, m)`` only those tokens are updated and returned
        ``(B, m, D)`` (they still attend to all ``n`` tokens), exactly equal to gathering the full output."""
        h = self.norm1(x)
        if query_ids is None:
            x = x + self.attn(h)
        else:
            x = gather_tokens(x, query_ids) + self.attn(h, gather_tokens(h, query_ids))
        return x + self.mlp(self.norm2(x))


def transformer_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                       prefix: str = "") -> nn.ModuleList:
    """``depth`` :class:`TransformerBlock` of width ``dim``: an encoder's or a decoder's stack.

    Raises:
        ValueError: naming the argument (``{prefix}depth``, ``{prefix}embed_dim``, ``{prefix}num_heads``) when
            ``depth < 1`` or ``dim`` is not divisible by ``num_heads``.
    """
    if depth < 1:
        raise ValueError(f"{prefix}depth must be positive, got {depth}.")
    if num_heads < 1 or dim % num_heads != 0:
        raise ValueError(f"{prefix}embed_dim ({dim}) must be divisible by {prefix}num_heads ({num_heads}).")
    return nn.ModuleList(TransformerBlock(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias) for _ in range(depth))


def init_vit_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform Linear weights with zero bias, unit LayerNorm, conv patch embedding
    xavier-uniform on its flattened ``(D, C*p^3)`` view (it acts as a Linear)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed3D):
            w = m.proj.weight
            with torch.no_grad():
                w.copy_(nn.init.xavier_uniform_(torch.empty_like(w).flatten(1)).view_as(w))


class ViTEncoder3D(nn.Module):
    """3D ViT encoder with fixed sin-cos positions that can run on a subset of tokens.

    There is no class token: MAE pretraining does not need one and the segmentation decoders (UNETR-style) that
    reuse this encoder read the token sequence only. Position embeddings are fixed sin-cos, kept as a
    non-persistent buffer (they are recomputed from the grid, so they are not in the state dict); images whose
    grid differs from ``superpatch_size`` get a sin-cos embedding computed for their own grid.

    Args:
        superpatch_size: input ``(X, Y, Z)`` or one int for a cube; divisible by ``token_size``.
        token_size: cubic token edge ``p``.
        in_channels: image channels ``C``.
        embed_dim: token width ``D`` (divisible by ``num_heads``).
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``D``.
        qkv_bias: bias in the fused qkv projection.
    """

    def __init__(
        self,
        superpatch_size: int | tuple[int, int, int],
        token_size: int = 8,
        in_channels: int = 1,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.superpatch_size = as_triple(superpatch_size, "superpatch_size")
        self._grid = token_grid(self.superpatch_size, token_size)
        self.token_size = token_size
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_embed = PatchEmbed3D(token_size, in_channels, embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed_3d(embed_dim, self._grid), persistent=False)  # (N, D)
        self.blocks = transformer_blocks(embed_dim, depth, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        self.norm = nn.LayerNorm(embed_dim)
        init_vit_weights(self)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid ``(gx, gy, gz)`` of ``superpatch_size``."""
        return self._grid

    @property
    def num_tokens(self) -> int:
        """Number of tokens ``N`` of ``superpatch_size``."""
        gx, gy, gz = self._grid
        return gx * gy * gz

    def _pos_embed_for(self, spatial_size: Sequence[int]) -> Tensor:
        grid = token_grid(spatial_size, self.token_size)
        if grid == self._grid:
            return self.pos_embed
        return sincos_pos_embed_3d(self.embed_dim, grid).to(self.pos_embed)

    def forward(
        self, images: Tensor, ids_keep: Tensor | None = None, return_hidden_states: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Encode the (visible) tokens of ``images``.

        Args:
            images: ``(B, C, X, Y, Z)``.
            ids_keep: optional ``(B, n)`` indices of the tokens to encode (e.g. ``TokenMask.ids_keep``); ``None``
                encodes all ``N`` tokens.
            return_hidden_states: also return the output of every block (before the final norm), e.g. as skips.

        Returns:
            ``(B, n, D)`` tokens after the final LayerNorm, and with ``return_hidden_states`` a list of ``depth``
            tensors ``(B, n, D)``.
        """
        pos = self._pos_embed_for(images.shape[2:])  # (N, D)
        x = self.patch_embed(images, ids_keep)  # (B, n, D)
        if ids_keep is None:
            x = x + pos
        else:
            x = x + pos[ids_keep]  # (B, n, D)
        hidden: list[Tensor] = []
        for blk in self.blocks:
            x = blk(x)
            if return_hidden_states:
                hidden.append(x)
        x = self.norm(x)
        return (x, hidden) if return_hidden_states else x
