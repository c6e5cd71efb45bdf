"""``python -m maesil compare-init``: does pretraining pay? Fine-tune from scratch and from checkpoints, same budget.

On the built-in phantoms' organ labels (or any labelled data given as a manifest), the command fine-tunes
the segmentation network from random initialisation and from each given checkpoint, with the same data,
steps, schedule and seeds, then scores every run on a fixed held-out set over whole volumes (Dice per organ
and HD95 in mm). It prints mean ± std over the seeds, and writes ``results.csv`` (one row per run and
class), ``summary.csv`` and ``compare_init.png``.

Each checkpoint picks its network from its method's transfer layout: a ViT encoder (MAESIL) is fine-tuned
as UNETR with ``--unetr-config``, a U-Net (PGL, BYOL, S3D) with ``--unet-config``. The encoder's sizes are
read from the checkpoint, so the scratch baseline of each family is the very same network, randomly
initialised. Nothing is tuned per run: the scratch baseline gets exactly the schedule the pretrained runs
get.

    python -m maesil compare-init --checkpoints runs/pgl_demo/checkpoints/last.ckpt \\
        runs/maesil_demo/checkpoints/last.ckpt --train-count 4 --seeds 0 1 2 --steps 300
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from maesil.phantoms import ORGAN_LABELS

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_UNET_CONFIG = REPO_ROOT / "experiments/finetune/unet_demo.yaml"
DEFAULT_UNETR_CONFIG = REPO_ROOT / "experiments/finetune/unetr_demo.yaml"


@dataclass
class Initialisation:
    """One arm of the comparison: a network family and where its weights start."""

    name: str
    family: str  # "unet" or "unetr"
    checkpoint: Path | None
    network_args: dict = field(default_factory=dict)
    preset: str | None = None


#: UNETR arguments read from a ViT checkpoint: name -> the older name a checkpoint may store it under.
_VIT_ARGS: dict[str, str | None] = {"token_size": "patch_size", "embed_dim": None, "depth": None,
                                    "num_heads": None, "mlp_ratio": None}
#: ResEnc U-Net arguments read from a U-Net checkpoint.
_UNET_ARGS = ("features", "blocks_per_stage", "strides")


def _encoder_network(method: str | None, state: dict, architecture: dict) -> str:
    """``"vit"``, ``"resenc"`` or ``"none"``: the method's transfer layout says it; for a file that names no
    method (an export of an unknown method, a bare state dict), its architecture or its keys do."""
    from maesil.checkpoints.layouts import method_layouts

    layout = method_layouts().get(method or "")
    if layout is not None:
        return layout.network
    if method is not None:
        return "none"
    kind = architecture.get("type")
    if kind == "ViTEncoder3D" or (kind is None and any(".patch_embed." in key for key in state)):
        return "vit"
    return "resenc" if kind == "ResEncUNet" else "none"


def describe_checkpoint(path: Path) -> Initialisation:
    """The network family and encoder sizes of a pretrained checkpoint (read by the one safe reader).

    A ViT encoder is fine-tuned as UNETR, a U-Net encoder as the ResEnc U-Net, with the sizes of an export's
    ``architecture`` or of the checkpoint's hyperparameters.
    """
    from maesil.checkpoints import identify_method, load_checkpoint_state
    from maesil.checkpoints.layouts import transferable_layouts

    state, metadata = load_checkpoint_state(path)
    method = identify_method(state, metadata)
    architecture = dict(metadata.get("architecture") or {})
    source = architecture or dict(metadata.get("hyper_parameters") or {})
    name = f"{method or path.stem} ({path.parent.parent.name if path.parent.name == 'checkpoints' else path.stem})"
    network = _encoder_network(method, state, architecture)
    if network == "vit":
        args = {}
        for key, old_key in _VIT_ARGS.items():
            value = source.get(key)
            if value is None and old_key is not None:
                value = source.get(old_key)
            if value is not None:
                args[key] = value
        return Initialisation(name, "unetr", path, network_args=args)
    if network == "resenc":
        args = {key: list(source[key]) for key in _UNET_ARGS if source.get(key) is not None}
        return Initialisation(name, "unet", path, network_args=args, preset=source.get("unet_preset"))
    raise ValueError(f"{path}: a {method or 'unknown'} checkpoint has no encoder compare-init can fine-tune "
                     f"(it handles checkpoints of {', '.join(sorted(transferable_layouts()))})")


def write_phantom_manifest(folder: Path, train_count: int, test_count: int, seed: int) -> Path:
    """Writes ``train_count + test_count`` phantoms and a manifest with a fixed train/test split."""
    from maesil.phantoms import write_phantoms

    paths = write_phantoms(folder, train_count + test_count, seed=seed)
    manifest = folder / "compare_init.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject_id", "image", "label", "split"])
        for index, image in enumerate(paths):
            split = "train" if index < train_count else "test"
            # Paths relative to the manifest's folder, as manifests resolve them.
            writer.writerow([image.name.split(".")[0], f"images/{image.name}", f"labels/{image.name}", split])
    return manifest


def fine_tune_and_test(arm: Initialisation, config: Path, manifest: Path, seed: int, steps: int,
                       out_dir: Path, overrides: Sequence[str] = (), cache_dir: Path | None = None) -> dict[str, float]:
    """One fine-tuning run through the same CLI users run; returns the test metrics.

    With ``cache_dir`` every run reads the volumes from one prepared cache (written by the first run), so the
    runs do not each decode and resample the same volumes again.
    """
    import json

    from maesil.lightning_cli import MaesilCLI

    slug = "".join(c if c.isalnum() else "_" for c in arm.name.lower()).strip("_")
    run_dir = out_dir / "runs" / f"{slug}_seed{seed}"
    args = [
        "--config", str(config),
        "--seed_everything", str(seed),
        "--data.init_args.data_dir", str(manifest),
        "--data.init_args.val_fraction", "0",
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.default_root_dir", str(run_dir),
        "--model.init_args.pretrained", str(arm.checkpoint) if arm.checkpoint else "null",
    ]  # fmt: skip
    if cache_dir is not None:
        args += ["--data.init_args.cache_dir", str(cache_dir)]
    if arm.preset:
        args += ["--model.init_args.preset", arm.preset]
    if arm.network_args:
        args += ["--model.init_args.network_args", json.dumps(arm.network_args)]
    for override in overrides:
        key, _, value = override.partition("=")
        args += [f"--{key.lstrip('-')}", value]
    with warnings.catch_warnings():  # the arguments come from here, not from sys.argv: nothing to warn about
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = MaesilCLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    [metrics] = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return {key: float(value) for key, value in metrics.items()}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def summary_table(results: dict[str, list[dict[str, float]]], class_names: Sequence[str]) -> list[list[str]]:
    """Rows: one per initialisation; columns: overall Dice, HD95 and Dice per organ, as mean ± std."""
    header = ["initialisation", "runs", "Dice", "HD95 (mm)", *[f"Dice {name}" for name in class_names]]
    rows = [header]
    for name, runs in results.items():
        def cell(key: str, digits: int = 3) -> str:
            mean, std = mean_std([run.get(key, math.nan) for run in runs])
            return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"

        rows.append([name, str(len(runs)), cell("test/dice"), cell("test/hd95", 1),
                     *[cell(f"test/dice_{c}") for c in class_names]])
    return rows


def format_rows(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def plot(results: dict[str, list[dict[str, float]]], class_names: Sequence[str], path: Path) -> Path:
    """Grouped bars of mean Dice per organ (and overall) with the std over seeds as error bars."""
    import numpy as np

    from maesil.evaluation.figures import plt, save_figure

    labels = ["overall", *class_names]
    keys = ["test/dice", *[f"test/dice_{c}" for c in class_names]]
    figure, axis = plt.subplots(figsize=(min(14.0, max(8.0, 0.3 * len(labels) * max(1, len(results)))), 4.5))
    width = 0.8 / max(1, len(results))
    for index, (name, runs) in enumerate(results.items()):
        stats = [mean_std([run.get(key, math.nan) for run in runs]) for key in keys]
        means = [0.0 if math.isnan(m) else m for m, _ in stats]
        stds = [0.0 if math.isnan(s) else s for _, s in stats]
        axis.bar(np.arange(len(labels)) + index * width, means, width, yerr=stds, capsize=2, label=name)
    axis.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
    axis.set_xticklabels(labels, rotation=30, ha="right")
    axis.set_ylabel("Dice (held-out volumes)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    axis.set_title("Fine-tuning from scratch vs. pretrained (mean ± std over seeds)")
    figure.tight_layout()
    return save_figure(figure, path)


def compare_init_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m maesil compare-init",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="*", type=Path, default=[],
                        help="pretrained checkpoints (.ckpt or exported .safetensors) to compare with scratch")
    parser.add_argument("--train-count", type=int, default=4, help="labelled training volumes (default 4)")
    parser.add_argument("--test-count", type=int, default=2, help="held-out volumes (default 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run (default 300)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a CSV/JSON manifest with train and test splits instead of the phantoms")
    parser.add_argument("--phantom-seed", type=int, default=200, help="seed of the first phantom (default 200)")
    parser.add_argument("--unet-config", type=Path, default=DEFAULT_UNET_CONFIG)
    parser.add_argument("--unetr-config", type=Path, default=DEFAULT_UNETR_CONFIG)
    parser.add_argument("--families", nargs="*", choices=["unet", "unetr"], default=None,
                        help="scratch baselines to run without a checkpoint of that family (default: those of "
                        "the checkpoints, else unet)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. data.init_args.num_workers=0")
    parser.add_argument("--no-cache", action="store_true",
                        help="read the volumes from their files in every run instead of one prepared cache in "
                        "OUT/cache")
    parser.add_argument("--out", type=Path, default=Path("runs/compare_init"))
    args = parser.parse_args(list(argv))
    if args.train_count < 1 or args.test_count < 1 or args.steps < 1:
        parser.error("--train-count, --test-count and --steps must be >= 1")
    if any("=" not in item for item in args.set):
        parser.error(f"--set takes KEY=VALUE items, got {args.set}")

    try:
        arms = [describe_checkpoint(path) for path in args.checkpoints]
    except (OSError, ValueError) as error:
        print(f"compare-init: {error}", file=sys.stderr)
        return 1
    families = args.families or sorted({arm.family for arm in arms}) or ["unet"]
    scratch = []
    for family in families:
        like = next((arm for arm in arms if arm.family == family), None)
        scratch.append(Initialisation(f"scratch ({family})", family, None,
                                      network_args=dict(like.network_args) if like else {},
                                      preset=like.preset if like else None))
    arms = scratch + arms
    manifest = args.data or write_phantom_manifest(args.out / "phantoms", args.train_count, args.test_count,
                                                   args.phantom_seed)
    class_names = [name for label, name in sorted(ORGAN_LABELS.items()) if label > 0]
    configs = {"unet": args.unet_config, "unetr": args.unetr_config}
    results: dict[str, list[dict[str, float]]] = defaultdict(list)
    rows = []
    for arm in arms:
        for seed in args.seeds:
            print(f"== {arm.name}, seed {seed}: {args.steps} steps", flush=True)
            metrics = fine_tune_and_test(arm, configs[arm.family], manifest, seed, args.steps, args.out, args.set,
                                         cache_dir=None if args.no_cache else args.out / "cache")
            results[arm.name].append(metrics)
            rows.append({"initialisation": arm.name, "seed": seed, **metrics})
    args.out.mkdir(parents=True, exist_ok=True)
    keys = sorted({key for row in rows for key in row} - {"initialisation", "seed"})
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["initialisation", "seed", *keys])
        writer.writeheader()
        writer.writerows(rows)
    table = summary_table(results, class_names)
    with open(args.out / "summary.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(table)
    picture = plot(results, class_names, args.out / "compare_init.png")
    print(f"\n{len(args.seeds)} seeds × {args.steps} steps, {args.train_count} labelled training volumes, "
          f"{args.test_count} held-out volumes\n")
    print(format_rows(table))
    print(f"\nresults: {(args.out / 'results.csv').resolve()}\nplot:    {picture.resolve()}")
    return 0
