"""``python -m maesil evidence``: the project's claims measured end to end, pretraining included (``make evidence``).

Every stage is a command users can run themselves, run here as a subprocess in this order:

1. **pretrain**: each ``experiments/pretrain/<method>_demo.yaml`` on the built-in phantoms. The autoencoders
   (AE, VAE, VQ-VAE) get MAESIL's number of steps, so the reconstruction comparison is at equal steps.
2. **recon**: ``benchmark-recon --protocol both`` of MAESIL and the autoencoders on held-out phantoms none of them
   saw (``phantoms --seed 100``).
3. **compare-init**: fine-tuning from scratch, from MAESIL (UNETR) and from the CNN method (U-Net), end-to-end and
   with a frozen encoder, with few labelled volumes, over the seeds; paired differences against scratch.

Every training run shares the sizes of one ``--scale``: ``small`` (the default) resamples the phantoms to 4 mm and
takes 32³ superpatches and patches everywhere, so that the whole protocol, fine-tuning budgets at the scratch
plateau included, fits 90 minutes of 2 CPU cores; ``demo`` keeps the demo YAMLs' own sizes (2 mm, 64³ and
48³), several hours on 2 cores.

``OUT/summary.md`` then states each claim with the figures that decide it, the commands that printed them, the
date, the machine and each stage's wall time; ``OUT/stages.json`` keeps the same record. A stage whose outputs
exist from an earlier call with the same command is not run again (``--force`` reruns everything), so a second
call with other seeds reuses the pretraining.

    python -m maesil evidence --out runs/evidence --seeds 0 1 2
    python -m maesil evidence --out runs/evidence_demo --scale demo --finetune-steps 600
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from maesil.tools.overrides import is_override, override_arguments
from maesil.tools.process_lifetime import sigterm_as_exit, stop_processes

REPO_ROOT = Path(__file__).resolve().parents[2]
PRETRAIN_DIR = REPO_ROOT / "experiments/pretrain"
RECON_BASELINES = ("ae", "vae", "vqvae")
CNN_METHODS = ("s3d", "pgl")


@dataclass(frozen=True)
class Scale:
    """The sizes every training run of one evidence call shares, and the budgets and parallelism that fit them."""

    overrides: tuple[str, ...]  # KEY=VALUE for every training run, before ``--set`` (which wins)
    finetune_steps: int
    jobs: int  # stages at a time
    finetune_jobs: int  # fine-tuning runs at a time inside each compare-init stage
    description: str


SCALES = {
    # No loader worker processes: every run reads a prepared cache, and with runs side by side on a few cores a
    # worker spawned every epoch made each fine-tuning step 3.7x slower (0.30 s against 1.1 s on 2 cores).
    "small": Scale(("data.init_args.target_spacing=4.0", "data.init_args.superpatch_size=32",
                             "data.init_args.num_workers=0"),
                   # Scratch still climbs between 600 and 1200 steps (one label, three seeds: U-Net 0.845 against
                   # 0.896, UNETR 0.413 against 0.459) and is about level over the last 400 of 1200 (docs/evidence.md).
                   finetune_steps=1200, jobs=2, finetune_jobs=2,
                   description="4 mm voxels, 32³ superpatches and patches for every run (the demo YAMLs' networks "
                   "and schedules), read from prepared caches in the training process: three seeds take about "
                   "85 minutes on 2 idle CPU cores"),
    "demo": Scale((), finetune_steps=120, jobs=1, finetune_jobs=1,
                  description="the demo YAMLs' own sizes (2 mm; 64³ for MAESIL, the autoencoders and UNETR, 48³ for "
                  "the CNN method and the U-Net): several hours on 2 CPU cores"),
}
DEFAULT_SCALE = "small"


@dataclass
class Stage:
    """One command of the evidence run and what it left behind."""

    name: str
    command: list[str]
    done_when: Path  # the file whose presence (with the same command) means the stage ran
    needs: tuple[str, ...] = ()  # the stages whose outputs it reads: it starts only once they are done
    force_flag: str | None = None  # what makes the command redo work it would reuse (``--force``)
    seconds: float | None = None
    reused: bool = False

    def display(self) -> str:
        """The command as a user types it (``python -m maesil ...``, paths relative to the repository)."""
        words = ["python" if word == sys.executable else word for word in self.command]
        return " ".join(_relative(word) for word in words)


def _relative(word: str) -> str:
    try:
        return str(Path(word).resolve().relative_to(REPO_ROOT)) if "/" in word else word
    except ValueError:
        return word


def yaml_max_steps(method: str) -> int:
    """``trainer.max_steps`` of a method's demo YAML."""
    config = yaml.safe_load((PRETRAIN_DIR / f"{method}_demo.yaml").read_text())
    return int(config["trainer"]["max_steps"])


@dataclass
class EvidencePlan:
    """What one evidence run does; the command line's arguments."""

    out: Path
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    scale: str = DEFAULT_SCALE
    cnn_method: str = "s3d"
    pretrain_steps: int | None = None  # None: MAESIL's demo YAML's
    finetune_steps: int | None = None  # None: the scale's (past the decoder-only and encoder warm-up, 60 steps)
    cnn_finetune_steps: int | None = None  # the U-Net's; None: ``finetune_steps`` if given, else the scale's
    train_counts: list[int] = field(default_factory=lambda: [1])
    modes: list[str] = field(default_factory=lambda: ["finetune", "frozen"])
    cnn_steps: int | None = None  # None: the CNN method's demo YAML's
    trainer_configs: list[Path] = field(default_factory=list)  # composed after each YAML, e.g. gpu_bf16.yaml
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE for every training run
    pretrain_cache: Path | None = None  # the prepared cache every pretraining run reads; None: OUT/pretrain_cache
    finetune_jobs: int | None = None  # compare-init --jobs; None: the scale's
    finetune_overrides: list[str] = field(default_factory=list)  # KEY=VALUE for the fine-tuning runs only

    @property
    def sizes(self) -> Scale:
        return SCALES[self.scale]

    def steps_to_finetune(self, method: str) -> int:
        """compare-init's budget for the network ``method`` initialises: MAESIL's UNETR or the CNN's U-Net."""
        if method != "maesil" and self.cnn_finetune_steps is not None:
            return self.cnn_finetune_steps
        return self.finetune_steps if self.finetune_steps is not None else self.sizes.finetune_steps

    @property
    def finetune_runs_at_a_time(self) -> int:
        return self.finetune_jobs if self.finetune_jobs is not None else self.sizes.finetune_jobs

    @property
    def cache(self) -> Path:
        """The prepared cache of the training phantoms (its settings are the scale's, hence one per evidence
        folder rather than the demo YAMLs' shared one)."""
        return self.pretrain_cache if self.pretrain_cache is not None else self.out / "pretrain_cache"

    def display(self, jobs: int | None = None) -> str:
        """The ``python -m maesil evidence`` command line of this plan (``jobs``: its ``--jobs``)."""
        words = ["python -m maesil evidence", "--out", _relative(str(self.out)), "--seeds", *map(str, self.seeds)]
        if self.scale != DEFAULT_SCALE:
            words += ["--scale", self.scale]
        if self.cnn_method != "s3d":
            words += ["--cnn-method", self.cnn_method]
        for flag, value in (("--pretrain-steps", self.pretrain_steps), ("--cnn-steps", self.cnn_steps)):
            if value is not None:
                words += [flag, str(value)]
        for flag, value in (("--finetune-steps", self.finetune_steps),
                            ("--cnn-finetune-steps", self.cnn_finetune_steps)):
            if value is not None:
                words += [flag, str(value)]
        if self.train_counts != [1]:
            words += ["--train-count", *map(str, self.train_counts)]
        if self.modes != ["finetune", "frozen"]:
            words += ["--modes", *self.modes]
        if self.trainer_configs:
            words += ["--trainer-config", *[_relative(str(path)) for path in self.trainer_configs]]
        if self.overrides:
            words += ["--set", *self.overrides]
        if self.pretrain_cache is not None:
            words += ["--pretrain-cache", _relative(str(self.pretrain_cache))]
        if self.finetune_overrides:
            words += ["--finetune-set", *self.finetune_overrides]
        if self.finetune_jobs is not None:
            words += ["--finetune-jobs", str(self.finetune_jobs)]
        if jobs is not None and jobs != self.sizes.jobs:
            words += ["--jobs", str(jobs)]
        return " ".join(words)

    def checkpoint(self, method: str) -> Path:
        return self.out / "pretrain" / method / "checkpoints" / "last.ckpt"

    def stages(self) -> list[Stage]:
        python = [sys.executable, "-m", "maesil"]
        steps = self.pretrain_steps or yaml_max_steps("maesil")
        stages = []
        for index, method in enumerate(("maesil", *RECON_BASELINES, self.cnn_method)):
            run_dir = self.out / "pretrain" / method
            command = [*python, "fit", "--config", str(PRETRAIN_DIR / f"{method}_demo.yaml"),
                       *[word for extra in self.trainer_configs for word in ("--config", str(extra))],
                       "--trainer.default_root_dir", str(run_dir)]
            method_steps = steps if method == "maesil" or method in RECON_BASELINES else self.cnn_steps
            if method_steps is not None:
                command += ["--trainer.max_steps", str(method_steps),
                            "--trainer.val_check_interval", str(max(1, method_steps // 4))]
            command += ["--data.init_args.cache_dir", str(self.cache)]
            command += override_arguments([*self.sizes.overrides, *self.overrides])
            # The first run writes the training phantoms (and the pretraining cache) the others read.
            stages.append(Stage(f"pretrain {method}", command, run_dir / "summary.json",
                                needs=("pretrain maesil",) if index > 0 else ()))
        heldout = self.out / "heldout_phantoms"
        stages.append(Stage("held-out phantoms", [*python, "phantoms", "--out", str(heldout), "--count", "2",
                                                  "--seed", "100"], heldout / "images"))
        recon = self.out / "recon"
        stages.append(Stage("recon", [*python, "benchmark-recon", "--data", str(heldout), "--out", str(recon),
                                      "--protocol", "both", "--checkpoints",
                                      *[str(self.checkpoint(m)) for m in ("maesil", *RECON_BASELINES)]],
                            recon / "results.csv",
                            needs=("held-out phantoms", *[f"pretrain {m}" for m in ("maesil", *RECON_BASELINES)])))
        # One compare-init per pretrained network (MAESIL -> UNETR, the CNN method -> U-Net), each with its own
        # scratch baseline; each starts as soon as its checkpoint is there.
        for method in ("maesil", self.cnn_method):
            compare = self.compare_dir(method)
            command = [*python, "compare-init", "--out", str(compare), "--checkpoints", str(self.checkpoint(method)),
                       "--train-count", *map(str, self.train_counts), "--modes", *self.modes,
                       "--seeds", *map(str, self.seeds),
                       "--steps", str(self.steps_to_finetune(method)),
                       "--curve-every", str(self.curve_every(method))]
            if self.trainer_configs:
                command += ["--trainer-config", *map(str, self.trainer_configs)]
            overrides = [*self.sizes.overrides, *self.overrides, *self.finetune_overrides]
            if overrides:
                command += ["--set", *overrides]  # the later of two settings wins
            if self.finetune_runs_at_a_time > 1:
                command += ["--jobs", str(self.finetune_runs_at_a_time)]
            stages.append(Stage(f"compare-init {method}", command, compare / "paired.csv",
                                needs=(f"pretrain {method}",), force_flag="--force"))
        return stages

    def curve_every(self, method: str) -> int:
        """Steps between the learning-curve points: six points (a third of the budget for budgets under 300
        steps), enough to see whether scratch has plateaued."""
        steps = self.steps_to_finetune(method)
        return max(1, steps // 6 if steps >= 300 else steps // 3)

    def compare_dir(self, method: str) -> Path:
        return self.out / "compare_init" / method


def run_stages(plan: EvidencePlan, force: bool = False, jobs: int = 1) -> list[Stage]:
    """Runs the plan's stages (skipping those done with the same command), up to ``jobs`` at a time: a stage
    starts, in the plan's order, as soon as the stages it needs are done and a slot is free. After the first
    failure no stage starts; the running ones finish, and the error names each failed stage, its command and
    its log."""
    plan.out.mkdir(parents=True, exist_ok=True)
    record_path = plan.out / "stages.json"
    previous = {} if force or not record_path.exists() else json.loads(record_path.read_text())
    stages = plan.stages()
    done: set[str] = set()
    waiting: list[Stage] = []
    for stage in stages:
        earlier = previous.get(stage.name)
        # Reused only if every stage it reads was reused too: a stage whose input was made again runs again.
        if (earlier and earlier.get("command") == stage.command and stage.done_when.exists()
                and all(need in done for need in stage.needs)):
            stage.seconds, stage.reused = earlier.get("seconds"), True
            done.add(stage.name)
            print(f"== {stage.name}: done earlier ({stage.done_when}), reused", flush=True)
        else:
            waiting.append(stage)
    running: list[tuple] = []  # (stage, process, log handle, log, start) of each stage running now
    failures: list[str] = []
    jobs = max(1, jobs)
    try:
        while waiting or running:
            ready = [stage for stage in waiting if all(need in done for need in stage.needs)]
            if failures:
                ready = []
            elif not ready and not running:
                raise RuntimeError("stages wait for stages that never run: "
                                   + ", ".join(f"{stage.name} (needs {', '.join(stage.needs)})" for stage in waiting))
            # Each stage's share of the cores is fixed when it starts: all of them when it runs alone.
            side_by_side = min(jobs, len(running) + len(ready))
            for stage in ready[: jobs - len(running)]:
                waiting.remove(stage)
                log = plan.out / "logs" / f"{stage.name.replace(' ', '_')}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                print(f"== {stage.name}: {stage.display()}", flush=True)
                handle = open(log, "w")
                command = [*stage.command, stage.force_flag] if force and stage.force_flag else stage.command
                process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                           env=stage_environment(os.environ, side_by_side))
                running.append((stage, process, handle, log, time.perf_counter()))
            if failures and not running:
                break
            finished = [entry for entry in running if entry[1].poll() is not None]
            if not finished:
                time.sleep(0.2)
                continue
            for entry in finished:
                running.remove(entry)
                stage, process, handle, log, started = entry
                code = process.returncode
                handle.close()
                stage.seconds = time.perf_counter() - started  # each stage's own wall time
                if code != 0 or not stage.done_when.exists():
                    failures.append(f"stage '{stage.name}' failed (exit {code}): {stage.display()}\nits output: {log}")
                    continue
                done.add(stage.name)
                print(f"   {stage.name}: {stage.seconds:.0f} s", flush=True)
                previous[stage.name] = {"command": stage.command, "seconds": stage.seconds}
                record_path.write_text(json.dumps(previous, indent=2) + "\n")
        if failures:
            raise RuntimeError("\n".join(failures))
    finally:  # also on SIGTERM (main turns it into SystemExit) or Ctrl-C: no stage runs on without its caller
        stop_processes(entry[1] for entry in running)
        for entry in running:
            entry[2].close()
    return stages


def stage_environment(environ: Mapping[str, str], jobs: int, cores: int | None = None) -> dict[str, str]:
    """The environment of a stage: W&B off unless asked for, and with ``jobs`` stages side by side each gets
    its share of the cores as torch threads (``OMP_NUM_THREADS``), unless the caller set it: torch's default
    of one thread per core in every stage would oversubscribe the machine ``jobs`` times over. A stage that
    runs alone keeps every core."""
    env = {**environ, "WANDB_MODE": environ.get("WANDB_MODE", "disabled")}
    if jobs > 1 and "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(max(1, (cores or os.cpu_count() or 1) // jobs))
    return env


# ----------------------------------------------------------------------------------------------------- summary


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def number(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(holds: bool) -> str:
    return "**holds**" if holds else "**does not hold**"


def recon_section(results_csv: Path, command: str) -> list[str]:
    """Both protocols' tables and the reconstruction claims they decide."""
    rows = read_csv(results_csv)
    lines = ["## Reconstruction (held-out phantoms)", "", f"`{command}`", ""]
    claims = []
    for protocol, metrics in (("paper", ("psnr", "ssim")), ("inpaint", ("psnr_masked", "ssim_masked"))):
        chosen = [row for row in rows if row["protocol"] == protocol]
        if not chosen:
            continue
        # "reference": an autoencoder scored on MAESIL's masked voxels, which it saw (not an inpainting score).
        saw = [row.get("masked_region") == "reference" and protocol == "inpaint" for row in chosen]
        lines += [f"### `{protocol}` protocol", "",
                  markdown_table(["method", "parameters", *metrics],
                                 [[row["method"], f"{int(number(row['params'])) / 1e6:.2f} M" if number(row["params"]) > 0
                                   else "0", *[f"{number(row[f'{m}_mean']):.3f} ± {number(row[f'{m}_std']):.3f}"
                                               + (" †" if marked else "") for m in metrics]]
                                  for row, marked in zip(chosen, saw)]), ""]
        if any(saw):
            lines += ["† an autoencoder sees its whole input: scored on the voxels MAESIL's masks hide, for "
                      "comparison only (it saw them); not compared by the claims.", ""]
        ours = next((row for row in chosen if row["method"] == "MAESIL"), None)
        if ours is None:
            continue
        others = [row for row in chosen if row is not ours and (protocol == "inpaint") == (row["class"] == "fill")]
        for other in others:
            for metric in metrics:
                mine, theirs = number(ours[f"{metric}_mean"]), number(other[f"{metric}_mean"])
                claims.append(f"- `{protocol}`: MAESIL beats {other['method']} in {metric}: {verdict(mine > theirs)} "
                              f"({mine:.3f} vs {theirs:.3f})")
    return lines + ["Claims:", "", *claims, ""]


def curve_section(summary_json: Path, margin_db: float = 1.0) -> list[str]:
    """MAESIL's held-out masked PSNR during pretraining against the fills on the same masks."""
    record = json.loads(summary_json.read_text())
    history = record.get("history", {})
    model = history.get("val/psnr_masked", [])
    blur = dict((int(s), v) for s, v in history.get("val/psnr_masked_blur_fill", []))
    mean = dict((int(s), v) for s, v in history.get("val/psnr_masked_mean_fill", []))
    seconds = dict((int(s), v) for s, v in history.get("time/training_seconds", []))
    probe = dict((int(s), v) for s, v in history.get("probe/dice", []))
    header = ["step", "training s", "masked PSNR", "blur fill", "mean fill", *(["probe Dice"] if probe else [])]
    rows = []
    for step, value in model:
        step = int(step)
        rows.append([str(step), f"{seconds[step]:.0f}" if step in seconds else "",
                     f"{value:.2f}", f"{blur.get(step, math.nan):.2f}", f"{mean.get(step, math.nan):.2f}",
                     *([f"{probe[step]:.3f}" if step in probe else ""] if probe else [])])
    lines = ["## MAESIL pretraining (validation split of the training phantoms)", "",
             markdown_table(header, rows), ""]
    if model and blur:
        last_step, last = int(model[-1][0]), model[-1][1]
        reference = blur.get(last_step, math.nan)
        lines += [f"- MAESIL ends at least {margin_db:g} dB above the blur fill of the same masks: "
                  f"{verdict(last >= reference + margin_db)} ({last:.2f} vs {reference:.2f} dB, "
                  f"{last - reference:+.2f})", ""]
    return lines


def paired_table(rows: Sequence[dict[str, str]], per_seed: Sequence[dict[str, str]]) -> str:
    """compare-init's ``paired.csv`` rows in Dice points: mean ± std of pretrained − scratch over the seeds, and
    each seed's difference from ``paired_seeds.csv`` rows (in seed order), so that one seed's weight is visible."""
    def key(row: dict[str, str]) -> tuple[str, ...]:
        return tuple(row.get(name, "") for name in ("family", "mode", "train_count", "initialisation", "reference"))

    seeds: dict[tuple[str, ...], list[tuple[float, float]]] = {}
    for row in per_seed:
        seeds.setdefault(key(row), []).append((number(row.get("seed")), number(row.get("difference"))))
    table = []
    for row in rows:
        mean, std = number(row.get("mean_difference")), number(row.get("std_difference"))
        each = ", ".join(f"{100 * difference:+.1f}" for _, difference in sorted(seeds.get(key(row), [])))
        table.append([row.get("family", ""), row.get("mode", ""), row.get("train_count", ""),
                      row.get("initialisation", ""), row.get("reference", ""),
                      f"{100 * mean:+.1f} ± {100 * std:.1f}", each or "n/a",
                      f"{row.get('positive_seeds', '')}/{row.get('seeds', '')}"])
    return markdown_table(["family", "mode", "labelled", "initialisation", "reference", "Δ Dice (points)",
                           "Δ per seed", "positive"], table)


def paired_section(runs: Sequence[tuple[Path, str]], min_gain: float = 0.02,
                   frozen_min_gain: float = 0.05) -> list[str]:
    """compare-init's paired differences (pretrained − scratch, per seed) and the few-label claims, from each
    ``(paired.csv, command)`` of ``runs``.

    Fine-tuned, a pretrained start must beat scratch by ``min_gain`` Dice on average (the papers' few-label
    gains are 2–7 points); frozen, a pretrained encoder must beat a frozen random one by ``frozen_min_gain``,
    the "wide margin" of a representation against none, in every seed both times."""
    lines = ["## Fine-tuning with few labels (held-out phantoms)", ""]
    lines += [f"`{command}`" + ("" if paired_csv.exists() else " (no results)") for paired_csv, command in runs]
    lines += [""]
    rows = [row for paired_csv, _ in runs if paired_csv.exists() for row in read_csv(paired_csv)]
    if not rows:
        return lines + ["compare-init wrote no paired rows.", ""]
    seed_csvs = [paired_csv.with_name("paired_seeds.csv") for paired_csv, _ in runs]
    per_seed = [row for seed_csv in seed_csvs if seed_csv.exists() for row in read_csv(seed_csv)]
    lines += [paired_table(rows, per_seed), ""]
    claims = []
    for row in rows:
        mean = number(row.get("mean_difference"))
        positive, seeds = row.get("positive_seeds", ""), row.get("seeds", "")
        if row.get("reference", "").startswith("scratch") and row.get("mode") == "finetune":
            holds = mean >= min_gain and positive == seeds and seeds not in ("", "0")
            claims.append(f"- {row['initialisation']} beats {row['reference']} by ≥ {100 * min_gain:.0f} Dice points "
                          f"on average with {row['train_count']} labelled volume(s), positive in every seed: "
                          f"{verdict(holds)} ({100 * mean:+.1f} points, {positive}/{seeds} seeds positive)")
        elif row.get("mode") == "frozen":
            holds = mean >= frozen_min_gain and positive == seeds and seeds not in ("", "0")
            claims.append(f"- frozen {row['initialisation']} beats frozen {row['reference']} by ≥ "
                          f"{100 * frozen_min_gain:.0f} Dice points with {row['train_count']} labelled volume(s), "
                          f"positive in every seed: {verdict(holds)} ({100 * mean:+.1f} points, {positive}/{seeds} "
                          "seeds positive)")
    return lines + ["Claims:", "", *claims, ""]


def curves_section(curves_csvs: Sequence[Path]) -> list[str]:
    """The mean held-out Dice of every arm at each scored step, one table per compare-init stage (``curves.csv``;
    the stages may have different budgets), and how much each scratch arm still gained over its last interval:
    the budget is read where scratch has nearly stopped."""
    lines = []
    for path in curves_csvs:
        if path.exists():
            lines += curve_table(read_csv(path))
    return lines


def curve_table(rows: Sequence[dict[str, str]]) -> list[str]:
    """One compare-init stage's mean curves (rows of its ``curves.csv``) and its scratch arms' last gains."""
    if not rows:
        return []
    steps = sorted({int(row["step"]) for row in rows})
    scores: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for row in rows:
        by_step = scores.setdefault((row["initialisation"], row["mode"], row["train_count"]), {})
        by_step.setdefault(int(row["step"]), []).append(number(row["dice"]))
    means = {arm: {step: sum(values) / len(values) for step, values in sorted(by_step.items())}
             for arm, by_step in scores.items()}
    table = [[*arm, *[f"{curve[step]:.3f}" if step in curve else "" for step in steps]] for arm, curve in means.items()]
    lines = ["Held-out Dice during fine-tuning, mean over seeds (`curves.csv`):", "",
             markdown_table(["initialisation", "mode", "labelled", *[f"step {step}" for step in steps]], table), ""]
    for (initialisation, mode, count), curve in means.items():
        points = list(curve.items())
        if initialisation.startswith("scratch") and mode == "finetune" and len(points) >= 3:
            (_, before), (previous, middle), (last_step, last) = points[-3:]
            lines.append(f"- {initialisation} with {count} labelled volume(s) gained {100 * (last - middle):+.1f} Dice "
                         f"points over its last {last_step - previous} steps, {100 * (middle - before):+.1f} over the "
                         "interval before")
    return lines + [""]


def machine_line() -> str:
    import torch

    return (f"{datetime.date.today().isoformat()}, {platform.node() or 'this machine'}: {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPU cores visible, torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


CALL_RECORD = "call.json"


def write_call_record(out: Path, command: str, seconds: float, stages: Sequence[Stage]) -> None:
    """``OUT/call.json``: the wall time of the last call that ran its stages, end to end."""
    finished = datetime.datetime.now().isoformat(timespec="minutes")
    record = {"command": command, "seconds": seconds, "finished": finished,
              "reused_stages": sum(stage.reused for stage in stages)}
    (out / CALL_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def read_call_record(out: Path) -> dict | None:
    path = out / CALL_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def write_summary(plan: EvidencePlan, stages: Sequence[Stage], jobs: int | None = None) -> Path:
    """``OUT/summary.md`` from the stages' outputs."""
    by_name = {stage.name: stage for stage in stages}
    total = sum(stage.seconds or 0.0 for stage in stages)
    jobs = jobs if jobs is not None else plan.sizes.jobs
    overlap = " (summed over the stages; with --jobs some ran side by side)" if jobs > 1 else ""
    lines = ["# maesil evidence", "",
             f"`{plan.display(jobs)}`"
             f" · {machine_line()} · {total / 60:.1f} min of stages{overlap} (stages reused from an earlier call "
             "count their first run)", ""]
    call = read_call_record(plan.out)
    if call is not None:
        reused = call.get("reused_stages", 0)
        lines += [f"The last call took {call['seconds'] / 60:.1f} min end to end (`{call['command']}`, finished "
                  f"{call['finished']}" + (f"; {reused} stage(s) reused from an earlier call" if reused else "")
                  + ").", ""]
    lines += [f"Scale `{plan.scale}`: {plan.sizes.description}.", ""]
    maesil_summary = plan.out / "pretrain" / "maesil" / "summary.json"
    if maesil_summary.exists():
        lines += curve_section(maesil_summary)
    recon = plan.out / "recon" / "results.csv"
    if recon.exists():
        lines += recon_section(recon, by_name["recon"].display())
    compare = [(plan.compare_dir(method) / "paired.csv", by_name[f"compare-init {method}"].display())
               for method in ("maesil", plan.cnn_method)]
    if any(paired.exists() for paired, _ in compare):
        lines += paired_section(compare)
        lines += curves_section([plan.compare_dir(method) / "curves.csv" for method in ("maesil", plan.cnn_method)])
    figures = [("MAESIL reconstructions during pretraining", plan.out / "pretrain/maesil/logs"),
               ("held-out reconstructions, every method", plan.out / "recon/slices.png"),
               *[(f"fine-tuning curves ({method})", plan.compare_dir(method) / "curves.png")
                 for method in ("maesil", plan.cnn_method)],
               *[(f"fine-tuning Dice per organ ({method})", plan.compare_dir(method) / "compare_init.png")
                 for method in ("maesil", plan.cnn_method)]]
    lines += ["## Figures", ""] + [f"- {label}: `{_relative(str(path))}`" for label, path in figures if path.exists()]
    lines += ["", "## Stages", "",
              markdown_table(["stage", "command", "wall time"],
                             [[stage.name, f"`{stage.display()}`",
                               (f"{stage.seconds / 60:.1f} min" if stage.seconds is not None else "") +
                               (" (reused)" if stage.reused else "")] for stage in stages]), ""]
    path = plan.out / "summary.md"
    path.write_text("\n".join(lines))
    return path


def evidence_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m maesil evidence", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/evidence"),
                        help="the folder of every stage's output, the logs and summary.md (default runs/evidence)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (default 0 1 2)")
    parser.add_argument("--scale", choices=sorted(SCALES), default=DEFAULT_SCALE,
                        help="the sizes of every training run: "
                        + "; ".join(f"{name}: {scale.description}" for name, scale in SCALES.items())
                        + f" (default {DEFAULT_SCALE})")
    parser.add_argument("--cnn-method", choices=CNN_METHODS, default="s3d",
                        help="the CNN pretraining method fine-tuned as a U-Net (default s3d)")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="steps of MAESIL and the autoencoders (default: maesil_demo.yaml's)")
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="compare-init --steps of both stages, MAESIL -> UNETR and the CNN method -> U-Net "
                        "(default: the scale's, "
                        + ", ".join(f"{scale.finetune_steps} at {name}" for name, scale in SCALES.items())
                        + "; six curve points, three under 300 steps)")
    parser.add_argument("--cnn-finetune-steps", type=int, default=None,
                        help="compare-init --steps of the CNN method -> U-Net stage alone (default: "
                        "--finetune-steps if given, else the scale's)")
    parser.add_argument("--train-count", type=int, nargs="+", default=[1], help="labelled volumes (default 1)")
    parser.add_argument("--modes", nargs="+", choices=["finetune", "frozen"], default=["finetune", "frozen"])
    parser.add_argument("--cnn-steps", type=int, default=None,
                        help="steps of the CNN method's pretraining (default: its demo YAML's)")
    parser.add_argument("--trainer-config", nargs="*", type=Path, default=[], metavar="YAML",
                        help="YAML files composed after every training run's own, e.g. "
                        "experiments/trainer/gpu_bf16.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every training run, e.g. data.init_args.num_workers=8")
    parser.add_argument("--pretrain-cache", type=Path, default=None, metavar="DIR",
                        help="the cache the first pretraining run prepares the training phantoms into and every "
                        "pretraining run reads its superpatches from (default OUT/pretrain_cache)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="stages at a time, each as soon as what it reads is there (default: the scale's, "
                        + ", ".join(f"{scale.jobs} at {name}" for name, scale in SCALES.items()) + ")")
    parser.add_argument("--finetune-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for the fine-tuning runs only, after --set, e.g. "
                        "data.init_args.num_workers=0")
    parser.add_argument("--finetune-jobs", type=int, default=None,
                        help="fine-tuning runs at a time in each compare-init stage (its --jobs; default: the "
                        "scale's, " + ", ".join(f"{scale.finetune_jobs} at {name}" for name, scale in SCALES.items())
                        + ")")
    parser.add_argument("--force", action="store_true", help="rerun every stage, even those done earlier")
    parser.add_argument("--summary-only", action="store_true", help="only rewrite summary.md from the outputs there")
    args = parser.parse_args(list(argv))
    counts = (*args.train_count, args.pretrain_steps, args.cnn_steps, args.finetune_steps, args.cnn_finetune_steps,
              args.jobs, args.finetune_jobs)
    if any(value is not None and value < 1 for value in counts):
        parser.error("--train-count, --pretrain-steps, --cnn-steps, --finetune-steps, --cnn-finetune-steps, --jobs "
                     "and --finetune-jobs must be >= 1")
    for flag, items in (("--set", args.set), ("--finetune-set", args.finetune_set)):
        if not all(map(is_override, items)):
            parser.error(f"{flag} takes KEY=VALUE items, got {items}")
    missing = [str(path) for path in args.trainer_config if not path.is_file()]
    if missing:
        parser.error(f"--trainer-config: no such file: {', '.join(missing)}")
    plan = EvidencePlan(out=args.out.resolve(), seeds=args.seeds, scale=args.scale, cnn_method=args.cnn_method,
                        pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                        cnn_finetune_steps=args.cnn_finetune_steps,
                        train_counts=args.train_count, modes=args.modes, cnn_steps=args.cnn_steps,
                        trainer_configs=[path.resolve() for path in args.trainer_config], overrides=args.set,
                        pretrain_cache=args.pretrain_cache.resolve() if args.pretrain_cache else None,
                        finetune_jobs=args.finetune_jobs, finetune_overrides=args.finetune_set)
    jobs = args.jobs if args.jobs is not None else plan.sizes.jobs
    if args.summary_only:
        stages = plan.stages()
        record = json.loads((plan.out / "stages.json").read_text()) if (plan.out / "stages.json").exists() else {}
        for stage in stages:
            stage.seconds = record.get(stage.name, {}).get("seconds")
    else:
        started = time.perf_counter()
        try:
            with sigterm_as_exit():
                stages = run_stages(plan, force=args.force, jobs=jobs)
        except RuntimeError as error:
            print(f"evidence: {error}", file=sys.stderr)
            return 1
        write_call_record(plan.out, plan.display(jobs), time.perf_counter() - started, stages)
    summary = write_summary(plan, stages, jobs)
    print(summary.read_text())
    print(f"summary: {summary}")
    return 0
