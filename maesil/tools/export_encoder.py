"""``python -m maesil export-encoder CKPT --out enc.safetensors``: a pretrained encoder for fine-tuning.

Writes only the transferable weights of a pretraining checkpoint (see :func:`maesil.checkpoints.export_encoder`)
as safetensors, which load without unpickling, plus a JSON sidecar with the architecture and preprocessing.
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
        "layout says which weights those are. EMA targets, projectors, predictors and "
        "pretraining-only decoders are left out. A JSON sidecar next to the output (enc.safetensors → enc.json) "
        "records the method, architecture and preprocessing. The checkpoint is read with weights_only=True: "
        "files that would need arbitrary unpickling are refused.",
    )
    parser.add_argument("checkpoint", type=Path, help="a maesil Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output .safetensors file (default: CKPT's folder, <stem>.encoder.safetensors)")
    parser.add_argument("--no-decoder", action="store_true", help="export the encoder only, also for PGL/S3D")
    return parser


def export_encoder_command(argv: Sequence[str]) -> int:
    from maesil.checkpoints import CheckpointError, export_encoder

    args = build_parser().parse_args(list(argv))
    out = args.out or args.checkpoint.with_name(f"{args.checkpoint.stem}.encoder.safetensors")
    try:
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
