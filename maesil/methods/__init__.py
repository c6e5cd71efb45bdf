"""LightningModules, one per pretraining or fine-tuning method."""

from maesil.methods.base import MethodModule
from maesil.methods.baselines import AE, VAE, VQVAE
from maesil.methods.byol import BYOL
from maesil.methods.maesil import MAESIL
from maesil.methods.pgl import PGL
from maesil.methods.s3d import S3D
from maesil.methods.segmentation import Segmentation

__all__ = ["AE", "BYOL", "MAESIL", "MethodModule", "PGL", "S3D", "Segmentation", "VAE", "VQVAE"]
