"""3D masked autoencoder (MAE, He et al. 2021) on top of :class:`~maesil.models.vit3d.ViTEncoder3D`.

The mask is made outside the model (:func:`maesil.models.masking.make_mask`) and passed in, so the model is
deterministic given a mask and any masking scheme (random, tube, dual) works unchanged. The encoder only sees,
and only embeds, the visible patches; the lightweight decoder sees every token (mask tokens at hidden positions)
and predicts the voxels of every patch; the loss is taken on the masked patches only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from maesil.models.masking import TokenMask
from maesil.models.vit3d import (
    ViTEncoder3D,
    gather_tokens,
    init_vit_weights,
    patchify,
    sincos_pos_embed_3d,
    transformer_blocks,
    unpatchify,
)

__all__ = ["MAEOutput", "MaskedAutoencoder3D", "patch_stats"]

_NORM_PIX_EPS = 1.0e-6


@dataclass(frozen=True)
class MAEOutput:
    """Result of :meth:`MaskedAutoencoder3D.forward`.

    Attributes:
        loss: scalar, mean over masked tokens of the per-patch mean squared error (plus the weighted visible
            tokens' mean when ``visible_loss_weight`` > 0).
        pred: ``(B, N, C * p**3)`` decoder prediction per token (normalised units if ``norm_pix_loss``); rows of
            visible tokens are zero unless the model was built with ``decode_visible=True``.
        mask: the :class:`TokenMask` used.
    """

    loss: Tensor
    pred: Tensor
    mask: TokenMask


def patch_stats(patches: Tensor) -> tuple[Tensor, Tensor]:
    """Per-patch mean and std (``sqrt(var + eps)``, unbiased=False) of ``(B, N, P)`` patches, each ``(B, N, 1)``:
    the targets of ``norm_pix_loss``, and what turns normalised predictions back into intensities."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return mean, (var + _NORM_PIX_EPS).sqrt()


class MaskedAutoencoder3D(nn.Module):
    """ViT masked autoencoder for 3D volumes ``(B, C, X, Y, Z)``.

    Args:
        superpatch_size: input ``(X, Y, Z)`` or one int for a cube; divisible by ``token_size``.
        token_size: cubic token edge ``p``.
        in_channels: image channels ``C``.
        embed_dim: encoder width.
        depth: encoder blocks.
        num_heads: encoder heads.
        mlp_ratio: MLP width multiple (encoder and decoder).
        decoder_embed_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder heads.
        norm_pix_loss: regress per-patch normalised voxels (MAE's ``norm_pix_loss``) instead of raw intensities.
        decode_visible: also predict the visible patches (full last decoder block). Off by default: the loss and
            :meth:`reconstruct` only read masked patches, and skipping the visible queries of the last block saves
            about a tenth of a training step without changing the loss or any gradient.
        decoder_local_mixing: before each decoder block, add a depthwise 3×3×3 convolution of the tokens on their
            grid (a position-encoding generator, CPVT, Chu et al. 2021). It gives the decoder the locality a ViT
            otherwise has to learn from data: a masked token reads its neighbours from the first step. The
            decoder is pretraining-only, so the encoder, and what transfers, is the same ViT either way.
        visible_loss_weight: weight of the visible patches' MSE added to the masked patches' MSE (0: MAE's loss,
            masked patches only). A positive weight trains the decoder to reproduce what it was shown too, which
            the masking-off evaluation (every patch visible, every patch predicted) reads; it implies
            ``decode_visible``.
    """

    def __init__(
        self,
        superpatch_size: int | tuple[int, int, int] = 64,
        token_size: int = 8,
        in_channels: int = 1,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        decoder_embed_dim: int = 192,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        norm_pix_loss: bool = False,
        decode_visible: bool = False,
        decoder_local_mixing: bool = False,
        visible_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if visible_loss_weight < 0:
            raise ValueError(f"visible_loss_weight must be >= 0, got {visible_loss_weight}")
        self.encoder = ViTEncoder3D(
            superpatch_size,
            token_size=token_size,
            in_channels=in_channels,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
        )
        self.token_size = token_size
        self.in_channels = in_channels
        self.norm_pix_loss = norm_pix_loss
        self.visible_loss_weight = float(visible_loss_weight)
        self.decode_visible = decode_visible or self.visible_loss_weight > 0
        patch_dim = in_channels * token_size**3

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_3d(decoder_embed_dim, self.encoder.grid), persistent=False
        )  # (N, Dd)
        self.decoder_blocks = transformer_blocks(
            decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio=mlp_ratio, prefix="decoder_"
        )
        self.decoder_local_mixing = (
            nn.ModuleList(nn.Conv3d(decoder_embed_dim, decoder_embed_dim, 3, padding=1, groups=decoder_embed_dim)
                          for _ in range(decoder_depth))
            if decoder_local_mixing else None
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_dim)

        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            init_vit_weights(module)  # the encoder initialised itself
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid ``(gx, gy, gz)``."""
        return self.encoder.grid

    @property
    def num_tokens(self) -> int:
        """Number of tokens ``N``."""
        return self.encoder.num_tokens

    def _check_mask(self, images: Tensor, mask: TokenMask) -> None:
        if images.shape[2:] != self.encoder.superpatch_size:
            raise ValueError(
                f"images must have spatial size {self.encoder.superpatch_size}, got {tuple(images.shape[2:])}."
            )
        if mask.num_tokens != self.num_tokens or mask.ids_keep.shape[0] != images.shape[0]:
            raise ValueError(
                f"mask is for batch {mask.ids_keep.shape[0]} x {mask.num_tokens} tokens, "
                f"images give batch {images.shape[0]} x {self.num_tokens} tokens."
            )

    def forward_encoder(self, images: Tensor, mask: TokenMask) -> Tensor:
        """Encode the visible patches: ``(B, C, X, Y, Z) -> (B, n_keep, D)``."""
        return self.encoder(images, mask.ids_keep)

    def forward_decoder(self, latent: Tensor, mask: TokenMask) -> Tensor:
        """Predict patches from the visible latents: ``(B, n_keep, D) -> (B, N, C * p**3)``.

        Unless ``decode_visible``, the last decoder block, the norm and the prediction head run only for the masked
        tokens (the only ones the loss reads; they still attend to every token, so their values are identical to
        the full decoder's) and the rows of visible tokens are zero.
        """
        x = self.decoder_embed(latent)  # (B, n_keep, Dd)
        b, n_keep, dd = x.shape
        n = mask.num_tokens
        mask_tokens = self.mask_token.expand(b, n - n_keep, dd)  # (B, N - n_keep, Dd)
        x = torch.cat([x, mask_tokens], dim=1)  # (B, N, Dd) in [kept, masked] order
        x = gather_tokens(x, mask.ids_restore)  # (B, N, Dd) unshuffled to grid order
        x = x + self.decoder_pos_embed
        if self.decode_visible or n_keep == 0 or n_keep == n:
            for index, blk in enumerate(self.decoder_blocks):
                x = blk(self._mix_locally(x, index))
            return self.decoder_pred(self.decoder_norm(x))  # (B, N, C*p^3)
        for index, blk in enumerate(self.decoder_blocks[:-1]):
            x = blk(self._mix_locally(x, index))
        ids_masked = mask.ids_masked  # (B, N - n_keep)
        x = self._mix_locally(x, len(self.decoder_blocks) - 1)
        x = self.decoder_blocks[-1](x, query_ids=ids_masked)  # (B, N - n_keep, Dd)
        pred_masked = self.decoder_pred(self.decoder_norm(x))  # (B, N - n_keep, C*p^3)
        pred = pred_masked.new_zeros(b, n, pred_masked.shape[-1])
        return pred.scatter(1, ids_masked.unsqueeze(-1).expand_as(pred_masked), pred_masked)  # (B, N, C*p^3)

    def _mix_locally(self, x: Tensor, index: int) -> Tensor:
        """``x + depthwise_conv(x)`` on the token grid before decoder block ``index`` (``decoder_local_mixing``)."""
        if self.decoder_local_mixing is None:
            return x
        b, n, d = x.shape
        # (B, N, D) tokens are already channels-last on the grid: this view costs no copy, and a channels-last
        # depthwise convolution runs about 1.5x faster on the CPU than the same one on a (B, D, ...) copy.
        grid = x.reshape(b, *self.grid, d).permute(0, 4, 1, 2, 3)  # (B, D, gx, gy, gz)
        mixed = self.decoder_local_mixing[index](grid)
        return x + mixed.permute(0, 2, 3, 4, 1).reshape(b, n, d)

    def forward_loss(self, images: Tensor, pred: Tensor, mask: TokenMask) -> Tensor:
        """Mean over masked tokens of the per-patch MSE; visible tokens get exactly zero gradient unless
        ``visible_loss_weight`` adds their mean MSE with that weight.

        The weighting by the mask (rather than indexing) keeps ``pred`` whole, so the gradient w.r.t. visible rows
        is an exact zero and any ``pred`` (e.g. from ``decode_visible=True``) is scored the same way.

        Args:
            images: ``(B, C, X, Y, Z)``.
            pred: ``(B, N, C * p**3)``.
            mask: the mask used for ``pred``.
        """
        target = patchify(images, self.token_size)  # (B, N, C*p^3)
        if self.norm_pix_loss:
            mean, std = patch_stats(target)
            target = (target - mean) / std
        per_patch = (pred - target).square().mean(dim=-1)  # (B, N)
        weight = mask.mask.to(per_patch.dtype)  # (B, N), 1 = masked
        loss = (per_patch * weight).sum() / weight.sum().clamp_min(1.0)  # 0 (not NaN) when nothing is masked
        if self.visible_loss_weight > 0:
            visible = 1.0 - weight
            loss = loss + self.visible_loss_weight * (per_patch * visible).sum() / visible.sum().clamp_min(1.0)
        return loss

    def forward(self, images: Tensor, mask: TokenMask) -> MAEOutput:
        """Encode visible patches, decode all, score the masked ones.

        Args:
            images: ``(B, C, X, Y, Z)`` with the spatial size ``superpatch_size``.
            mask: a :class:`TokenMask` for this batch and grid (e.g. from ``make_mask``).
        """
        self._check_mask(images, mask)
        latent = self.forward_encoder(images, mask)  # (B, n_keep, D)
        pred = self.forward_decoder(latent, mask)  # (B, N, C*p^3)
        return MAEOutput(loss=self.forward_loss(images, pred, mask), pred=pred, mask=mask)

    def reconstruct(self, images: Tensor, output: MAEOutput) -> Tensor:
        """Volume for visualisation: visible patches copied from ``images``, masked ones from the prediction.

        With ``norm_pix_loss`` the predicted (normalised) patches are de-normalised with the *true* per-patch
        mean/std of ``images``, as MAE visualisations do; this leaks the patch statistics, so it shows the
        predicted structure, not a fully blind reconstruction.

        Returns:
            ``(B, C, X, Y, Z)``, exactly ``images`` at visible patches.
        """
        target = patchify(images, self.token_size)  # (B, N, C*p^3)
        pred = output.pred.to(target.dtype)
        if self.norm_pix_loss:
            mean, std = patch_stats(target)
            pred = pred * std + mean
        merged = torch.where(output.mask.mask.unsqueeze(-1), pred, target)
        return unpatchify(merged, self.token_size, self.grid, self.in_channels)
