"""``python -m maesil export-encoder CKPT --out enc.safetensors``: a pretrained encoder for fine-tuning.

Writes only the transferable weights of a pretraining checkpoint (see :func:`maesil.checkpoints.export_encoder`)
as safetensors, which load without unpickling, plus a JSON sidecar with the architecture and preprocessing.
``--format nnunet`` writes them as an nnssl checkpoint for nnU-Net (ResEnc methods), ``--format monai`` as a
MONAI ``ViT`` state dict (ViT methods); see :mod:`maesil.checkpoints.interop_export`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m maesil export-encoder",
        description="Export the pretrained encoder of a maesil checkpoint (e.g. MAESIL, PGL, BYOL, S3D) as "
        "safetensors, with its U-Net decoder for methods that train one (e.g. PGL, S3D): the method's transfer "
        "layout says which weights those are (fine-tuning loads that decoder only with transfer_decoder: true). "
        "EMA targets, projectors, predictors and pretraining-only decoders are left out. A JSON sidecar next to "
        "the output (enc.safetensors → enc.json) records the method, architecture and preprocessing. The "
        "checkpoint is read with weights_only=True: files that would need arbitrary unpickling are refused. "
        "--format nnunet and --format monai write the same weights for nnU-Net (an nnssl checkpoint) or MONAI "
        "(a ViT state dict); see the README.",
    )
    parser.add_argument("checkpoint", type=Path, help="a maesil Lightning checkpoint (.ckpt) or a maesil export")
    parser.add_argument("--format", choices=("maesil", "nnunet", "monai"), default="maesil",
                        help="maesil: safetensors for maesil's fine-tuning (default); nnunet: an nnssl checkpoint "
                        "(.pth, nnU-Net's ResidualEncoderUNet names plus the adaptation plan) for PGL, BYOL, S3D; "
                        "monai: a monai.networks.nets.ViT state dict (.safetensors) plus its constructor "
                        "arguments (.json) for MAESIL, SelfMedMAE")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file or folder (default: CKPT's folder; <stem>.encoder.safetensors, "
                        "<stem>.nnssl.pth or <stem>.monai_vit.safetensors)")
    parser.add_argument("--no-decoder", action="store_true", help="export the encoder only, also for PGL/S3D")
    return parser


_DEFAULT_NAMES = {"maesil": "{}.encoder.safetensors", "nnunet": "{}.nnssl.pth", "monai": "{}.monai_vit.safetensors"}


def _export_other(args: argparse.Namespace, out: Path) -> int:
    from maesil.checkpoints.interop_export import export_monai, export_nnunet

    if args.format == "nnunet":
        written = export_nnunet(args.checkpoint, out, with_decoder=False if args.no_decoder else None)
    else:
        written = export_monai(args.checkpoint, out)
    info = json.loads(written.with_suffix(".json").read_text())
    what = {"nnunet": "nnssl checkpoint (nnU-Net ResidualEncoderUNet names)", "monai": "MONAI ViT state dict"}
    decoder = " with the decoder" if info.get("includes_decoder") else ""
    print(f"{written}: {what[args.format]}{decoder}, {info['parameters']:,} parameters from the "
          f"{info.get('method') or 'unknown'} checkpoint {args.checkpoint}")
    print(f"description: {written.with_suffix('.json')}")
    return 0


def export_encoder_command(argv: Sequence[str]) -> int:
    from maesil.checkpoints import CheckpointError, export_encoder

    args = build_parser().parse_args(list(argv))
    out = args.out or args.checkpoint.with_name(_DEFAULT_NAMES[args.format].format(args.checkpoint.stem))
    try:
        if args.format != "maesil":
            return _export_other(args, out)
        written = export_encoder(args.checkpoint, out, with_decoder=False if args.no_decoder else None)
    except (CheckpointError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    sidecar = written.with_suffix(".json")
    info = json.loads(sidecar.read_text())
    tensors = info["tensors"]
    parts = f"encoder {tensors['encoder']}" + (f", decoder {tensors['decoder']}" if tensors["decoder"] else "")
    print(f"{written}: {tensors['total']} tensors ({parts}), {info['parameters']:,} parameters from the "
          f"{info.get('method') or 'unknown'} checkpoint {args.checkpoint}")
    print(f"sidecar: {sidecar}")
    return 0
