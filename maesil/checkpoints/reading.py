"""The one checkpoint reader: tensors and metadata of a ``.ckpt`` or an exported ``.safetensors``, safely.

A ``.ckpt`` is a pickle, and unpickling can run any code. :func:`load_checkpoint_state` reads checkpoints
with ``torch.load(weights_only=True)`` and allows only the few plain types that maesil's own checkpoints
hold (:func:`checkpoint_safe_globals`). Anything else is refused with :class:`UnsafeCheckpointError`; there
is no fallback to full unpickling. Exported encoders are ``.safetensors`` files (no code at all) with a JSON
sidecar. Every place that reads a checkpoint (fine-tuning, export, compare-init, benchmark-recon) goes
through this reader.

Private internals:
    To name the type that made a refused file unsafe, the reader scans a zip checkpoint with the public
    :func:`torch.serialization.get_unsafe_globals_in_checkpoint`; for a legacy (non-zip) file, which that
    function cannot read, it parses the text of torch's ``UnpicklingError`` (``WeightsUnpickler error: ...
    GLOBAL module.name``). That text is not an API: tested with torch 2.13. When it changes, the refusal
    still happens but names no type; ``tests/checkpoints/test_reading.py`` fails loudly on the new text.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from maesil.checkpoints.export_format import SAFETENSORS_METADATA_KEY, sidecar_path

__all__ = ["ACCEPTED_FORMATS", "CheckpointError", "UnsafeCheckpointError", "checkpoint_safe_globals", "load_checkpoint_state"]

FileKind = Literal["zip", "pickle", "safetensors", "unknown"]

#: The sentence every "not a usable file" error ends with.
ACCEPTED_FORMATS = (
    "Accepted: a maesil checkpoint (.ckpt), a maesil export (.safetensors + .json), an nnssl / nnU-Net checkpoint "
    "(torch.save dict with 'network_weights' under nnU-Net's ResidualEncoderUNet names), or a state dict of a "
    "MONAI ViT / UNETR (.pt or .safetensors)."
)


class CheckpointError(ValueError):
    """A file that cannot serve as pretrained weights (not a checkpoint, no matching keys, ...)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint refused because reading it would need arbitrary (code-executing) unpickling."""


def checkpoint_safe_globals() -> list[Any]:
    """The non-tensor Python types allowed when unpickling a checkpoint with ``weights_only=True``.

    Checkpoints written through ``python -m maesil fit`` need none: LightningCLI stores the hyperparameters as
    plain config dicts. Modules and DataModules built in Python store their ``__init__`` arguments as given,
    and maesil's signatures let two non-plain types in:

    * :class:`pathlib.PosixPath` (e.g. ``VolumeDataModule(data_dir=Path(...))``): rebuilt by calling the class
      with its string parts, which only builds a path object (no file-system access);
    * :class:`maesil.data.views.ViewSettings` (``VolumeDataModule(views=ViewSettings(...))``): a plain
      dataclass without ``__setstate__``/``__reduce__``, rebuilt by ``object.__new__`` plus a ``__dict__``
      update of numbers and tuples; none of its code runs.
    """
    from maesil.data.views import ViewSettings

    return [Path("").__class__, ViewSettings]  # PosixPath (WindowsPath on Windows)


def _file_kind(path: Path) -> FileKind:
    """What the first bytes say: ``torch.save`` zip, legacy ``torch.save`` / raw pickle, safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) == 9:
        header_size = int.from_bytes(head[:8], "little")
        if 0 < header_size <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":  # pickle PROTO opcode
        return "pickle"
    return "unknown"


def _refused_globals(path: Path, kind: FileKind, error: Exception) -> list[str]:
    """The globals that made a weights-only load fail (read without executing anything)."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in checkpoint_safe_globals()}
    names: list[str] = []
    if kind == "zip":
        try:  # a static scan of the pickle opcodes (pickletools), nothing is executed
            names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if n not in allowed]
        except Exception:  # noqa: BLE001 - the error message below is the fallback
            names = []
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    return list(dict.fromkeys(names))


def _torch_load(path: Path, kind: FileKind) -> Any:
    """``torch.load(weights_only=True)`` with :func:`checkpoint_safe_globals`; refusals become clear errors."""
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()), warnings.catch_warnings():
            # A file pickled with another protocol than torch.save's (e.g. pickle.dump of a state dict) reads
            # fine; torch's warning about it would only confuse. Scoped to this call.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        names = _refused_globals(path, kind, error)
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        what = (f" (it references {', '.join(names)})" if names
                else f" (the weights-only unpickler stopped at: {reason.group(1).strip()})" if reason else "")
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it would need arbitrary unpickling{what}, which can execute code. Only "
            "tensors, plain containers and maesil's known-safe types are read (weights_only=True). If you trust "
            "the file, convert it to a state dict of tensors or a .safetensors file first."
        ) from None
    except Exception as error:  # noqa: BLE001 - corrupt zip, truncated file, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error}).") from None


def _tensor_dict(candidate: Any, allow_empty: bool = False) -> dict[str, Tensor] | None:
    """``candidate`` as a state dict (string keys, tensor values), or None when it is not one."""
    if isinstance(candidate, Mapping) and (candidate or allow_empty) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in candidate.items()
    ):
        return dict(candidate)
    return None


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}).") from None
    sidecar = sidecar_path(path)
    metadata: dict = {}
    if sidecar.is_file():
        try:
            metadata = json.loads(sidecar.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{sidecar}: the JSON sidecar of {path} cannot be read ({error}).") from None
    elif SAFETENSORS_METADATA_KEY in header:
        metadata = json.loads(header[SAFETENSORS_METADATA_KEY])
    return state, metadata


def load_checkpoint_state(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Reads the tensors of a maesil checkpoint or exported encoder, without unsafe unpickling.

    Args:
        path: a Lightning ``.ckpt`` (or any ``torch.save`` file holding a state dict) or a ``.safetensors``
            file written by :func:`~maesil.checkpoints.export_encoder` (its ``.json`` sidecar, when present,
            is the metadata).

    Returns:
        ``(state_dict, metadata)``. For a Lightning checkpoint the metadata holds ``hyper_parameters`` and
        ``datamodule_hyper_parameters`` (as saved, possibly empty), plus ``global_step``; its state dict may
        be empty (a module without parameters). For an nnssl / nnU-Net checkpoint the state is its
        ``network_weights`` and the metadata ``{"format": "nnssl", "nnssl_adaptation_plan": ...}``. For a bare state dict the metadata is empty; for an exported
        file it is the sidecar JSON (``method``, ``architecture``, ``preprocessing``...).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the pickle needs types outside :func:`checkpoint_safe_globals` (never unpickled).
        CheckpointError: neither a PyTorch checkpoint nor a safetensors file, or no state dict inside.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file.")
    kind = _file_kind(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    if kind == "unknown":
        raise CheckpointError(
            f"{path}: neither a PyTorch checkpoint (.ckpt/.pt written by torch.save) nor a .safetensors file. "
            + ACCEPTED_FORMATS
        )
    content = _torch_load(path, kind)
    state = _tensor_dict(content)
    if state is not None:  # torch.save(model.state_dict())
        return state, {}
    if isinstance(content, Mapping):
        state = _tensor_dict(content.get("network_weights"))
        if state is not None:  # nnssl / nnU-Net: torch.save({"network_weights": ..., "nnssl_adaptation_plan": ...})
            plan = content.get("nnssl_adaptation_plan")
            return state, {"format": "nnssl" if isinstance(plan, Mapping) else "nnunet",
                           "nnssl_adaptation_plan": dict(plan) if isinstance(plan, Mapping) else None}
        for key in ("state_dict", "model"):
            state = _tensor_dict(content.get(key), allow_empty=key == "state_dict")
            if state is not None:
                metadata = {
                    "hyper_parameters": dict(content.get("hyper_parameters") or {}),
                    "datamodule_hyper_parameters": dict(content.get("datamodule_hyper_parameters") or {}),
                }
                if "global_step" in content:
                    metadata["global_step"] = content["global_step"]
                return state, metadata
    raise CheckpointError(f"{path}: a PyTorch file, but it holds no state dict of tensors (looked for "
                          f"'state_dict', 'model' and 'network_weights'). {ACCEPTED_FORMATS}")
