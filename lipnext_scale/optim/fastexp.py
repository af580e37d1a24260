"""Retractions that keep weights orthogonal: a truncated exponential of skew matrices whose orthogonality
defect is bounded rigorously, Newton–Schulz polar re-orthogonalisation, and the SVD polar as fallback.

The host decides how many products each matrix needs (series order, squarings, Newton–Schulz iterations)
from a few scalars per matrix; `read_scalars` is the one place those scalars reach the host, once per
optimizer step for all of a rank's matrices.

Defect of the truncated series. For skew A, T_k(A) = Σ_{j≤k} A^j/j! is normal and T_k(A)ᵀ = T_k(−A), so
T_kᵀT_k − I = Σ_n c_n A^n with c_n = Σ_{i+j=n, i,j≤k} (−1)^i/(i!·j!): zero for n ≤ k (binomial) and for odd n
(the terms pair off), so the defect is a polynomial in A² of degrees k+1 … 2k (k = 2: A⁴/4; k = 4:
−A⁶/72 + A⁸/576). Its spectral norm is at most Σ |c_n|·ρⁿ with ρ = ‖A‖₂. After s squarings of T_k(A/2^s)
the defect is at most (1 + δ)^(2^s) − 1, δ the defect of the factor (TᵀT commutes with T). ρ is bounded
without an eigenvalue solver: the eigenvalues of a skew A come in pairs ±iθ, so ‖A²‖_F² = Σ|λ|⁴ ≥ 2ρ⁴, and
A² is needed by the series anyway. With the float64 rounding of A² added (≤ W·2⁻⁵³·‖A‖_F², elementwise),
ρ ≤ ((‖fl(A²)‖_F + W·2⁻⁵³·‖A‖_F²)² / 2)^(1/4), times the norm's own summation error (`spectral_bound`).
Every plan guarantees a defect ≤ DEFECT_TARGET per step in exact arithmetic; float64 rounding adds
~W·2⁻⁵³ (< 1e-12 for W ≤ 5760).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch._subclasses.fake_tensor import is_fake

# The orthogonality defect ‖TᵀT − I‖₂ one retraction may commit: far under fp32 rounding of the master
# (~1e-7), so the truncation never shows next to it. Not a tuning knob: looser targets trade exactness.
DEFECT_TARGET = 1e-8
# Series orders formed by Horner's rule in A² (order 2m costs m products, A² included).
SERIES_ORDERS = (2, 4, 6, 8, 10, 12, 14, 16)
MAX_SQUARINGS = 64
# Newton–Schulz converges for ‖XᵀX − I‖₂ < 1; beyond this bound the SVD is used instead.
NEWTON_SCHULZ_MAX_DEFECT = 0.5
# Iterate until the defect bound is at float64 rounding.
NEWTON_SCHULZ_TOLERANCE = 1e-15


def skew(x: torch.Tensor) -> torch.Tensor:
    return (x - x.transpose(-1, -2)) / 2


def sym(x: torch.Tensor) -> torch.Tensor:
    return (x + x.transpose(-1, -2)) / 2


# ----------------------------------------------------------------------------- the one host sync


def read_scalars(scalars: list[torch.Tensor]) -> list[float] | None:
    """The step's one host sync: every scalar the plans need, stacked on their device and read at once.

    Under FakeTensorMode (the full-scale dry run) values cannot be read; this returns None and every
    planner below then returns its most expensive plan, which is what a dry run should account for.
    """
    if not scalars:
        return []
    stacked = torch.stack([s.reshape(()).to(torch.float64) for s in scalars])
    if is_fake(stacked):
        return None
    return stacked.tolist()


# ----------------------------------------------------------------------------- truncated exponential


@functools.cache
def defect_coefficients(order: int) -> tuple[tuple[int, float], ...]:
    """(n, |c_n|) of the defect T_kᵀT_k − I = Σ c_n Aⁿ, exact rationals rounded once."""
    out = []
    for n in range(order + 1, 2 * order + 1):
        c = sum(
            Fraction((-1) ** i, math.factorial(i) * math.factorial(n - i))
            for i in range(n - order, order + 1)
        )
        if c:
            out.append((n, abs(float(c))))
    return tuple(out)


def series_defect_bound(order: int, rho: float, squarings: int = 0) -> float:
    """Upper bound on ‖TᵀT − I‖₂ for T = T_order(A/2^s)^(2^s), skew A with ‖A‖₂ ≤ rho."""
    r = rho / 2**squarings
    delta = sum(c * r**n for n, c in defect_coefficients(order))
    exponent = 2**squarings * math.log1p(delta)
    return math.expm1(exponent) if exponent < 700 else math.inf


def series_products(order: int) -> int:
    return order // 2


@functools.cache
def _largest_norm(order: int, squarings: int) -> float:
    """The largest ρ for which the plan (order, squarings) meets DEFECT_TARGET (bisection, rounded down)."""
    lo, hi = 0.0, 2.0**squarings * 8
    for _ in range(80):
        mid = (lo + hi) / 2
        if series_defect_bound(order, mid, squarings) <= DEFECT_TARGET:
            lo = mid
        else:
            hi = mid
    return lo * (1 - 1e-12)


@dataclass(frozen=True)
class SeriesPlan:
    order: int
    squarings: int

    @property
    def products(self) -> int:
        """Matrix products to form the factor, A² included (the product with X is not counted)."""
        return series_products(self.order) + self.squarings


@functools.cache
def _plans_by_cost() -> tuple[tuple[int, float, SeriesPlan], ...]:
    """Every (order, squarings) with the largest ρ it covers, cheapest first, larger reach first."""
    plans = [
        (SeriesPlan(k, s).products, _largest_norm(k, s), SeriesPlan(k, s))
        for k in SERIES_ORDERS
        for s in range(MAX_SQUARINGS + 1)
    ]
    plans.sort(key=lambda p: (p[0], -p[1]))
    return tuple(plans)


def spectral_bound(a2_fro: float, a_fro: float, width: int) -> float:
    """ρ ≥ ‖A‖₂ for skew A from ‖fl(A²)‖_F and ‖A‖_F (see the module docstring)."""
    # fl(A²)'s rounding (≤ W·2⁻⁵³·‖A‖_F², entrywise) and the norm's summation error (≤ W²·2⁻⁵³, relative).
    a2 = (a2_fro + width * 2.0**-53 * a_fro**2) * (1 + width * width * 2.0**-53)
    return (a2 * a2 / 2) ** 0.25


def retraction_orders(bounds: list[float] | None, count: int) -> list[SeriesPlan]:
    """The cheapest plan meeting DEFECT_TARGET for each of `count` matrices, given ρ ≥ ‖A‖₂ for each.

    This is the host's decision; `bounds` is None when the scalars are fake tensors (FakeTensorMode), and
    then every matrix gets the most expensive plan the schedule would pick for ρ = WORST_CASE_NORM.
    """
    if bounds is None:
        return [retraction_orders([WORST_CASE_NORM], 1)[0]] * count
    out = []
    for rho in bounds:
        if not math.isfinite(rho):  # a non-finite step: any plan gives NaNs; the cheapest is as good
            out.append(SeriesPlan(SERIES_ORDERS[0], 0))
            continue
        out.append(next(plan for _, reach, plan in _plans_by_cost() if rho <= reach))
    return out


# Only used for fake tensors (the dry run measures memory; every plan holds the same temporaries): the plan
# for this ρ. Entries of Adam's m̂/√v̂ are at most (1−β1)/√(1−β2) ≈ 3.2 (default betas), so an Adam step
# has ‖A‖₂ ≤ ‖A‖_F ≤ 3.2·lr·W ≈ 18 at lr 1e-3 and W = 5760.
WORST_CASE_NORM = 32.0


def series_factor(a: torch.Tensor, a2: torch.Tensor, plan: SeriesPlan, mm=torch.matmul) -> torch.Tensor:
    """T_k(A/2^s)^(2^s) from A and A² (in their dtype); `plan.products` − 1 further products, by `mm`
    (tools/bench_optimizer.py passes an emulation of tensor-core products)."""
    k, s = plan.order, plan.squarings
    if s:
        a, a2 = a / 2**s, a2 / 4**s
    coef = [1 / math.factorial(j) for j in range(k + 1)]

    def pair(j: int) -> torch.Tensor:  # c_{2j}·I + c_{2j+1}·A
        block = a * coef[2 * j + 1] if 2 * j + 1 <= k else torch.zeros_like(a)
        block.diagonal().add_(coef[2 * j])
        return block

    m = k // 2
    acc = pair(m - 1).add_(a2, alpha=coef[k])
    for j in range(m - 2, -1, -1):
        acc = pair(j).add_(mm(a2, acc))
    for _ in range(s):
        acc = mm(acc, acc)
    return acc


def fast_exp(a: torch.Tensor) -> torch.Tensor:
    """A retraction of skew A onto the orthogonal group, exp(A) up to the series' truncation, with
    ‖TᵀT − I‖₂ ≤ DEFECT_TARGET (plus rounding in A's dtype). One host sync; for many matrices at once the
    optimizer uses `read_scalars` + `retraction_orders` + `series_factor` with one sync for all."""
    a2 = a @ a
    values = read_scalars([torch.linalg.matrix_norm(a2), torch.linalg.matrix_norm(a)])
    bound = None if values is None else [spectral_bound(values[0], values[1], a.shape[-1])]
    return series_factor(a, a2, retraction_orders(bound, 1)[0])


# ----------------------------------------------------------------------------- polar re-orthogonalisation


def polar(x: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns, U·Vᵀ from the SVD X = U·S·Vᵀ (in X's dtype)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def newton_schulz_iterations(defect_bound: float | None) -> int | None:
    """Newton–Schulz iterations that take a defect ‖XᵀX − I‖₂ ≤ `defect_bound` to float64 rounding, or
    None when the SVD must be used. Each iteration maps a singular value's defect δ = σ² − 1 to
    −δ²(3 − δ)/4, so |δ| ≤ d becomes ≤ d²(3 + d)/4. None as input (fake tensors): the count from the
    largest accepted defect."""
    d = NEWTON_SCHULZ_MAX_DEFECT if defect_bound is None else defect_bound
    if not d <= NEWTON_SCHULZ_MAX_DEFECT:  # also NaN
        return None
    n = 0
    while d > NEWTON_SCHULZ_TOLERANCE:
        d = d * d * (3 + d) / 4
        n += 1
    return n


def gram_minus_identity(y: torch.Tensor) -> torch.Tensor:
    gram = y.t() @ y
    gram.diagonal().sub_(1.0)
    return gram


def newton_schulz(y: torch.Tensor, defect: torch.Tensor, iterations: int) -> torch.Tensor:
    """Polar factor by Newton–Schulz, X ← X(3I − XᵀX)/2 = X − X·D/2 with D = XᵀX − I; the first D is given
    (the caller computed it to decide the count). Matrix products only: fast on GPUs."""
    for i in range(iterations):
        if i:
            defect = gram_minus_identity(y)
        y = y - (y @ defect) / 2
    return y


def reorthogonalize(x: torch.Tensor) -> torch.Tensor:
    """Polar factor of a nearly orthogonal matrix, computed in float64, returned in x's dtype: Newton–Schulz
    while the defect allows it (one host sync to decide the count), the SVD otherwise."""
    y = x.double()
    defect = gram_minus_identity(y)
    values = read_scalars([torch.linalg.matrix_norm(defect)])
    iterations = newton_schulz_iterations(None if values is None else values[0])
    if iterations is None:
        return polar(y).to(x.dtype)
    return newton_schulz(y, defect, iterations).to(x.dtype)
