"""Data loading: discovery and validation of image folders, preprocessing, patch sampling and
the shared :class:`VolumeDataModule`."""

from maesil.data.datamodule import VolumeDataModule
from maesil.data.sources import DataError, SubjectRecord, check_headers, discover_subjects

__all__ = ["DataError", "SubjectRecord", "VolumeDataModule", "check_headers", "discover_subjects"]
