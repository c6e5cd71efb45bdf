"""LightningModules, one per pretraining or fine-tuning method."""

from maesil.methods.base import PretrainModule
from maesil.methods.baselines import AE, VAE, VQVAE
from maesil.methods.maesil import MAESIL

__all__ = ["AE", "MAESIL", "PretrainModule", "VAE", "VQVAE"]
