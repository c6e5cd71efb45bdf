"""``python -m maesil sweep-local SWEEP.yaml``: run a W&B grid sweep file here, one run after another, no server.

A W&B sweep file (``experiments/sweeps/mask_ratio.yaml``) is meant for ``wandb sweep`` + ``wandb agent``,
which need a W&B account and a server. This command runs the same file on one machine: it expands the grid
as the W&B grid search does (the cartesian product of every parameter's ``values``; ``value`` constants
are passed to every run), builds each run's command from the sweep's ``command`` with the agent's macros,
and runs the commands one after another as subprocesses:

* ``${env}`` is dropped, ``${interpreter}`` and a literal ``python``/``python3`` become this Python
  (``sys.executable``, so the virtual environment is the one running this command), ``${program}`` is the
  sweep's ``program``; ``${args}`` → ``--key=value``, ``${args_no_hyphens}`` → ``key=value``,
  ``${args_no_equals}`` → ``--key value``, ``${args_no_boolean_flags}``, ``${args_json}``,
  ``${args_json_file}`` and ``${envvar:NAME}`` as the agent expands them;
* every run gets ``--trainer.default_root_dir OUT/run_NNN_<values>`` after the sweep's arguments (so it
  wins), then the extra arguments given after ``--`` (e.g. a shorter schedule);
* ``WANDB_MODE`` defaults to ``offline`` (a W&B logger writes its run under the run folder; ``wandb sync``
  uploads it later); each run's output is shown and written to ``OUT/run_.../output.log``;
* a failed run is recorded (status, return code, the end of its log) and the sweep goes on.

Each run's final metrics come from its ``summary.json``, written by :class:`maesil.callbacks.RunSummary`
(in every experiment YAML), not from a logger's files. Outputs in ``OUT`` (default
``runs/sweeps/<sweep file name>``): ``results.csv`` (one row per run: parameters, effective masked
fraction, status, wall time, final metrics, with ``probe/dice`` next to the PSNR and SSIM when the runs carry
:class:`maesil.probing.LinearProbe`) and ``sweep.png`` (PSNR and SSIM, masked-region values when logged, and
probe Dice when logged, against the masked fraction, one line per combination of the other swept
parameters).

    python -m maesil sweep-local experiments/sweeps/mask_ratio.yaml -- --trainer.max_steps 200

Only grids run locally: ``random`` and ``bayes`` sweeps draw from distributions and need the W&B agent.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The linear probe's mean organ Dice on frozen encoder features (:class:`maesil.probing.LinearProbe`).
PROBE_DICE = "probe/dice"
#: Metric columns shown first (table, CSV) and plotted, masked-region values preferred.
PREFERRED_METRICS = ("val/psnr_masked", "val/ssim_masked", "val/psnr", "val/ssim", PROBE_DICE, "val/loss",
                     "train/loss")
#: Metrics of the end-of-sweep table and of each run's closing line, when logged.
TABLE_METRICS = PREFERRED_METRICS[:5]
PSNR_KEYS = ("val/psnr_masked", "val/psnr")
SSIM_KEYS = ("val/ssim_masked", "val/ssim")
EFFECTIVE = "effective_mask_ratio"
ENVVAR_MACRO = re.compile(r"\$\{envvar:([A-Za-z0-9_]*)\}")


class SweepError(Exception):
    """A sweep file that cannot run locally; the message names the file and the problem."""


@dataclass
class Sweep:
    """A parsed W&B grid sweep: each parameter's values (a constant is a one-value list) and the command."""

    path: Path
    method: str
    parameters: dict[str, list[Any]]
    command: list[str]
    program: str | None = None
    metric: dict[str, str] = field(default_factory=dict)

    @property
    def swept(self) -> list[str]:
        """Parameters with more than one value: the ones that tell runs apart."""
        return [key for key, values in self.parameters.items() if len(values) > 1]


@dataclass
class RunResult:
    """One run of the sweep: what it ran with, how it ended, and its final metrics."""

    name: str
    params: dict[str, Any]
    run_dir: Path
    command: list[str]
    status: str = "pending"  # finished | failed | interrupted
    returncode: int | None = None
    wall_s: float = 0.0
    global_step: int | None = None
    effective_mask_ratio: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""


def load_sweep(path: Path) -> Sweep:
    """Reads and validates a W&B sweep YAML for a local grid run.

    Raises:
        SweepError: missing or unreadable file, bad YAML, a method other than ``grid``, parameters that are
            not ``values`` lists or ``value`` constants, or no ``command``.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found")
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SweepError(f"{path}: not a readable YAML sweep file: {error}") from None
    if not isinstance(config, dict):
        raise SweepError(f"{path}: a sweep file is a YAML mapping with method, parameters and command")
    method = config.get("method", "grid")
    if method != "grid":
        raise SweepError(
            f"{path}: method {method!r}: sweep-local runs grids only (method: grid with `values` lists); "
            f"run a {method} sweep with `wandb sweep {path}` and `wandb agent`"
        )
    raw = config.get("parameters")
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"{path}: no `parameters` mapping (e.g. model.init_args.mask_ratio: {{values: [0.5, 0.75]}})")
    parameters: dict[str, list[Any]] = {}
    for key, spec in raw.items():
        if isinstance(spec, dict) and isinstance(spec.get("values"), list) and spec["values"]:
            parameters[str(key)] = list(spec["values"])
        elif isinstance(spec, dict) and "value" in spec:
            parameters[str(key)] = [spec["value"]]
        elif isinstance(spec, dict) and ("distribution" in spec or "min" in spec or "max" in spec):
            raise SweepError(
                f"{path}: parameter {key!r} is a distribution; sweep-local runs grids only, give it `values: [...]`"
            )
        else:
            raise SweepError(f"{path}: parameter {key!r} needs `values: [...]` (a non-empty list) or `value: ...`, "
                             f"got {spec!r}")
    command = config.get("command")
    if not isinstance(command, list) or not command:
        raise SweepError(
            f"{path}: no `command` list; sweep-local needs one, e.g. [${{env}}, python, -m, maesil, fit, "
            f"--config, experiments/pretrain/maesil_demo.yaml, ${{args}}]"
        )
    metric = config.get("metric") or {}
    if not isinstance(metric, dict):
        raise SweepError(f"{path}: `metric` must be a mapping with name and goal, got {metric!r}")
    program = config.get("program")
    return Sweep(path=path, method=method, parameters=parameters, command=[str(c) for c in command],
                 program=None if program is None else str(program), metric=metric)


def expand_grid(sweep: Sweep) -> list[dict[str, Any]]:
    """Every combination of the parameters' values, first parameter slowest (the cartesian product)."""
    keys = list(sweep.parameters)
    return [dict(zip(keys, combination)) for combination in itertools.product(*sweep.parameters.values())]


def run_name(index: int, params: dict[str, Any], swept: Sequence[str]) -> str:
    """``run_003_mask_ratio-0.6_masking-tube``: the index and the swept values, safe as a folder name."""
    parts = [f"{key.rsplit('.', 1)[-1]}-{params[key]}" for key in swept]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-")
    return f"run_{index:03d}" + (f"_{slug[:80]}" if slug else "")


def macro_values(sweep: Sweep, params: dict[str, Any], json_file: Path) -> dict[str, list[str]]:
    """What each ``${macro}`` of a sweep command expands to, as ``wandb agent`` builds it
    (``wandb.sdk.launch.sweeps.utils.create_sweep_command_args``), with this Python as the interpreter."""
    flags = [f"{key}={value}" for key, value in params.items()]
    no_booleans = [f"--{key}" if value is True else f"--{key}={value}"
                   for key, value in params.items() if value is not False]
    return {
        "env": [],
        "interpreter": [sys.executable],
        "program": [sweep.program] if sweep.program else [],
        "args": ["--" + flag for flag in flags],
        "args_no_hyphens": flags,
        "args_no_equals": [item for key, value in params.items() for item in (f"--{key}", str(value))],
        "args_no_boolean_flags": no_booleans,
        "args_json": [json.dumps(params)],
        "args_json_file": [str(json_file)],
        "args_append_hydra": ["+" + flag for flag in flags],
        "args_override_hydra": ["++" + flag for flag in flags],
    }


def build_command(sweep: Sweep, params: dict[str, Any], run_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    """The command line of one run: the sweep's ``command`` with its macros expanded, then
    ``--trainer.default_root_dir run_dir`` and ``extra``."""
    values = macro_values(sweep, params, run_dir / "sweep_args.json")
    command: list[str] = []
    for token in sweep.command:
        if token.startswith("${") and token.endswith("}") and token[2:-1] in values:
            command += values[token[2:-1]]
        elif token in ("python", "python3") and not command:
            command.append(sys.executable)
        elif token.startswith("${") and token.endswith("}") and not ENVVAR_MACRO.fullmatch(token):
            raise SweepError(f"{sweep.path}: unknown macro {token} in command")
        else:
            command.append(ENVVAR_MACRO.sub(lambda m: os.environ.get(m.group(1), m.group(1)), token))
    if not command:
        raise SweepError(f"{sweep.path}: command {sweep.command} expands to nothing")
    return [*command, "--trainer.default_root_dir", str(run_dir), *extra]


def check_config_paths(sweep: Sweep, command: Sequence[str]) -> None:
    """Fails before the first run when a ``--config`` file of the command does not exist from here."""
    pairs = list(zip(command, command[1:]))
    pairs += [tuple(token.split("=", 1)) for token in command if token.startswith("--config=")]
    for flag, value in pairs:
        if flag == "--config" and not Path(value).exists():
            raise SweepError(
                f"{sweep.path}: the command's --config {value} does not exist in {Path.cwd()}; run sweep-local "
                f"from the folder the sweep's paths are relative to (the repository root), as `wandb agent` would"
            )


def run_process(command: Sequence[str], log_path: Path, env: dict[str, str], echo: bool) -> int:
    """Runs ``command``, copying its output (stdout and stderr) to ``log_path`` and, with ``echo``, to stdout."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8", errors="replace") as log_file:
        log_file.write("$ " + shlex.join(command) + "\n")
        log_file.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                   text=True, encoding="utf-8", errors="replace", bufsize=1)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log_file.write(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            return process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file ('' when unreadable)."""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_summary(run_dir: Path) -> dict | None:
    """The run's ``summary.json`` (:class:`maesil.callbacks.RunSummary`), or None when absent or unreadable."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def mask_ratio_from_config(run_dir: Path) -> float | None:
    """The masked fraction from the run's saved ``config.yaml``, for runs without ``effective_mask_ratio``
    in their summary: :func:`maesil.models.masking.expected_mask_ratio` of its model settings.

    The superpatch is the data's ``superpatch_size`` (the model follows it), or the model's own in configs
    that state it there (``superpatch_size``, or ``img_size`` in older ones); the token edge is ``token_size``
    (``patch_size`` in older configs)."""
    import yaml

    from maesil.models.masking import expected_mask_ratio
    from maesil.shapes import as_triple

    for path in sorted(run_dir.glob("**/config.yaml")):
        try:
            config = yaml.safe_load(path.read_text()) or {}
            args = (config.get("model") or {}).get("init_args") or {}
            data_args = (config.get("data") or {}).get("init_args") or {}
            masking, ratio = args.get("masking"), args.get("mask_ratio")
            if masking is None or ratio is None:
                continue
            size = args.get("superpatch_size") or args.get("img_size") or data_args.get("superpatch_size") or 128
            token = args.get("token_size") or args.get("patch_size") or 8
            grid = tuple(edge // int(token) for edge in as_triple(size, "superpatch_size"))
            axial = args.get("axial_mask_ratio") if masking == "dual" else None
            return expected_mask_ratio(masking, grid, float(ratio), None if axial is None else float(axial))
        except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
            continue
    return None


def collect(result: RunResult) -> None:
    """Fills ``result`` from the run folder: final metrics, step and masked fraction."""
    summary = read_summary(result.run_dir)
    if summary is None:
        result.note = (f"no summary.json in {result.run_dir}: metrics missing (the run's config has no "
                       f"maesil.callbacks.RunSummary callback, or it stopped before fitting)")
    else:
        result.metrics = {key: float(value) for key, value in (summary.get("metrics") or {}).items()
                          if isinstance(value, (int, float))}
        result.global_step = summary.get("global_step")
        result.effective_mask_ratio = summary.get(EFFECTIVE)
        if summary.get("error"):
            result.note = str(summary["error"])[:300]
    if result.effective_mask_ratio is None:
        result.effective_mask_ratio = mask_ratio_from_config(result.run_dir)


def metric_columns(results: Sequence[RunResult]) -> list[str]:
    """Every metric any run logged, preferred ones first, then validation, then the rest, sorted."""
    keys = {key for result in results for key in result.metrics}
    ordered = [key for key in PREFERRED_METRICS if key in keys]
    rest = sorted(keys - set(ordered), key=lambda key: (not key.startswith("val"), key))
    return ordered + rest


def write_results_csv(results: Sequence[RunResult], sweep: Sweep, path: Path) -> Path:
    """``results.csv``: one row per run; a missing value is an empty cell."""
    metrics = metric_columns(results)
    fields = ["run", *sweep.parameters, EFFECTIVE, "status", "returncode", "wall_s", "global_step", *metrics,
              "run_dir", "note"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for result in results:
            row: dict[str, Any] = {"run": result.name, **result.params, "status": result.status,
                                   "returncode": result.returncode, "wall_s": f"{result.wall_s:.1f}",
                                   "global_step": result.global_step, "run_dir": str(result.run_dir),
                                   "note": result.note}
            row[EFFECTIVE] = "" if result.effective_mask_ratio is None else f"{result.effective_mask_ratio:.6g}"
            row.update({key: repr(result.metrics[key]) for key in metrics if key in result.metrics})
            writer.writerow(row)
    return path


def x_parameter(sweep: Sweep, x: str) -> str | None:
    """The swept parameter that ``--x`` names (full key or last component), or the one named like ``mask_ratio``."""
    swept = sweep.swept
    if x not in ("auto", EFFECTIVE):
        matches = [key for key in swept if x in (key, key.rsplit(".", 1)[-1])]
        if not matches:
            raise SweepError(f"{sweep.path}: --x {x} is not a swept parameter ({', '.join(swept) or 'none'}) "
                             f"nor {EFFECTIVE}")
        return matches[0]
    named = [key for key in swept if key.rsplit(".", 1)[-1] == "mask_ratio"] or \
            [key for key in swept if "mask_ratio" in key] or \
            [key for key in swept if all(isinstance(v, (int, float)) for v in sweep.parameters[key])]
    return named[0] if named else None


def sweep_figure(results: Sequence[RunResult], sweep: Sweep, x: str = "auto") -> Figure | None:
    """PSNR and SSIM (masked-region values when logged), and probe Dice when logged, against the x value, one line
    per combination of the other swept values; None when no run has metrics.

    ``x="auto"`` plots against the effective masked fraction when every run recorded it (for ``dual``
    masking the swept ``mask_ratio`` is only the tube ratio, so the fraction is the comparable axis), else
    against the parameter named like ``mask_ratio``; ``x`` may also name a swept parameter.
    """
    from matplotlib.figure import Figure

    done = [r for r in results if r.metrics]
    if not done:
        return None
    param = x_parameter(sweep, x)
    use_effective = x == EFFECTIVE or (x == "auto" and all(r.effective_mask_ratio is not None for r in done))
    if not use_effective and param is None:
        raise SweepError(f"{sweep.path}: no numeric swept parameter to plot against; pass --x")
    groups_keys = [key for key in sweep.swept if key != param]
    psnr_key = next((k for k in PSNR_KEYS if any(k in r.metrics for r in done)), None)
    ssim_key = next((k for k in SSIM_KEYS if any(k in r.metrics for r in done)), None)
    probe_key = PROBE_DICE if any(PROBE_DICE in r.metrics for r in done) else None
    panels = [key for key in (psnr_key, ssim_key, probe_key) if key]
    if not panels:
        return None
    figure = Figure(figsize=(5.2 * len(panels), 4.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    groups: dict[tuple, list[RunResult]] = {}
    for result in done:
        groups.setdefault(tuple(result.params[key] for key in groups_keys), []).append(result)

    def x_of(result: RunResult) -> float:
        return float(result.effective_mask_ratio if use_effective else result.params[param])

    for axis, key in zip(axes, panels):
        for group, members in groups.items():
            points = sorted((x_of(r), r.metrics[key]) for r in members
                            if key in r.metrics and math.isfinite(r.metrics[key]))
            if points:
                label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(groups_keys, group)) or "runs"
                axis.plot(*zip(*points), marker="o", label=label)
        axis.set_xlabel("masked fraction (effective)" if use_effective else param.rsplit(".", 1)[-1])
        axis.set_ylabel(key + (" (dB)" if "psnr" in key else ""))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{sweep.path.name}: final values of {len(done)} run(s)", fontsize=10)
    return figure


def plot_sweep(results: Sequence[RunResult], sweep: Sweep, path: Path, x: str = "auto") -> Path | None:
    """Saves :func:`sweep_figure` as ``path`` (PNG); None, and no file, when no run has metrics."""
    figure = sweep_figure(results, sweep, x)
    if figure is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def format_table(results: Sequence[RunResult], sweep: Sweep) -> str:
    """The end-of-sweep table: run, swept values, masked fraction, status, wall time, main metrics (probe Dice
    beside the reconstruction metrics when the runs logged it)."""
    metrics = [key for key in TABLE_METRICS if any(key in r.metrics for r in results)]
    header = ["run", *[key.rsplit(".", 1)[-1] for key in sweep.swept], "masked", "status", "wall (s)",
              *[key.removeprefix("val/") for key in metrics]]
    rows = [header]
    for r in results:
        masked = "" if r.effective_mask_ratio is None else f"{r.effective_mask_ratio:.3f}"
        status = r.status if r.returncode in (0, None) else f"{r.status} ({r.returncode})"
        values = [f"{r.metrics[key]:.4f}" if key in r.metrics else "-" for key in metrics]
        rows.append([r.name, *[str(r.params[key]) for key in sweep.swept], masked, status, f"{r.wall_s:.1f}", *values])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def best_run(results: Sequence[RunResult], sweep: Sweep, name: str | None = None) -> RunResult | None:
    """The run with the best final value of ``name`` (default: the sweep's ``metric``, maximised unless its goal
    is ``minimize``; any other name is maximised); None without metric or values."""
    goal = "maximize" if name is not None and name != sweep.metric.get("name") else sweep.metric.get("goal")
    name = name or sweep.metric.get("name")
    scored = [r for r in results if name in r.metrics and math.isfinite(r.metrics[name])]
    if not name or not scored:
        return None
    pick = min if goal == "minimize" else max
    return pick(scored, key=lambda r: r.metrics[name])


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def plan_runs(sweep: Sweep, out: Path, extra: Sequence[str] = (), max_runs: int | None = None) -> list[RunResult]:
    """The runs of the grid (the first ``max_runs``), each with its folder under ``out`` and its command."""
    results = []
    for index, params in enumerate(expand_grid(sweep)[:max_runs]):
        name = run_name(index, params, sweep.swept)
        results.append(RunResult(name=name, params=params, run_dir=out / name,
                                 command=build_command(sweep, params, out / name, extra)))
    return results


def run_sweep(sweep: Sweep, out: Path, extra: Sequence[str] = (), max_runs: int | None = None,
              echo: bool = True) -> list[RunResult]:
    """Runs the grid (at most ``max_runs`` runs) one run after another and returns their results.

    Ctrl-C stops the current run (recorded as ``interrupted``) and the sweep; the runs up to it are returned.
    """
    results = plan_runs(sweep, out, extra, max_runs)
    for result in results[:1]:
        check_config_paths(sweep, result.command)
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("PYTHONUNBUFFERED", "1")
    total = math.prod(len(values) for values in sweep.parameters.values())
    print(f"sweep-local: {sweep.path}: {len(results)} of {total} run(s) into {out} (WANDB_MODE={env['WANDB_MODE']})",
          flush=True)
    for index, result in enumerate(results, start=1):
        result.run_dir.mkdir(parents=True, exist_ok=True)
        (result.run_dir / "summary.json").unlink(missing_ok=True)  # never read a previous sweep's results
        if any(token == str(result.run_dir / "sweep_args.json") for token in result.command):
            (result.run_dir / "sweep_args.json").write_text(json.dumps(result.params))
        values = ", ".join(f"{key.rsplit('.', 1)[-1]}={result.params[key]}" for key in sweep.parameters)
        print(f"\n== [{index}/{len(results)}] {result.name}: {values}\n$ {shlex.join(result.command)}", flush=True)
        start = time.perf_counter()
        try:
            result.returncode = run_process(result.command, result.run_dir / "output.log", env, echo)
        except KeyboardInterrupt:
            result.status, result.wall_s = "interrupted", time.perf_counter() - start
            collect(result)
            print(f"\nsweep-local: interrupted during {result.name}; {len(results) - index} run(s) not started",
                  file=sys.stderr)
            return results[:index]
        result.wall_s = time.perf_counter() - start
        result.status = "finished" if result.returncode == 0 else "failed"
        collect(result)
        line = f"== [{index}/{len(results)}] {result.name}: {result.status} in {format_seconds(result.wall_s)}"
        if result.returncode:
            print(f"{line} (exit code {result.returncode}); last lines of {result.run_dir / 'output.log'}:\n"
                  f"{tail(result.run_dir / 'output.log')}", flush=True)
        else:
            shown = {key: result.metrics[key] for key in TABLE_METRICS if key in result.metrics}
            print(line + ("; " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) if shown else
                          f"; {result.note}"), flush=True)
    return results


def report(results: Sequence[RunResult], sweep: Sweep, out: Path, x: str, wall_s: float) -> None:
    """Writes ``results.csv`` and ``sweep.png`` and prints the table, the best run and the total wall time."""
    csv_path = write_results_csv(results, sweep, out / "results.csv")
    plot_path = plot_sweep(results, sweep, out / "sweep.png", x=x)
    print("\n" + format_table(results, sweep))
    best = best_run(results, sweep)
    if best is not None:
        print(f"\nbest {sweep.metric['name']} ({sweep.metric.get('goal', 'maximize')}): {best.name} "
              f"{best.metrics[sweep.metric['name']]:.4f}")
    best_probe = best_run(results, sweep, PROBE_DICE) if sweep.metric.get("name") != PROBE_DICE else None
    if best_probe is not None:
        print(f"best {PROBE_DICE} (maximize): {best_probe.name} {best_probe.metrics[PROBE_DICE]:.4f}")
    failed = [r.name for r in results if r.status != "finished"]
    missing = [r.name for r in results if r.status == "finished" and not r.metrics]
    if failed:
        print(f"{len(failed)} run(s) did not finish: {', '.join(failed)} (see their output.log)")
    if missing:
        print(f"{len(missing)} run(s) wrote no summary.json, their metrics are missing: {', '.join(missing)}")
    print(f"\nresults: {csv_path}")
    print(f"plot:    {plot_path}" if plot_path else "plot:    none (no run has metrics)")
    print(f"{len(results)} run(s) in {format_seconds(wall_s)} ({wall_s:.1f} s)")


def sweep_local_command(argv: Sequence[str]) -> int:
    """Entry point of ``python -m maesil sweep-local``; returns the exit code (1 when a run failed)."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m maesil sweep-local",
        usage="%(prog)s SWEEP.yaml [--out DIR] [--max-runs N] [--x X] [--quiet] [-- RUN_ARGS ...]",
        description="Run a W&B grid sweep file here, one run after another, without a W&B server (runs log "
        "offline). Arguments after -- are appended to every run's command. Writes OUT/results.csv and "
        "OUT/sweep.png.",
        epilog="example:\n  python -m maesil sweep-local experiments/sweeps/mask_ratio.yaml -- --trainer.max_steps 200",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep", type=Path, help="W&B sweep YAML with method: grid")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the run folders, results.csv and sweep.png (default runs/sweeps/<sweep name>)")
    parser.add_argument("--max-runs", type=int, default=None, help="run only the first N combinations")
    parser.add_argument("--x", default="auto",
                        help="x axis of the plot: effective_mask_ratio, a swept parameter (e.g. mask_ratio), or auto "
                             "(the effective masked fraction when every run recorded it)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the runs' output (it is still in output.log)")
    args = parser.parse_args(argv)
    if args.max_runs is not None and args.max_runs < 1:
        parser.error("--max-runs must be >= 1")
    out = args.out or Path("runs/sweeps") / args.sweep.stem
    start = time.perf_counter()
    try:
        sweep = load_sweep(args.sweep)
        if args.x != "auto":
            x_parameter(sweep, args.x)  # a bad --x fails now, not after the runs
        results = run_sweep(sweep, out, extra, args.max_runs, echo=not args.quiet)
    except SweepError as error:
        print(f"sweep-local: {error}", file=sys.stderr)
        return 1
    report(results, sweep, out, args.x, time.perf_counter() - start)
    if any(r.status == "interrupted" for r in results):
        return 130
    return 0 if all(r.status == "finished" for r in results) else 1
