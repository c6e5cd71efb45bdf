"""Copying pretrained tensors into a downstream network, with a report of what matched.

Silent key mismatches are the failure this module guards against: a fine-tuning run that loaded nothing
looks like one that loaded everything. :func:`load_pretrained` renames checkpoint keys by prefix (a given
``mapping`` such as ``{"net.encoder.": "encoder."}``, or the method's :class:`~maesil.checkpoints.layouts.
TransferLayout`), copies what matches and returns a :class:`LoadReport` (loaded / missing / unexpected /
shape-mismatched keys) that it also logs. It fails when nothing matches, instead of fine-tuning from
scratch unnoticed.

Only the encoder is loaded unless ``decoder=True``: a U-Net decoder that a method pretrained (PGL, S3D) stays
in the checkpoint and the downstream decoder keeps its initialisation. nnssl's fine-tuning loads the encoder
and stem only for the same networks, and here the pretrained decoders cost Dice in few-label fine-tuning
(docs/evidence.md). ``decoder=True`` loads them, as the S3D paper describes its transfer.

The EMA target networks of BYOL-style methods (``target_*`` keys) are never loaded: the online network is
the one the papers transfer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from maesil.checkpoints.export_format import EXPORTED_LAYOUT, EXPORTED_PREFIXES, is_export
from maesil.checkpoints.foreign import maesil_names
from maesil.checkpoints.layouts import identify_method, layout_name, method_layouts, transferable_layouts
from maesil.checkpoints.reading import ACCEPTED_FORMATS, CheckpointError, load_checkpoint_state

__all__ = ["LoadReport", "has_trained_decoder", "is_ema_key", "load_pretrained", "no_layout_error",
           "remap_state_dict"]

log = logging.getLogger(__name__)


def is_ema_key(key: str) -> bool:
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
        if source is None or is_ema_key(key):
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
        layout: the layout picked automatically: the method's class name in lower case (``"pgl"``),
            ``"exported"`` for an exported file, with `` (bare encoder)`` when the model is the encoder
            itself; ``"custom"`` for a given mapping.
        mapping: the prefix mapping applied.
        loaded: model keys copied from the checkpoint.
        missing: model keys not loaded (they keep their initialisation), shape mismatches included.
        unexpected: renamed checkpoint keys the model does not have.
        shape_mismatched: ``(model key, checkpoint shape, model shape)`` of keys skipped for their shape.
        ignored: checkpoint keys outside the mapping (other heads, EMA ``target_*`` networks, ...).
        decoder_left_out: checkpoint keys of a pretrained U-Net decoder not loaded (``decoder=False``).
        metadata: the file's metadata (:func:`~maesil.checkpoints.load_checkpoint_state`), e.g. for
            :func:`~maesil.checkpoints.check_preprocessing`.
    """

    source: str
    layout: str
    mapping: dict[str, str]
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    decoder_left_out: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def summary(self, examples: int = 5) -> str:
        """A printable multi-line report: the four counts with up to ``examples`` keys each."""

        def some(keys: list[str]) -> str:
            if not keys:
                return ""
            more = f", … (+{len(keys) - examples})" if len(keys) > examples else ""
            return "  e.g. " + ", ".join(keys[:examples]) + more

        mismatched = [f"{k}: checkpoint {tuple(c)} vs model {tuple(m)}" for k, c, m in self.shape_mismatched]
        ema = sum(is_ema_key(k) for k in self.ignored)
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
        if self.decoder_left_out:
            lines.append(f"  pretrained decoder left out: {len(self.decoder_left_out)} tensors (the encoder only is "
                         "transferred; transfer_decoder: true loads the decoder too)")
        return "\n".join(lines)


def _plan(
    state: Mapping[str, Tensor], model_shapes: Mapping[str, torch.Size], mapping: Mapping[str, str],
    source: str, layout: str,
) -> tuple[LoadReport, dict[str, Tensor]]:  # fmt: skip
    """The report and the tensors to copy for one candidate mapping (nothing is copied yet)."""
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


def no_layout_error(path: Path, method: str, state: Mapping[str, Tensor]) -> CheckpointError:
    """The error for a checkpoint of a method whose layout transfers nothing, or that has no layout."""
    examples = [k for k in state if not is_ema_key(k)][:5]
    return CheckpointError(
        f"{path}: a {method} checkpoint has no known encoder to transfer (known methods: "
        f"{sorted(transferable_layouts())}; keys e.g. {examples}). Pass an explicit mapping to load it anyway."
    )


def _auto_candidates(
    path: Path, state: Mapping[str, Tensor], metadata: Mapping[str, Any]
) -> list[tuple[str, dict[str, str]]]:
    """Layouts to try, each also in a variant for a bare encoder (a ViTEncoder3D / ResEncoder itself).

    An export is read with its own layout; a checkpoint of a known method with the method's; a checkpoint of
    an unknown method with every layout that transfers something.
    """
    if is_export(metadata):
        named = [(EXPORTED_LAYOUT, EXPORTED_PREFIXES)]
    else:
        method = identify_method(state, metadata)
        layouts = method_layouts()
        if method is None:
            named = [(layout_name(m), dict(layout.prefixes)) for m, layout in transferable_layouts().items()]
            named.append((EXPORTED_LAYOUT, EXPORTED_PREFIXES))
        elif method in layouts and layouts[method].prefixes:
            named = [(layout_name(method), dict(layouts[method].prefixes))]
        else:
            raise no_layout_error(path, method, state)
    candidates = []
    for name, mapping in named:
        candidates.append((name, dict(mapping)))
        bare = {source: "" for source, target in mapping.items() if target == "encoder."}
        candidates.append((f"{name} (bare encoder)", bare))
    return candidates


def _decoder_sources(mapping: Mapping[str, str]) -> tuple[str, ...]:
    """The checkpoint prefixes that ``mapping`` sends to the downstream decoder."""
    return tuple(source for source, target in mapping.items() if target.startswith("decoder."))


def has_trained_decoder(state: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> bool:
    """True when a checkpoint holds a U-Net decoder its method pretrained (PGL, S3D, or an export carrying
    one): what ``load_pretrained(..., decoder=True)`` would load on top of the encoder."""
    if is_export(metadata):
        sources = _decoder_sources(EXPORTED_PREFIXES)
    else:
        layout = method_layouts().get(identify_method(state, metadata) or "")
        sources = _decoder_sources(layout.prefixes) if layout is not None else ()
    return bool(sources) and any(key.startswith(sources) and not is_ema_key(key) for key in state)


def _shape_error(path: Path, report: LoadReport, what: str = "") -> CheckpointError:
    """Names the first mismatching keys with both shapes; nothing has been loaded."""
    details = "; ".join(f"{k}: checkpoint {c} vs model {m}" for k, c, m in report.shape_mismatched[:5])
    return CheckpointError(f"{path}: {len(report.shape_mismatched)} tensor(s) differ in shape{what}, first "
                           f"{details}. Nothing was loaded.")


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    mapping: dict[str, str] | None = None,
    strict_shapes: bool = False,
    decoder: bool | None = False,
) -> LoadReport:
    """Copies pretrained tensors into ``model`` and reports what matched.

    Args:
        model: the downstream network, e.g. ``ResEncUNet(out_channels=C)`` or a module with a ViTEncoder3D at
            ``encoder``.
        path: a maesil ``.ckpt`` or an exported ``.safetensors`` (see
            :func:`~maesil.checkpoints.load_checkpoint_state`); also, renamed by
            :func:`~maesil.checkpoints.foreign.maesil_names`, an nnssl / nnU-Net checkpoint (layout ``"nnssl"``,
            a one-channel stem widened to the model's channels as nnssl does) or a MONAI ``ViT`` / ``UNETR``
            state dict (layout ``"monai"``). Those must fit in every shape (as with ``strict_shapes``).
        mapping: checkpoint key prefix → model key prefix, e.g. ``{"net.encoder.": "encoder."}``; checkpoint
            keys matching no prefix are ignored. None: the layout of the checkpoint's method (every
            transferring layout when the method is unknown), keeping the one that loads the most tensors.
        strict_shapes: raise on a shape mismatch instead of skipping (and reporting) the tensor.
        decoder: also load the U-Net decoder the method pretrained (PGL, S3D, an export that carries one);
            an error when there is none. False: the encoder only; the checkpoint's decoder keys are reported
            as left out. None: the decoder wherever the checkpoint has one (continued pretraining). Ignored
            with an explicit ``mapping``, which says exactly what loads.

    Returns:
        The :class:`LoadReport`, also logged at INFO level.

    Raises:
        CheckpointError (a ValueError): nothing matched (the message shows checkpoint and model keys), a
            method whose checkpoints hold no transferable encoder, a shape mismatch with ``strict_shapes``, or
            ``decoder=True`` for a checkpoint without a pretrained decoder that fits; also every error of
            :func:`~maesil.checkpoints.load_checkpoint_state`.
    """
    path = Path(path)
    state, metadata = load_checkpoint_state(path)
    model_shapes = {key: value.shape for key, value in model.state_dict().items()}
    foreign = maesil_names(state, metadata, model) if mapping is None else None
    if foreign is not None:  # another framework's names: renamed to an export's, and every shape must fit
        state, strict_shapes = foreign.state, True
        candidates = [(foreign.layout, dict(EXPORTED_PREFIXES)), (f"{foreign.layout} (bare encoder)", {"encoder.": ""})]
    else:
        candidates = [("custom", dict(mapping))] if mapping is not None else _auto_candidates(path, state, metadata)
    left_out: dict[str, tuple[str, ...]] = {}
    if mapping is None and decoder is False:  # the encoder only: the decoder prefixes leave the layouts
        left_out = {name: _decoder_sources(candidate) for name, candidate in candidates}
        candidates = [(name, {s: t for s, t in candidate.items() if s not in left_out[name]})
                      for name, candidate in candidates]
    best: tuple[LoadReport, dict[str, Tensor]] | None = None
    for name, candidate in candidates:
        plan = _plan(state, model_shapes, candidate, str(path), name)
        if best is None or len(plan[0].loaded) > len(best[0].loaded):
            best = plan
    assert best is not None
    report, to_load = best
    if sources := left_out.get(report.layout):
        left = {k for k in report.ignored if k.startswith(sources) and not is_ema_key(k)}
        report.decoder_left_out = [k for k in report.ignored if k in left]
        report.ignored = [k for k in report.ignored if k not in left]
    if foreign is not None:
        report.ignored = foreign.ignored + report.ignored
    if foreign is not None and report.shape_mismatched:  # another network: its shapes say more than "no match"
        raise _shape_error(path, report, f" ({foreign.layout} weights of a network of another size or architecture)")
    if not to_load:
        ckpt_keys = [k for k in state if not is_ema_key(k)][:5]
        tried = "mapping " + str(mapping) if mapping is not None else "layouts " + ", ".join(n for n, _ in candidates)
        mismatched = [f"{k} {c} vs {m}" for k, c, m in report.shape_mismatched[:3]]
        raise CheckpointError(
            f"{path}: no tensor matches the model (tried {tried}). Checkpoint keys e.g. {ckpt_keys}; model keys "
            f"e.g. {list(model_shapes)[:5]}"
            + (f"; shape mismatches e.g. {mismatched}" if mismatched else "")
            + f". Pass mapping={{checkpoint prefix: model prefix}}. {ACCEPTED_FORMATS}"
        )
    if strict_shapes and report.shape_mismatched:
        raise _shape_error(path, report)
    if decoder is True and mapping is None and not any(key.startswith("decoder.") for key in report.loaded):
        raise CheckpointError(
            f"{path}: decoder=True (transfer_decoder: true), but the checkpoint holds no pretrained U-Net decoder "
            f"that fits the model (layout {report.layout!r}; PGL and S3D checkpoints have one, MAESIL, SelfMedMAE "
            f"and BYOL transfer their encoder only). Nothing was loaded."
        )
    result = model.load_state_dict(to_load, strict=False)
    if result.unexpected_keys:  # cannot happen: only model keys are loaded
        raise RuntimeError(f"unexpected keys while loading {path}: {result.unexpected_keys[:5]}")
    report.metadata = dict(metadata)
    log.info(report.summary())
    return report
