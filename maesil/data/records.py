"""What finding a dataset's subjects produces: one :class:`SubjectRecord` per subject, and the
:class:`Problem` rows (gathered into one :class:`DataError`) about the paths that could not be used."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataError", "Problem", "SubjectRecord"]


@dataclass(frozen=True)
class Problem:
    """One finding about one input path: ``severity`` is ``"error"`` (the run cannot use the data)
    or ``"warning"`` (it can, but the user should know)."""

    path: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class DataError(ValueError):
    """Invalid input data. The message names every offending path and the problem with it.

    ``problems`` holds the rendered lines, ``findings`` the same as :class:`Problem` objects.
    """

    def __init__(self, problems: str | Problem | Sequence[str | Problem], header: str | None = None) -> None:
        if isinstance(problems, (str, Problem)):
            problems = [problems]
        self.findings: list[Problem] = [p if isinstance(p, Problem) else Problem("", p) for p in problems]
        self.problems: list[str] = [str(p) for p in problems]
        if len(self.problems) == 1 and header is None:
            message = self.problems[0]
        else:
            n = len(self.problems)
            head = header or f"Found {n} problem{'s' if n != 1 else ''} with the input data"
            message = head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


@dataclass(frozen=True)
class SubjectRecord:
    """One subject: its id, image and optional label map.

    ``image`` (and ``label``) is a volume file or, for DICOM, the folder of one study;
    ``series_uid`` then picks the series in that folder (``None``: the largest CT series).
    ``split`` is the split given by a manifest (``"train"``, ``"val"`` or ``"test"``), if any.
    """

    subject_id: str
    image: Path
    label: Path | None = None
    series_uid: str | None = None
    split: str | None = None
