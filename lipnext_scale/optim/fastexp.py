"""Matrix exponential of skew matrices and polar retraction, the two maps that keep weights orthogonal."""

from __future__ import annotations

import torch

# Truncated Taylor series T_k(A) of exp(A) for skew A. T_k(A)ᵀT_k(A) − I is even in A, so the orthogonality
# defect is ‖A‖⁴/4 for k = 2 and ‖A‖⁶/72 for k = 4. These thresholds (on ‖A‖_F ≥ ‖A‖₂) keep it below
# 1e-8 per step, well under fp32 rounding of the master; beyond them the exact exponential is used.
# (DESIGN.md's looser thresholds 0.05/0.25/1 would leave up to ~1e-2 of drift per step.)
SECOND_ORDER_MAX_NORM = 0.014
FOURTH_ORDER_MAX_NORM = 0.095


def skew(x: torch.Tensor) -> torch.Tensor:
    return (x - x.transpose(-1, -2)) / 2


def sym(x: torch.Tensor) -> torch.Tensor:
    return (x + x.transpose(-1, -2)) / 2


def fast_exp(a: torch.Tensor) -> torch.Tensor:
    """exp(A) for a skew-symmetric A: adaptive truncated Taylor series, exact exponential for large A.

    Returns the result in A's dtype; pass float64 for an orthogonality defect at float64 rounding.
    At most three matrix products in the Taylor regimes.
    """
    norm = torch.linalg.matrix_norm(a, ord="fro").item()
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    if norm < SECOND_ORDER_MAX_NORM:
        return eye + a + (a @ a) / 2
    if norm < FOURTH_ORDER_MAX_NORM:
        a2 = a @ a
        return eye + a + a2 / 2 + (a2 @ a) / 6 + (a2 @ a2) / 24
    return torch.linalg.matrix_exp(a)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns, U·Vᵀ from the SVD X = U·S·Vᵀ (in X's dtype)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def reorthogonalize(x: torch.Tensor) -> torch.Tensor:
    """Polar factor of a nearly orthogonal fp32 matrix, computed in float64, returned in x's dtype.

    Newton–Schulz X ← X(3I − XᵀX)/2 squares the defect each iteration and is only matrix products (fast on
    GPUs); it converges when ‖XᵀX − I‖₂ < 1, so larger defects fall back to the SVD. It iterates until the
    defect is at float64 rounding (from the largest accepted defect, 0.5, that takes six iterations).
    """
    y = x.double()
    eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
    for _ in range(8):
        defect = y.t() @ y - eye
        size = torch.linalg.matrix_norm(defect, ord="fro").item()
        if size > 0.5:
            return polar(x.double()).to(x.dtype)
        if size < 1e-10:
            break
        y = y @ (eye - defect / 2)
    return y.to(x.dtype)
