"""MONAI's names for maesil's ViT encoder, and the ``ViT`` / ``UNETR`` arguments that rebuild it.

maesil's :class:`~maesil.models.vit3d.ViTEncoder3D` and ``monai.networks.nets.ViT`` (``proj_type="conv"``,
``classification=False``, ``dropout_rate=0``) compute the same function on a whole image: a ``Conv3d`` patch
embedding with the same token order (z fastest), pre-norm blocks (LayerNorm → fused-qkv attention, LayerNorm →
GELU MLP), a final LayerNorm, and hidden states taken before it. The names differ:

=================================  ==========================================
maesil (``encoder.``)              MONAI ``ViT`` (``vit.`` inside ``UNETR``)
=================================  ==========================================
``patch_embed.proj.*``             ``patch_embedding.patch_embeddings.*``
(sin-cos buffer, not stored)       ``patch_embedding.position_embeddings``
``blocks.i.norm1`` / ``norm2``     ``blocks.i.norm1`` / ``norm2``
``blocks.i.attn.qkv``              ``blocks.i.attn.qkv``
``blocks.i.attn.proj``             ``blocks.i.attn.out_proj``
``blocks.i.mlp.fc1`` / ``fc2``     ``blocks.i.mlp.linear1`` / ``linear2``
``norm``                           ``norm``
=================================  ==========================================

What MONAI cannot express, and how the export handles it:

* Positions. maesil's fixed 3D sin-cos table orders the channel groups (x, y, z); MONAI's
  ``pos_embed_type="sincos"`` builds (y, x, z) and raises unless the width is a multiple of 6. The export
  stores maesil's table as ``position_embeddings``, which replaces MONAI's on loading (it is a parameter
  with ``requires_grad=False`` under ``"sincos"``), so the loaded network is maesil's. It holds for the
  exported ``img_size`` only: maesil recomputes the table for any other token grid, MONAI's ViT accepts only
  ``img_size``. With a width that is not a multiple of 6 the kwargs say ``pos_embed_type="learnable"`` and the
  table then trains unless frozen (``vit.patch_embedding.position_embeddings.requires_grad_(False)``).
* ``blocks.i.norm_cross_attn``: MONAI registers this LayerNorm even without cross-attention; it is never
  used. The export fills it with the LayerNorm initialisation (ones, zeros) so that strict loading works.
* Masked encoding (``ids_keep``, only visible tokens) exists only in maesil.
* ``UNETR`` hard-codes 16³ tokens and 12 blocks: :func:`monai_unetr_kwargs` is None for other encoders
  (use ``ViT``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from maesil.models.vit3d import sincos_pos_embed_3d, token_grid
from maesil.shapes import as_triple

__all__ = [
    "POSITION_KEY",
    "from_monai_vit_state",
    "is_monai_vit_state",
    "maesil_positions",
    "monai_unetr_kwargs",
    "monai_vit_kwargs",
    "to_monai_vit_state",
]

POSITION_KEY = "patch_embedding.position_embeddings"

# (maesil name without "encoder.", MONAI name)
_RENAMES: list[tuple[str, str]] = [
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embedding.patch_embeddings.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"blocks.\1.mlp.linear\2.\3"),
    (r"norm\.(weight|bias)", r"norm.\1"),
]
_TO_MONAI = [(re.compile(a), b) for a, b in _RENAMES]
_FROM_MONAI = [
    (re.compile(r"patch_embedding\.patch_embeddings\.(weight|bias)"), "patch_embed.proj.{0}"),
    (re.compile(r"blocks\.(\d+)\.norm([12])\.(weight|bias)"), "blocks.{0}.norm{1}.{2}"),
    (re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)"), "blocks.{0}.attn.qkv.{1}"),
    (re.compile(r"blocks\.(\d+)\.attn\.out_proj\.(weight|bias)"), "blocks.{0}.attn.proj.{1}"),
    (re.compile(r"blocks\.(\d+)\.mlp\.linear([12])\.(weight|bias)"), "blocks.{0}.mlp.fc{1}.{2}"),
    (re.compile(r"norm\.(weight|bias)"), "norm.{0}"),
]


def maesil_positions(architecture: Mapping[str, Any]) -> Tensor:
    """maesil's fixed sin-cos table for the exported superpatch, ``(1, N, D)`` as MONAI stores it."""
    size = as_triple(architecture["superpatch_size"], "superpatch_size")
    grid = token_grid(size, int(architecture["token_size"]))
    return sincos_pos_embed_3d(int(architecture["embed_dim"]), grid).unsqueeze(0)


def to_monai_vit_state(tensors: Mapping[str, Tensor], architecture: Mapping[str, Any]) -> dict[str, Tensor]:
    """maesil ``encoder.*`` tensors under ``monai.networks.nets.ViT``'s names, complete for a strict load.

    Adds ``patch_embedding.position_embeddings`` (:func:`maesil_positions`) and the unused
    ``blocks.i.norm_cross_attn`` (ones, zeros), see the module docstring.

    Raises:
        KeyError: a key outside a maesil ViT encoder (e.g. a decoder's).
    """
    state: dict[str, Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix("encoder.")
        for pattern, template in _TO_MONAI:
            if pattern.fullmatch(name):
                state[pattern.sub(template, name)] = value
                break
        else:
            raise KeyError(key)
    width = int(architecture["embed_dim"])
    for block in sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")}):
        state[f"blocks.{block}.norm_cross_attn.weight"] = torch.ones(width)
        state[f"blocks.{block}.norm_cross_attn.bias"] = torch.zeros(width)
    state[POSITION_KEY] = maesil_positions(architecture)
    return state


def is_monai_vit_state(state: Mapping[str, Any]) -> bool:
    """True for the state dict of a MONAI ``ViT`` or of a network holding one at ``vit`` (``UNETR``)."""
    return any(key.endswith("patch_embedding.patch_embeddings.weight") for key in state)


def from_monai_vit_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """A MONAI ``ViT`` / ``UNETR`` state dict under maesil's ``encoder.*`` names; returns ``(renamed, ignored)``.

    Keys outside the ViT (UNETR's decoder, a classification head, ``cls_token``), the unused
    ``norm_cross_attn`` and the position table (maesil computes its own; compare it with
    :func:`maesil_positions`) are returned in ``ignored``.
    """
    prefix = "vit." if any(k.startswith("vit.patch_embedding.") for k in state) else ""
    renamed: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        new = None
        for pattern, template in _FROM_MONAI:
            match = pattern.fullmatch(name) if name is not None else None
            if match:
                new = "encoder." + template.format(*match.groups())
                break
        if new is None:
            ignored.append(key)
        else:
            renamed[new] = value
    return renamed, ignored


def monai_vit_kwargs(architecture: Mapping[str, Any], qkv_bias: bool = True) -> dict[str, Any]:
    """``monai.networks.nets.ViT(**kwargs)`` that takes :func:`to_monai_vit_state` strictly."""
    width = int(architecture["embed_dim"])
    return {
        "in_channels": int(architecture.get("in_channels", 1)),
        "img_size": list(as_triple(architecture["superpatch_size"], "superpatch_size")),
        "patch_size": int(architecture["token_size"]),
        "hidden_size": width,
        "mlp_dim": int(width * float(architecture.get("mlp_ratio", 4.0))),
        "num_layers": int(architecture["depth"]),
        "num_heads": int(architecture["num_heads"]),
        "proj_type": "conv",
        "pos_embed_type": "sincos" if width % 6 == 0 else "learnable",
        "classification": False,
        "dropout_rate": 0.0,
        "spatial_dims": 3,
        "qkv_bias": qkv_bias,
    }


def monai_unetr_kwargs(architecture: Mapping[str, Any], qkv_bias: bool = True) -> dict[str, Any] | None:
    """``monai.networks.nets.UNETR`` arguments whose ``.vit`` takes the export (add ``out_channels`` and
    ``feature_size``), or None: MONAI's UNETR only builds 16³ tokens and 12 blocks."""
    vit = monai_vit_kwargs(architecture, qkv_bias)
    if vit["patch_size"] != 16 or vit["num_layers"] != 12:
        return None
    return {key: vit[key] for key in ("in_channels", "img_size", "hidden_size", "mlp_dim", "num_heads", "proj_type",
                                      "dropout_rate", "spatial_dims", "qkv_bias")}
