"""Data options shared by the ``prepare`` and ``check-data`` tools, read from flags or from the
``data:`` section of training YAMLs, so a cache is prepared with exactly the settings of the run."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from maesil.data.preprocess import MAESIL_HU_WINDOW, PreprocessSettings

#: Defaults of :class:`~maesil.data.VolumeDataModule` for the options the tools share with it.
DATA_DEFAULTS: dict[str, Any] = {
    "data_dir": None,
    "cache_dir": None,
    "cache_format": "npy",
    "modality": "ct",
    "target_spacing": 1.5,
    "hu_window": list(MAESIL_HU_WINDOW),
    "crop_foreground": True,
    "superpatch_size": 128,
    "exclude": None,
    "num_classes": None,
}


def data_section(config_paths: Sequence[str | Path]) -> dict[str, Any]:
    """The ``data.init_args`` (or plain ``data``) options of one or more YAMLs, later files winning."""
    options: dict[str, Any] = {}
    for path in config_paths:
        path = Path(path)
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise SystemExit(f"error: cannot read config {path}: {error}") from error
        data = config.get("data") if isinstance(config, dict) else None
        if isinstance(data, dict):
            options.update(data.get("init_args", {}) if "init_args" in data or "class_path" in data else data)
    return options


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags mirroring the DataModule's preprocessing options (default: from --config, else the
    DataModule defaults)."""
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="training YAML(s) whose data section gives the options (repeatable; flags win)")
    parser.add_argument("--modality", choices=["ct", "mri"], default=None)
    parser.add_argument("--target-spacing", nargs="+", default=None, metavar="MM",
                        help="voxel size in mm after resampling: one number, three numbers, or 'native'")
    parser.add_argument("--hu-window", nargs=2, type=float, default=None, metavar=("LOW", "HIGH"))
    parser.add_argument("--crop-foreground", action=argparse.BooleanOptionalAction, default=None,
                        help="crop to the body's bounding box (default: on)")
    parser.add_argument("--exclude", nargs="*", default=None, metavar="GLOB",
                        help="glob patterns of files that are not images (default: hidden files and text metadata)")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes/threads (default 2)")


def _spacing(value: Any) -> tuple[float, float, float] | float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = value[0]
        else:
            return tuple(float(v) for v in value)  # type: ignore[return-value]
    if isinstance(value, str) and value.lower() in ("native", "none", "null"):
        return None
    return float(value)


def resolve_data_options(args: argparse.Namespace) -> dict[str, Any]:
    """Merge DataModule defaults, ``--config`` data sections and explicit flags (in that order)."""
    options = dict(DATA_DEFAULTS)
    options.update({k: v for k, v in data_section(args.config).items() if k in DATA_DEFAULTS or k == "data_dir"})
    for key in ("modality", "hu_window", "crop_foreground", "exclude"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    if getattr(args, "target_spacing", None) is not None:
        options["target_spacing"] = args.target_spacing
    options["target_spacing"] = _spacing(options["target_spacing"])
    return options


def settings_from_options(options: dict[str, Any]) -> PreprocessSettings:
    """The :class:`PreprocessSettings` the DataModule would use with these options."""
    return PreprocessSettings(
        modality=options["modality"],
        target_spacing=options["target_spacing"],
        hu_window=tuple(options["hu_window"]) if options["hu_window"] is not None else None,
        crop_foreground=bool(options["crop_foreground"]),
    )
