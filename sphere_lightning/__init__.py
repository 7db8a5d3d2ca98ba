"""Sequential knowledge editing of language models with SPHERE, on PyTorch Lightning."""

__version__ = "0.1.0"
