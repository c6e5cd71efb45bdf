"""Opt-in speed settings that every method takes: ``torch.compile`` of its networks and the channels_last_3d layout.

Every method's constructor accepts these keyword arguments besides its own (:func:`accepts_speed_options`
adds them), all off by default::

    model:
      init_args:
        compile: true                # torch.compile each network of the method
        compile_mode: max-autotune   # optional: torch.compile's mode (default, reduce-overhead, max-autotune...)
        compile_backend: inductor    # optional: torch.compile's backend (inductor, aot_eager, eager...)
        channels_last: true          # CNNs: 5-D weights and inputs in channels_last_3d

Networks are compiled in place (``nn.Module.compile``), so ``state_dict`` keys, checkpoints and exports are
the same as without compilation (no ``_orig_mod.`` prefix). The first optimizer step of a compiled run
includes the compilation; the method prints its time and the second step's. These are settings of the run,
not of the trained network: they are not hyperparameters and do not travel with checkpoints.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["COMPILE_MODES", "SPEED_ARGUMENTS", "SpeedOptions", "accepts_speed_options", "channels_last_networks",
           "compile_networks", "constructor_signatures", "networks", "to_channels_last"]

#: The modes ``torch.compile`` takes.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class SpeedOptions:
    """How a method runs its networks.

    Attributes:
        compile: compile each network with ``torch.compile`` (``nn.Module.compile``, in place).
        compile_mode: torch.compile's ``mode``; None: its default.
        compile_backend: torch.compile's ``backend``.
        channels_last: keep 5-D weights and batch tensors in ``torch.channels_last_3d`` (faster convolutions
            on GPUs with tensor cores; no effect on the results beyond rounding).
    """

    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.init_args.compile_mode must be one of {', '.join(COMPILE_MODES)} or null, got "
                             f"{self.compile_mode!r}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(f"model.init_args.compile_backend must be a backend name such as 'inductor', got "
                             f"{self.compile_backend!r}")


#: The constructor arguments of :class:`SpeedOptions`.
SPEED_ARGUMENTS = ("compile", "compile_mode", "compile_backend", "channels_last")

_SPEED_PARAMETERS = [
    inspect.Parameter("compile", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool),
    inspect.Parameter("compile_mode", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=str | None),
    inspect.Parameter("compile_backend", inspect.Parameter.KEYWORD_ONLY, default="inductor", annotation=str),
    inspect.Parameter("channels_last", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool),
]


def accepts_speed_options(init: Callable[..., None]) -> Callable[..., None]:
    """Wraps a method's ``__init__`` so that it also takes the keyword arguments of :class:`SpeedOptions`
    and stores them as ``self.speed_options``.

    The wrapper's signature is the constructor's plus these arguments, so LightningCLI (jsonargparse) accepts
    ``model.init_args.compile`` etc. for every method. They are set after the constructor and are not
    hyperparameters: Lightning's ``save_hyperparameters`` reads the constructor's own arguments from its frame
    by its signature, so it runs within :func:`constructor_signatures`.
    """
    if getattr(init, "_maesil_speed_options", False):
        return init

    @functools.wraps(init)
    def initialise(self: nn.Module, *args: Any, compile: bool = False, compile_mode: str | None = None,
                   compile_backend: str = "inductor", channels_last: bool = False, **kwargs: Any) -> None:
        options = SpeedOptions(compile=bool(compile), compile_mode=compile_mode, compile_backend=compile_backend,
                               channels_last=bool(channels_last))
        init(self, *args, **kwargs)
        self.speed_options = options

    signature = inspect.signature(init)
    parameters = list(signature.parameters.values())
    names = {parameter.name for parameter in parameters}
    clashes = names & {parameter.name for parameter in _SPEED_PARAMETERS}
    if clashes:
        raise TypeError(f"{init.__qualname__} has its own {sorted(clashes)}, which every method takes as speed options")
    tail = [parameter for parameter in parameters if parameter.kind is inspect.Parameter.VAR_KEYWORD]
    head = [parameter for parameter in parameters if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
    initialise.__signature__ = signature.replace(parameters=head + _SPEED_PARAMETERS + tail)  # type: ignore[attr-defined]
    initialise._maesil_speed_options = True  # type: ignore[attr-defined]
    return initialise


def networks(module: nn.Module) -> list[nn.Module]:
    """The networks of a method: its direct submodules that hold parameters, without metrics (torchmetrics)."""
    from torchmetrics import Metric, MetricCollection

    return [child for child in module.children()
            if not isinstance(child, (Metric, MetricCollection)) and any(True for _ in child.parameters())]


def compile_networks(modules: list[nn.Module], options: SpeedOptions) -> None:
    """Compiles each module in place with ``options``' mode and backend; a module compiled before is left."""
    for module in modules:
        if getattr(module, "_compiled_call_impl", None) is None:
            module.compile(mode=options.compile_mode, backend=options.compile_backend)


def channels_last_networks(modules: list[nn.Module]) -> None:
    """Stores every 5-D parameter and buffer of each module in ``torch.channels_last_3d`` (in place; values and
    ``state_dict`` keys unchanged) and converts the 5-D inputs of each module's calls alike (a forward
    pre-hook, :func:`to_channels_last`). A module converted before is left."""
    for module in modules:
        if getattr(module, "_maesil_channels_last", False):
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.dim() == 5:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last_3d)
        module.register_forward_pre_hook(_inputs_to_channels_last, with_kwargs=True)
        module._maesil_channels_last = True


def _inputs_to_channels_last(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return to_channels_last(args), to_channels_last(kwargs)


def to_channels_last(value: Any) -> Any:
    """``value`` with every 5-D floating-point tensor in ``torch.channels_last_3d``, through dicts, lists and
    tuples (a batch); other values are returned as they are."""
    if isinstance(value, Tensor):
        if value.dim() == 5 and value.is_floating_point():
            return value.contiguous(memory_format=torch.channels_last_3d)
        return value
    if isinstance(value, dict):
        return {key: to_channels_last(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_channels_last(item) for item in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(to_channels_last(item) for item in value)
    return value


@contextmanager
def constructor_signatures(cls: type) -> Iterator[None]:
    """Within it, the constructors of ``cls`` and its bases show their own signatures, without the speed
    options, which their frames do not hold (Lightning's ``save_hyperparameters`` reads each constructor's
    arguments from its frame by the signature)."""
    wrapped = [init for init in (vars(klass).get("__init__") for klass in cls.__mro__)
               if getattr(init, "_maesil_speed_options", False)]
    signatures = [init.__dict__.pop("__signature__") for init in wrapped]
    try:
        yield
    finally:
        for init, signature in zip(wrapped, signatures):
            init.__signature__ = signature
