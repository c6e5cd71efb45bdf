"""The recipe table: step time, memory, largest batch and MFU of every paper-sized recipe.

Every paper-sized YAML (``experiments/pretrain/*.yaml`` without ``_demo``, ``experiments/finetune/unetr.yaml``
and ``unet.yaml``) is profiled with ``python -m maesil profile`` (one subprocess each, ``--json``), composed
with ``experiments/trainer/gpu_bf16.yaml``, when CUDA is available. Without a GPU those rows read
"not measured" and the ``_demo`` version of each recipe is profiled on the CPU instead (its own trainer
settings). A recipe that fails becomes a row with the first line of its error; the table is still written.

Written to ``--out``: ``recipe_table.md`` (also printed), ``recipe_table.csv`` and the profile's JSON of every
measured recipe under ``json/``.

    python benchmarks/recipe_table.py [--steps 20] [--max-batch] [--recipes maesil unetr] \\
        [--set data.init_args.cache_dir=/fast/ct_cache] [--out runs/recipe_table]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "experiments"
GPU_TRAINER = EXPERIMENTS / "trainer/gpu_bf16.yaml"
FINETUNE_RECIPES = ("unetr", "unet")
COLUMNS = ("recipe", "network", "input", "batch", "s/step", "superpatches/s", "peak GiB", "largest batch", "MFU",
           "device", "date")
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Recipe:
    """A paper-sized recipe and its CPU demo version (``None`` when there is none)."""

    name: str
    config: Path
    demo: Path | None


def paper_recipes() -> list[Recipe]:
    """Every paper-sized recipe, pretraining first, with its ``_demo`` YAML where one exists."""
    configs = sorted(path for path in (EXPERIMENTS / "pretrain").glob("*.yaml") if not path.stem.endswith("_demo"))
    configs += [EXPERIMENTS / "finetune" / f"{name}.yaml" for name in FINETUNE_RECIPES]
    recipes = []
    for config in configs:
        demo = config.with_name(f"{config.stem}_demo.yaml")
        recipes.append(Recipe(config.stem, config, demo if demo.is_file() else None))
    return recipes


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def error_line(stderr: str) -> str:
    """The first line of the exception (or argument error) a failed profile ended with."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    pattern = re.compile(r"^([\w.]+(Error|Exception|Interrupt)|error)\b:?|: error: ")
    for line in reversed(lines):
        if pattern.search(line):
            return line
    return lines[-1] if lines else "failed without a message"


def last_stage(stderr: str | bytes | None) -> str | None:
    """The last stage a profile announced (``[profile] ...`` on stderr), or None."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
    stages = [line.partition("[profile] ")[2].strip() for line in text.splitlines() if "[profile] " in line]
    return stages[-1] if stages else None


def max_batch_seconds(args: argparse.Namespace) -> float:
    """The time for each recipe's largest-batch search: ``--max-batch-seconds``, or half of ``--timeout``."""
    return args.max_batch_seconds if args.max_batch_seconds is not None else args.timeout / 2


def profile_recipe(configs: Sequence[Path], json_path: Path, args: argparse.Namespace, on_gpu: bool) -> dict:
    """Runs ``python -m maesil profile`` on ``configs``; the figures, or ``{"error": first line}``."""
    command = [sys.executable, "-m", "maesil", "profile", "--json", str(json_path),
               "--steps", str(args.steps if args.steps else (20 if on_gpu else 3)),
               "--warmup", str(args.warmup if args.warmup is not None else (3 if on_gpu else 1)),
               "--loader-batches", str(args.loader_batches)]
    for config in configs:
        command += ["--config", str(config)]
    for override in args.overrides:
        command += ["--set", override]
    if args.max_batch:
        command += ["--max-batch", "--max-batch-limit", str(args.max_batch_limit or (1024 if on_gpu else 16)),
                    "--max-batch-seconds", f"{max_batch_seconds(args):g}"]
    json_path.unlink(missing_ok=True)
    print("$", " ".join(command), flush=True)
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as timeout:
        # The figures are written (atomically) once every measurement is done: a run that wrote them and then
        # did not exit in time (loader workers or the CUDA context shutting down) has measured everything.
        if json_path.is_file():
            print(f"   {json_path.name} written, but the process did not exit within {args.timeout} s: figures kept",
                  flush=True)
            return json.loads(json_path.read_text())
        stage = last_stage(timeout.stderr)
        return {"error": f"timed out after {args.timeout} s" + (f" at: {stage}" if stage else "")}
    if result.returncode != 0 or not json_path.is_file():
        return {"error": error_line(result.stderr or result.stdout)}
    print(result.stdout.strip(), flush=True)
    return json.loads(json_path.read_text())


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def configured(config: Path) -> dict[str, str]:
    """The network, input and batch a recipe's YAML states (for the rows that are not measured)."""
    import yaml

    document = yaml.safe_load(config.read_text()) or {}
    model = (document.get("model") or {}).get("class_path", "?").rpartition(".")[2]
    data = (document.get("data") or {}).get("init_args") or {}
    edge = data.get("superpatch_size")
    return {"network": model, "input": f"{edge}³" if isinstance(edge, int) else str(edge or "?"),
            "batch": str(data.get("batch_size", "?"))}


def table_row(recipe: str, figures: dict | None, config: Path | None = None) -> dict[str, str]:
    """A table row: the measured figures, the error of a failed run, or "not measured" (with what ``config``
    states)."""
    if figures is None:
        row = dict.fromkeys(COLUMNS, NOT_MEASURED)
        row.update(recipe=recipe, device="GPU, bf16-mixed", date="")
        if config is not None:
            row.update(configured(config))
        return row
    if "error" in figures:
        return {column: (recipe if column == "recipe" else f"failed: {figures['error']}" if column == "network"
                         else "") for column in COLUMNS}
    peak = figures["peak_allocated_gib"] if figures["accelerator"] == "cuda" else figures["peak_rss_gib"]
    mfu = figures.get("mfu")
    largest = figures.get("largest_batch")
    return {
        "recipe": recipe,
        "network": f"{figures['method']} ({figures['network']})",
        "input": figures["input"],
        "batch": str(figures["batch"]),
        "s/step": _number(figures["seconds_per_step_median"], 3),
        "superpatches/s": _number(figures["superpatches_per_second"], 2),
        "peak GiB": _number(peak, 2) + ("" if figures["accelerator"] == "cuda" else " (RSS)"),
        "largest batch": "" if largest is None else {"limit": f"{largest}+", "time limit": f"≥{largest}"}.get(
            figures.get("largest_batch_stopped_by"), f"{largest}"),
        "MFU": "n/a" if mfu is None else f"{mfu:.1%}",
        "device": f"{figures['device']}, {figures['precision']}",
        "date": figures["date"],
    }


def markdown(rows: Sequence[dict[str, str]]) -> str:
    def cells(values: Sequence[str]) -> str:
        return "| " + " | ".join(value.replace("|", "\\|") for value in values) + " |"

    return "\n".join([cells(COLUMNS), cells(["---"] * len(COLUMNS)),
                      *(cells([row[column] for column in COLUMNS]) for row in rows)])


def write_tables(out: Path, rows: Sequence[dict[str, str]], note: str) -> str:
    """Writes ``recipe_table.md`` and ``.csv`` under ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out / "recipe_table.md").write_text(f"{table}\n\n{note}\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    (out / "recipe_table.csv").write_text(buffer.getvalue())
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per recipe (default 20 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3 GPU, 1 CPU)")
    parser.add_argument("--loader-batches", type=int, default=5, help="data loader batches timed (default 5)")
    parser.add_argument("--max-batch", action="store_true", help="find each recipe's largest batch")
    parser.add_argument("--max-batch-limit", type=int, default=None,
                        help="largest batch tried (default 1024 GPU, 16 CPU)")
    parser.add_argument("--max-batch-seconds", type=float, default=None,
                        help="seconds for each largest-batch search (default: half of --timeout)")
    parser.add_argument("--recipes", nargs="+", default=None, metavar="NAME",
                        help="only these recipes, in this order (names of the paper-sized YAMLs, e.g. maesil unetr)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="passed to every profile, e.g. data.init_args.cache_dir=/fast/ct_cache")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per recipe before it counts as failed")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs/recipe_table",
                        help="folder for recipe_table.md/.csv and the JSON figures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipes = paper_recipes()
    if args.recipes:
        known = {recipe.name for recipe in recipes}
        unknown = sorted(set(args.recipes) - known)
        if unknown:
            raise SystemExit(f"--recipes: unknown {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        by_name = {recipe.name: recipe for recipe in recipes}
        recipes = [by_name[name] for name in dict.fromkeys(args.recipes)]  # in the order given
    on_gpu = cuda_available()
    json_dir = args.out / "json"
    json_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    note = (f"Measured {date} by `python benchmarks/recipe_table.py` "
            + ("on the GPU, each recipe composed with `experiments/trainer/gpu_bf16.yaml`." if on_gpu else
               "on a machine without a GPU: the paper-sized rows are not measured, the `_demo` rows ran on the "
               "CPU.")
            + " s/step: median of the timed steps on one prepared batch (data loading excluded); peak GiB: CUDA "
              "max allocated (CPU: peak RSS); largest batch: `--max-batch` (+: stopped at the limit; ≥: the "
              "search's time ran out); MFU: model FLOPs per step / s/step against the device's dense bf16 peak.")
    rows = []
    for recipe in recipes:  # the tables are rewritten after every recipe, so a stopped run leaves its rows
        if on_gpu:
            figures = profile_recipe([recipe.config, GPU_TRAINER], json_dir / f"{recipe.name}.json", args, True)
            rows.append(table_row(recipe.name, figures))
        else:
            rows.append(table_row(recipe.name, None, recipe.config))
            if recipe.demo is not None:
                figures = profile_recipe([recipe.demo], json_dir / f"{recipe.demo.stem}.json", args, False)
                rows.append(table_row(recipe.demo.stem, figures))
        write_tables(args.out, rows, note)
    table = markdown(rows)
    print()
    print(table)
    print()
    print(note)
    print(f"written to {args.out / 'recipe_table.md'} and .csv", file=sys.stderr)
    measured = [row for row in rows if row["s/step"] != NOT_MEASURED]
    return 1 if measured and all(row["network"].startswith("failed:") for row in measured) else 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())
