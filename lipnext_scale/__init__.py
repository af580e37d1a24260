"""lipnext_scale: train and certify 1-Lipschitz LipNeXt classifiers."""

from lipnext_scale.certify import certified_radius, evaluate, exact_fp32_matmuls
from lipnext_scale.pretrained import load_pretrained

__all__ = ["certified_radius", "evaluate", "exact_fp32_matmuls", "load_pretrained"]
