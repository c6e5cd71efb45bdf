"""``python -m maesil benchmark-recon``: whole-volume reconstruction benchmark of pretrained checkpoints.

Every checkpoint reconstructs every volume of ``--data`` superpatch by superpatch
(:func:`~maesil.evaluation.reconstruction.reconstruct_volume`); PSNR and 3D SSIM are scored over the
whole volume, the body and the masked voxels, optionally with slice-wise LPIPS. The checkpoints must
share their preprocessing settings and superpatch size (read from the checkpoint's
``datamodule_hyper_parameters``), so that all methods see identical inputs.

Two protocols (``--protocol``, default ``both``):

* ``inpaint``: masked methods reconstruct with their seeded evaluation masks (``reconstruct_for_evaluation``),
  visible voxels copied from the input; autoencoders reconstruct the whole input. Two reference rows that need
  no training, ``mean fill`` and ``blur fill`` (:mod:`maesil.evaluation.fills`), fill the voxels hidden by the
  first masked method's masks (exactly those masks, taken from its ``hidden`` output), superpatch by
  superpatch on the same grid. A run without a masked method has no masks, hence no fill rows.
* ``paper``: masking off, the protocol of the MAESIL group's public (NEMESIS) code
  (``reconstruct_unmasked``): every voxel seen and predicted, nothing pasted back, no masked region, no fills.

Outputs in ``--out``:

* ``results.md``: the protocol paragraphs and, per protocol, a heading and one table row per checkpoint (and
  fill) (mean ± std over volumes);
* ``results.csv``: the same tables, one row per protocol × checkpoint (and fill), with a ``protocol`` column
  and a ``_mean`` and a ``_std`` column per metric; ``masked_region`` is ``own``, ``reference`` (scored on
  the first masked method's masks, †), ``filled`` (a fill) or ``none``;
* ``per_volume.csv``: one row per protocol × checkpoint (and fill) × volume;
* ``slices.png``: one volume's axial and coronal slice, input and every method side by side, with
  ``|recon − input|`` maps.

Numbers in the CSVs are plain floats; an exact reconstruction has PSNR ``inf``, a missing value
(no mask, no LPIPS weights) is an empty cell.

Intensities follow the checkpoints' modality, as in validation: each model is told it
(``input_modality``), so CT reconstructions are clamped to [0, 1] and MRI ones are not; the PSNR/SSIM
range is ``--data-range`` if given, else 1 for CT and each volume's own max − min for z-normalised MRI
(also the grey levels LPIPS sees); ``slices.png`` shows MRI over the input's 1st–99th percentile.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchio as tio

from maesil.data.preprocess import PreprocessSettings, padding_value
from maesil.evaluation.reconstruction import BODY_THRESHOLD
from maesil.models.parameters import count_parameters
from maesil.shapes import as_triple

log = logging.getLogger(__name__)

#: Metric columns of the tables, in order: (key, label, digits).
METRICS: tuple[tuple[str, str, int], ...] = (
    ("psnr", "PSNR whole (dB)", 2),
    ("psnr_body", "PSNR body (dB)", 2),
    ("psnr_masked", "PSNR masked (dB)", 2),
    ("ssim", "SSIM whole", 4),
    ("ssim_body", "SSIM body", 4),
    ("ssim_masked", "SSIM masked", 4),
    ("lpips", "LPIPS (axial)", 4),
)


class BenchmarkError(Exception):
    """A problem with the inputs (checkpoints, settings, data); the message says what to fix."""


@dataclass
class Method:
    """A loaded checkpoint and what the benchmark needs to know about it."""

    name: str
    path: Path
    model: Any
    settings: PreprocessSettings
    superpatch_size: tuple[int, int, int]
    params: int
    per_volume: list[dict[str, Any]] = field(default_factory=list)
    masked_region: str = "none"  # "own", "reference", "filled" or "none"
    protocol: str = "inpaint"  # "inpaint" or "paper"

    @property
    def is_fill(self) -> bool:
        """A reference in-filling (:data:`maesil.evaluation.fills.FILLS`), not a checkpoint."""
        return self.model is None

    @property
    def class_name(self) -> str:
        return "fill" if self.is_fill else type(self.model).__name__


#: ``--protocol`` choices and the protocols each runs, in table order.
PROTOCOLS: dict[str, tuple[str, ...]] = {"both": ("inpaint", "paper"), "inpaint": ("inpaint",), "paper": ("paper",)}

#: One line per protocol for the tables' headings.
PROTOCOL_TITLES = {
    "inpaint": "masked: the models see the visible voxels of the seeded evaluation masks and fill the rest",
    "paper": "masking off (the NEMESIS code's protocol): every voxel seen and predicted, nothing pasted back",
}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _resolve_class(class_path: str, path: Path) -> type:
    from maesil.methods.base import MethodModule
    import maesil.methods  # noqa: F401  (registers the methods)

    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise BenchmarkError(f"{path}: its model class {class_path!r} cannot be imported ({error})") from error
    if not (isinstance(cls, type) and issubclass(cls, MethodModule)):
        raise BenchmarkError(f"{path}: {class_path!r} is not a maesil MethodModule")
    if cls.reconstruct_for_evaluation is MethodModule.reconstruct_for_evaluation:
        raise BenchmarkError(f"{path}: {cls.__name__} does not reconstruct its input (no reconstruct_for_evaluation)")
    return cls


def _init_arguments(cls: type, hparams: dict[str, Any]) -> dict[str, Any]:
    """The saved hyperparameters ``cls.__init__`` takes, as ``load_from_checkpoint`` passes them: LightningCLI's
    own entries (``_class_path``, ``_instantiator``) and, unless ``__init__`` takes ``**kwargs``, names it does
    not know are left out."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return {k: v for k, v in hparams.items() if not k.startswith("_")}
    return {k: v for k, v in hparams.items() if k in parameters and k != "self"}


def load_method(path: str | Path, device: torch.device | str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Loads a checkpoint written by ``python -m maesil fit``: the model, in eval mode on ``device``,
    and the DataModule's hyper-parameters.

    The file is read by the one safe reader (:func:`maesil.checkpoints.load_checkpoint_state`,
    ``weights_only=True``). LightningCLI stores the model class as ``hyper_parameters["_class_path"]`` and the
    data options as ``datamodule_hyper_parameters``. The class is imported from that path and must be a
    :class:`~maesil.methods.base.MethodModule` that implements ``reconstruct_for_evaluation``; it is built
    from the saved hyperparameters and takes the saved state dict (strictly). The model's ``input_modality``
    is set from the data settings, so that it clamps (CT) or does not clamp (MRI) its reconstructions as in
    validation. Raises :class:`BenchmarkError` for missing, unreadable or foreign checkpoints.
    """
    from maesil.checkpoints import CheckpointError, load_checkpoint_state

    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such checkpoint file")
    try:
        state, metadata = load_checkpoint_state(path)
    except (CheckpointError, OSError) as error:
        raise BenchmarkError(f"{path}: cannot be read as a checkpoint ({type(error).__name__}: {error})") from error
    if "hyper_parameters" not in metadata:
        raise BenchmarkError(f"{path}: not a Lightning checkpoint (no state_dict)")
    hparams = dict(metadata["hyper_parameters"])
    class_path = hparams.get("_class_path")
    if not class_path:
        raise BenchmarkError(f"{path}: the checkpoint does not name its model class (hyper_parameters._class_path);"
                             " use checkpoints written by `python -m maesil fit`")
    data = metadata["datamodule_hyper_parameters"]
    if not data:
        raise BenchmarkError(f"{path}: the checkpoint holds no data settings (datamodule_hyper_parameters);"
                             " use checkpoints written by `python -m maesil fit`")
    cls = _resolve_class(str(class_path), path)
    try:
        model = cls(**_init_arguments(cls, hparams))
        model.load_state_dict(state)
    except Exception as error:  # noqa: BLE001
        raise BenchmarkError(f"{path}: {cls.__name__} cannot be restored ({type(error).__name__}: {error})") from error
    model.input_modality = str(data.get("modality") or "ct")
    return model.to(device).eval(), dict(data)


def data_settings(data: dict[str, Any]) -> tuple[PreprocessSettings, tuple[int, int, int]]:
    """The preprocessing settings and superpatch size of a checkpoint's DataModule hyper-parameters."""
    from maesil.tools.data_options import DATA_DEFAULTS, settings_from_options

    options = dict(DATA_DEFAULTS)
    options.update({k: v for k, v in data.items() if k in DATA_DEFAULTS})
    if options["hu_window"] is None:  # allowed for MRI, which ignores the window (CT runs cannot save None)
        options["hu_window"] = DATA_DEFAULTS["hu_window"]
    return settings_from_options(options), as_triple(options["superpatch_size"], "superpatch_size")


def _run_folder(path: Path) -> str:
    parent = path.resolve().parent
    return parent.parent.name if parent.name == "checkpoints" else parent.name


def method_names(paths: Sequence[Path], classes: Sequence[str], names: Sequence[str] | None) -> list[str]:
    """``--names`` if given, else the class name, with the run folder added where classes repeat."""
    if names:
        if len(names) != len(paths):
            raise BenchmarkError(f"--names gives {len(names)} name(s) for {len(paths)} checkpoint(s)")
        if len(set(names)) != len(names):
            raise BenchmarkError(f"--names must be unique, got {list(names)}")
        return list(names)
    first = [c if classes.count(c) == 1 else f"{c} ({_run_folder(p)})" for p, c in zip(paths, classes)]
    seen: dict[str, int] = {}
    out = []
    for name in first:
        if first.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            name = f"{name} #{seen[name]}"
        out.append(name)
    return out


def _check_same_settings(methods: Sequence[Method]) -> None:
    first = methods[0]
    if all(m.settings == first.settings and m.superpatch_size == first.superpatch_size for m in methods):
        return
    lines = [f"  {m.name} ({m.path}): superpatch {list(m.superpatch_size)}, {m.settings.to_dict()}" for m in methods]
    raise BenchmarkError("the checkpoints were trained with different preprocessing or superpatch sizes; a fair"
                         " comparison needs identical inputs:\n" + "\n".join(lines))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_subjects(data_dir: str | Path, settings: PreprocessSettings, superpatch: tuple[int, int, int],
                  split: str = "all", exclude: Sequence[str] | None = None, workers: int = 2
                  ) -> list[tuple[str, Callable[[], tio.Subject]]]:
    """The records to evaluate (checked like training data) and a loader of preprocessed subjects.

    ``data_dir`` is anything ``VolumeDataModule(data_dir=...)`` reads: a folder, a manifest, a DICOM
    tree or a prepared cache (whose settings must match). Returns ``[(subject_id, load)]`` sorted by
    id, ``load()`` giving the preprocessed, unpadded ``tio.Subject``.
    """
    from functools import partial

    from maesil.data import VolumeDataModule
    from maesil.data.cache import CacheIndex, is_cache, load_cached_subject
    from maesil.data.io import subject_from_record

    datamodule = VolumeDataModule(
        data_dir=str(data_dir), modality=settings.modality, superpatch_size=superpatch,
        target_spacing=settings.target_spacing, hu_window=settings.hu_window,
        crop_foreground=settings.crop_foreground, val_fraction=0.0, exclude=list(exclude) if exclude else None,
        num_workers=max(0, workers), check_voxels=False,
    )
    datamodule.setup("validate")
    records = {"train": datamodule.train_records, "val": datamodule.val_records, "test": datamodule.test_records}
    chosen = [r for key in (("train", "val", "test") if split == "all" else (split,)) for r in records[key]]
    chosen = sorted(chosen, key=lambda r: r.subject_id)
    if is_cache(data_dir):
        index = CacheIndex.load(data_dir)
        return [(r.subject_id, partial(load_cached_subject, index, r.subject_id, False)) for r in chosen]
    transform = settings.transform()
    return [(r.subject_id, lambda r=r: transform(subject_from_record(r, with_label=False))) for r in chosen]


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def summarise(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) over volumes, NaNs skipped; an infinite
    value makes the mean ``inf`` and the deviation NaN."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan
    if np.isinf(array).any():
        return float(array.mean()), math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def format_mean_std(mean: float, std: float, digits: int) -> str:
    """``12.34 ± 0.56``; ``∞`` for an infinite mean; ``n/a`` when there is no value."""
    if math.isnan(mean):
        return "n/a"
    if math.isinf(mean):
        return "∞" if mean > 0 else "−∞"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_params(count: int) -> str:
    """A parameter count as ``12.35 M`` or ``45.6 k``."""
    return f"{count / 1e6:.2f} M" if count >= 1e5 else f"{count / 1e3:.1f} k"


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value) if math.isinf(value) else f"{value:.6g}"
    return "" if value is None else value


def markdown_table(methods: Sequence[Method], lpips: bool) -> str:
    """The results table: one row per method, mean ± std over volumes."""
    header = ["method", "params", *(label for _, label, _ in METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method in methods:
        cells = [method.name, format_params(method.params)]
        for key, _, digits in METRICS:
            if key == "lpips" and not lpips:
                cells.append("n/a (no weights)")
                continue
            text = format_mean_std(*summarise([row.get(key, math.nan) for row in method.per_volume]), digits)
            if key.endswith("_masked") and method.masked_region == "reference" and text != "n/a":
                text += " †"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def protocol_text(methods: Sequence[Method], data: str, subject_ids: Sequence[str], split: str,
                  data_range: float | None, lpips_weights: Sequence[str] | None, reference: str | None,
                  protocols: Sequence[str] = ("inpaint",)) -> str:
    """The paragraphs above the tables: data, settings, protocols, regions, masks, fills, LPIPS. ``data_range``
    None: the modality's default (1 for CT, each volume's max − min for MRI)."""
    first = methods[0]
    settings, size = first.settings, first.superpatch_size
    spacing = "native" if settings.target_spacing is None else "×".join(f"{s:g}" for s in settings.target_spacing)
    ids = ", ".join(subject_ids[:10]) + (f", … ({len(subject_ids) - 10} more)" if len(subject_ids) > 10 else "")
    if settings.modality == "ct":
        low, high = settings.hu_window
        intensity = f"CT, HU window [{low:g}, {high:g}] → [0, 1]"
        body_hu = low + BODY_THRESHOLD * (high - low)
        body = (f"windowed intensity > {BODY_THRESHOLD:g} (≈ {body_hu:.0f} HU) with holes filled in each axial"
                " slice, so that lungs and airways count as body")
    else:
        intensity = "MRI, z-normalised over the foreground (reconstructions not clipped)"
        body = "voxels above the volume mean with holes filled in each axial slice"
    if data_range is not None:
        range_text = f"{data_range:g}"
    else:
        range_text = "1" if settings.modality == "ct" else "the volume's own max − min"
    masked_methods = [m for m in methods if m.masked_region == "own" and m.protocol == "inpaint"]
    fills = [m.name for m in methods if m.is_fill and m.protocol == "inpaint"]
    if masked_methods:
        seeds = ", ".join(f"{m.name}: {getattr(m.model, 'val_mask_seed', '?')}" for m in masked_methods)
        masked = ("**masked** = voxels the model did not see. Masked methods are scored on their own evaluation"
                  " masks, drawn per superpatch from a seed fixed by the method's `val_mask_seed`, the subject and"
                  f" the superpatch location (MAESIL: crc32(\"seed:subject:location\"); seeds: {seeds}), so every"
                  " run and checkpoint with the same masking settings sees identical masks. Masked methods copy the"
                  " visible patches from the input: their whole and body scores include voxels they saw.")
        if reference is not None and any(m.masked_region == "reference" for m in methods):
            masked += (f" † Methods that see the whole input (autoencoders) are scored on the voxels hidden by the"
                       f" masks of **{reference}**, for comparison only: they saw these voxels.")
    else:
        masked = "**masked** = n/a: no method masks its input."
    texts = []
    if "inpaint" in protocols:
        text = ("**Protocol `inpaint`** (" + PROTOCOL_TITLES["inpaint"] + "): each masked method reconstructs with"
                " its seeded evaluation masks and copies the visible voxels from the input; autoencoders reconstruct"
                " the whole input.")
        if fills:
            text += (f" Reference rows that need no training ({', '.join(f'`{f}`' for f in fills)}) fill the voxels"
                     f" hidden by the masks of **{reference}** (the same masks, voxel for voxel), within each"
                     " superpatch of the same grid, the visible voxels copied: `mean fill` puts the mean of the"
                     " superpatch's visible voxels into every hidden voxel; `blur fill` is a normalised convolution"
                     " (visible intensities and visibility mask both summed over a 17³ box, zero padding, divided),"
                     " falling back to the mean fill where the box holds no visible voxel. Their masked region is"
                     " `filled` in `results.csv`.")
        else:
            text += (" The reference fills (`mean fill`, `blur fill`) need the masks of a masked method; no method of"
                     " this run masks its input, so they have no row.")
        texts += [text, ""]
    if "paper" in protocols:
        texts += ["**Protocol `paper`** (" + PROTOCOL_TITLES["paper"] + "; the MAESIL group's public evaluation):"
                  " masked methods run with nothing hidden (MAESIL: all tokens to the encoder, the decoder's"
                  " prediction of every token, un-patchified; S3D: its network with no masked cell); autoencoders"
                  " as in `inpaint`. Nothing is pasted back from the input, there is no masked region, and the"
                  " fills have no row.", ""]
    if lpips_weights:
        lpips = ("LPIPS: AlexNet LPIPS (v0.1) of every axial slice, averaged over the slices, weights "
                 + ", ".join(f"`{w}`" for w in lpips_weights) + ".")
    else:
        lpips = "LPIPS: n/a (no weights): pass `--lpips-weights` with local AlexNet LPIPS weights."
    return "\n".join([
        "# Whole-volume reconstruction benchmark",
        "",
        f"**Protocol.** {len(subject_ids)} volume(s) of `{data}`"
        + ("" if split == "all" else f" (split `{split}`)") + f": {ids}. "
        f"Preprocessing shared by all checkpoints: {intensity}, spacing {spacing} mm, crop to the body:"
        f" {'yes' if settings.crop_foreground else 'no'}; superpatch {'×'.join(map(str, size))} voxels. Each volume"
        " is padded (centred) to a multiple of the superpatch, cut into a non-overlapping grid, reconstructed"
        " superpatch by superpatch, reassembled and cropped back to its own voxels. Per volume: PSNR (dB, data"
        f" range {range_text}, squared error pooled over the region's voxels) and 3D SSIM (Gaussian window 11,"
        f" σ 1.5, data range {range_text}; the SSIM map of the whole volume averaged over the region). The table"
        " gives mean ± sample std over volumes; an exact reconstruction has PSNR ∞ (not capped).",
        "",
        "",
        *texts,
        f"Regions: **whole** = every voxel of the volume; **body** = {body}; {masked}",
        "",
        lpips,
        "",
    ])


def protocol_tables(methods: Sequence[Method], lpips: bool) -> str:
    """One heading and :func:`markdown_table` per protocol present, in the order of ``methods``."""
    protocols = list(dict.fromkeys(m.protocol for m in methods))
    parts = []
    for protocol in protocols:
        parts += [f"## Protocol `{protocol}`: {PROTOCOL_TITLES[protocol]}", "",
                  markdown_table([m for m in methods if m.protocol == protocol], lpips), ""]
    return "\n".join(parts).rstrip("\n")


def write_outputs(out: Path, methods: Sequence[Method], protocol: str, table: str, lpips: bool) -> None:
    """Writes ``results.md``, ``results.csv`` and ``per_volume.csv`` (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(protocol + "\n" + table + "\n")
    keys = [key for key, _, _ in METRICS if key != "lpips" or lpips]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "protocol", "class", "checkpoint", "params", "volumes", "masked_region",
                         *(f"{k}_{s}" for k in keys for s in ("mean", "std"))])
        for m in methods:
            stats = [summarise([row.get(k, math.nan) for row in m.per_volume]) for k in keys]
            writer.writerow([m.name, m.protocol, m.class_name, "" if m.is_fill else str(m.path), m.params,
                             len(m.per_volume), m.masked_region, *(_csv_value(v) for pair in stats for v in pair)])
    with open(out / "per_volume.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        columns = ["subject_id", "shape", "voxels", "body_voxels", "masked_voxels", *keys]
        writer.writerow(["method", "protocol", *columns])
        for m in methods:
            for row in m.per_volume:
                writer.writerow([m.name, m.protocol, *(_csv_value(row.get(c)) for c in columns)])


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m maesil benchmark-recon",
        description="Reconstruct every volume of --data with every checkpoint (superpatch grid, reassembled) and"
        " score PSNR and 3D SSIM over the whole volume, the body and the masked voxels (plus slice-wise LPIPS with"
        " --lpips-weights). Writes OUT/results.md, OUT/results.csv, OUT/per_volume.csv and OUT/slices.png, and"
        " prints the table. The checkpoints must share preprocessing settings and superpatch size.",
    )
    parser.add_argument("--checkpoints", nargs="+", required=True, type=Path, metavar="CKPT",
                        help="checkpoints written by `python -m maesil fit`")
    parser.add_argument("--names", nargs="+", default=None, metavar="NAME",
                        help="one table name per checkpoint (default: class name, plus the run folder if repeated)")
    parser.add_argument("--data", required=True,
                        help="held-out volumes: a folder, manifest, DICOM tree or prepared cache")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--split", choices=["all", "train", "val", "test"], default="all",
                        help="with a manifest's split column: evaluate only these subjects (default: all)")
    parser.add_argument("--batch-size", type=int, default=2, help="superpatches per forward pass (default 2)")
    parser.add_argument("--max-volumes", type=int, default=None, help="evaluate at most N volumes (first by id)")
    parser.add_argument("--lpips-weights", nargs="+", default=None, metavar="PATH",
                        help="local AlexNet LPIPS weights (one file, or torchvision AlexNet + LPIPS lin weights)")
    parser.add_argument("--data-range", type=float, default=None,
                        help="intensity range for PSNR/SSIM (default: 1 for CT, each volume's max − min for MRI)")
    parser.add_argument("--figure-subject", default=None, help="subject shown in slices.png (default: the first)")
    parser.add_argument("--exclude", nargs="*", default=None, metavar="GLOB",
                        help="glob patterns of files under --data that are not images")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the data checks (default 2)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="both",
                        help="inpaint: masked methods reconstruct from their seeded evaluation masks, plus the"
                        " `mean fill` and `blur fill` reference rows on the same masks; paper: masking off (every"
                        " voxel seen and predicted, nothing pasted back), as the MAESIL group's public code;"
                        " both (default): one table each")
    return parser


def benchmark_recon_command(argv: Sequence[str]) -> int:
    """Runs the benchmark; returns 0, or 1 after printing what is wrong with the inputs."""
    args = build_parser().parse_args(list(argv))
    try:
        return _run(args)
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from maesil.data.records import DataError
    from maesil.evaluation.figures import comparison_figure, display_range, save_figure
    from maesil.evaluation.fills import FILLS, fill_volume
    from maesil.evaluation.metrics import resolve_data_range
    from maesil.evaluation.reconstruction import (
        LPIPS2D,
        body_mask,
        lpips_volume,
        reconstruct_volume,
        volume_metrics,
    )

    if args.batch_size < 1:
        raise BenchmarkError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_volumes is not None and args.max_volumes < 1:
        raise BenchmarkError(f"--max-volumes must be >= 1, got {args.max_volumes}")
    if args.data_range is not None and args.data_range <= 0:
        raise BenchmarkError(f"--data-range must be > 0, got {args.data_range}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    loaded = [(path, *load_method(path, device)) for path in args.checkpoints]
    names = method_names([p for p, _, _ in loaded], [type(m).__name__ for _, m, _ in loaded], args.names)
    checkpoints = []
    for name, (path, model, data) in zip(names, loaded):
        settings, size = data_settings(data)
        params = count_parameters(model)
        checkpoints.append(Method(name, path, model, settings, size, params))
    _check_same_settings(checkpoints)
    settings, superpatch = checkpoints[0].settings, checkpoints[0].superpatch_size
    protocols = PROTOCOLS[args.protocol]
    # One row per protocol × checkpoint, then (inpaint) one per fill; fills without masks are dropped at the end.
    methods: list[Method] = []
    for protocol in protocols:
        methods += [replace(m, per_volume=[], protocol=protocol) for m in checkpoints]
        if protocol == "inpaint":
            methods += [Method(name, Path(), None, settings, superpatch, 0, masked_region="filled")
                        for name in FILLS]

    lpips_net = None
    if args.lpips_weights:
        try:
            lpips_net = LPIPS2D.from_weights(args.lpips_weights).to(device)
        except ValueError as error:
            raise BenchmarkError(str(error)) from error

    try:
        subjects = load_subjects(args.data, settings, superpatch, args.split, args.exclude, args.workers)
    except DataError as error:
        raise BenchmarkError(f"data {args.data}:\n{error}") from error
    if args.max_volumes is not None:
        subjects = subjects[: args.max_volumes]
    if not subjects:
        raise BenchmarkError(f"{args.data}: no subject to evaluate" + ("" if args.split == "all" else
                                                                       f" in split {args.split!r}"))
    ids = [sid for sid, _ in subjects]
    figure_id = args.figure_subject or ids[0]
    if figure_id not in ids:
        raise BenchmarkError(f"--figure-subject {figure_id!r} is not among the evaluated subjects")

    pad = padding_value(settings.modality)
    reference: str | None = None
    figure_data: dict[str, Any] = {}
    for index, (subject_id, load) in enumerate(subjects, start=1):
        start = time.perf_counter()
        try:
            subject = load()
        except DataError as error:
            raise BenchmarkError(f"{subject_id}: {error}") from error
        body: Any = None
        for protocol in protocols:
            rows = [m for m in methods if m.protocol == protocol and not m.is_fill]
            results = [reconstruct_volume(m.model, subject, superpatch, pad, args.batch_size,
                                          masked=protocol == "inpaint") for m in rows]
            image = results[0].image
            if body is None:
                body = body_mask(image, modality=settings.modality)
            masked_index = next((i for i, r in enumerate(results) if r.hidden_mask is not None), None)
            reference_mask = results[masked_index].hidden_mask if masked_index is not None else None
            if masked_index is not None:
                reference = rows[masked_index].name
            scored = [(m, r.reconstruction, r.hidden_mask) for m, r in zip(rows, results)]
            if protocol == "inpaint" and reference_mask is not None:
                scored += [(m, fill_volume(FILLS[m.name], image, reference_mask, superpatch, pad), reference_mask)
                           for m in methods if m.is_fill]
            for method, reconstruction, hidden in scored:
                own = hidden is not None
                if not method.is_fill:
                    method.masked_region = "own" if own else ("reference" if reference_mask is not None else "none")
                row: dict[str, Any] = volume_metrics(image, reconstruction, hidden, body, args.data_range,
                                                     reference_mask=reference_mask, modality=settings.modality)
                mask = hidden if own else reference_mask
                row.update(subject_id=subject_id, shape="x".join(map(str, image.shape)), voxels=image.numel(),
                           body_voxels=int(body.sum()), masked_voxels=int(mask.sum()) if mask is not None else None)
                if lpips_net is not None:
                    span = float(resolve_data_range(image[None], args.data_range, settings.modality)[0])
                    low = 0.0 if settings.modality == "ct" else float(image.min())
                    row["lpips"] = lpips_volume(lpips_net, image, reconstruction, span, low=low)
                method.per_volume.append(row)
            if subject_id == figure_id:
                figure_data.update(image=image.numpy(), spacing=results[0].spacing)
                for method, reconstruction, _ in scored:
                    label = method.name if len(protocols) == 1 else f"{method.name} · {protocol}"
                    figure_data.setdefault("reconstructions", {})[label] = reconstruction.numpy()
        log.info("%d/%d %s %s: %.1f s", index, len(subjects), subject_id, "x".join(map(str, image.shape)),
                 time.perf_counter() - start)

    out: Path = args.out
    methods = [m for m in methods if m.per_volume]  # fills without masks to fill
    protocol = protocol_text(methods, str(args.data), ids, args.split, args.data_range, args.lpips_weights, reference,
                             protocols)
    table = protocol_tables(methods, lpips=lpips_net is not None)
    write_outputs(out, methods, protocol, table, lpips=lpips_net is not None)
    low, high = ((0.0, args.data_range or 1.0) if settings.modality == "ct"
                 else display_range(figure_data["image"], settings.modality))
    figure = comparison_figure(figure_data["image"], figure_data["reconstructions"], spacing=figure_data["spacing"],
                               title=f"{figure_id}: input and reconstructions", value_range=(low, high))
    save_figure(figure, out / "slices.png")
    print(table)
    print(f"\n{len(checkpoints)} checkpoint(s) × {len(protocols)} protocol(s) × {len(ids)} volume(s):"
          f" {out / 'results.md'}, {out / 'results.csv'}, {out / 'per_volume.csv'}, {out / 'slices.png'}")
    return 0
