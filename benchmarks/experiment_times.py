"""Expected CPU wall time of each demo experiment, from a short real run of its YAML.

Each demo YAML (``experiments/pretrain/*_demo.yaml``, ``experiments/finetune/*_demo.yaml``) is run through the
CLI in a subprocess, exactly as a user runs it, but for ``--warmup`` + ``--steps`` training steps and one
validation at the last step. A small callback (:class:`StepTimer`, appended with ``--trainer.callbacks+=``)
records the wall-clock time at the end of every training batch and around every validation. From that:

* **startup**: launch of the process to the end of the first training step (imports, writing the phantoms if
  they are missing, data checks, validation preprocessing, filling the queue, the first step);
* **s/step**: the median interval between the ends of consecutive training steps after the warm-up steps
  (forward, backward, optimizer step, data loading, logging; includes occasional checkpoint writes);
* **val s**: the duration of the one validation (whole held-out set, metrics and picture). It is the run's
  first validation, which may include one-off work, so it is an upper bound for later ones;
* **expected**: startup + (max_steps − 1) × s/step + validations × val s, with max_steps and the number of
  validations (max_steps // val_check_interval) read from the YAML. Checkpoint writes at
  ``every_n_train_steps`` and the end-of-run summary are not counted separately.

Nothing here is part of the test suite. Run it on an otherwise idle machine; timings of a shared machine vary.

    python benchmarks/experiment_times.py [--only selfmedmae_demo unetr_demo] [--steps 10] [--warmup 3]
        [--no-validation] [--threads N] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
DEMO_FOLDERS = (ROOT / "experiments" / "pretrain", ROOT / "experiments" / "finetune")


class StepTimer(Callback):
    """Writes wall-clock times (``time.time()``) of training-batch ends and validations to a JSON file.

    Args:
        path: where the JSON file is written at the end of ``fit``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.step_ends: list[float] = []
        self.validations: list[tuple[float, float]] = []
        self._validation_start: float | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self.step_ends.append(time.time())

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation_start = time.time()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._validation_start is not None and not trainer.sanity_checking:
            self.validations.append((self._validation_start, time.time()))
        self._validation_start = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps({"step_ends": self.step_ends, "validations": self.validations}))


@dataclass
class Timing:
    """One demo's measurement and the full-run estimate built from it."""

    name: str
    max_steps: int
    validations: int
    startup_s: float
    step_s: float
    val_s: float | None
    wall_s: float

    @property
    def expected_s(self) -> float:
        validation = self.validations * self.val_s if self.val_s is not None else 0.0
        return self.startup_s + (self.max_steps - 1) * self.step_s + validation


def demo_configs() -> dict[str, Path]:
    """Every demo YAML by name (file stem)."""
    return {path.stem: path for folder in DEMO_FOLDERS for path in sorted(folder.glob("*_demo.yaml"))}


def schedule(config: Path) -> tuple[int, int]:
    """``(max_steps, validations)`` of a full run of ``config``."""
    trainer = yaml.safe_load(config.read_text())["trainer"]
    max_steps = int(trainer["max_steps"])
    interval = trainer.get("val_check_interval")
    if trainer.get("check_val_every_n_epoch", 1) is not None or not isinstance(interval, int):
        raise ValueError(f"{config}: expected step-based validation (integer val_check_interval, "
                         f"check_val_every_n_epoch: null) to count validations")
    return max_steps, max_steps // interval


def measure(name: str, config: Path, steps: int, warmup: int, validate: bool, threads: int | None) -> Timing:
    """Runs ``config`` for ``warmup + steps`` steps in a subprocess and times it with :class:`StepTimer`."""
    if steps < 2 or warmup < 1:
        raise ValueError(f"need --steps >= 2 and --warmup >= 1, got {steps} and {warmup}")
    max_steps, validations = schedule(config)
    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix=f"times_{name}_") as folder:
        times_file = Path(folder) / "times.json"
        timer = {"class_path": "experiment_times.StepTimer", "init_args": {"path": str(times_file)}}
        command = [
            sys.executable, "-m", "maesil", "fit", "--config", str(config),
            "--trainer.max_steps", str(total),
            "--trainer.default_root_dir", str(Path(folder) / "run"),
            f"--trainer.callbacks+={json.dumps(timer)}",
        ]  # fmt: skip
        command += ["--trainer.val_check_interval", str(total)] if validate else ["--trainer.limit_val_batches", "0"]
        env = {**os.environ, "WANDB_MODE": "disabled",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "benchmarks"),
                                                           os.environ.get("PYTHONPATH")]))}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        launched = time.time()
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - launched
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {result.returncode}):\n"
                               f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        record = json.loads(times_file.read_text())
    ends = record["step_ends"]
    if len(ends) != total:
        raise RuntimeError(f"{name}: expected {total} training steps, timed {len(ends)}")
    intervals = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    val_s = record["validations"][-1][1] - record["validations"][-1][0] if record["validations"] else None
    return Timing(name, max_steps, validations, startup_s=ends[0] - launched, step_s=statistics.median(intervals),
                  val_s=val_s, wall_s=wall)


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s" if seconds >= 60 else f"{seconds:.0f} s"


def print_table(timings: list[Timing], markdown: bool) -> None:
    header = ["experiment", "max_steps", "validations", "startup s", "s/step", "val s", "expected CPU time"]
    rows = [[t.name, str(t.max_steps), str(t.validations), f"{t.startup_s:.1f}", f"{t.step_s:.3f}",
             f"{t.val_s:.1f}" if t.val_s is not None else "not run", minutes(t.expected_s)] for t in timings]
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def main(argv: list[str] | None = None) -> None:
    configs = demo_configs()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=sorted(configs),
                        help=f"demo names (default: all): {', '.join(sorted(configs))}")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps after the warm-up (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first (default 3)")
    parser.add_argument("--no-validation", action="store_true",
                        help="skip the one validation (the estimate then has no validation cost)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: inherited)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    names = args.only or sorted(configs)
    print(f"{len(names)} demo(s), {args.warmup} warm-up + {args.steps} timed steps each, "
          f"{'no validation' if args.no_validation else 'one validation at the last step'}, "
          f"OMP_NUM_THREADS={args.threads or os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs",
          flush=True)
    timings = []
    for name in names:
        timing = measure(name, configs[name], args.steps, args.warmup, not args.no_validation, args.threads)
        print(f"  {name}: {timing.step_s:.3f} s/step, measured in {timing.wall_s:.0f} s", flush=True)
        timings.append(timing)
    print_table(timings, args.markdown)


if __name__ == "__main__":
    main()
