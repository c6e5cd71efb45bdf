"""Data loading: discovery and validation of image folders, preprocessing, the two back-ends (TorchIO
queue, prepared cache) with their shared patch sampling, and the shared :class:`VolumeDataModule`."""

from maesil.data.checks import check_headers, check_records
from maesil.data.datamodule import VolumeDataModule
from maesil.data.records import DataError, Problem, SubjectRecord
from maesil.data.sources import discover_subjects
from maesil.data.spec import DataSpec
from maesil.data.views import ViewSettings  # registers the task "two_view"

__all__ = [
    "DataError", "DataSpec", "Problem", "SubjectRecord", "ViewSettings", "VolumeDataModule", "check_headers",
    "check_records", "discover_subjects",
]
