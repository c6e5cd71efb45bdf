"""LightningModules, one per pretraining or fine-tuning method."""

from maesil.methods.base import PretrainModule
from maesil.methods.maesil import MAESIL

__all__ = ["MAESIL", "PretrainModule"]
