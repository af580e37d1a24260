"""Rigorous float64 arithmetic for bounds: γ_n, outward rounding, norms and spectral-norm bounds.

Every function here returns an *upper* bound on a real quantity (or a lower one where it says so),
accounting for the rounding of its own float64 arithmetic (docs/soundness.md §2). The model assumed is
IEEE 754 binary64 with round-to-nearest: each +, −, ×, /, sqrt is correctly rounded (relative error ≤ u
= 2⁻⁵³, plus an absolute underflow term that `TINY` covers), and a sum of n terms or a dot product of
length n, in any order and with or without FMA, has error ≤ γ_n · Σ|terms| (Higham, Accuracy and
Stability of Numerical Algorithms, §3.1–3.5). Nothing here assumes a summation order, so the bounds hold
for any BLAS, on any device, with any thread count.
"""

from __future__ import annotations

import math

import torch

U64 = 2.0**-53  # unit roundoff of binary64
U32 = 2.0**-24  # unit roundoff of binary32
# Covers every underflow (subnormal or flushed-to-zero) contribution of a whole evaluation: each op adds at
# most 2⁻¹⁰²² absolute, and no evaluation here does 2¹²⁰ ops.
TINY = 2.0**-900


def up(x: float) -> float:
    """The next float above x: ≥ the exact result of the one correctly rounded op that produced x."""
    return math.nextafter(x, math.inf)


def down(x: float) -> float:
    return math.nextafter(x, -math.inf)


def gamma(n: int, u: float = U64) -> float:
    """γ_n = n·u / (1 − n·u), rounded up (n·u and 1 − n·u are exact for the n used here)."""
    if n * u >= 0.5:
        raise ValueError(f"γ_{n} is undefined or useless for unit roundoff {u}")
    return up((n * u) / (1.0 - n * u))


def tensor_up(t: torch.Tensor) -> torch.Tensor:
    """Elementwise next float above t (t is the correctly rounded result of one op)."""
    return torch.nextafter(t, torch.full_like(t, math.inf))


def tensor_down(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, -math.inf))


def norm_up(t: torch.Tensor, dim=None) -> torch.Tensor:
    """An upper bound on the exact L2 norm of float64 `t` over `dim` (all of it when None).

    Computed as sqrt(Σ t²): the sum of n squares has relative error ≤ γ_n and sqrt adds u, so the
    computed value v satisfies ‖t‖ ≤ v / (1 − γ_{n+1}) ≤ v · (1 + 2γ_{n+1}); the product is rounded up.
    """
    if t.dtype != torch.float64:
        raise ValueError(f"norm_up needs float64, got {t.dtype}")
    n = (
        t.numel()
        if dim is None
        else math.prod(t.shape[d] for d in (dim if isinstance(dim, tuple) else (dim,)))
    )
    squares = (t * t).sum() if dim is None else (t * t).sum(dim=dim)
    return tensor_up(torch.sqrt(squares) * up(1.0 + 2.0 * gamma(n + 1))) + TINY


def frobenius_up(matrix: torch.Tensor) -> float:
    """Upper bound on ‖X‖_F of a matrix whose values are exact in float64 (fp32 or float64 entries)."""
    return float(norm_up(matrix.detach().to(torch.float64)))


def _spectral_up(a: torch.Tensor, squarings: int) -> float:
    """Upper bound on ‖A‖₂ for a float64 matrix A (exactly the values held), by ‖A‖₂² = ‖AᵀA‖₂.

    With C = fl(AᵀA) computed in any order, |C − AᵀA| ≤ γ_n |A|ᵀ|A| elementwise (n = rows), so
    ‖AᵀA‖₂ ≤ ‖C‖₂ + γ_n ‖A‖_F²; recursing `squarings` times ends on ‖·‖₂ ≤ ‖·‖_F. Each level halves the
    exponent, so the Frobenius over-statement (up to √rank) shrinks to rank^(1/2^(k+1)). A is scaled by
    a power of two (exact) before each product so nothing underflows.
    """
    frob = frobenius_up(a)
    if squarings == 0 or frob == 0.0:
        return frob
    scale_exp = math.frexp(frob)[1]  # frob ∈ [2^(e−1), 2^e): a / 2^e has ‖·‖_F ≤ 1
    scaled = torch.ldexp(a, torch.tensor(-scale_exp, dtype=torch.int32, device=a.device))
    frob_scaled = math.ldexp(frob, -scale_exp)  # exact, and still an upper bound for `scaled`
    product = scaled.t() @ scaled
    slack = up(gamma(a.shape[0]) * up(frob_scaled * frob_scaled))
    inner = up(_spectral_up(product, squarings - 1) + slack)
    return math.ldexp(up(math.sqrt(inner)), scale_exp)


def spectral_norm_up(matrix: torch.Tensor, squarings: int = 3) -> float:
    """Upper bound on ‖X‖₂ of a matrix whose entries are exact in float64 (fp32 or float64 values),
    computed in float64 on X's own device."""
    return _spectral_up(matrix.detach().to(torch.float64), squarings)


# How many times the Gram defect is squared before taking a Frobenius norm (`operator_norm_bound`): each
# costs one more W³ product and cuts the over-statement from √W to W^(1/2^(k+1)) (k = 3: W^(1/16)).
DEFECT_SQUARINGS = 3


def operator_norm_bound(matrix: torch.Tensor, squarings: int = DEFECT_SQUARINGS) -> float:
    """A sound upper bound on ‖X‖₂ for a tall (n, p) X with XᵀX ≈ I, from its values, in float64.

    ‖X‖₂² = λ_max(XᵀX) ≤ 1 + ‖D‖₂ with D = XᵀX − I. The computed D̂ = fl(fl(XᵀX) − I) satisfies
    |D̂ − D| ≤ γ_{n+1}(|X|ᵀ|X| + I) elementwise, so ‖D‖₂ ≤ ‖D̂‖₂ + γ_{n+1}(‖X‖_F² + √p), and ‖D̂‖₂ is
    bounded by `spectral_norm_up` (k squarings). Every step rounds up. Power iteration would be a lower
    estimate and is never used.
    """
    n, p = matrix.shape
    if n < p:
        raise ValueError(f"operator_norm_bound wants a tall matrix, got {n}x{p}")
    x = matrix.detach().to(torch.float64)
    defect = x.t() @ x
    defect.diagonal().sub_(1.0)
    frob_x = frobenius_up(x)
    rounding = up(gamma(n + 1) * up(up(frob_x * frob_x) + up(math.sqrt(p))))
    defect_norm = up(spectral_norm_up(defect, squarings) + rounding)
    return up(math.sqrt(up(1.0 + defect_norm)))


def product_up(factors) -> float:
    """Π factors in the given order, every multiplication rounded up (the same order on every rank)."""
    out = 1.0
    for f in factors:
        out = up(out * f)
    return out
