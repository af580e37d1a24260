"""Sound certification: the float64 forward pass with a rigorous a-priori bound on its rounding error.

The certified classifier is F̂: the LipNeXt op sequence evaluated in IEEE binary64 (round-to-nearest)
on the model's fp32 weights, in any summation order, with or without FMA, with P = M·Rᵀ and the
normalised head rows formed in float64 in any order. For each input x this module computes ŷ = F̂(x) and
a radius r* such that F̂(x') = ŷ for every x' ∈ R^n (not only [0,1]^n) with ‖x' − x‖₂ < r*.

The argument, line by line, is docs/soundness.md; the symbols below are its symbols. In short: let g be
the backbone in exact real arithmetic (exact P = M·Rᵀ, exact head rows w̄_i = w_i/‖w_i‖), L-Lipschitz
with L = `LipNeXt.lipschitz_bound()` (no products: ‖E‖·Π‖R‖²‖M‖). For every x'' in the ball the computed
logits satisfy |ẑ_i(x'') − z_i(x'')| ≤ e_i(r) = α_i + β_i·r (affine in r with α, β ≥ 0, because every
activation norm at x'' is at most its bound at x plus (Lipschitz so far)·r). Then for j ≠ ŷ

    ẑ_ŷ(x') − ẑ_j(x') ≥ (ẑ_ŷ(x) − ẑ_j(x)) − 2(e_ŷ(r) + e_j(r)) − L·d_ŷj·r,

and the right side is > 0 for r < r_j = (m̂_j − 2(α_ŷ + α_j)) / (L·d_ŷj + 2(β_ŷ + β_j)), d_ŷj ≥ ‖w̄_ŷ − w̄_j‖.
Every bound is computed in float64 rounded outward (`lipnext_scale.rounding`).
"""

from __future__ import annotations

import math

import torch

from lipnext_scale.model.layers import beta_abs, spatial_shift
from lipnext_scale.model.lipnext import LipNeXt
from lipnext_scale.rounding import (
    TINY,
    U32,
    U64,
    frobenius_up,
    gamma,
    norm_up,
    operator_norm_bound,
    tensor_down,
    tensor_up,
    up,
)


class Affine:
    """c0 + c1·r with c0 per sample (float64 tensor) and c1 a float, both ≥ 0; every op rounds up."""

    __slots__ = ("c0", "c1")

    def __init__(self, c0: torch.Tensor, c1: float):
        self.c0, self.c1 = c0, c1

    def __add__(self, other: Affine) -> Affine:
        return Affine(tensor_up(self.c0 + other.c0), up(self.c1 + other.c1))

    def scale(self, k: float) -> Affine:
        return Affine(tensor_up(self.c0 * k), up(self.c1 * k))

    def plus(self, k: float) -> Affine:
        return Affine(tensor_up(self.c0 + k), self.c1)


class SoundCertifier:
    """Radii of the float64 classifier F̂ for one model; the weight-dependent constants computed once."""

    def __init__(
        self,
        model: LipNeXt,
        lipschitz: float | None = None,
        norms: dict[str, float] | None = None,
        dtype: torch.dtype = torch.float64,
    ):
        """`lipschitz` and `norms` (operator-norm bounds by `LipNeXt.lipschitz_factors()` name, without
        products) may be passed in when already computed; they must be those of `model`'s weights.
        `dtype` float32 runs the same analysis for an fp32 forward pass (u = 2⁻²⁴): far looser at large
        widths, it is how the tests check the bound against errors large enough to measure."""
        self.model = model
        self.dtype = dtype
        self.u = {torch.float64: U64, torch.float32: U32}[dtype]
        u = self.u
        if norms is None:
            norms = {name: operator_norm_bound(m) for name, m in model.lipschitz_factors()}
        w = model.head.weight.detach().to(dtype)
        row_norms = torch.sqrt((w * w).sum(dim=1))
        if bool((row_norms < 1e-12).any()):
            raise ValueError("a head row has norm < 1e-12: the LLN head is degenerate, nothing to certify")
        self.rows = w / row_norms[:, None]  # ŵ, as F̂ forms them
        self.bias = model.head.bias.detach().to(dtype)
        width = self.rows.shape[1]
        # |ŵ − w̄| ≤ κ·|w̄| elementwise: the row norm has relative error ≤ γ_{W+1}, the division adds u.
        self.kappa = up(2.0 * gamma(width + 2, u))
        # d_ij ≥ ‖w̄_i − w̄_j‖: the computed distance of the ŵ rows rounded up, plus 2κ (‖ŵ_i − w̄_i‖ ≤ κ).
        # The subtraction ŵ_i − ŵ_j rounds each entry (relative u): ‖exact‖ ≤ ‖computed‖·(1 + 2u).
        rows64 = self.rows.double()  # the subtraction in float64 (rounding u64 covered below)
        computed = torch.stack([norm_up(rows64 - row, dim=1) for row in rows64])
        self.distances = tensor_up(tensor_up(computed * up(1.0 + 2.0 * U64)) + 2.0 * self.kappa)
        self.bias_term = tensor_up(self.bias.double().abs() * gamma(width + 1, u))  # γ_{W+1}|b_i|
        self.lipschitz = model.lipschitz_bound() if lipschitz is None else lipschitz
        self._blocks = [
            self._block_constants(b, norms[f"blocks.{i}.R"], norms[f"blocks.{i}.M"], dtype, u)
            for i, b in enumerate(model.blocks)
        ]
        e = model.embed
        self._embed = {
            "matrix": e.matrix().detach().to(dtype),
            "norm": norms["embed.weight"],
            "frob": frobenius_up(e.weight),
            "gamma": gamma(e.patch_dim, u),
        }

    @staticmethod
    def _block_constants(block, n_r: float, n_m: float, dtype: torch.dtype, u: float) -> dict:
        width = block.R.shape[0]

        f_r, f_m = frobenius_up(block.R), frobenius_up(block.M)
        g_w = gamma(width, u)
        tokens = block.pos.shape[0] * block.pos.shape[1]
        return {
            # R and P̂ = fl(M·Rᵀ) are formed per batch (`_mixes`), not held for every block: the bound
            # covers any P̂ formed in any order (|P̂ − P| ≤ γ_W |M||R|ᵀ), so re-forming it is sound.
            "block": block,
            "pos": block.pos.detach().to(dtype),
            "bias": block.bias.detach().to(dtype),
            "n_R": n_r,
            "n_P": up(n_m * n_r),  # ‖P‖₂ of the exact product
            "f_R": f_r,
            "g_W": g_w,
            "g_W1": gamma(width + 1, u),
            "f_Phat": up(up(1.0 + g_w) * up(f_m * f_r)),  # ‖P̂‖_F ≤ (1 + γ_W)·‖M‖_F‖R‖_F
            "dP": up(g_w * up(f_m * f_r)),  # ‖P̂ − P‖₂ ≤ γ_W·‖M‖_F‖R‖_F
            "pos_spread": up(float(norm_up(block.pos.detach().to(torch.float64))) * up(math.sqrt(width))),
            "bias_spread": up(float(norm_up(block.bias.detach().to(torch.float64))) * up(math.sqrt(tokens))),
            "alpha": block.alpha,
            "beta": block.beta,
        }

    @torch.no_grad()
    def logits_and_error(self, images: torch.Tensor) -> tuple[torch.Tensor, Affine]:
        """(ẑ = F̂(images) in float64, e(r) bounding |ẑ_i(x'') − z_i(x'')| for ‖x'' − x‖ ≤ r, all i)."""
        x = images.to(self.dtype)
        u = self.u

        # Centering: |fl(x − ½) − (x − ½)| ≤ u·|x − ½|. ‖c(x'')‖ ≤ ‖c(x)‖ + r ≤ ‖ĉ(x)‖/(1 − u) + r.
        c = x - 0.5
        c_norm = Affine(tensor_up(norm_up(c.double(), dim=(1, 2, 3)) * up(1.0 + 2.0 * u)), 1.0)
        error = c_norm.scale(u)
        c_hat = c_norm.scale(up(1.0 + u))  # ‖ĉ(x'')‖
        lip = 1.0

        # Patch embedding: a dot product of length 3P² per output; exact map Lipschitz ‖E‖₂.
        e = self._embed
        p = self.model.embed.patch
        b, ch, hh, ww = c.shape
        patches = c.reshape(b, ch, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)
        h = patches.reshape(b, hh // p, ww // p, ch * p * p) @ e["matrix"].t()
        error = error.scale(e["norm"]) + c_hat.scale(up(e["gamma"] * e["frob"]))
        lip = up(lip * e["norm"])

        for k in self._blocks:
            # ‖ĥ(x'')‖ ≤ ‖ĥ(x)‖ + 2·E + lip·r (exact activation at x within E of ĥ(x); Lipschitz lip).
            a = Affine(norm_up(h.double(), dim=(1, 2, 3)), lip) + error.scale(2.0)
            # t = ĥ + pos: one rounding per entry; ‖t̂‖ ≤ (1 + u)(‖ĥ‖ + √W‖pos‖).
            t_exact = a.plus(k["pos_spread"])
            error = error + t_exact.scale(u)
            t_hat = t_exact.scale(up(1.0 + u))
            t = h + k["pos"]
            # m = t̂·Rᵀ: dot products of length W; |ρ| ≤ γ_W|t̂||R|ᵀ, so ‖ρ‖ ≤ γ_W‖R‖_F‖t̂‖.
            r_mat, p_mat = _mixes(k["block"], self.dtype)
            m = t @ r_mat.t()
            rho_m = t_hat.scale(up(k["g_W"] * k["f_R"]))
            error = error.scale(k["n_R"]) + rho_m
            s_hat = t_hat.scale(k["n_R"]) + rho_m  # ‖ŝ‖ = ‖m̂‖: the shift permutes entries
            s = spatial_shift(m, k["alpha"])
            # y = ŝ·P̂ᵀ + b against s·Pᵀ + b: the addmm rounding (length W + 1) and the rounding of P̂.
            y = torch.addmm(k["bias"], s.reshape(-1, s.shape[-1]), p_mat.t()).reshape(s.shape)
            del r_mat, p_mat
            rho_y = s_hat.scale(up(k["g_W1"] * k["f_Phat"])).plus(up(k["g_W1"] * k["bias_spread"]))
            rho_y = rho_y + s_hat.scale(k["dP"])
            error = error.scale(k["n_P"]) + rho_y
            h = beta_abs(y, k["beta"])  # exact: |·| and copies
            lip = up(up(lip * k["n_R"]) * k["n_P"])

        # L2 pooling: per channel sqrt of N squares, relative error ≤ γ_{N+1}; 1-Lipschitz.
        tokens = h.shape[1] * h.shape[2]
        a = Affine(norm_up(h.double(), dim=(1, 2, 3)), lip) + error.scale(2.0)
        g_pool = gamma(tokens + 1, u)
        error = error + a.scale(g_pool)
        features = torch.sqrt((h * h).sum(dim=(1, 2)))
        f_hat = a.scale(up(1.0 + g_pool))  # ‖f̂(x'')‖ (‖pool(y)‖ = ‖y‖)

        # Head: ẑ_i = fl(ŵ_i·f̂ + b_i) against z̄_i = w̄_i·g + b_i. Per logit:
        #   |fl(ŵ_i·f̂ + b_i) − (ŵ_i·f̂ + b_i)| ≤ γ_{W+1}((1 + κ)‖f̂‖ + |b_i|)
        #   |(ŵ_i − w̄_i)·f̂| ≤ κ‖f̂‖,  |w̄_i·(f̂ − g)| ≤ E (‖w̄_i‖ = 1).
        logits = torch.addmm(self.bias, features, self.rows.t())
        g_head = gamma(self.rows.shape[1] + 1, u)
        per_logit = error + f_hat.scale(up(self.kappa + up(g_head * up(1.0 + self.kappa))))
        return logits, per_logit.plus(TINY)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(radius, pred) of F̂ per image: F̂(x') = pred for every ‖x' − x‖₂ < radius. 0 when none."""
        logits, err = self.logits_and_error(images)
        logits = logits.double()  # exact
        pred = logits.argmax(dim=1)
        # e_i(r) = α + β r + γ|b_i|: the pair (ŷ, j) loses 2(e_ŷ + e_j) of margin at x and at x'.
        alpha = tensor_up(err.c0[:, None] + self.bias_term[None, :])  # (B, C)
        alpha_pair = tensor_up(2.0 * tensor_up(alpha.gather(1, pred[:, None]) + alpha))
        beta_pair = up(4.0 * err.c1)
        margin = tensor_down(logits.gather(1, pred[:, None]) - logits)  # ≤ the exact difference
        numerator = tensor_down(margin - alpha_pair)
        lipschitz_term = tensor_up(self.lipschitz * self.distances.to(logits.device)[pred])
        denominator = tensor_up(lipschitz_term + beta_pair)
        radius = tensor_down(numerator / denominator).clamp_min(0.0)
        radius.scatter_(1, pred[:, None], math.inf)
        return radius.min(dim=1).values, pred


def _mixes(block, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """R and P̂ = fl(M·Rᵀ) of one block in `dtype` (the fp32 values are exact in float64)."""
    r = block.R.detach().to(dtype)
    return r, block.M.detach().to(dtype) @ r.t()
