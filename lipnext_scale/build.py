"""Recipe → the objects both the trainer and the tools build from it: compute dtype, optimizer inputs."""

from __future__ import annotations

import torch

from lipnext_scale.config import Recipe
from lipnext_scale.optim import ManifoldHyper, parameter_kind


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        # bf16 matmuls are fast on GPUs; on CPUs they are emulated and slower than fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def named_parameters_with_kinds(model) -> list[tuple[str, torch.nn.Parameter, str]]:
    manifold = {id(p) for _, p in model.orthogonal_parameters()}
    return [(n, p, parameter_kind(p, id(p) in manifold)) for n, p in model.named_parameters()]


def manifold_hyper(recipe: Recipe) -> ManifoldHyper:
    o = recipe.optim
    return ManifoldHyper(
        lr=o.lr,
        euclidean_lr=o.euclidean_lr,
        betas=o.betas,
        eps=o.eps,
        weight_decay=o.weight_decay,
        euclidean_method=o.euclidean,
        lookahead_k=o.lookahead_k,
        lookahead_alpha=o.lookahead_alpha,
        reorthogonalize_every=o.reorthogonalize_every,
    )
