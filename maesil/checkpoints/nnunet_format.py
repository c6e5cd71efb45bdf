"""nnU-Net's names for maesil's residual-encoder U-Net, and nnssl's checkpoint format.

maesil's :class:`~maesil.models.unet.ResEncUNet` and ``dynamic_network_architectures``'
``ResidualEncoderUNet`` (the network of nnU-Net's ResEnc plans) compute the same function: stem conv →
InstanceNorm → LeakyReLU, ``BasicBlockD`` residual stages with an average-pooled, bias-free 1³ projection
shortcut, transposed-conv decoder with the upsampled features concatenated before the skip. Only the names
differ, and nnU-Net's state dict holds every tensor more than once (``all_modules.N`` aliases of each
conv/norm, and ``decoder.encoder.*``, the encoder seen again through the decoder):

==========================================  ==============================================================
maesil                                      nnU-Net (aliases)
==========================================  ==============================================================
``encoder.stem.conv.*``                     ``encoder.stem.convs.0.conv.*`` (``…convs.0.all_modules.0.*``)
``encoder.stem.norm.*``                     ``encoder.stem.convs.0.norm.*`` (``…all_modules.1.*``)
``encoder.stages.S.B.conv1`` / ``norm1``    ``encoder.stages.S.blocks.B.conv1.conv`` / ``.conv1.norm``
``encoder.stages.S.B.conv2`` / ``norm2``    ``encoder.stages.S.blocks.B.conv2.conv`` / ``.conv2.norm``
``encoder.stages.S.B.shortcut.J`` (conv)    ``encoder.stages.S.blocks.B.skip.J.conv``
``encoder.stages.S.B.shortcut.J`` (norm)    ``encoder.stages.S.blocks.B.skip.(J-1).norm``
``decoder.upsamples.I``                     ``decoder.transpconvs.I``
``decoder.stages.I.J.conv`` / ``.norm``     ``decoder.stages.I.convs.J.conv`` / ``.norm``
``head``                                    ``decoder.seg_layers.<last>`` (never exported: pretraining has no head)
==========================================  ==============================================================

An nnssl checkpoint (what nnU-Net's fine-tuning from pretrained weights reads) is a ``torch.save`` dict with
``network_weights`` (the full state dict, aliases included) and ``nnssl_adaptation_plan`` (architecture,
pretraining plan, input channels, recommended patch size, ``key_to_encoder``, ``key_to_stem``,
``keys_to_in_proj``, ``key_to_lpe``). :func:`nnssl_checkpoint` builds one; :func:`from_nnunet_state` and
:func:`adapt_input_channels` read one back into maesil's names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = [
    "KEYS_TO_IN_PROJ",
    "KEY_TO_ENCODER",
    "KEY_TO_STEM",
    "NNUNET_ARCHITECTURE",
    "adapt_input_channels",
    "adaptation_plan",
    "from_nnunet_state",
    "is_nnunet_state",
    "nnssl_checkpoint",
    "nnunet_architecture_kwargs",
    "to_nnunet_state",
]

#: The class nnU-Net builds (importable path, as nnU-Net's plans name it).
NNUNET_ARCHITECTURE = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
KEY_TO_ENCODER = "encoder.stages"
KEY_TO_STEM = "encoder.stem"
#: The stem convolution, under both of its names: nnssl adapts its input channels.
KEYS_TO_IN_PROJ = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")

_PARAM = r"(weight|bias)"
# maesil name -> (nnU-Net name, alias) templates; {0}, {1}... are the regex groups.
_TO_NNUNET: list[tuple[re.Pattern[str], str, str | None]] = [
    (re.compile(rf"encoder\.stem\.conv\.{_PARAM}"), "encoder.stem.convs.0.conv.{0}",
     "encoder.stem.convs.0.all_modules.0.{0}"),
    (re.compile(rf"encoder\.stem\.norm\.{_PARAM}"), "encoder.stem.convs.0.norm.{0}",
     "encoder.stem.convs.0.all_modules.1.{0}"),
    (re.compile(rf"encoder\.stages\.(\d+)\.(\d+)\.conv([12])\.{_PARAM}"),
     "encoder.stages.{0}.blocks.{1}.conv{2}.conv.{3}", "encoder.stages.{0}.blocks.{1}.conv{2}.all_modules.0.{3}"),
    (re.compile(rf"encoder\.stages\.(\d+)\.(\d+)\.norm([12])\.{_PARAM}"),
     "encoder.stages.{0}.blocks.{1}.conv{2}.norm.{3}", "encoder.stages.{0}.blocks.{1}.conv{2}.all_modules.1.{3}"),
    (re.compile(rf"decoder\.upsamples\.(\d+)\.{_PARAM}"), "decoder.transpconvs.{0}.{1}", None),
    (re.compile(rf"decoder\.stages\.(\d+)\.(\d+)\.conv\.{_PARAM}"), "decoder.stages.{0}.convs.{1}.conv.{2}",
     "decoder.stages.{0}.convs.{1}.all_modules.0.{2}"),
    (re.compile(rf"decoder\.stages\.(\d+)\.(\d+)\.norm\.{_PARAM}"), "decoder.stages.{0}.convs.{1}.norm.{2}",
     "decoder.stages.{0}.convs.{1}.all_modules.1.{2}"),
]  # fmt: skip
_SHORTCUT = re.compile(rf"encoder\.stages\.(\d+)\.(\d+)\.shortcut\.(\d+)\.{_PARAM}")

# nnU-Net name -> maesil template (aliases are recognised separately and dropped).
_FROM_NNUNET: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"encoder\.stem\.convs\.0\.conv\.{_PARAM}"), "encoder.stem.conv.{0}"),
    (re.compile(rf"encoder\.stem\.convs\.0\.norm\.{_PARAM}"), "encoder.stem.norm.{0}"),
    (re.compile(rf"encoder\.stages\.(\d+)\.blocks\.(\d+)\.conv([12])\.conv\.{_PARAM}"),
     "encoder.stages.{0}.{1}.conv{2}.{3}"),
    (re.compile(rf"encoder\.stages\.(\d+)\.blocks\.(\d+)\.conv([12])\.norm\.{_PARAM}"),
     "encoder.stages.{0}.{1}.norm{2}.{3}"),
    (re.compile(rf"decoder\.transpconvs\.(\d+)\.{_PARAM}"), "decoder.upsamples.{0}.{1}"),
    (re.compile(rf"decoder\.stages\.(\d+)\.convs\.(\d+)\.conv\.{_PARAM}"), "decoder.stages.{0}.{1}.conv.{2}"),
    (re.compile(rf"decoder\.stages\.(\d+)\.convs\.(\d+)\.norm\.{_PARAM}"), "decoder.stages.{0}.{1}.norm.{2}"),
]  # fmt: skip
_SKIP = re.compile(rf"encoder\.stages\.(\d+)\.blocks\.(\d+)\.skip\.(\d+)\.(conv|norm)\.{_PARAM}")
#: Keys of nnU-Net's state dict that repeat another key (or belong to the segmentation head).
_ALIASES = re.compile(r"(^|\.)all_modules\.|^decoder\.encoder\.|^decoder\.seg_layers\.")


def _nnunet_names(key: str, value: Tensor) -> tuple[str, str | None]:
    """nnU-Net's name of a maesil key, and its ``all_modules`` alias (None when it has none)."""
    for pattern, name, alias in _TO_NNUNET:
        match = pattern.fullmatch(key)
        if match:
            return name.format(*match.groups()), None if alias is None else alias.format(*match.groups())
    match = _SHORTCUT.fullmatch(key)
    if match:  # maesil's shortcut is Sequential(pool?, conv, norm); nnU-Net's is Sequential(pool?, ConvNorm)
        stage, block, index, param = match.groups()
        base = f"encoder.stages.{stage}.blocks.{block}.skip"
        if value.ndim > 1:  # the 1³ projection conv
            return f"{base}.{index}.conv.{param}", f"{base}.{index}.all_modules.0.{param}"
        position = int(index) - 1
        return f"{base}.{position}.norm.{param}", f"{base}.{position}.all_modules.1.{param}"
    raise KeyError(key)


def to_nnunet_state(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """maesil ``ResEncUNet`` tensors (``encoder.*``, optionally ``decoder.*``) under nnU-Net's names.

    The result holds every name nnU-Net's ``ResidualEncoderUNet.state_dict()`` has for those tensors: the
    ``all_modules`` aliases, and ``decoder.encoder.*`` when a decoder is included, so that nnU-Net's strict
    loaders find every key they check. The segmentation head is never included (pretraining has none).

    Raises:
        KeyError: a key that is not part of a maesil ResEnc U-Net encoder/decoder, e.g. ``head.weight``.
    """
    state: dict[str, Tensor] = {}
    for key, value in tensors.items():
        name, alias = _nnunet_names(key, value)
        state[name] = value
        if alias is not None:
            state[alias] = value
    if any(key.startswith("decoder.") for key in tensors):
        state.update({"decoder." + k: v for k, v in list(state.items()) if k.startswith("encoder.")})
    return state


def is_nnunet_state(state: Mapping[str, Any]) -> bool:
    """True when the keys are nnU-Net's residual-encoder names (``encoder.stem.convs.`` / ``…blocks.``)."""
    return any(key.startswith("encoder.stem.convs.") or (key.startswith("encoder.stages.") and ".blocks." in key)
               for key in state)


def from_nnunet_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """nnU-Net ``ResidualEncoderUNet`` tensors under maesil's names; returns ``(renamed, ignored)``.

    Aliases (``all_modules``, ``decoder.encoder``) and the segmentation layers are ignored, as is any key that
    is not part of a residual-encoder U-Net (returned in ``ignored``, so a report can show it).
    """
    renamed: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        if _ALIASES.search(key):
            ignored.append(key)
            continue
        new = None
        for pattern, template in _FROM_NNUNET:
            match = pattern.fullmatch(key)
            if match:
                new = template.format(*match.groups())
                break
        match = _SKIP.fullmatch(key)
        if match:
            stage, block, index, kind, param = match.groups()
            position = int(index) + (kind == "norm")
            new = f"encoder.stages.{stage}.{block}.shortcut.{position}.{param}"
        if new is None:
            ignored.append(key)
        else:
            renamed[new] = value
    return renamed, ignored


def adapt_input_channels(state: dict[str, Tensor], in_channels: int, key: str = "encoder.stem.conv.weight") -> bool:
    """Widens a pretrained stem to ``in_channels`` the way nnssl does: the weight repeated along the input
    channels and divided by their number (so a constant image gives the same response). Returns True when it
    adapted; nothing happens when the stem already has ``in_channels`` or more."""
    weight = state.get(key)
    if weight is None or weight.shape[1] >= in_channels:
        return False
    if in_channels % weight.shape[1]:
        raise ValueError(f"cannot widen a stem of {weight.shape[1]} input channels to {in_channels}.")
    repeat = in_channels // weight.shape[1]
    state[key] = weight.repeat(1, repeat, *([1] * (weight.ndim - 2))) / repeat
    return True


def _triple(value: Any) -> list[float]:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * 3
    return [float(v) if isinstance(v, float) and not float(v).is_integer() else v for v in values]


def nnunet_architecture_kwargs(architecture: Mapping[str, Any], decoder_convs: int = 1) -> dict[str, Any]:
    """``ResidualEncoderUNet`` constructor arguments (without ``input_channels`` / ``num_classes``), serialised as
    nnssl's ``DynamicArchitecturePlans`` (classes as import paths) for a maesil ``ResEncUNet`` description."""
    features = [int(f) for f in architecture["features"]]
    stages = len(features)
    kernel = int(architecture.get("kernel_size", 3))
    return {
        "n_stages": stages,
        "features_per_stage": features,
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[kernel] * 3 for _ in range(stages)],
        "strides": [[int(s)] * 3 for s in architecture["strides"]],
        "n_blocks_per_stage": [int(b) for b in architecture["blocks_per_stage"]],
        "n_conv_per_stage_decoder": [int(decoder_convs)] * (stages - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.modules.activation.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


def adaptation_plan(architecture: Mapping[str, Any], preprocessing: Mapping[str, Any], method: str | None,
                    decoder_convs: int = 1) -> dict[str, Any]:
    """nnssl's serialised ``AdaptationPlan`` for a maesil ResEnc encoder.

    The pretraining plan records what nnU-Net's ``nnUNetv2_preprocess_like_nnssl`` reads: the spacing and
    patch (superpatch) size; the normalisation is named ``ZScoreNormalization`` for MRI and
    ``CTWindow[lo,hi]->[0,1]`` for CT, which nnU-Net does not have (see the README on matching plans).
    """
    size = [int(s) for s in _triple(preprocessing.get("superpatch_size", 128))]
    spacing = preprocessing.get("target_spacing")
    modality = preprocessing.get("modality", "ct")
    window = preprocessing.get("hu_window")
    norm = "ZScoreNormalization" if modality == "mri" else (
        f"CTWindow[{window[0]:g},{window[1]:g}]->[0,1]" if window else "CTWindow->[0,1]")
    configuration = {
        "data_identifier": f"maesil_{(method or 'encoder').lower()}",
        "preprocessor_name": "maesil",
        "spacing_style": "noresample" if spacing is None else "fixed",
        "normalization_schemes": [norm],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_mask": "resample_data_or_seg_to_shape",
        "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "spacing": None if spacing is None else _triple(spacing),
        "patch_size": size,
    }
    kwargs = nnunet_architecture_kwargs(architecture, decoder_convs)
    return {
        "architecture_plans": {
            "arch_class_name": NNUNET_ARCHITECTURE,
            "arch_kwargs": kwargs,
            "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"],
        },
        "pretrain_plan": {
            "dataset_name": "maesil",
            "plans_name": f"maesil_{(method or 'encoder').lower()}",
            "original_median_spacing_after_transp": configuration["spacing"] or [1, 1, 1],
            "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2],
            "configurations": {"3d_fullres": configuration},
            "experiment_planner_used": "maesil",
        },
        "pretrain_num_input_channels": int(architecture.get("in_channels", 1)),
        "recommended_downstream_patchsize": size,
        "key_to_encoder": KEY_TO_ENCODER,
        "key_to_stem": KEY_TO_STEM,
        "keys_to_in_proj": list(KEYS_TO_IN_PROJ),
        "key_to_lpe": None,
    }


def nnssl_checkpoint(tensors: Mapping[str, Tensor], architecture: Mapping[str, Any],
                     preprocessing: Mapping[str, Any], method: str | None) -> dict[str, Any]:
    """The dict to ``torch.save``: nnssl's checkpoint layout, readable with ``torch.load(weights_only=True)``.

    ``network_weights`` holds the tensors under nnU-Net's names (:func:`to_nnunet_state`); with a decoder it
    is also a complete ``-pretrained_weights`` file for ``nnUNetv2_train`` (whose loader checks every key but
    the segmentation layers).
    """
    decoder_convs = len({k.split(".")[3] for k in tensors if k.startswith("decoder.stages.0.")}) or 1
    weights = {k: v.detach().to("cpu").contiguous() for k, v in to_nnunet_state(tensors).items()}
    return {
        "network_weights": weights,
        "nnssl_adaptation_plan": adaptation_plan(architecture, preprocessing, method, decoder_convs),
        "trainer_name": f"maesil.{method}" if method else "maesil",
        "citations": [],
        "maesil": {"method": method, "includes_decoder": any(k.startswith("decoder.") for k in tensors)},
    }

