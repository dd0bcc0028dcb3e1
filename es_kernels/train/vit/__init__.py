"""ViT (timm) fine-tuning with ES/ESWP: the ``es-vit`` command. See :mod:`es_kernels.train.vit.cli` for usage.

Importing this package imports neither timm, torchvision nor matplotlib; the run does, when it starts.
"""

from es_kernels.train.vit.cli import main

__all__ = ["main"]
