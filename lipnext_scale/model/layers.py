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


def random_orthogonal(
    rows: int,
    cols: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols), Haar-distributed, in float32, made
    on `device` (default: the generator's device, else the CPU): on a GPU the float64 QR runs there."""
    if rows < cols:
        raise ValueError(f"random_orthogonal needs rows >= cols, got {rows}x{cols}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    gaussian = torch.randn(rows, cols, dtype=torch.float64, generator=generator, device=device)
    q, r = torch.linalg.qr(gaussian)
    # Multiplying by sign(diag(r)) makes the distribution Haar rather than QR-biased.
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).float()


def gram_defect(matrix: torch.Tensor) -> torch.Tensor:
    """XᵀX − I in float64 for a tall X, on X's own device: zero exactly when X has orthonormal columns.

    2·n·p² float64 operations; on a GPU they stay there (fp64 tensor cores), never on the host."""
    x = matrix.detach().to(torch.float64)
    gram = x.t() @ x
    gram.diagonal().sub_(1.0)
    return gram


def max_orthogonality_defect(matrices, device: torch.device | str = "cpu") -> torch.Tensor:
    """max |XᵀX − I| over the given tall matrices as a float64 scalar tensor on `device` (0 for none).

    Each defect is computed on its matrix's device and only the scalar moves: no host synchronisation."""
    out = torch.zeros((), dtype=torch.float64, device=device)
    for x in matrices:
        out = torch.maximum(out, gram_defect(x).abs().amax().to(device))
    return out


def orthogonality_error(matrices) -> float:
    """max |XᵀX − I| over the given tall matrices (one host read)."""
    matrices = list(matrices)
    device = matrices[0].device if matrices else "cpu"
    return max_orthogonality_defect(matrices, device).item()


def init_orthogonal_(module: nn.Module) -> None:
    """Fill each matrix in `module.orthogonal_names` with a random (semi-)orthogonal one.

    The QR runs on the parameter's device (on a GPU, not on the host). Meta tensors are skipped, so a 2B
    model builds on the meta device without 64 large QR factorisations.
    """
    for name in module.orthogonal_names:
        param = getattr(module, name)
        if not param.is_meta:
            with torch.no_grad():
                param.copy_(random_orthogonal(*param.shape, device=param.device))


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


def fuse_second_mix(tokens: int, width: int) -> bool:
    """Whether a block applies M·Rᵀ to its N = `tokens` tokens as one product P = M·Rᵀ (fused) or as two
    token matmuls, ·R then ·Mᵀ (unfused). Both compute the same function; the cheaper one is chosen.

    FLOPs (multiply-adds × 2) that differ between the two, per block:
      fused:   forming P costs 2·W³ forward and 4·W³ backward (dM = dP·R and dR = dPᵀ·M);
      unfused: the extra token matmul costs 2·N·W² forward and 4·N·W² backward (its input and weight
               gradients), while dM and dR come out of the token matmuls themselves.
    So fusing pays when 6·W³ ≤ 6·N·W², i.e. N ≥ W (the same rule holds for a forward alone, 2·W³ vs 2·N·W²).
    Memory: fused saves P (W² values) for backward, unfused saves the intermediate N·W values instead —
    `memory_plan.activation_plan` counts the same rule. Decided from the input's shape at every forward,
    so one model serves any micro-batch, and a recomputed (checkpointed) block takes the same branch.
    """
    return tokens >= width


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
        # Row-vector convention: applying R to a token is `token @ Rᵀ`.
        mixed = (x + self.pos) @ self.R.t()
        shifted = spatial_shift(mixed, self.alpha)
        if fuse_second_mix(shifted.numel() // shifted.shape[-1], shifted.shape[-1]):
            return beta_abs(F.linear(shifted, self.M @ self.R.t(), self.bias), self.beta)
        return beta_abs(F.linear(shifted @ self.R, self.M, self.bias), self.beta)


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
