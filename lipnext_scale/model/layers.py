"""The exactly 1-Lipschitz building blocks of LipNeXt (DESIGN.md §1).

Each layer is 1-Lipschitz in the L2 norm *given* that its matrices are orthogonal; keeping them
orthogonal is the optimizer's job, and `LipNeXt.lipschitz_bound` measures how far they are from it.
A module lists its manifold matrices in `orthogonal_names`; each is stored tall, (n, p) with n >= p,
so that XᵀX = I is the one condition everywhere (square for the channel mixes, tall for the stem).
Tokens are laid out channels-last: (batch, H', W', channels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def random_orthogonal(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols), Haar-distributed, in float32."""
    if rows < cols:
        raise ValueError(f"random_orthogonal needs rows >= cols, got {rows}x{cols}")
    q, r = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator))
    # Multiplying by sign(diag(r)) makes the distribution Haar rather than QR-biased.
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).float()


def gram_defect(matrix: torch.Tensor) -> torch.Tensor:
    """XᵀX − I in float64 for a tall X: zero exactly when X has orthonormal columns."""
    x = matrix.detach().to(device="cpu", dtype=torch.float64)
    gram = x.t() @ x
    gram.diagonal().sub_(1.0)
    return gram


def orthogonality_error(matrices) -> float:
    """max |XᵀX − I| over the given tall matrices."""
    return max((gram_defect(x).abs().max().item() for x in matrices), default=0.0)


def init_orthogonal_(module: nn.Module) -> None:
    """Fill each matrix in `module.orthogonal_names` with a random (semi-)orthogonal one.

    Meta tensors are skipped, so a 2B model builds on the meta device without 64 large QR factorisations.
    """
    for name in module.orthogonal_names:
        param = getattr(module, name)
        if not param.is_meta:
            with torch.no_grad():
                param.copy_(random_orthogonal(*param.shape))


class PatchEmbedding(nn.Module):
    """Non-overlapping P×P patches (3P² values each) mapped to `width` channels by a semi-orthogonal E.

    When width >= 3P², E has orthonormal columns and the map is an isometry; otherwise E has orthonormal
    rows (stored transposed so the parameter is tall) and the map is a projection. Either way 1-Lipschitz,
    because the patches of an image partition its pixels.
    """

    orthogonal_names = ("weight",)

    def __init__(self, patch: int, width: int, in_chans: int = 3):
        super().__init__()
        self.patch = patch
        self.patch_dim = in_chans * patch * patch
        self.width = width
        self.transposed = width < self.patch_dim
        self.weight = nn.Parameter(torch.empty(max(width, self.patch_dim), min(width, self.patch_dim)))

    def matrix(self) -> torch.Tensor:
        """E as a (width, 3P²) matrix."""
        return self.weight.t() if self.transposed else self.weight

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        p = self.patch
        patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, h // p, w // p, c * p * p)
        return patches @ self.matrix().t()


def spatial_shift(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Circularly roll four groups of alpha·C channels by one token: up, down, left, right.

    A permutation of the entries, hence norm-preserving (Theorem 1: the only norm-preserving
    circular convolutions are such shifts).
    """
    g = int(round(alpha * x.shape[-1]))
    if g == 0:
        return x
    return _SpatialShift.apply(x, g)


# (channel group, token axis, roll) for up, down, left, right; `torch.roll` convention: out[i] = x[i - roll].
_SHIFTS = ((0, 1, -1), (1, 1, 1), (2, 2, -1), (3, 2, 1))


def _shift_into(out: torch.Tensor, x: torch.Tensor, g: int, direction: int) -> torch.Tensor:
    """out ← x with channel group i rolled by direction·roll_i along its axis; the rest copied.

    One read and one write per entry, where `torch.roll` of each group and a `cat` would make two.
    """
    for group, axis, roll in _SHIFTS:
        src, dst = x[..., group * g : (group + 1) * g], out[..., group * g : (group + 1) * g]
        n, r = x.shape[axis], (direction * roll) % x.shape[axis]
        dst.narrow(axis, r, n - r).copy_(src.narrow(axis, 0, n - r))
        dst.narrow(axis, 0, r).copy_(src.narrow(axis, n - r, r))
    out[..., 4 * g :].copy_(x[..., 4 * g :])
    return out


class _SpatialShift(torch.autograd.Function):
    """The shift as one permutation pass each way; it saves nothing for backward (the inverse roll)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: int) -> torch.Tensor:
        ctx.g = g
        return _shift_into(torch.empty_like(x), x, g, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _shift_into(torch.empty_like(grad), grad, ctx.g, -1), None


def beta_abs(x: torch.Tensor, beta: float) -> torch.Tensor:
    """|·| on the first beta·C channels, identity on the rest: slope ±1 everywhere."""
    k = int(round(beta * x.shape[-1]))
    if k == 0:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _BetaAbs.apply(x, k)
    out = x.clone()
    out[..., :k].abs_()
    return out


class _BetaAbs(torch.autograd.Function):
    """β-Abs saving the signs of its first k channels as int8 (what |·|'s gradient, grad·sgn(x), needs)
    rather than the whole input in the compute dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:
        ctx.k = k
        ctx.save_for_backward(x[..., :k].sgn().to(torch.int8))
        out = x.clone()
        out[..., :k].abs_()
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (signs,) = ctx.saved_tensors
        out = grad.clone()
        out[..., : ctx.k].mul_(signs)
        return out, None


class _SafeL2Norm(torch.autograd.Function):
    """sqrt(Σ x²) over the spatial axes with a zero (not NaN) gradient where the norm is 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=(1, 2))
        ctx.save_for_backward(x, norm)
        return norm

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, norm = ctx.saved_tensors
        scale = torch.where(norm > 0, grad / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
        return x * scale[:, None, None, :]


def l2_spatial_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, H', W', C) → (B, C): per-channel L2 norm over positions (1-Lipschitz: reverse triangle ineq.)."""
    return _SafeL2Norm.apply(x)


class LipNeXtBlock(nn.Module):
    """Z = β-Abs(M · Rᵀ · Shift(R · (X + p)) + b) with R, M ∈ O(W)."""

    orthogonal_names = ("R", "M")

    def __init__(self, width: int, tokens_hw: tuple[int, int], alpha: float, beta: float):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.pos = nn.Parameter(torch.zeros(*tokens_hw, 1))
        self.R = nn.Parameter(torch.empty(width, width))
        self.M = nn.Parameter(torch.empty(width, width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Row-vector convention: applying R to a token is `token @ Rᵀ`. M·Rᵀ is one matrix, so the block
        # costs two token matmuls; the W³ product is small next to them at training batch sizes.
        mixed = (x + self.pos) @ self.R.t()
        shifted = spatial_shift(mixed, self.alpha)
        return beta_abs(F.linear(shifted, self.M @ self.R.t(), self.bias), self.beta)


class LLNHead(nn.Module):
    """Linear head with L2-normalised rows (last-layer normalisation) and a bias."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, width))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1 / math.sqrt(self.weight.shape[1]))

    def normalized_weight(self) -> torch.Tensor:
        return self.weight / torch.linalg.vector_norm(self.weight, dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.normalized_weight(), self.bias)
