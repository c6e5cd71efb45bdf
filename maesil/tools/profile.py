"""``python -m maesil profile``: how fast a recipe trains, how much memory it takes and what batch fits.

The run is built exactly as ``python -m maesil fit`` builds it (the same ``--config`` files and overrides,
through :class:`~maesil.lightning_cli.MaesilCLI`). One batch is taken from the recipe's training loader and
kept in memory; the run's own trainer (accelerator, precision, gradient clipping, optimizer and scheduler)
then trains on that batch for ``--warmup`` + ``--steps`` steps, on one device, without validation,
checkpoints, loggers or the configured callbacks (which would also freeze or unfreeze parts of a fine-tuned
network), and with one batch per optimizer step, so the figures are those of the steady training step of the
whole network. Printed:

* s/step (median and fastest of the timed steps) and superpatches/s (batch size / median);
* peak memory of the timed steps: on CUDA the largest memory allocated and reserved by PyTorch, on CPU the
  process's peak resident memory;
* parameters (trainable / total), FLOPs of one step (forward + backward, ``torch.utils.flop_counter``),
  the achieved TFLOP/s and the model FLOP utilisation (MFU) against ``--peak-tflops`` or the device's
  datasheet peak (:data:`maesil.profiling.KNOWN_PEAK_TFLOPS`);
* with ``--max-batch``, the largest batch with which two steps run (doubled until out of memory, then bisected;
  ``--max-batch-seconds`` bounds the search, which then reports the largest batch that fitted so far);
* the recipe's real data loader: ``--loader-batches`` batches after its first, and whether loading or
  computing bounds the step.

``--json PATH`` writes every figure, for ``benchmarks/recipe_table.py``. Each stage is announced on stderr
(``[profile] ...``), so a run stopped from outside shows where it was.

    python -m maesil profile --config experiments/pretrain/maesil.yaml --config experiments/trainer/gpu_bf16.yaml \\
        --steps 20 --max-batch
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maesil.tools.overrides import is_override, override_arguments

#: Trainer settings of the profiling run: one device, and nothing that validates, saves or logs.
PROFILE_TRAINER: dict[str, Any] = {
    "devices": 1,
    "num_nodes": 1,
    "strategy": "auto",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "limit_train_batches": 1.0,
    "accumulate_grad_batches": 1,
    "limit_val_batches": 0,
    "num_sanity_val_steps": 0,
    "val_check_interval": 1.0,
    "check_val_every_n_epoch": 1,
    "max_epochs": 1,
    "min_epochs": None,
    "max_steps": -1,
    "min_steps": None,
    "max_time": None,
    "fast_dev_run": False,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m maesil profile",
        description="Time a recipe's training step, its peak memory and FLOPs, the largest batch that fits and "
                    "its data loader.")
    parser.add_argument("--config", action="append", required=True, type=Path,
                        help="a YAML as given to `fit`; repeat to compose (later ones override)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a `fit` override without its dashes, e.g. data.init_args.batch_size=2 (repeatable)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    parser.add_argument("--max-batch", action="store_true", help="also find the largest batch that fits")
    parser.add_argument("--max-batch-limit", type=int, default=1024,
                        help="largest batch --max-batch tries (default 1024)")
    parser.add_argument("--max-batch-seconds", type=float, default=None,
                        help="stop the --max-batch search after this many seconds and report the largest batch "
                             "that fitted so far (default: no limit)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for the MFU (default: its dense bf16 datasheet peak)")
    parser.add_argument("--no-flops", action="store_true",
                        help="do not count FLOPs (no MFU), e.g. for a model that FlopCounterMode cannot trace")
    parser.add_argument("--loader-batches", type=int, default=10,
                        help="data loader batches timed after its first (default 10; 0: not timed)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Raises ``ValueError`` naming the argument for input the profile cannot run with."""
    for path in args.config:
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file")
    for override in args.overrides:
        if not is_override(override):
            raise ValueError(f"--set {override!r}: expected KEY=VALUE, e.g. data.init_args.batch_size=2")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.loader_batches < 0:
        raise ValueError(f"--loader-batches must be 0 or more, got {args.loader_batches}")
    if args.max_batch_limit < 1:
        raise ValueError(f"--max-batch-limit must be at least 1, got {args.max_batch_limit}")
    seconds = args.max_batch_seconds
    if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"--max-batch-seconds must be a positive number, got {seconds}")
    if args.peak_tflops is not None and not (args.peak_tflops > 0 and math.isfinite(args.peak_tflops)):
        raise ValueError(f"--peak-tflops must be a positive number, got {args.peak_tflops}")


def announce(stage: str) -> None:
    """Prints the stage the profile starts on stderr, at once."""
    print(f"[profile] {stage}", file=sys.stderr, flush=True)


def cli_arguments(configs: Sequence[Path], overrides: Sequence[str], root_dir: Path) -> list[str]:
    """The ``MaesilCLI`` arguments of ``fit`` for these configs and ``KEY=VALUE`` overrides, writing nowhere
    but ``root_dir``."""
    args = [word for config in configs for word in ("--config", str(config))]
    return [*args, *override_arguments(overrides), "--trainer.default_root_dir", str(root_dir)]


def network_name(model: Any) -> str:
    """The class of the model's largest direct submodule (its network), or the model's class."""
    children = list(model.named_children())
    if not children:
        return type(model).__name__
    from maesil.models.parameters import count_parameters

    _, largest = max(children, key=lambda item: count_parameters(item[1]))
    return type(largest).__name__


def input_size(batch: Any) -> str:
    """The spatial size of the batch's ``image`` (``"128³"`` for a cube), channels first."""
    image = batch.get("image") if isinstance(batch, dict) else None
    if image is None or image.ndim < 3:
        return "n/a"
    channels, *spatial = (int(size) for size in image.shape[1:])
    edge = f"{spatial[0]}³" if len(spatial) == 3 and len(set(spatial)) == 1 else "×".join(map(str, spatial))
    return edge if channels == 1 else f"{channels}×{edge}"


def device_name(accelerator_device: Any) -> str:
    import torch

    if accelerator_device.type == "cuda":
        return torch.cuda.get_device_name(accelerator_device)
    from maesil.profiling import cpu_count

    return f"CPU {platform.machine()} ({cpu_count()} cores, {torch.get_num_threads()} threads)"


def run_profile(args: argparse.Namespace, root_dir: Path) -> dict[str, Any]:
    """Builds the run, measures it and returns every figure (the JSON's content)."""
    from maesil.lightning_cli import MaesilCLI
    from maesil.profiling import first_batch_and_loader_time

    announce("building the run")
    with warnings.catch_warnings():  # the arguments come from here, not from sys.argv: nothing to warn about
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = MaesilCLI(args=cli_arguments(args.config, args.overrides, root_dir), run=False,
                        save_config_callback=None)
    datamodule = cli.datamodule

    def make_trainer(callbacks: list) -> Any:
        return cli.instantiate_trainer(**PROFILE_TRAINER, callbacks=list(callbacks))

    announce("preparing the data")
    datamodule.prepare_data()
    datamodule.setup("fit")
    announce(f"data loader: the first batch and {args.loader_batches} more")
    batch, loader = first_batch_and_loader_time(datamodule.train_dataloader(), args.loader_batches)

    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # every trial trainer would announce its devices and settings
    try:
        return _measure(args, cli, make_trainer, batch, loader)
    finally:
        lightning_log.setLevel(level)


def _measure(args: argparse.Namespace, cli: Any, make_trainer: Any, batch: Any, loader: Any) -> dict[str, Any]:
    """The step, memory, FLOPs and largest-batch figures of the built run, with the loader's timing."""
    from maesil.models.parameters import count_parameters
    from maesil.profiling import available_memory_bytes, known_peak_tflops, largest_batch, profile_steps

    model = cli.model
    with warnings.catch_warnings():  # one prepared batch, no workers, by design
        warnings.filterwarnings("ignore", message=r".*does not have many workers")
        warnings.filterwarnings("ignore", message=r".*(is smaller than the logging interval|Total length of)")
        announce(f"training steps: {args.warmup} warm-up, {args.steps} timed")
        steps = profile_steps(make_trainer, model, batch, args.steps, args.warmup, count_flops=not args.no_flops,
                              datamodule=cli.datamodule)
        trainer = make_trainer([])
        device = trainer.strategy.root_device
        precision = str(trainer.precision)
        name = device_name(device)
        biggest = None
        if args.max_batch:
            guard = None
            if device.type != "cuda":
                def guard(size: int) -> bool:  # stay below half the free memory, scaling the measured peak
                    free = available_memory_bytes()
                    needed = (steps.peak_rss_bytes or 0) * size / steps.batch_size
                    return free is None or needed < 0.5 * free + (steps.peak_rss_bytes or 0)
            biggest = largest_batch(make_trainer, model, batch, max(args.max_batch_limit, steps.batch_size), guard,
                                    datamodule=cli.datamodule, seconds=args.max_batch_seconds,
                                    on_trial=lambda size: announce(f"largest batch: trying {size}"))

    attention = attention_kernel(model, device, precision)
    peak = args.peak_tflops if args.peak_tflops is not None else (
        known_peak_tflops(name) if device.type == "cuda" else None)
    achieved = steps.achieved_tflops
    figures: dict[str, Any] = {
        "recipe": args.config[0].stem,
        "configs": [str(path) for path in args.config],
        "overrides": list(args.overrides),
        "method": type(model).__name__,
        "network": network_name(model),
        "input": input_size(batch),
        "batch": steps.batch_size,
        "device": name,
        "accelerator": device.type,
        "precision": precision,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "steps": args.steps,
        "warmup": args.warmup,
        "step_seconds": list(steps.step_seconds),
        "seconds_per_step_median": steps.median_seconds,
        "seconds_per_step_min": steps.min_seconds,
        "superpatches_per_second": steps.samples_per_second,
        "peak_allocated_gib": _gib(steps.peak_allocated_bytes),
        "peak_reserved_gib": _gib(steps.peak_reserved_bytes),
        "peak_rss_gib": _gib(steps.peak_rss_bytes),
        "parameters_trainable": count_parameters(model, trainable_only=True),
        "parameters_total": count_parameters(model),
        "flops_per_step": steps.flops,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": None if achieved is None or peak is None else achieved / peak,
        "largest_batch": None if biggest is None else biggest.size,
        "largest_batch_limit": None if biggest is None else biggest.limit,
        "largest_batch_stopped_by": None if biggest is None else biggest.stopped_by,
        "largest_batch_trials": None if biggest is None else [list(trial) for trial in biggest.trials],
        "loader_batches": None if loader is None else loader.batches,
        "loader_batches_per_second": None if loader is None else loader.batches_per_second,
        "loader_superpatches_per_second": None if loader is None else loader.samples_per_second,
        "bound_by": None if loader is None else (
            "data loading" if 1 / loader.batches_per_second > steps.median_seconds else "compute"),
        "attention_kernel": None if attention is None else attention.selected,
        "attention_kernels_available": None if attention is None else list(attention.available),
        "attention_head_dim": None if attention is None else attention.head_dim,
    }
    return figures


def attention_kernel(model: Any, device: Any, precision: str) -> Any:
    """The SDPA kernel report (:func:`maesil.models.attention_backend.sdpa_report`) for the first ViT attention
    of ``model`` in the dtype its precision computes attention in; None for a model without one."""
    import torch

    from maesil.models.attention_backend import sdpa_report
    from maesil.models.vit3d import Attention

    layer = next((module for module in model.modules() if isinstance(module, Attention)), None)
    if layer is None:
        return None
    dtype = (torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16")
             else torch.float32)
    return sdpa_report(layer.head_dim, dtype, device)


def _gib(value: int | None) -> float | None:
    return None if value is None else value / 1024**3


def format_report(figures: dict[str, Any]) -> str:
    """The printed block: one line per figure."""
    def number(value: float | None, digits: int = 3, unit: str = "") -> str:
        return "n/a" if value is None else f"{value:.{digits}f}{unit}"

    if figures["accelerator"] == "cuda":
        memory = (f"{number(figures['peak_allocated_gib'], 2)} GiB max allocated, "
                  f"{number(figures['peak_reserved_gib'], 2)} GiB max reserved (CUDA, timed steps)")
    else:
        memory = f"{number(figures['peak_rss_gib'], 2)} GiB peak RSS of the process"
    flops = figures["flops_per_step"]
    mfu = figures["mfu"]
    peak = figures["peak_tflops"]
    lines = [
        f"profile    {figures['recipe']}: {figures['method']} ({figures['network']}), input {figures['input']}, "
        f"batch {figures['batch']}",
        f"device     {figures['device']}, precision {figures['precision']}, {figures['steps']} timed steps after "
        f"{figures['warmup']} warm-up",
        f"step       {number(figures['seconds_per_step_median'], 4)} s/step median, "
        f"{number(figures['seconds_per_step_min'], 4)} s/step min",
        f"speed      {number(figures['superpatches_per_second'], 2)} superpatches/s",
        f"memory     {memory}",
        f"parameters {figures['parameters_trainable']:,} trainable / {figures['parameters_total']:,} total",
        f"FLOPs      {'n/a' if flops is None else f'{flops / 1e9:,.2f} GFLOP'} per training step (forward + backward)",
        f"compute    {number(figures['achieved_tflops'], 3)} TFLOP/s achieved, MFU "
        + ("n/a (FLOPs not counted)" if flops is None
           else "n/a (no peak known for this device: give --peak-tflops)" if mfu is None
           else f"{mfu:.1%} of {peak:g} TFLOP/s"),
    ]
    if figures["largest_batch"] is not None:
        tried = ", ".join(f"{size}{'' if fitted else ' ✗'}" for size, fitted in figures["largest_batch_trials"])
        lines.append(f"max batch  {figures['largest_batch']} (stopped by {figures['largest_batch_stopped_by']}, "
                     f"limit {figures['largest_batch_limit']}; tried {tried or 'nothing'})")
    if figures.get("attention_kernel") is not None:
        lines.append(f"attention  SDPA {figures['attention_kernel']} kernel (head dim {figures['attention_head_dim']}; "
                     f"available: {', '.join(figures['attention_kernels_available']) or 'none'})")
    if figures["loader_batches"] is None:
        lines.append("loader     not timed")
    else:
        lines.append(f"loader     {number(figures['loader_batches_per_second'], 2)} batches/s, "
                     f"{number(figures['loader_superpatches_per_second'], 2)} superpatches/s "
                     f"({figures['loader_batches']} batches after the first): {figures['bound_by']} bounds the step")
    return "\n".join(lines)


def write_json(path: Path, figures: dict[str, Any]) -> None:
    from maesil.files import atomic_write

    text = json.dumps(figures, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda file: file.write(text.encode()))


def profile_command(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        check_arguments(args)
    except ValueError as error:
        parser.error(str(error))
    with tempfile.TemporaryDirectory(prefix="maesil_profile_") as root:
        figures = run_profile(args, Path(root))
    print(format_report(figures))
    if args.json is not None:
        write_json(args.json, figures)
        print(f"figures written to {args.json}")
    return 0
