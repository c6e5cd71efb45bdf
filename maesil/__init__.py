"""maesil: self-supervised pretraining of 3D medical images with PyTorch Lightning."""

__version__ = "0.1.0"
