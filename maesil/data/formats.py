"""The file types a dataset may hold, and the subject id a volume's file name gives."""

from __future__ import annotations

from pathlib import Path

__all__ = ["MANIFEST_EXTENSIONS", "SIDECAR_EXTENSIONS", "SUPPORTED_EXTENSIONS", "split_extension"]

#: Image file extensions read by the pipeline (SimpleITK / TorchIO). Longest first, so that
#: ``.nii.gz`` wins over ``.gz``.
SUPPORTED_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

#: Raw-data sidecar extensions of ``.mhd`` headers. They are accepted when an ``.mhd`` in the
#: same folder references them (``ElementDataFile``) or has the same stem.
SIDECAR_EXTENSIONS: tuple[str, ...] = (".raw", ".zraw")

#: Extensions of the subject lists that ``data_dir`` may name instead of a folder.
MANIFEST_EXTENSIONS: tuple[str, ...] = (".csv", ".json")


def split_extension(path: str | Path) -> tuple[str, str] | None:
    """Return ``(stem, extension)`` for a supported image file, else ``None``.

    The stem is the subject id of a volume file: ``case_001.nii.gz`` -> ``("case_001", ".nii.gz")``.
    """
    name = Path(path).name
    lower = name.lower()
    for ext in SUPPORTED_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    return None
