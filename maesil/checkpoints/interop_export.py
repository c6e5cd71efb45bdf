"""Exporting a maesil encoder for nnU-Net (nnssl checkpoint) or MONAI (``ViT`` / ``UNETR.vit`` state dict).

Both start from the tensors of maesil's own export (:func:`~maesil.checkpoints.export.collect_export`: the
method's transfer layout, EMA targets and heads left out) and rename them:

* :func:`export_nnunet` (ResEnc methods: PGL, BYOL, S3D) writes an nnssl checkpoint (``.pth``):
  ``network_weights`` under ``ResidualEncoderUNet``'s names plus the ``nnssl_adaptation_plan``
  (:mod:`maesil.checkpoints.nnunet_format`). The decoder goes along where the method trained one.
* :func:`export_monai` (ViT methods: MAESIL, SelfMedMAE) writes a ``.safetensors`` state dict under
  ``monai.networks.nets.ViT``'s names and a JSON sidecar with the ``ViT`` (and, for 16³ tokens and 12 blocks,
  ``UNETR``) constructor arguments (:mod:`maesil.checkpoints.monai_format`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from maesil.checkpoints.export import collect_export
from maesil.checkpoints.monai_format import monai_unetr_kwargs, monai_vit_kwargs, to_monai_vit_state
from maesil.checkpoints.nnunet_format import nnssl_checkpoint
from maesil.checkpoints.reading import CheckpointError
from maesil.files import atomic_write_bytes

__all__ = ["EXPORT_FORMATS", "export_monai", "export_nnunet"]

#: ``--format`` choices of ``export-encoder`` and the architecture each one takes.
EXPORT_FORMATS = {"maesil": None, "nnunet": "ResEncUNet", "monai": "ViTEncoder3D"}

_OTHER_FORMAT = {"ResEncUNet": "nnunet", "ViTEncoder3D": "monai"}


def _checked(checkpoint: Path, fmt: str, with_decoder: bool | None) -> tuple[dict, dict[str, Any]]:
    """The export's tensors and description; fails unless its architecture is the one ``fmt`` takes."""
    tensors, sidecar = collect_export(checkpoint, with_decoder)
    kind = sidecar["architecture"].get("type")
    if kind != EXPORT_FORMATS[fmt]:
        other = _OTHER_FORMAT.get(kind)
        hint = f"; export it with --format {other} or maesil" if other else ""
        raise CheckpointError(f"{checkpoint}: --format {fmt} takes a {EXPORT_FORMATS[fmt]} encoder, this "
                              f"{sidecar.get('method') or 'checkpoint'} holds a {kind}{hint}.")
    return tensors, sidecar


def _out_file(out: Path, suffixes: tuple[str, ...], default_name: str) -> Path:
    """``out`` itself when it ends in one of ``suffixes``, else ``out/default_name`` (a folder, created)."""
    if out.suffix in suffixes:
        out.parent.mkdir(parents=True, exist_ok=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    return out / default_name


def _stem(sidecar: dict[str, Any]) -> str:
    return f"maesil_{(sidecar.get('method') or 'encoder').lower()}"


def export_nnunet(checkpoint: str | Path, out: str | Path, with_decoder: bool | None = None) -> Path:
    """Writes a ResEnc encoder (and the decoder the method trained) as an nnssl checkpoint for nnU-Net.

    Args:
        checkpoint: a maesil checkpoint of a ResEnc method (PGL, BYOL, S3D) or its maesil export.
        out: a ``.pth`` file, or a folder (then ``maesil_<method>_nnssl.pth`` inside it).
        with_decoder: as for :func:`~maesil.checkpoints.export_encoder`.

    Returns:
        The ``.pth`` written; next to it a ``.json`` with the adaptation plan and the source.

    Raises:
        CheckpointError: the checkpoint holds a ViT (use :func:`export_monai`), or any error of
            :func:`~maesil.checkpoints.export.collect_export`.
    """
    checkpoint = Path(checkpoint)
    tensors, sidecar = _checked(checkpoint, "nnunet", with_decoder)
    content = nnssl_checkpoint(tensors, sidecar["architecture"], sidecar.get("preprocessing") or {},
                               sidecar.get("method"))
    path = _out_file(Path(out), (".pth", ".pt"), f"{_stem(sidecar)}_nnssl.pth")
    buffer = io.BytesIO()
    torch.save(content, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    description = {
        "format": "nnssl",
        "source_checkpoint": sidecar["source_checkpoint"],
        "method": sidecar.get("method"),
        "includes_decoder": sidecar["includes_decoder"],
        "nnunet_pretrained_weights": sidecar["includes_decoder"],
        "parameters": sidecar["parameters"],
        "preprocessing": sidecar.get("preprocessing") or {},
        "nnssl_adaptation_plan": content["nnssl_adaptation_plan"],
    }
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(description, indent=2) + "\n").encode())
    return path


def export_monai(checkpoint: str | Path, out: str | Path) -> Path:
    """Writes a ViT encoder as a MONAI ``ViT`` state dict (safetensors) plus the arguments that rebuild it.

    Args:
        checkpoint: a maesil checkpoint of a ViT method (MAESIL, SelfMedMAE) or its maesil export.
        out: a ``.safetensors`` file, or a folder (then ``maesil_<method>_monai_vit.safetensors`` inside it).

    Returns:
        The ``.safetensors`` written; next to it a ``.json`` with ``monai_vit_kwargs``, ``monai_unetr_kwargs``
        (None unless 16³ tokens and 12 blocks) and the differences from maesil's encoder.

    Raises:
        CheckpointError: the checkpoint holds a ResEnc U-Net (use :func:`export_nnunet`), or any error of
            :func:`~maesil.checkpoints.export.collect_export`.
    """
    from safetensors.torch import save

    checkpoint = Path(checkpoint)
    tensors, sidecar = _checked(checkpoint, "monai", False)
    architecture = sidecar["architecture"]
    missing = [f for f in ("superpatch_size", "token_size", "embed_dim", "depth", "num_heads") if f not in architecture]
    if missing:
        raise CheckpointError(f"{checkpoint}: the checkpoint does not record the ViT's {missing}; MONAI's ViT "
                              "cannot be described without them.")
    qkv_bias = any(key.endswith("attn.qkv.bias") for key in tensors)
    state = {k: v.contiguous() for k, v in to_monai_vit_state(tensors, architecture).items()}
    description = {
        "format": "monai-vit",
        "source_checkpoint": sidecar["source_checkpoint"],
        "method": sidecar.get("method"),
        "parameters": sidecar["parameters"],
        "preprocessing": sidecar.get("preprocessing") or {},
        "maesil_architecture": architecture,
        "monai_vit_kwargs": monai_vit_kwargs(architecture, qkv_bias),
        "monai_unetr_kwargs": monai_unetr_kwargs(architecture, qkv_bias),
        "differences": [
            "position_embeddings holds maesil's fixed sin-cos table (channel groups x, y, z; MONAI's own sincos "
            "is y, x, z); it replaces MONAI's on loading and fits img_size only",
            "blocks.*.norm_cross_attn is unused by MONAI without cross-attention; exported as ones/zeros",
            "maesil can encode a subset of tokens (masked encoding); MONAI's ViT always encodes all",
        ],
    }
    text = json.dumps(description, indent=2)
    path = _out_file(Path(out), (".safetensors",), f"{_stem(sidecar)}_monai_vit.safetensors")
    atomic_write_bytes(path, save(state, metadata={"maesil_monai": text}))
    atomic_write_bytes(path.with_suffix(".json"), (text + "\n").encode())
    return path
