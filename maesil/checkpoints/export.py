"""Exporting a pretraining checkpoint's transferable weights, described well enough to fine-tune them.

:func:`export_encoder` writes the online network's encoder (and the U-Net decoder of methods that train
one) as safetensors, in the downstream network's key names, with a description of the architecture and of
the pretraining preprocessing (:mod:`maesil.checkpoints.export_format`). The method's
:class:`~maesil.checkpoints.layouts.TransferLayout` says which keys those are; EMA targets, projectors,
predictors, mask tokens and pretraining-only decoders are left out.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from maesil.checkpoints.export_format import (
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    EXPORTED_LAYOUT,
    EXPORTED_PREFIXES,
    SAFETENSORS_METADATA_KEY,
    is_export,
    sidecar_path,
)
from maesil.checkpoints.layouts import (
    TransferLayout,
    identify_method,
    layout_name,
    method_layouts,
    transferable_layouts,
)
from maesil.checkpoints.preprocessing import PREPROCESSING_FIELDS
from maesil.checkpoints.reading import CheckpointError, load_checkpoint_state
from maesil.checkpoints.transfer import is_ema_key, no_layout_error, remap_state_dict
from maesil.files import atomic_write_bytes
from maesil.models.parameters import count_parameters

__all__ = ["collect_export", "describe_architecture", "export_encoder"]

log = logging.getLogger(__name__)

#: The ViT hyperparameters an export records: name -> the older name a checkpoint may store it under.
_VIT_FIELDS: dict[str, str | None] = {
    "superpatch_size": "img_size",
    "token_size": "patch_size",
    "embed_dim": None,
    "depth": None,
    "num_heads": None,
    "mlp_ratio": None,
    "in_channels": None,
}
_RESENC_FIELDS = ("features", "blocks_per_stage", "strides", "kernel_size")


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


def _vit_architecture(hparams: Mapping[str, Any], state: Mapping[str, Tensor]) -> dict[str, Any]:
    arch: dict[str, Any] = {"type": "ViTEncoder3D"}
    for name, old_name in _VIT_FIELDS.items():
        value = hparams.get(name)
        if value is None and old_name is not None:
            value = hparams.get(old_name)
        if value is not None:
            arch[name] = _plain(value)
    weight = state.get("encoder.patch_embed.proj.weight")
    if weight is not None and weight.ndim == 5:  # (D, C, p, p, p): fills what the hyperparameters lack
        arch.setdefault("embed_dim", int(weight.shape[0]))
        arch.setdefault("in_channels", int(weight.shape[1]))
        arch.setdefault("token_size", int(weight.shape[2]))
    blocks = {k.split(".")[2] for k in state if k.startswith("encoder.blocks.")}
    if blocks:
        arch.setdefault("depth", len(blocks))
    return arch


def _resenc_architecture(hparams: Mapping[str, Any], state: Mapping[str, Tensor]) -> dict[str, Any]:
    from maesil.models.unet import UNET_PRESETS

    arch: dict[str, Any] = {"type": "ResEncUNet"}
    preset = hparams.get("unet_preset")
    resolved: dict[str, Any] = dict(UNET_PRESETS.get(preset, {})) if preset else {}
    for name in ("features", "blocks_per_stage", "strides"):
        if hparams.get(name) is not None:
            resolved[name] = hparams[name]
    if preset:
        arch["unet_preset"] = preset
    arch.update({name: _plain(resolved[name]) for name in _RESENC_FIELDS if name in resolved})
    if "in_channels" in hparams:
        arch["in_channels"] = hparams["in_channels"]
    stem = state.get("encoder.stem.conv.weight")
    if stem is not None and stem.ndim == 5:
        arch.setdefault("in_channels", int(stem.shape[1]))
    return arch


def describe_architecture(layout: TransferLayout, hparams: Mapping[str, Any],
                          tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """What a downstream network must be built with to take the exported ``tensors`` (downstream key names).

    A ViT encoder (``layout.network == "vit"``, or ``encoder.patch_embed`` tensors) is described as
    ``ViTEncoder3D`` with ``superpatch_size``, ``token_size``, ``embed_dim``, ``depth``, ``num_heads``,
    ``mlp_ratio`` and ``in_channels`` (read under their older names ``img_size`` / ``patch_size`` from
    checkpoints that store those), completed from the tensor shapes; a U-Net as ``ResEncUNet`` with its preset
    resolved into ``features``, ``blocks_per_stage``, ``strides``, ``kernel_size`` and ``in_channels``.
    """
    if layout.network == "vit" or any(k.startswith("encoder.patch_embed.") for k in tensors):
        return _vit_architecture(hparams, tensors)
    return _resenc_architecture(hparams, tensors)


def _preprocessing(datamodule_hparams: Mapping[str, Any]) -> dict:
    return {name: _plain(datamodule_hparams[name]) for name in PREPROCESSING_FIELDS if name in datamodule_hparams}


def _export_layout(
    path: Path, state: Mapping[str, Tensor], metadata: Mapping[str, Any]
) -> tuple[str | None, str, TransferLayout | None]:
    """``(method, layout name, layout)`` of a checkpoint to export; layout None: keys named as in an export.

    An export is re-exported as it is; a checkpoint of a method without a class path nor a recognised
    structure takes the transferring layout whose prefixes cover the most keys.
    """
    method = identify_method(state, metadata)
    if is_export(metadata):
        return method, EXPORTED_LAYOUT, None
    layouts = method_layouts()
    if method is not None:
        if method not in layouts or not layouts[method].prefixes:
            raise no_layout_error(path, method, state)
        return method, layout_name(method), layouts[method]
    candidates: dict[str, TransferLayout | None] = {layout_name(m): layout
                                                    for m, layout in transferable_layouts().items()}
    candidates[EXPORTED_LAYOUT] = None

    def prefixes(layout: TransferLayout | None) -> Mapping[str, str]:
        return EXPORTED_PREFIXES if layout is None else layout.prefixes

    counts = {name: len(remap_state_dict(state, prefixes(layout))[0]) for name, layout in candidates.items()}
    name = max(counts, key=lambda candidate: counts[candidate])
    if counts[name] == 0:
        known = sorted({p for layout in candidates.values() for p in prefixes(layout)})
        examples = [k for k in state if not is_ema_key(k)][:5]
        raise CheckpointError(
            f"{path}: no known encoder in this checkpoint: no key starts with one of {known} (keys e.g. "
            f"{examples})."
        )
    return None, name, candidates[name]


def _export_mapping(path: Path, method: str | None, name: str, layout: TransferLayout | None,
                    with_decoder: bool | None) -> dict[str, str]:
    """The prefixes to export: the layout's, without its decoder or with an untrained one on request."""
    mapping = dict(EXPORTED_PREFIXES if layout is None else layout.prefixes)
    untrained = {} if layout is None else dict(layout.untrained)
    has_decoder = any(target == "decoder." for target in mapping.values())
    if with_decoder is False:
        mapping = {s: t for s, t in mapping.items() if t != "decoder."}
    elif with_decoder and not has_decoder:
        if not untrained:
            raise CheckpointError(f"{path}: a {method or name} checkpoint has no U-Net decoder to export.")
        log.warning("%s: exporting the %s decoder on request: it is frozen at its random initialisation.",
                    path, method or name)
        mapping.update(untrained)
    return mapping


def collect_export(checkpoint: str | Path, with_decoder: bool | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors an export holds (downstream key names, CPU, contiguous) and its description.

    The common part of :func:`export_encoder` and the exports for other frameworks
    (:mod:`maesil.checkpoints.interop_export`); arguments and errors as for :func:`export_encoder`.
    """
    checkpoint = Path(checkpoint)
    state, metadata = load_checkpoint_state(checkpoint)
    method, name, layout = _export_layout(checkpoint, state, metadata)
    mapping = _export_mapping(checkpoint, method, name, layout, with_decoder)
    renamed, _ = remap_state_dict(state, mapping)
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in sorted(renamed.items())}
    if not any(key.startswith("encoder.") for key in tensors):
        raise CheckpointError(f"{checkpoint}: no encoder tensors under {sorted(mapping)} in this checkpoint.")

    if layout is None:  # re-export: keep the original description
        sidecar = dict(metadata)
        architecture, preprocessing = sidecar.get("architecture", {}), sidecar.get("preprocessing", {})
    else:
        sidecar = {}
        architecture = describe_architecture(layout, metadata.get("hyper_parameters") or {}, tensors)
        preprocessing = _preprocessing(metadata.get("datamodule_hyper_parameters") or {})
    counts = {prefix.rstrip("."): sum(k.startswith(prefix) for k in tensors) for prefix in ("encoder.", "decoder.")}
    sidecar.update({
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "source_checkpoint": str(checkpoint.resolve()),
        "method": method or sidecar.get("method"),
        "layout": name if name != EXPORTED_LAYOUT else sidecar.get("layout", name),
        "includes_decoder": counts["decoder"] > 0,
        "tensors": {**counts, "total": len(tensors)},
        "parameters": count_parameters(tensors),
        "architecture": architecture,
        "preprocessing": preprocessing,
    })  # fmt: skip
    if "global_step" in metadata:
        sidecar["global_step"] = int(metadata["global_step"])
    return tensors, _plain(sidecar)


def export_encoder(checkpoint: str | Path, out_path: str | Path, with_decoder: bool | None = None) -> Path:
    """Writes a checkpoint's transferable weights as safetensors, plus a JSON sidecar describing them.

    Only the online network's encoder (``encoder.*``) is written, and its U-Net decoder (``decoder.*``) for
    methods that train one (PGL, S3D); no EMA target, projector, predictor, mask token or MAE decoder. The
    sidecar (``enc.safetensors`` → ``enc.json``; also embedded in the safetensors header) records the format
    version, source checkpoint, method, architecture (:func:`describe_architecture`) and pretraining
    preprocessing.

    Args:
        checkpoint: a maesil Lightning ``.ckpt`` (or an exported file, re-exported).
        out_path: the ``.safetensors`` file to write.
        with_decoder: None: the method's default (PGL, S3D: yes; BYOL, MAESIL: no); False: encoder only; True:
            also an untrained decoder (BYOL's, with a warning).

    Returns:
        ``out_path``.

    Raises:
        CheckpointError: ``out_path`` does not end in ``.safetensors``, or the checkpoint holds no known encoder;
            also every error of :func:`~maesil.checkpoints.load_checkpoint_state`.
    """
    from safetensors.torch import save

    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise CheckpointError(f"{out_path}: the exported file must end in .safetensors.")
    tensors, sidecar = collect_export(checkpoint, with_decoder)
    text = json.dumps(sidecar, indent=2)
    atomic_write_bytes(out_path, save(tensors, metadata={SAFETENSORS_METADATA_KEY: text}))
    atomic_write_bytes(sidecar_path(out_path), (text + "\n").encode())
    return out_path
