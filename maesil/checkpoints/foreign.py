"""Weights of other frameworks under maesil's names: nnssl / nnU-Net checkpoints and MONAI ViT state dicts.

:func:`maesil_names` is the step :func:`~maesil.checkpoints.load_pretrained` takes before matching keys: it
recognises the format by its keys (and an nnssl checkpoint by its adaptation plan), renames the tensors to
those of maesil's exports (``encoder.*``, ``decoder.*``), and widens a one-channel stem to the model's input
channels the way nnssl does. Everything it leaves out is listed, so the load report shows it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from maesil.checkpoints.monai_format import POSITION_KEY, from_monai_vit_state, is_monai_vit_state
from maesil.checkpoints.nnunet_format import (
    KEY_TO_ENCODER,
    KEY_TO_STEM,
    adapt_input_channels,
    from_nnunet_state,
    is_nnunet_state,
)

__all__ = ["ForeignWeights", "maesil_names"]

log = logging.getLogger(__name__)


@dataclass
class ForeignWeights:
    """Tensors of another framework renamed to maesil's export names.

    Attributes:
        layout: ``"nnssl"`` (checkpoint with an adaptation plan), ``"nnunet"`` (nnU-Net names without one) or
            ``"monai"``.
        state: the renamed tensors.
        ignored: source keys left out (aliases, segmentation / classification heads, position table...).
        notes: what was adapted, for the log.
    """

    layout: str
    state: dict[str, Tensor]
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _model_in_channels(model_shapes: Mapping[str, Any]) -> tuple[str, int] | None:
    for key in ("encoder.stem.conv.weight", "stem.conv.weight"):
        if key in model_shapes:
            return key, int(model_shapes[key][1])
    return None


def _nnunet(state: Mapping[str, Tensor], metadata: Mapping[str, Any],
            model_shapes: Mapping[str, Any]) -> ForeignWeights:
    plan = metadata.get("nnssl_adaptation_plan") or {}
    prefixes = (plan.get("key_to_encoder", KEY_TO_ENCODER), plan.get("key_to_stem", KEY_TO_STEM))
    if prefixes != (KEY_TO_ENCODER, KEY_TO_STEM):
        log.warning("the adaptation plan names the encoder %r and the stem %r; maesil reads %r and %r "
                    "(ResidualEncoderUNet's).", *prefixes, KEY_TO_ENCODER, KEY_TO_STEM)
    renamed, ignored = from_nnunet_state(state)
    result = ForeignWeights("nnssl" if plan else "nnunet", renamed, ignored)
    stem = _model_in_channels(model_shapes)
    pretrained_channels = int(plan.get("pretrain_num_input_channels") or 0) or None
    if stem is not None and adapt_input_channels(renamed, stem[1]):
        result.notes.append(f"stem widened from {pretrained_channels or 1} to {stem[1]} input channels "
                            "(weights repeated and divided by the channel count, as nnssl does)")
    return result


def _monai(state: Mapping[str, Tensor], model: nn.Module) -> ForeignWeights:
    renamed, ignored = from_monai_vit_state(state)
    result = ForeignWeights("monai", renamed, ignored)
    positions = next((v for k, v in state.items() if k.endswith(POSITION_KEY)), None)
    encoder = getattr(model, "encoder", model)
    own = getattr(encoder, "pos_embed", None)
    if positions is not None:
        same = (isinstance(own, Tensor) and own.numel() == positions.numel()
                and float((own.reshape(-1) - positions.reshape(-1).to(own)).abs().max()) < 1e-5)
        if not same:
            result.notes.append("the MONAI position table is not loaded: it differs from maesil's fixed sin-cos "
                                "positions, which the model keeps")
    return result


def maesil_names(state: Mapping[str, Tensor], metadata: Mapping[str, Any], model: nn.Module) -> ForeignWeights | None:
    """``state`` renamed to maesil's export names when it is nnssl / nnU-Net or MONAI weights, else None.

    Args:
        state: the tensors of :func:`~maesil.checkpoints.load_checkpoint_state`.
        metadata: its metadata (an nnssl checkpoint's carries ``nnssl_adaptation_plan``).
        model: the network to load into (its stem's input channels; a ViT's own position table).
    """
    model_shapes = {key: value.shape for key, value in model.state_dict().items()}
    if metadata.get("format") in ("nnssl", "nnunet") or is_nnunet_state(state):
        result = _nnunet(state, metadata, model_shapes)
    elif is_monai_vit_state(state):
        result = _monai(state, model)
    else:
        return None
    for note in result.notes:
        log.warning("%s", note)
    return result
