"""lipnext_scale: train and certify 1-Lipschitz LipNeXt classifiers."""

from lipnext_scale.certify import Certifier, certified_radius, certify, evaluate, exact_fp32_matmuls
from lipnext_scale.pretrained import load_pretrained

__all__ = ["Certifier", "certified_radius", "certify", "evaluate", "exact_fp32_matmuls", "load_pretrained"]
