from lipnext_scale.optim.fastexp import fast_exp, polar, reorthogonalize, retraction_orders
from lipnext_scale.optim.manifold import ManifoldHyper, ManifoldOptimizer, lr_schedule, parameter_kind

__all__ = [
    "ManifoldHyper",
    "ManifoldOptimizer",
    "fast_exp",
    "lr_schedule",
    "parameter_kind",
    "polar",
    "reorthogonalize",
    "retraction_orders",
]
