"""Reading pretrained weights safely into a downstream network, and exporting pretrained encoders.

Three things go wrong when self-supervised weights meet a fine-tuning network, and this module handles each:

* **Unsafe files.** A ``.ckpt`` is a pickle; unpickling can run any code. :func:`load_checkpoint_state` reads
  checkpoints with ``torch.load(weights_only=True)`` and allows only the few plain types that maesil's own
  checkpoints hold (:func:`checkpoint_safe_globals`). Anything else is refused with
  :class:`UnsafeCheckpointError`; there is no fallback to full unpickling. Exported encoders are
  ``.safetensors`` files (no code at all) with a JSON sidecar.
* **Silent key mismatches.** :func:`load_pretrained` renames checkpoint keys by prefix (a ``mapping`` such as
  ``{"net.encoder.": "encoder."}``, or automatically from :data:`PRETRAINED_LAYOUTS`), copies what matches and
  returns a :class:`LoadReport` (loaded / missing / unexpected / shape-mismatched keys) that it also logs. It
  fails when nothing matches, instead of fine-tuning from scratch unnoticed.
* **Preprocessing drift.** The exported sidecar and the checkpoint keep the pretraining preprocessing
  (modality, spacing, HU window, superpatch size); :func:`check_preprocessing` compares it with a fine-tuning
  run's and returns readable warnings.

The EMA target networks of BYOL-style methods (``target_*`` keys) are never loaded nor exported: the online
network is the one the papers transfer.

Example:
    >>> from maesil.checkpoints import export_encoder, load_pretrained
    >>> from maesil.models.unet import resenc_unet
    >>> export_encoder("runs/pgl_demo/checkpoints/last.ckpt", "pgl_encoder.safetensors")  # doctest: +SKIP
    >>> net = resenc_unet("cpu", out_channels=4)
    >>> report = load_pretrained(net, "pgl_encoder.safetensors")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "LoadReport",
    "METHOD_LAYOUTS",
    "PRETRAINED_LAYOUTS",
    "UnsafeCheckpointError",
    "check_preprocessing",
    "checkpoint_safe_globals",
    "export_encoder",
    "infer_method",
    "load_checkpoint_state",
    "load_pretrained",
    "remap_state_dict",
]

log = logging.getLogger(__name__)

#: ``format`` and ``format_version`` of the JSON sidecar written by :func:`export_encoder`.
EXPORT_FORMAT = "maesil-encoder"
EXPORT_FORMAT_VERSION = 1
#: Key of the sidecar JSON inside the safetensors header (so a file that lost its sidecar still describes itself).
_SAFETENSORS_METADATA_KEY = "maesil"

#: Checkpoint layouts of the pretraining methods: checkpoint key prefix → downstream key prefix. The downstream
#: names are those of :class:`maesil.models.unet.ResEncUNet` (``encoder.``, ``decoder.``) and of networks that
#: hold a :class:`maesil.models.vit3d.ViTEncoder3D` at ``encoder`` (e.g. UNETR). Only what transfers is listed:
#: MAESIL's MAE decoder and S3D's mask tokens / densify convs are pretraining-only, and BYOL's U-Net decoder is
#: frozen at its random initialisation (its pooled loss never reaches it).
PRETRAINED_LAYOUTS: dict[str, dict[str, str]] = {
    "maesil": {"net.encoder.": "encoder."},
    "pgl": {"backbone.encoder.": "encoder.", "backbone.decoder.": "decoder."},
    "byol": {"backbone.encoder.": "encoder."},
    "s3d": {"net.encoder.": "encoder.", "net.decoder.": "decoder."},
    "exported": {"encoder.": "encoder.", "decoder.": "decoder."},
}

#: LightningModule class name → its layout in :data:`PRETRAINED_LAYOUTS`.
METHOD_LAYOUTS: dict[str, str] = {"MAESIL": "maesil", "PGL": "pgl", "BYOL": "byol", "S3D": "s3d"}

#: Decoders present in a checkpoint but untrained: exported only on explicit request (``with_decoder=True``).
_UNTRAINED_DECODERS: dict[str, dict[str, str]] = {"byol": {"backbone.decoder.": "decoder."}}

_PREPROCESSING_FIELDS = ("modality", "target_spacing", "hu_window", "superpatch_size", "crop_foreground")
_VIT_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "in_channels")


class CheckpointError(ValueError):
    """A file that cannot serve as pretrained weights (not a checkpoint, no matching keys, ...)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint refused because reading it would need arbitrary (code-executing) unpickling."""


# ---------------------------------------------------------------------------------------------------- reading


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


def _file_kind(path: Path) -> str:
    """``"zip"`` (torch.save), ``"pickle"`` (legacy torch.save / raw pickle), ``"safetensors"`` or ``"unknown"``."""
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


def _refused_globals(path: Path, kind: str, error: Exception) -> list[str]:
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


def _torch_load(path: Path, kind: str) -> Any:
    """``torch.load(weights_only=True)`` with :func:`checkpoint_safe_globals`; refusals become clear errors."""
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()), warnings.catch_warnings():
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


def _tensor_dict(candidate: Any) -> dict[str, Tensor] | None:
    if isinstance(candidate, Mapping) and candidate and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in candidate.items()
    ):
        return dict(candidate)
    return None


def _sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}).") from None
    sidecar = _sidecar_path(path)
    metadata: dict = {}
    if sidecar.is_file():
        try:
            metadata = json.loads(sidecar.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{sidecar}: the JSON sidecar of {path} cannot be read ({error}).") from None
    elif _SAFETENSORS_METADATA_KEY in header:
        metadata = json.loads(header[_SAFETENSORS_METADATA_KEY])
    return state, metadata


def load_checkpoint_state(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Reads the tensors of a maesil checkpoint or exported encoder, without unsafe unpickling.

    Args:
        path: a Lightning ``.ckpt`` (or any ``torch.save`` file holding a state dict) or a ``.safetensors``
            file written by :func:`export_encoder` (its ``.json`` sidecar, when present, is the metadata).

    Returns:
        ``(state_dict, metadata)``. For a Lightning checkpoint the metadata holds ``hyper_parameters`` and
        ``datamodule_hyper_parameters`` (as saved, possibly empty), plus ``global_step``; for an exported file
        it is the sidecar JSON (``method``, ``architecture``, ``preprocessing``...).

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
            f"{path}: neither a PyTorch checkpoint (.ckpt/.pt written by torch.save) nor a .safetensors file."
        )
    content = _torch_load(path, kind)
    state = _tensor_dict(content)
    if state is not None:  # torch.save(model.state_dict())
        return state, {}
    if isinstance(content, Mapping):
        for key in ("state_dict", "model"):
            state = _tensor_dict(content.get(key))
            if state is not None:
                metadata = {
                    "hyper_parameters": dict(content.get("hyper_parameters") or {}),
                    "datamodule_hyper_parameters": dict(content.get("datamodule_hyper_parameters") or {}),
                }
                if "global_step" in content:
                    metadata["global_step"] = content["global_step"]
                return state, metadata
    raise CheckpointError(f"{path}: a PyTorch file, but it holds no state dict of tensors (looked for "
                          "'state_dict' and 'model').")


# ---------------------------------------------------------------------------------------------------- mapping


def _is_ema_key(key: str) -> bool:
    """``target_backbone.x``, ``target_projector.x``...: the EMA target network of BYOL-style methods."""
    return any(part.startswith("target_") for part in key.split("."))


def remap_state_dict(
    state: Mapping[str, Tensor], mapping: Mapping[str, str]
) -> tuple[dict[str, Tensor], list[str]]:
    """Renames keys by prefix; returns ``(renamed, ignored)``.

    Each key takes the longest matching source prefix of ``mapping`` (``{"net.encoder.": "encoder."}`` renames
    ``net.encoder.x`` to ``encoder.x``; an empty source prefix matches everything). Keys that match no prefix,
    and every EMA ``target_*`` key, are returned in ``ignored`` and never renamed.

    Raises:
        ValueError: an empty mapping, or two checkpoint keys renamed to the same name.
    """
    if not mapping:
        raise ValueError("mapping is empty: give at least one {checkpoint prefix: model prefix} pair.")
    prefixes = sorted(mapping, key=len, reverse=True)
    renamed: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in state.items():
        source = next((p for p in prefixes if key.startswith(p)), None)
        if source is None or _is_ema_key(key):
            ignored.append(key)
            continue
        new = mapping[source] + key[len(source):]
        if new in renamed:
            raise ValueError(f"mapping {dict(mapping)} renames both {origin[new]!r} and {key!r} to {new!r}.")
        renamed[new] = value
        origin[new] = key
    return renamed, ignored


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        source: the file read.
        layout: the :data:`PRETRAINED_LAYOUTS` name picked automatically, or ``"custom"`` for a given mapping.
        mapping: the prefix mapping applied.
        loaded: model keys copied from the checkpoint.
        missing: model keys not loaded (they keep their initialisation), shape mismatches included.
        unexpected: renamed checkpoint keys the model does not have.
        shape_mismatched: ``(model key, checkpoint shape, model shape)`` of keys skipped for their shape.
        ignored: checkpoint keys outside the mapping (other heads, EMA ``target_*`` networks, ...).
        metadata: the file's metadata (:func:`load_checkpoint_state`), e.g. for :func:`check_preprocessing`.
    """

    source: str
    layout: str
    mapping: dict[str, str]
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def summary(self, examples: int = 5) -> str:
        """A printable multi-line report: the four counts with up to ``examples`` keys each."""

        def some(keys: list[str]) -> str:
            if not keys:
                return ""
            more = f", … (+{len(keys) - examples})" if len(keys) > examples else ""
            return "  e.g. " + ", ".join(keys[:examples]) + more

        mismatched = [f"{k}: checkpoint {tuple(c)} vs model {tuple(m)}" for k, c, m in self.shape_mismatched]
        ema = sum(_is_ema_key(k) for k in self.ignored)
        mapping = ", ".join(f"{s or '<all>'} → {d or '<root>'}" for s, d in self.mapping.items())
        lines = [
            f"pretrained weights from {self.source} (layout {self.layout!r}: {mapping})",
            f"  loaded:           {len(self.loaded)}{some(self.loaded)}",
            f"  missing:          {len(self.missing)}{some(self.missing)}",
            f"  unexpected:       {len(self.unexpected)}{some(self.unexpected)}",
            f"  shape mismatched: {len(self.shape_mismatched)}{some(mismatched)}",
            f"  ignored checkpoint keys outside the mapping: {len(self.ignored)}"
            + (f" (incl. {ema} EMA target_* keys, never loaded)" if ema else ""),
        ]
        return "\n".join(lines)


def _plan(
    state: Mapping[str, Tensor], model_shapes: Mapping[str, torch.Size], mapping: Mapping[str, str],
    source: str, layout: str,
) -> tuple[LoadReport, dict[str, Tensor]]:  # fmt: skip
    try:
        renamed, ignored = remap_state_dict(state, mapping)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None
    report = LoadReport(source=source, layout=layout, mapping=dict(mapping), ignored=ignored)
    to_load: dict[str, Tensor] = {}
    for key, value in renamed.items():
        if key not in model_shapes:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(model_shapes[key]):
            report.shape_mismatched.append((key, tuple(value.shape), tuple(model_shapes[key])))
        else:
            to_load[key] = value
            report.loaded.append(key)
    report.loaded = [k for k in model_shapes if k in to_load]  # in the model's order
    report.missing = [k for k in model_shapes if k not in to_load]
    return report, to_load


def _class_name(class_path: Any) -> str | None:
    return class_path.rsplit(".", 1)[-1] if isinstance(class_path, str) and class_path else None


def infer_method(state: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None) -> str | None:
    """The pretraining method (LightningModule class name) of a checkpoint, or None when unknown.

    A name in :data:`METHOD_LAYOUTS` from the metadata (LightningCLI's ``_class_path``, an exported sidecar's
    ``method``) wins. Otherwise the structure of the keys tells: MAESIL's ViT (``net.encoder.patch_embed``),
    S3D's mask tokens / densify convs, BYOL vs PGL by their projector (one MLP of ``Linear`` layers vs one
    1×1×1 conv MLP per scale), and the AE / VAE / VQ-VAE baselines (MONAI networks, nothing to transfer).
    Failing that, the metadata's name as it is (e.g. a user's subclass).
    """
    metadata = metadata or {}
    named = metadata.get("method") or _class_name((metadata.get("hyper_parameters") or {}).get("_class_path"))
    if named in METHOD_LAYOUTS:
        return str(named)
    keys = list(state)
    if any(k.startswith("net.encoder.patch_embed.") for k in keys):
        return "MAESIL"
    if any(k.startswith(("net.mask_tokens.", "net.densify.")) for k in keys):
        return "S3D"
    if any(k.startswith("backbone.encoder.") for k in keys):
        if "projector.0.0.weight" in state:
            return "PGL"
        if "projector.0.weight" in state and state["projector.0.weight"].ndim == 2:
            return "BYOL"
    if any(k.startswith("net.quantizer.") for k in keys):
        return "VQVAE"
    if any(k.startswith("net.encode.") for k in keys):
        return "VAE" if any(k.startswith("net.mu.") for k in keys) else "AE"
    return str(named) if named else None


def _no_layout_error(path: Path, method: str, state: Mapping[str, Tensor]) -> CheckpointError:
    examples = [k for k in state if not _is_ema_key(k)][:5]
    return CheckpointError(
        f"{path}: a {method} checkpoint has no known encoder to transfer (known methods: "
        f"{sorted(METHOD_LAYOUTS)}; keys e.g. {examples}). Pass an explicit mapping to load it anyway."
    )


def _auto_candidates(
    path: Path, state: Mapping[str, Tensor], metadata: Mapping[str, Any]
) -> list[tuple[str, dict[str, str]]]:
    """Layouts to try, each also in a variant for a bare encoder (a ViTEncoder3D / ResEncoder itself)."""
    method = infer_method(state, metadata)
    if metadata.get("format") == EXPORT_FORMAT:
        names = ["exported"]
    elif method in METHOD_LAYOUTS:
        names = [METHOD_LAYOUTS[method]]
    elif method is None:
        names = list(PRETRAINED_LAYOUTS)
    else:
        raise _no_layout_error(path, method, state)
    candidates = []
    for name in names:
        mapping = PRETRAINED_LAYOUTS[name]
        candidates.append((name, dict(mapping)))
        bare = {source: "" for source, target in mapping.items() if target == "encoder."}
        candidates.append((f"{name} (bare encoder)", bare))
    return candidates


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    mapping: dict[str, str] | None = None,
    strict_shapes: bool = False,
) -> LoadReport:
    """Copies pretrained tensors into ``model`` and reports what matched.

    Args:
        model: the downstream network, e.g. ``ResEncUNet(out_channels=C)`` or a module with a ViTEncoder3D at
            ``encoder``.
        path: a maesil ``.ckpt`` or an exported ``.safetensors`` (see :func:`load_checkpoint_state`).
        mapping: checkpoint key prefix → model key prefix, e.g. ``{"net.encoder.": "encoder."}``; checkpoint
            keys matching no prefix are ignored. None: try :data:`PRETRAINED_LAYOUTS` (restricted to the
            checkpoint's method when it is known) and keep the one that loads the most tensors.
        strict_shapes: raise on a shape mismatch instead of skipping (and reporting) the tensor.

    Returns:
        The :class:`LoadReport`, also logged at INFO level.

    Raises:
        CheckpointError (a ValueError): nothing matched (the message shows checkpoint and model keys), or a
            shape mismatch with ``strict_shapes``; also every error of :func:`load_checkpoint_state`.
    """
    path = Path(path)
    state, metadata = load_checkpoint_state(path)
    model_shapes = {key: value.shape for key, value in model.state_dict().items()}
    candidates = [("custom", dict(mapping))] if mapping is not None else _auto_candidates(path, state, metadata)
    best: tuple[LoadReport, dict[str, Tensor]] | None = None
    for name, candidate in candidates:
        plan = _plan(state, model_shapes, candidate, str(path), name)
        if best is None or len(plan[0].loaded) > len(best[0].loaded):
            best = plan
    assert best is not None
    report, to_load = best
    if not to_load:
        ckpt_keys = [k for k in state if not _is_ema_key(k)][:5]
        tried = "mapping " + str(mapping) if mapping is not None else "layouts " + ", ".join(n for n, _ in candidates)
        mismatched = [f"{k} {c} vs {m}" for k, c, m in report.shape_mismatched[:3]]
        raise CheckpointError(
            f"{path}: no tensor matches the model (tried {tried}). Checkpoint keys e.g. {ckpt_keys}; model keys "
            f"e.g. {list(model_shapes)[:5]}"
            + (f"; shape mismatches e.g. {mismatched}" if mismatched else "")
            + ". Pass mapping={checkpoint prefix: model prefix}."
        )
    if strict_shapes and report.shape_mismatched:
        details = "; ".join(f"{k}: checkpoint {c} vs model {m}" for k, c, m in report.shape_mismatched[:5])
        raise CheckpointError(f"{path}: {len(report.shape_mismatched)} tensor(s) differ in shape: {details}.")
    result = model.load_state_dict(to_load, strict=False)
    if result.unexpected_keys:  # cannot happen: only model keys are loaded
        raise RuntimeError(f"unexpected keys while loading {path}: {result.unexpected_keys[:5]}")
    report.metadata = dict(metadata)
    log.info(report.summary())
    return report


# ---------------------------------------------------------------------------------------------------- export


def _plain(value: Any) -> Any:
    """JSON-safe copy: tuples → lists, paths → str, dataclass-like objects → dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Tensor):
        return value.tolist()
    if hasattr(value, "__dict__"):
        return _plain(vars(value))
    return str(value)


def _architecture(method: str | None, layout: str, hparams: Mapping[str, Any], state: Mapping[str, Tensor]) -> dict:
    """What a downstream network must be built with to take the exported tensors."""
    if layout == "exported":
        return {}
    if layout == "maesil" or any(k.startswith("encoder.patch_embed.") for k in state):
        arch: dict[str, Any] = {"type": "ViTEncoder3D"}
        arch.update({name: _plain(hparams[name]) for name in _VIT_FIELDS if name in hparams})
        weight = state.get("encoder.patch_embed.proj.weight")
        if weight is not None and weight.ndim == 5:  # (D, C, p, p, p): fills what the hyperparameters lack
            arch.setdefault("embed_dim", int(weight.shape[0]))
            arch.setdefault("in_channels", int(weight.shape[1]))
            arch.setdefault("patch_size", int(weight.shape[2]))
        blocks = {k.split(".")[2] for k in state if k.startswith("encoder.blocks.")}
        if blocks:
            arch.setdefault("depth", len(blocks))
        return arch
    from maesil.models.unet import UNET_PRESETS

    arch = {"type": "ResEncUNet"}
    preset = hparams.get("unet_preset")
    resolved: dict[str, Any] = dict(UNET_PRESETS.get(preset, {})) if preset else {}
    for name in ("features", "blocks_per_stage", "strides"):
        if hparams.get(name) is not None:
            resolved[name] = hparams[name]
    if preset:
        arch["unet_preset"] = preset
    arch.update({name: _plain(resolved[name]) for name in ("features", "blocks_per_stage", "strides", "kernel_size")
                 if name in resolved})
    if "in_channels" in hparams:
        arch["in_channels"] = hparams["in_channels"]
    stem = state.get("encoder.stem.conv.weight")
    if stem is not None and stem.ndim == 5:
        arch.setdefault("in_channels", int(stem.shape[1]))
    return arch


def _preprocessing(datamodule_hparams: Mapping[str, Any]) -> dict:
    return {name: _plain(datamodule_hparams[name]) for name in _PREPROCESSING_FIELDS if name in datamodule_hparams}


def _export_mapping(
    path: Path, state: Mapping[str, Tensor], metadata: Mapping[str, Any], with_decoder: bool | None
) -> tuple[str | None, str, dict[str, str]]:
    """``(method, layout name, mapping)`` for :func:`export_encoder`."""
    method = infer_method(state, metadata)
    layout = "exported" if metadata.get("format") == EXPORT_FORMAT else METHOD_LAYOUTS.get(method or "")
    if layout is None and method is not None:
        raise _no_layout_error(path, method, state)
    if layout is None:  # unknown method: the layout whose prefixes cover the most checkpoint keys
        counts = {name: len(remap_state_dict(state, m)[0]) for name, m in PRETRAINED_LAYOUTS.items()}
        layout = max(counts, key=lambda name: counts[name])
        if counts[layout] == 0:
            prefixes = sorted({p for m in PRETRAINED_LAYOUTS.values() for p in m})
            examples = [k for k in state if not _is_ema_key(k)][:5]
            raise CheckpointError(
                f"{path}: no known encoder in this checkpoint: no key starts with one of {prefixes} (keys e.g. "
                f"{examples})."
            )
    mapping = dict(PRETRAINED_LAYOUTS[layout])
    has_decoder = any(target == "decoder." for target in mapping.values())
    if with_decoder is False:
        mapping = {s: t for s, t in mapping.items() if t != "decoder."}
    elif with_decoder and not has_decoder:
        if layout not in _UNTRAINED_DECODERS:
            raise CheckpointError(f"{path}: a {method or layout} checkpoint has no U-Net decoder to export.")
        log.warning("%s: exporting the %s decoder on request: it is frozen at its random initialisation.",
                    path, method or layout)
        mapping.update(_UNTRAINED_DECODERS[layout])
    return method, layout, mapping


def export_encoder(checkpoint: str | Path, out_path: str | Path, with_decoder: bool | None = None) -> Path:
    """Writes a checkpoint's transferable weights as safetensors, plus a JSON sidecar describing them.

    Only the online network's encoder (``encoder.*``) is written, and its U-Net decoder (``decoder.*``) for
    methods that train one (PGL, S3D); no EMA target, projector, predictor, mask token or MAE decoder. The
    sidecar (``enc.safetensors`` → ``enc.json``; also embedded in the safetensors header) records the format
    version, source checkpoint, method, architecture and pretraining preprocessing.

    Args:
        checkpoint: a maesil Lightning ``.ckpt`` (or an exported file, re-exported).
        out_path: the ``.safetensors`` file to write.
        with_decoder: None: the method's default (PGL, S3D: yes; BYOL, MAESIL: no); False: encoder only; True:
            also BYOL's untrained decoder (with a warning).

    Returns:
        ``out_path``.

    Raises:
        CheckpointError: ``out_path`` does not end in ``.safetensors``, or the checkpoint holds no known encoder;
            also every error of :func:`load_checkpoint_state`.
    """
    from safetensors.torch import save_file

    checkpoint, out_path = Path(checkpoint), Path(out_path)
    if out_path.suffix != ".safetensors":
        raise CheckpointError(f"{out_path}: the exported file must end in .safetensors.")
    state, metadata = load_checkpoint_state(checkpoint)
    method, layout, mapping = _export_mapping(checkpoint, state, metadata, with_decoder)
    renamed, _ = remap_state_dict(state, mapping)
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in sorted(renamed.items())}
    if not any(key.startswith("encoder.") for key in tensors):
        raise CheckpointError(f"{checkpoint}: no encoder tensors under {sorted(mapping)} in this checkpoint.")

    if layout == "exported":  # re-export: keep the original description
        sidecar = dict(metadata)
        architecture, preprocessing = sidecar.get("architecture", {}), sidecar.get("preprocessing", {})
    else:
        sidecar = {}
        hparams = metadata.get("hyper_parameters") or {}
        architecture = _architecture(method, layout, hparams, tensors)
        preprocessing = _preprocessing(metadata.get("datamodule_hyper_parameters") or {})
    counts = {prefix.rstrip("."): sum(k.startswith(prefix) for k in tensors) for prefix in ("encoder.", "decoder.")}
    sidecar.update({
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "source_checkpoint": str(checkpoint.resolve()),
        "method": method or sidecar.get("method"),
        "layout": layout if layout != "exported" else sidecar.get("layout", layout),
        "includes_decoder": counts["decoder"] > 0,
        "tensors": {**counts, "total": len(tensors)},
        "parameters": int(sum(t.numel() for t in tensors.values())),
        "architecture": architecture,
        "preprocessing": preprocessing,
    })  # fmt: skip
    if "global_step" in metadata:
        sidecar["global_step"] = int(metadata["global_step"])
    text = json.dumps(_plain(sidecar), indent=2)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_path), metadata={_SAFETENSORS_METADATA_KEY: text})
    _sidecar_path(out_path).write_text(text + "\n")
    return out_path


# ---------------------------------------------------------------------------------------------- preprocessing


def _triple_floats(value: Any) -> tuple[float, float, float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    return values if len(values) == 3 else None  # type: ignore[return-value]


def _spacing_text(spacing: tuple[float, float, float] | None) -> str:
    if spacing is None:
        return "native spacing"
    if len(set(spacing)) == 1:
        return f"{spacing[0]:g} mm"
    return "×".join(f"{s:g}" for s in spacing) + " mm"


def _size_text(size: tuple[float, float, float]) -> str:
    return f"{int(size[0])}³" if len(set(size)) == 1 else "×".join(str(int(s)) for s in size)


def _close(a: Iterable[float], b: Iterable[float]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-6) for x, y in zip(a, b))


def check_preprocessing(metadata: Mapping[str, Any], **actual: Any) -> list[str]:
    """Warnings where a fine-tuning run preprocesses differently from pretraining.

    Args:
        metadata: the metadata of :func:`load_checkpoint_state` (an exported sidecar's ``preprocessing``, or a
            checkpoint's ``datamodule_hyper_parameters``), or a plain preprocessing dict.
        **actual: the fine-tuning values, any of ``modality``, ``target_spacing`` (mm, one value or three; None
            = native), ``hu_window``, ``superpatch_size`` (or its alias ``patch_size``), ``crop_foreground``.

    Returns:
        One readable line per mismatch, e.g. ``"pretrained at 1.5 mm spacing, fine-tuning at 2 mm"``; empty when
        they agree or the metadata lacks the field. The HU window is compared for CT only.

    Raises:
        TypeError: an unknown keyword.
    """
    if "patch_size" in actual:
        actual.setdefault("superpatch_size", actual.pop("patch_size"))
    unknown = set(actual) - set(_PREPROCESSING_FIELDS)
    if unknown:
        raise TypeError(f"check_preprocessing() got unknown field(s) {sorted(unknown)}; "
                        f"known: {list(_PREPROCESSING_FIELDS)} and patch_size.")
    if isinstance(metadata.get("preprocessing"), Mapping):
        pretrained = dict(metadata["preprocessing"])
    elif isinstance(metadata.get("datamodule_hyper_parameters"), Mapping):
        pretrained = dict(metadata["datamodule_hyper_parameters"])
    else:
        pretrained = dict(metadata)
    warnings_: list[str] = []
    both = [name for name in _PREPROCESSING_FIELDS if name in actual and name in pretrained]

    def modality(value: Any) -> str:
        return str(value).lower()

    if "modality" in both and actual["modality"] is not None:
        if modality(pretrained["modality"]) != modality(actual["modality"]):
            warnings_.append(f"pretrained on {modality(pretrained['modality']).upper()}, fine-tuning on "
                             f"{modality(actual['modality']).upper()}")
    if "target_spacing" in both:
        before, now = _triple_floats(pretrained["target_spacing"]), _triple_floats(actual["target_spacing"])
        if (before is None) != (now is None) or (before is not None and now is not None and not _close(before, now)):
            warnings_.append(f"pretrained at {_spacing_text(before)} spacing, fine-tuning at {_spacing_text(now)}")
    if "hu_window" in both and actual["hu_window"] is not None and pretrained["hu_window"] is not None:
        is_mri = "mri" in {modality(pretrained.get("modality", "ct")), modality(actual.get("modality", "ct"))}
        before, now = [float(v) for v in pretrained["hu_window"]], [float(v) for v in actual["hu_window"]]
        if not is_mri and (len(before) != len(now) or not _close(before, now)):
            warnings_.append(f"pretrained with HU window [{before[0]:g}, {before[1]:g}], fine-tuning with "
                             f"[{now[0]:g}, {now[1]:g}]")
    if "superpatch_size" in both and actual["superpatch_size"] is not None:
        before, now = _triple_floats(pretrained["superpatch_size"]), _triple_floats(actual["superpatch_size"])
        if before is not None and now is not None and not _close(before, now):
            warnings_.append(f"pretrained on {_size_text(before)} superpatches, fine-tuning on {_size_text(now)} "
                             "patches")
    if "crop_foreground" in both and actual["crop_foreground"] is not None:
        if bool(pretrained["crop_foreground"]) != bool(actual["crop_foreground"]):
            state = {True: "with", False: "without"}
            warnings_.append(f"pretrained {state[bool(pretrained['crop_foreground'])]} foreground cropping, "
                             f"fine-tuning {state[bool(actual['crop_foreground'])]}")
    return warnings_
