"""Command-line tools that are not training runs: ``python -m maesil <tool> --help``.

:data:`TOOLS` names every tool, the function that runs it and a one-line description. The function is
imported only when its tool runs, so listing the tools (``python -m maesil --help``) imports none of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Tool:
    """A command-line tool.

    Attributes:
        target: ``"module:function"``; the function takes the arguments after the tool's name and returns the
            exit code.
        description: One line for the tool list.
    """

    target: str
    description: str

    def load(self) -> Callable[[Sequence[str]], int]:
        """The tool's function (imports its module)."""
        module_name, _, function_name = self.target.partition(":")
        return getattr(importlib.import_module(module_name), function_name)

    def __call__(self, argv: Sequence[str]) -> int:
        return self.load()(argv)


TOOLS: dict[str, Tool] = {
    "phantoms": Tool(
        "maesil.tools.phantoms:phantoms_command",
        "write synthetic CT phantoms (image + organ labels) as NIfTI",
    ),
    "check-data": Tool(
        "maesil.tools.check_data:check_data_command",
        "validate a dataset up front, one table row per problem",
    ),
    "prepare": Tool(
        "maesil.tools.prepare:prepare_command",
        "preprocess a dataset once into a cache for fast loading",
    ),
    "benchmark-recon": Tool(
        "maesil.tools.benchmark_recon:benchmark_recon_command",
        "whole-volume reconstruction benchmark (PSNR, SSIM, LPIPS)",
    ),
    "export-encoder": Tool(
        "maesil.tools.export_encoder:export_encoder_command",
        "a checkpoint's pretrained encoder as safetensors + JSON, or for nnU-Net (nnssl) or MONAI (ViT)",
    ),
    "embed": Tool(
        "maesil.tools.embed:embed_command",
        "a pretrained encoder as feature extractor: per-subject embeddings (CSV), optional feature maps (NIfTI)",
    ),
    "compare-init": Tool(
        "maesil.tools.compare_init:compare_init_command",
        "fine-tune from scratch and from checkpoints: Dice/HD95 table",
    ),
    "evidence": Tool(
        "maesil.tools.evidence:evidence_command",
        "the project's claims measured end to end: pretraining, reconstruction, few-label fine-tuning",
    ),
    "profile": Tool(
        "maesil.tools.profile:profile_command",
        "a recipe's step time, peak memory, FLOPs/MFU, largest batch and data loader speed",
    ),
    "sweep-local": Tool(
        "maesil.tools.sweep_local:sweep_local_command",
        "run a W&B grid sweep file here, without a W&B server",
    ),
}
