"""Measures a training run's step: time, peak memory, FLOPs and the largest batch that fits.

The step is the real one: the run's Lightning ``Trainer`` (precision plugin, gradient clipping, optimizer and
scheduler) trains the run's model on one prepared batch that a :class:`RepeatedBatch` hands out again and
again, already on the model's device, so that neither data loading nor the host-to-device copy is in the
figures; the run's DataModule serves it (:func:`serving`), so the method still reads the data's spec. On
CUDA every timed step is bracketed by ``torch.cuda.synchronize`` and the peak memory counters are reset
after the warm-up steps. The FLOPs of one step (forward and backward) are counted by
``torch.utils.flop_counter.FlopCounterMode`` on an extra step after the timed ones.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from torch.utils import flop_counter

#: Dense bf16 tensor-core peaks (TFLOP/s, datasheet, without sparsity), matched as substrings of
#: ``torch.cuda.get_device_name()``; the first match wins, so longer names come before their prefixes.
KNOWN_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
)


def known_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device from :data:`KNOWN_PEAK_TFLOPS`, or ``None`` when it is not listed."""
    for fragment, peak in KNOWN_PEAK_TFLOPS:
        if fragment in device_name:
            return peak
    return None


# ------------------------------------------------------------------------------------------------ batches
def batch_size_of(batch: Any) -> int:
    """The leading size of the first tensor in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            raise ValueError("a batch tensor has no batch dimension")
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        if isinstance(value, (torch.Tensor, Mapping, list, tuple)) and not _is_leaf_list(value):
            try:
                return batch_size_of(value)
            except ValueError:
                continue
    raise ValueError("the batch holds no tensor to read its size from")


def _is_leaf_list(value: Any) -> bool:
    """A list or tuple of plain values (e.g. subject ids), collated per sample."""
    return isinstance(value, (list, tuple)) and not any(
        isinstance(item, (torch.Tensor, Mapping, list, tuple)) for item in value)


def tile_batch(batch: Any, size: int, batch_size: int | None = None) -> Any:
    """``batch`` with ``size`` samples: every per-sample tensor (leading size ``batch_size``) and every list of
    per-sample values is repeated along dim 0 and cut to ``size``; anything else is kept as it is."""
    if batch_size is None:
        batch_size = batch_size_of(batch)
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0 or batch.shape[0] != batch_size:
            return batch
        repeats = -(-size // batch_size)
        return batch.repeat(repeats, *([1] * (batch.ndim - 1)))[:size].contiguous()
    if isinstance(batch, Mapping):
        return type(batch)({key: tile_batch(value, size, batch_size) for key, value in batch.items()})
    if isinstance(batch, (list, tuple)):
        if _is_leaf_list(batch) and len(batch) == batch_size:
            tiled = [batch[index % batch_size] for index in range(size)]
        else:
            tiled = [tile_batch(value, size, batch_size) for value in batch]
        return type(batch)(tiled) if isinstance(batch, list) else tuple(tiled)
    return batch


class RepeatedBatch:
    """An iterable of ``length`` copies of one batch, moved once to the model's device when training starts."""

    def __init__(self, batch: Any, length: int) -> None:
        self.batch = batch
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.length):
            yield self.batch


@contextlib.contextmanager
def serving(datamodule: L.LightningDataModule, loader: Iterable[Any]) -> Iterator[L.LightningDataModule]:
    """``datamodule`` with ``loader`` as its training loader and its data preparation (already done) skipped,
    so that the method still reads the DataModule's spec (classes, modality) while it trains on ``loader``."""
    datamodule.train_dataloader = lambda: loader  # type: ignore[method-assign]
    datamodule.prepare_data = lambda: None  # type: ignore[method-assign]
    try:
        yield datamodule
    finally:
        del datamodule.train_dataloader, datamodule.prepare_data


# ------------------------------------------------------------------------------------------------ measuring
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _cpu_flop_formulas() -> dict[Any, Callable]:
    """Formulas for CPU attention kernels that ``FlopCounterMode`` does not count by itself."""
    aten = torch.ops.aten
    formulas: dict[Any, Callable] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _attention_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _attention_backward_flops
    return formulas


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the CPU attention kernels."""
    return flop_counter.FlopCounterMode(display=False, custom_mapping=_cpu_flop_formulas())


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (``getrusage``; kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class StepProfiler(Callback):
    """Times every training step after ``warmup`` steps, reads the peak memory of the timed steps and, with
    ``count_flops``, counts the FLOPs of the step after them (which is neither timed nor in the memory peak)."""

    def __init__(self, repeated: RepeatedBatch, warmup: int, steps: int, count_flops: bool) -> None:
        self.repeated = repeated
        self.warmup = warmup
        self.steps = steps
        self.count_flops = count_flops
        self.step_seconds: list[float] = []
        self.flops: int | None = None
        self.peak_allocated: int | None = None
        self.peak_reserved: int | None = None
        self.peak_rss: int | None = None
        self._started = 0.0
        self._counter: flop_counter.FlopCounterMode | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.repeated.batch = move_data_to_device(self.repeated.batch, pl_module.device)

    def _timed(self, batch_idx: int) -> bool:
        return self.warmup <= batch_idx < self.warmup + self.steps

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        device = pl_module.device
        if batch_idx == self.warmup and device.type == "cuda":
            _synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        if self._timed(batch_idx):
            _synchronize(device)
            self._started = time.perf_counter()
        elif batch_idx == self.warmup + self.steps and self.count_flops:
            self._counter = flop_counter_mode()
            self._counter.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        device = pl_module.device
        if self._timed(batch_idx):
            _synchronize(device)
            self.step_seconds.append(time.perf_counter() - self._started)
            if batch_idx == self.warmup + self.steps - 1:
                self._read_memory(device)
        elif self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops = int(self._counter.get_total_flops())
            self._counter = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def _read_memory(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.peak_allocated = int(torch.cuda.max_memory_allocated(device))
            self.peak_reserved = int(torch.cuda.max_memory_reserved(device))
        else:
            self.peak_rss = peak_rss_bytes()


@dataclass(frozen=True)
class StepProfile:
    """The figures of the timed training steps."""

    batch_size: int
    step_seconds: tuple[float, ...]
    flops: int | None
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    peak_rss_bytes: int | None

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def min_seconds(self) -> float:
        return min(self.step_seconds)

    @property
    def samples_per_second(self) -> float:
        return self.batch_size / self.median_seconds

    @property
    def achieved_tflops(self) -> float | None:
        return None if self.flops is None else self.flops / self.median_seconds / 1e12


TrainerFactory = Callable[[list[Callback]], L.Trainer]


def profile_steps(make_trainer: TrainerFactory, model: L.LightningModule, batch: Any, steps: int, warmup: int,
                  count_flops: bool = True, datamodule: L.LightningDataModule | None = None) -> StepProfile:
    """Trains ``model`` for ``warmup + steps`` (+1 with ``count_flops``) steps on ``batch`` with a trainer
    from ``make_trainer(callbacks)`` (one epoch over a :class:`RepeatedBatch`, served by ``datamodule`` when
    given) and returns the figures."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")
    repeated = RepeatedBatch(batch, warmup + steps + int(count_flops))
    profiler = StepProfiler(repeated, warmup, steps, count_flops)
    trainer = make_trainer([profiler])
    if datamodule is None:
        trainer.fit(model, train_dataloaders=repeated)
    else:
        with serving(datamodule, repeated):
            trainer.fit(model, datamodule=datamodule)
    if len(profiler.step_seconds) != steps:
        raise RuntimeError(f"the trainer ran {len(profiler.step_seconds)} of the {steps} timed steps "
                           f"(global step {trainer.global_step}): check max_steps/max_time overrides")
    return StepProfile(batch_size_of(batch), tuple(profiler.step_seconds), profiler.flops,
                       profiler.peak_allocated, profiler.peak_reserved, profiler.peak_rss)


# ------------------------------------------------------------------------------------------------ largest batch
def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def _free_memory(model: L.LightningModule) -> None:
    model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else ``None``."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class LargestBatch:
    """The largest batch that trained, and the batch sizes tried (size, fitted)."""

    size: int
    limit: int
    trials: tuple[tuple[int, bool], ...]
    stopped_by: str  # "limit", "out of memory", "memory guard" or "time limit" (then ``size`` is a lower bound)


def largest_batch(make_trainer: TrainerFactory, model: L.LightningModule, batch: Any, limit: int,
                  fits_in_memory: Callable[[int], bool] | None = None,
                  datamodule: L.LightningDataModule | None = None, seconds: float | None = None,
                  on_trial: Callable[[int], None] | None = None,
                  clock: Callable[[], float] = time.monotonic) -> LargestBatch:
    """The largest batch size up to ``limit`` with which two training steps run: from the prepared batch's
    size, doubled until a size fails (``torch.OutOfMemoryError``) or reaches ``limit``, then bisected.

    ``fits_in_memory(size)``, when given, is asked before each try; ``False`` counts as a failure without
    running (on CPU there is no out-of-memory error to catch, only the operating system's killer).
    ``seconds`` bounds the search: no new size is tried once that many seconds have passed, and the size
    that last fitted is returned, stopped by ``"time limit"`` (each try builds a trainer and, on CUDA, may
    autotune new kernels for the new shape, so a large 3D network can take minutes). ``on_trial(size)`` is
    called before each try, e.g. to report progress.
    """
    base = batch_size_of(batch)
    if limit < base:
        raise ValueError(f"the batch size limit {limit} is below the configured batch size {base}")
    trials: list[tuple[int, bool]] = []
    reasons: dict[int, str] = {}
    started = clock()

    def out_of_time() -> bool:
        return seconds is not None and clock() - started >= seconds

    def fits(size: int) -> bool:
        if on_trial is not None:
            on_trial(size)
        if fits_in_memory is not None and not fits_in_memory(size):
            trials.append((size, False))
            reasons[size] = "memory guard"
            return False
        out_of_memory = False
        try:
            profile_steps(make_trainer, model, tile_batch(batch, size, base), steps=1, warmup=1, count_flops=False,
                          datamodule=datamodule)
        except BaseException as error:  # noqa: BLE001 (only out-of-memory errors are a result here)
            if not _is_out_of_memory(error):
                raise
            out_of_memory = True
        _free_memory(model)  # outside the except block: the traceback no longer holds the step's tensors
        trials.append((size, not out_of_memory))
        reasons[size] = "out of memory"
        return not out_of_memory

    good, bad = base, None
    while bad is None and good < limit:
        if out_of_time():
            return LargestBatch(good, limit, tuple(trials), "time limit")
        candidate = min(good * 2, limit)
        if fits(candidate):
            good = candidate
        else:
            bad = candidate
    if bad is None:
        return LargestBatch(good, limit, tuple(trials), "limit")
    first_failure = bad
    while bad - good > 1:
        if out_of_time():
            return LargestBatch(good, limit, tuple(trials), "time limit")
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return LargestBatch(good, limit, tuple(trials), reasons[first_failure])


# ------------------------------------------------------------------------------------------------ data loading
@dataclass(frozen=True)
class LoaderProfile:
    """Timing of a training data loader's batches after its first (start-up) batch."""

    batches: int
    seconds: float
    batch_size: int

    @property
    def batches_per_second(self) -> float:
        return self.batches / self.seconds

    @property
    def samples_per_second(self) -> float:
        return self.batches_per_second * self.batch_size


def first_batch_and_loader_time(loader: Iterable[Any], batches: int) -> tuple[Any, LoaderProfile | None]:
    """The loader's first batch, and the time of the ``batches`` that follow it (``None`` when 0)."""
    iterator = iter(loader)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("the training data loader yields no batch") from None
    if batches <= 0:
        del iterator
        return first, None
    started = time.perf_counter()
    count = 0
    for _ in range(batches):
        try:
            next(iterator)
        except StopIteration:
            break
        count += 1
    seconds = time.perf_counter() - started
    del iterator
    return first, (LoaderProfile(count, seconds, batch_size_of(first)) if count else None)


def cpu_count() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
