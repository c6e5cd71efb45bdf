"""Checkpoints: reading them safely, moving pretrained weights into a downstream network, exporting
encoders, and writing checkpoints atomically.

* :mod:`~maesil.checkpoints.reading`: the one safe reader (:func:`load_checkpoint_state`,
  ``weights_only=True``; unsafe pickles are refused with :class:`UnsafeCheckpointError`).
* :mod:`~maesil.checkpoints.layouts`: which keys of a method's checkpoint transfer; each method declares its
  :class:`TransferLayout` next to its own code, found by the checkpoint's class path.
* :mod:`~maesil.checkpoints.transfer`: :func:`load_pretrained` with a :class:`LoadReport`.
* :mod:`~maesil.checkpoints.export` and :mod:`~maesil.checkpoints.export_format`: :func:`export_encoder`,
  safetensors plus a JSON description of the architecture and preprocessing.
* :mod:`~maesil.checkpoints.nnunet_format`, :mod:`~maesil.checkpoints.monai_format`: nnU-Net's and MONAI's
  names for maesil's ResEnc U-Net and ViT; :mod:`~maesil.checkpoints.interop_export`: :func:`export_nnunet`
  (nnssl checkpoint) and :func:`export_monai` (MONAI ``ViT`` state dict); :mod:`~maesil.checkpoints.foreign`:
  nnssl / nnU-Net and MONAI weights renamed for :func:`load_pretrained`.
* :mod:`~maesil.checkpoints.preprocessing`: :func:`check_preprocessing`, pretraining vs fine-tuning.
* :mod:`~maesil.checkpoints.writing`: :class:`AtomicCheckpointIO`, :func:`check_resumable`.
"""

from maesil.checkpoints.export import describe_architecture, export_encoder
from maesil.checkpoints.interop_export import export_monai, export_nnunet
from maesil.checkpoints.layouts import TransferLayout, identify_method, register_layout, registered_layouts
from maesil.checkpoints.preprocessing import check_preprocessing
from maesil.checkpoints.reading import (
    CheckpointError,
    UnsafeCheckpointError,
    checkpoint_safe_globals,
    load_checkpoint_state,
)
from maesil.checkpoints.transfer import LoadReport, has_trained_decoder, load_pretrained, remap_state_dict
from maesil.checkpoints.writing import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    CorruptCheckpointError,
    atomic_torch_save,
    check_resumable,
    latest_last_checkpoint,
)

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "LoadReport",
    "TransferLayout",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "check_preprocessing",
    "check_resumable",
    "checkpoint_safe_globals",
    "describe_architecture",
    "export_encoder",
    "export_monai",
    "export_nnunet",
    "has_trained_decoder",
    "identify_method",
    "latest_last_checkpoint",
    "load_checkpoint_state",
    "load_pretrained",
    "register_layout",
    "registered_layouts",
    "remap_state_dict",
]
