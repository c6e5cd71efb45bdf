"""Data loading: discovery and validation of image folders, preprocessing, patch sampling and
the shared :class:`VolumeDataModule`."""

from maesil.data.datamodule import VolumeDataModule
from maesil.data.checks import check_headers, check_records
from maesil.data.sources import DataError, Problem, SubjectRecord, discover_subjects
from maesil.data.views import ViewSettings  # registers the task "two_view"

__all__ = [
    "DataError", "Problem", "SubjectRecord", "ViewSettings", "VolumeDataModule", "check_headers", "check_records",
    "discover_subjects",
]
