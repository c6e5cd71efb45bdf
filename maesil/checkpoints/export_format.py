"""maesil's exported-encoder format: a ``.safetensors`` file of tensors plus a JSON description.

An export holds the downstream network's own key names (``encoder.*`` and, for methods that train one,
``decoder.*``), so it maps onto a network by the identity layout :data:`EXPORTED_PREFIXES`. The description
(format, version, method, architecture, pretraining preprocessing, ...) is written twice: as a sidecar next
to the file (``enc.safetensors`` -> ``enc.json``) and inside the safetensors header, so that a file that lost
its sidecar still describes itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "EXPORTED_LAYOUT",
    "EXPORTED_PREFIXES",
    "EXPORT_FORMAT",
    "EXPORT_FORMAT_VERSION",
    "SAFETENSORS_METADATA_KEY",
    "is_export",
    "sidecar_path",
]

#: ``format`` and ``format_version`` of the description.
EXPORT_FORMAT = "maesil-encoder"
EXPORT_FORMAT_VERSION = 1
#: Key of the description inside the safetensors header.
SAFETENSORS_METADATA_KEY = "maesil"
#: Name of the layout an export is read with (reported by ``load_pretrained``).
EXPORTED_LAYOUT = "exported"
#: An export's keys are already the downstream network's.
EXPORTED_PREFIXES: dict[str, str] = {"encoder.": "encoder.", "decoder.": "decoder."}


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of an exported file: the same name with ``.json``."""
    return Path(path).with_suffix(".json")


def is_export(metadata: Mapping[str, Any]) -> bool:
    """True for the metadata of a file written by :func:`maesil.checkpoints.export_encoder`."""
    return metadata.get("format") == EXPORT_FORMAT
