"""Learning curves of the MAESIL demo recipe and of single changes to it, side by side in one run.

Each variant is the demo (``experiments/pretrain/maesil_demo.yaml``, the built-in phantoms) with one group of
overrides, trained through the same CLI users run for ``--steps`` steps and validated every ``--val-every``
steps on the held-out phantoms. Validation scores the masked voxels and, on the very same masks, the mean fill
and the blur fill, so every curve is read against references that need no training. The table prints the
held-out masked PSNR at each validation, the training seconds (validation excluded), and the margin over the
blur fill; ``curves.csv`` and ``curves.png`` (against step and against seconds) hold the curves.

    python benchmarks/maesil_recipe.py                       # every variant, 600 steps each
    python benchmarks/maesil_recipe.py --variants demo lr_2e-3 --steps 300 --val-every 100

Absolute seconds depend on the machine and on what else runs on it; compare variants of one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "experiments/pretrain/maesil_demo.yaml"

#: Variant name -> CLI overrides on top of the demo YAML ("demo" is the YAML as it is).
VARIANTS: dict[str, list[str]] = {
    "demo": [],
    "lr_2e-3": ["--model.init_args.optimizer.init_args.lr", "2.0e-3"],
    "lr_5e-4": ["--model.init_args.optimizer.init_args.lr", "5.0e-4"],
    "warmup_20": ["--model.init_args.scheduler.init_args.warmup_steps", "20"],
    "decoder_depth_4": ["--model.init_args.decoder_depth", "4"],
    "decoder_width_384": ["--model.init_args.decoder_embed_dim", "384", "--model.init_args.decoder_num_heads", "8"],
    "encoder_depth_3": ["--model.init_args.depth", "3"],
    "torchio_queue": ["--data.init_args.cache_dir", "null"],  # the source files through the TorchIO queue
    "batch_8": ["--data.init_args.batch_size", "8"],
    "batch_2": ["--data.init_args.batch_size", "2"],
    "random_mask": ["--model.init_args.masking", "random", "--model.init_args.mask_ratio", "0.75"],
    "decoder_local_mixing": ["--model.init_args.decoder_local_mixing", "true"],
    "visible_loss_0.1": ["--model.init_args.visible_loss_weight", "0.1"],
}

METRIC = "val/psnr_masked"
REFERENCES = {"blur fill": "val/psnr_masked_blur_fill", "mean fill": "val/psnr_masked_mean_fill"}
SECONDS = "time/training_seconds"


def run_variant(name: str, overrides: list[str], steps: int, val_every: int, out: Path, extra: list[str]) -> dict:
    """Trains one variant through ``python -m maesil fit``; returns its ``summary.json`` and wall seconds."""
    run_dir = out / name
    command = [
        sys.executable, "-m", "maesil", "fit", "--config", str(DEMO_CONFIG),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(val_every),
        "--trainer.default_root_dir", str(run_dir), *overrides, *extra,
    ]  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    started = time.perf_counter()
    with open(run_dir / "fit.log", "w") as log:
        code = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - started
    summary_path = run_dir / "summary.json"
    if code != 0 or not summary_path.exists():
        raise RuntimeError(f"variant {name} failed (exit {code}); see {run_dir / 'fit.log'}")
    return {"summary": json.loads(summary_path.read_text()), "wall_seconds": wall}


def curve_rows(name: str, summary: dict) -> list[dict]:
    """One row per validation: step, training seconds, masked PSNR and the fills' masked PSNR."""
    history = summary["history"]
    seconds = dict((int(s), v) for s, v in history.get(SECONDS, []))
    references = {label: dict((int(s), v) for s, v in history.get(key, [])) for label, key in REFERENCES.items()}
    rows = []
    for step, value in history.get(METRIC, []):
        row = {"variant": name, "step": int(step), "training_seconds": seconds.get(int(step)), "psnr_masked": value}
        row.update({label: values.get(int(step)) for label, values in references.items()})
        rows.append(row)
    return rows


def format_table(results: dict[str, list[dict]]) -> str:
    steps = sorted({row["step"] for rows in results.values() for row in rows})
    header = ["variant", *[f"step {s}" for s in steps], "blur fill", "last - blur", "s/step"]
    lines = [header]
    for name, rows in results.items():
        by_step = {row["step"]: row for row in rows}
        last = rows[-1] if rows else {}
        blur = last.get("blur fill")
        seconds = last.get("training_seconds")
        lines.append([
            name,
            *[f"{by_step[s]['psnr_masked']:.2f}" if s in by_step else "" for s in steps],
            f"{blur:.2f}" if blur is not None else "n/a",
            f"{last['psnr_masked'] - blur:+.2f}" if blur is not None else "n/a",
            f"{seconds / last['step']:.3f}" if seconds and last.get("step") else "n/a",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from maesil.evaluation.figures import plt, save_figure

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, rows in results.items():
        axes[0].plot([r["step"] for r in rows], [r["psnr_masked"] for r in rows], marker="o", label=name)
        timed = [r for r in rows if r["training_seconds"] is not None]
        axes[1].plot([r["training_seconds"] for r in timed], [r["psnr_masked"] for r in timed], marker="o")
    references = [row for rows in results.values() for row in rows if row.get("blur fill") is not None]
    if references:
        for axis in axes:
            axis.axhline(references[-1]["blur fill"], color="k", linestyle="--", label="blur fill")
            if references[-1].get("mean fill") is not None:
                axis.axhline(references[-1]["mean fill"], color="grey", linestyle=":", label="mean fill")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training seconds (validation excluded)")
    axes[0].set_ylabel("held-out masked PSNR (dB)")
    axes[0].legend(fontsize=7)
    figure.suptitle("MAESIL demo recipe: held-out masked PSNR, fills on the same masks")
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--val-every", type=int, default=150)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs/maesil_recipe")
    parser.add_argument("extra", nargs="*", help="overrides for every variant, after --")
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {}
    for name in args.variants:
        print(f"== {name}: {' '.join(VARIANTS[name]) or '(the demo YAML)'}", flush=True)
        outcome = run_variant(name, VARIANTS[name], args.steps, args.val_every, args.out, args.extra)
        results[name] = curve_rows(name, outcome["summary"])
        print(format_table({name: results[name]}), flush=True)
    rows = [row for variant_rows in results.values() for row in variant_rows]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "curves.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["variant"])
        writer.writeheader()
        writer.writerows(rows)
    plot(results, args.out / "curves.png")
    print(f"\n{args.steps} steps per variant, validation every {args.val_every}\n")
    print(format_table(results))
    print(f"\ncurves: {args.out / 'curves.csv'}\nplot:   {args.out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
