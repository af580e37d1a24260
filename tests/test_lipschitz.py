"""Every LipNeXt layer and the whole backbone (images → pooled features) is 1-Lipschitz in L2.

Checked three independent ways on tiny models in float64: random pairs, pairs found by gradient ascent on
the Lipschitz ratio, and the Jacobian's top singular value by power iteration. Then the exact structure
behind the proofs (the shift is a permutation, β-Abs with the paper's R is MinMax, the L2 pool has a finite
gradient at 0), and the soundness of `LipNeXt.lipschitz_bound` against exact spectral norms.
The head is not part of the backbone; the whole classifier is covered by the certificate tests.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from lipnext_scale.model import LipNeXt
from lipnext_scale.model.layers import (
    LipNeXtBlock,
    PatchEmbedding,
    beta_abs,
    init_orthogonal_,
    l2_spatial_pool,
    random_orthogonal,
    spatial_shift,
)
from lipnext_scale.rounding import operator_norm_bound, spectral_norm_up

PAIR_TOL = 1e-6
ASCENT_TOL = 1e-4
POWER_TOL = 1e-4

# Tiny shapes: 8×8 RGB images, 2×2 patches (3P² = 12 values), 4×4 tokens.
IMAGE, PATCH, TOKENS = 8, 2, 4
WIDE, NARROW = 16, 8  # width ≥ 3P² (isometric stem) and width < 3P² (projecting stem)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ----------------------------------------------------------------------------- layers under test


def randomize_euclidean_(model: torch.nn.Module, seed: int) -> None:
    """Non-zero positional terms and biases, so that translations are exercised too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos") or name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def make_backbone(width: int, depth: int = 2, seed: int = 0, alpha: float = 1 / 8) -> LipNeXt:
    """fp32 model (as certified); tests evaluate a float64 copy of the very same weights."""
    torch.manual_seed(seed)
    model = LipNeXt(depth=depth, width=width, num_classes=10, image_size=IMAGE, patch=PATCH, alpha=alpha)
    randomize_euclidean_(model, seed)
    return model.eval()


def make_block(width: int = WIDE, seed: int = 0) -> LipNeXtBlock:
    torch.manual_seed(seed)
    block = LipNeXtBlock(width, (TOKENS, TOKENS), alpha=1 / 8, beta=0.5)
    init_orthogonal_(block)
    randomize_euclidean_(block, seed)
    return block.double()


def make_embed(width: int, seed: int = 0) -> PatchEmbedding:
    torch.manual_seed(seed)
    embed = PatchEmbedding(PATCH, width)
    init_orthogonal_(embed)
    return embed.double()


IMAGE_SHAPE = (3, IMAGE, IMAGE)
TOKEN_SHAPE = (TOKENS, TOKENS, WIDE)


CASE_NAMES = [
    "embed_isometric",
    "embed_projection",
    "spatial_shift",
    "spatial_shift_all_channels",
    "beta_abs",
    "l2_spatial_pool",
    "block",
    "backbone_wide",
    "backbone_narrow",
]
# Isometries have ratio exactly 1 everywhere: gradient ascent has nothing to climb there.
ASCENT_CASES = [
    "embed_projection",
    "beta_abs",
    "l2_spatial_pool",
    "block",
    "backbone_wide",
    "backbone_narrow",
]


@functools.cache
def layer_case(name: str) -> tuple:
    """(f, per-sample input shape); f maps a float64 batch to a float64 batch. Built on first use."""
    return {
        "embed_isometric": lambda: (make_embed(WIDE), IMAGE_SHAPE),
        "embed_projection": lambda: (make_embed(NARROW), IMAGE_SHAPE),
        "spatial_shift": lambda: (lambda x: spatial_shift(x, 1 / 8), TOKEN_SHAPE),
        "spatial_shift_all_channels": lambda: (lambda x: spatial_shift(x, 1 / 4), TOKEN_SHAPE),
        "beta_abs": lambda: (lambda x: beta_abs(x, 0.5), TOKEN_SHAPE),
        "l2_spatial_pool": lambda: (l2_spatial_pool, TOKEN_SHAPE),
        "block": lambda: (make_block(), TOKEN_SHAPE),
        "backbone_wide": lambda: (make_backbone(WIDE).double().features, IMAGE_SHAPE),
        "backbone_narrow": lambda: (make_backbone(NARROW).double().features, IMAGE_SHAPE),
    }[name]()


def pair_ratio(f, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖f(a) − f(b)‖ / ‖a − b‖ per sample."""
    num = torch.linalg.vector_norm((f(a) - f(b)).flatten(1), dim=1)
    return num / torch.linalg.vector_norm((a - b).flatten(1), dim=1)


def random_pairs(shape: tuple, seed: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs at RMS per-entry distances from 1e-3 to 10; the first points in [−0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, *shape, generator=g, dtype=torch.float64) * 2 - 0.5
    scale = 10.0 ** torch.linspace(-3, 1, n, dtype=torch.float64).view(n, *([1] * len(shape)))
    direction = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    direction = direction / torch.linalg.vector_norm(direction.flatten(1), dim=1).view_as(scale)
    return a, a + scale * direction * math.sqrt(math.prod(shape))


# ----------------------------------------------------------------------------- random pairs


@pytest.mark.parametrize("name", CASE_NAMES)
def test_random_pairs_are_not_stretched(name):
    f, shape = layer_case(name)
    with torch.no_grad():
        ratio = pair_ratio(f, *random_pairs(shape, seed=1))
    assert torch.isfinite(ratio).all()
    assert ratio.max().item() <= 1 + PAIR_TOL, f"{name}: ‖f(a)−f(b)‖/‖a−b‖ = {ratio.max().item()!r}"


@pytest.mark.parametrize("width", [WIDE, NARROW])
def test_backbone_pairs_within_lipschitz_bound(width):
    model = make_backbone(width, seed=3)
    bound = model.lipschitz_bound()
    features = copy.deepcopy(model).double().features
    with torch.no_grad():
        ratio = pair_ratio(features, *random_pairs(IMAGE_SHAPE, seed=4))
    assert 1.0 <= bound and bound - 1 <= 1.5 * (spectral_norm_product(model) - 1) + 1e-12
    assert ratio.max().item() <= bound * (1 + PAIR_TOL)
    # The fp32 forward itself (what is actually certified) also respects it, up to fp32 rounding.
    a, b = random_pairs(IMAGE_SHAPE, seed=4)
    with torch.no_grad():
        ratio32 = pair_ratio(model.features, a.float(), b.float())
    assert ratio32.max().item() <= bound * (1 + 1e-4)


# ----------------------------------------------------------------------------- gradient ascent


def ascend_ratio(f, shape: tuple, seed: int, starts: int = 16, steps: int = 40, lr: float = 0.05):
    """Adam on (a, d) maximising log ‖f(a+d) − f(a)‖ − log ‖d‖, every start in parallel (f is per-sample).

    Returns (initial ratios, final ratios, largest ratio seen at any step).
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(starts, *shape, generator=g, dtype=torch.float64).requires_grad_()
    d = torch.randn(starts, *shape, generator=g, dtype=torch.float64).requires_grad_()
    opt = torch.optim.Adam([a, d], lr=lr)
    initial = seen = None
    for _ in range(steps):
        ratio = pair_ratio(f, a + d, a)
        if initial is None:
            initial = ratio.detach().clone()
        seen = ratio.detach().max() if seen is None else torch.maximum(seen, ratio.detach().max())
        opt.zero_grad()
        (-ratio.log().sum()).backward()
        opt.step()
    with torch.no_grad():
        final = pair_ratio(f, a + d, a)
    return initial, final, torch.maximum(seen, final.max()).item()


@pytest.mark.parametrize("name", ASCENT_CASES)
def test_gradient_ascent_finds_no_ratio_above_one(name):
    f, shape = layer_case(name)
    initial, final, largest = ascend_ratio(f, shape, seed=5)
    assert largest <= 1 + ASCENT_TOL, f"{name}: ascent found ratio {largest!r}"
    # The ascent must actually climb, or it proves nothing.
    assert final.mean().item() > initial.mean().item() + 1e-3, (initial.mean().item(), final.mean().item())


def test_gradient_ascent_detects_a_hidden_stretch():
    """The harness has teeth: a block whose M stretches one direction by 0.5% is caught."""
    block = make_block(seed=6)
    with torch.no_grad():
        block.M[:, 0] *= 1.005  # M·diag(1.005, 1, …, 1)
    assert torch.linalg.matrix_norm(block.M, ord=2).item() == pytest.approx(1.005, abs=1e-6)
    _, _, largest = ascend_ratio(block, TOKEN_SHAPE, seed=5, steps=60)
    assert largest > 1 + ASCENT_TOL


# ----------------------------------------------------------------------------- Jacobian spectral norm


def jacobian_top_singular_value(f, x: torch.Tensor, iters: int = 30, block: int = 12) -> torch.Tensor:
    """σ_max of f's Jacobian at each sample of x, by block power iteration on JᵀJ (jvp and vjp).

    f is per-sample, so `block` copies of each point carry the block's vectors through one batched jvp/vjp.
    ‖J·V‖₂ with orthonormal V is a lower estimate of σ_max, exact once V holds the top singular vector.
    """
    n = x.shape[0]
    xs = x.repeat_interleave(block, dim=0)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(xs.shape, generator=g, dtype=x.dtype)

    def orthonormalize(t: torch.Tensor) -> torch.Tensor:
        q, _ = torch.linalg.qr(t.reshape(n, block, -1).transpose(1, 2))
        return q.transpose(1, 2).reshape(t.shape)

    for _ in range(iters):
        _, jv = torch.autograd.functional.jvp(f, xs, orthonormalize(v))
        _, v = torch.autograd.functional.vjp(f, xs, jv)
    _, jv = torch.autograd.functional.jvp(f, xs, orthonormalize(v))
    return torch.linalg.matrix_norm(jv.reshape(n, block, -1), ord=2)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_jacobian_spectral_norm_at_most_one(name):
    f, shape = layer_case(name)
    torch.manual_seed(7)
    x = torch.rand(4, *shape, dtype=torch.float64) * 2 - 0.5
    sigma = jacobian_top_singular_value(f, x)
    assert sigma.max().item() <= 1 + POWER_TOL, f"{name}: σ_max(J) = {sigma.max().item()!r}"
    # Each of these maps has a Jacobian with singular value exactly 1 (an isometry, a permutation, ±1 slopes,
    # orthonormal rows of the pool's Jacobian), so the iteration must find it: proof it has converged.
    if not name.startswith("backbone"):
        assert sigma.min().item() >= 1 - 1e-6, f"{name}: power iteration found only {sigma.min().item()!r}"


@pytest.mark.parametrize("width", [WIDE, NARROW])
def test_power_iteration_matches_exact_jacobian_svd(width):
    """Cross-check the power iteration on the whole backbone against the SVD of its full Jacobian."""
    model = make_backbone(width, seed=8)
    features = copy.deepcopy(model).double().features
    torch.manual_seed(9)
    x = torch.rand(1, *IMAGE_SHAPE, dtype=torch.float64)
    sigma = jacobian_top_singular_value(features, x).item()
    jac = torch.autograd.functional.jacobian(features, x).reshape(width, -1)
    exact = torch.linalg.matrix_norm(jac, ord=2).item()
    assert exact <= model.lipschitz_bound()
    assert exact > 0.5  # not a degenerate (e.g. zero) Jacobian
    # Power iteration is a lower estimate that converges to the top singular value.
    assert exact - 1e-8 <= sigma <= exact * (1 + 1e-12)


# ----------------------------------------------------------------------------- exact structure


@pytest.mark.parametrize("alpha, channels", [(1 / 8, 16), (1 / 16, 32), (1 / 4, 8), (1 / 8, 20)])
def test_spatial_shift_is_the_documented_permutation(alpha, channels):
    b, h, w = 2, 3, 5  # non-square token grid: the axes cannot be confused
    x = torch.arange(b * h * w * channels, dtype=torch.float64).reshape(b, h, w, channels)
    y = spatial_shift(x, alpha)
    assert y.shape == x.shape
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)  # a permutation
    g = int(round(alpha * channels))
    assert g >= 1
    hh = torch.arange(h)
    ww = torch.arange(w)
    up, down, left, right = (slice(i * g, (i + 1) * g) for i in range(4))
    # up: the token at row i now holds what was at row i+1 (circularly); and so on.
    assert torch.equal(y[:, :, :, up], x[:, (hh + 1) % h][:, :, :, up])
    assert torch.equal(y[:, :, :, down], x[:, (hh - 1) % h][:, :, :, down])
    assert torch.equal(y[:, :, :, left], x[:, :, (ww + 1) % w][:, :, :, left])
    assert torch.equal(y[:, :, :, right], x[:, :, (ww - 1) % w][:, :, :, right])
    assert torch.equal(y[..., 4 * g :], x[..., 4 * g :])
    # Channels never mix and samples never mix.
    for c in range(channels):
        assert torch.equal(y[..., c].flatten(1).sort(dim=1).values, x[..., c].flatten(1).sort(dim=1).values)


def _reference_shift(x, g):
    rolls = [(-1, 1), (1, 1), (-1, 2), (1, 2)]
    parts = [torch.roll(x[..., i * g : (i + 1) * g], shifts=s, dims=d) for i, (s, d) in enumerate(rolls)]
    return torch.cat([*parts, x[..., 4 * g :]], dim=-1)


def _reference_beta_abs(x, k):
    return torch.cat([x[..., :k].abs(), x[..., k:]], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fused_shift_and_beta_abs_match_roll_cat_and_abs_bit_for_bit(dtype):
    """The one-pass shift and the int8-sign β-Abs give the same values and gradients as the plain torch
    formulation (roll + cat, abs + cat), exact zeros included (|·|'s gradient there is 0)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64).round(decimals=1).to(dtype)  # some exact zeros
    assert (x == 0).any()
    grad_out = torch.randn(2, 3, 5, 16).to(dtype)
    for fused, reference in (
        (lambda t: spatial_shift(t, 1 / 8), lambda t: _reference_shift(t, 2)),
        (lambda t: beta_abs(t, 0.5), lambda t: _reference_beta_abs(t, 8)),
    ):
        outs, grads = [], []
        for fn in (fused, reference):
            leaf = x.clone().requires_grad_()
            y = fn(leaf)
            y.backward(grad_out)
            outs.append(y.detach())
            grads.append(leaf.grad)
        assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
        with torch.no_grad():  # the no-grad path (evaluation) computes the same values
            assert torch.equal(fused(x), outs[1])
    if dtype == torch.float64:
        leaf = x.clone().add_(0.05).requires_grad_()  # away from |·|'s kink
        assert torch.autograd.gradcheck(lambda t: beta_abs(spatial_shift(t, 1 / 8), 0.5), leaf)


def test_spatial_shift_with_no_shifted_group_is_identity():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 7, dtype=torch.float64)
    assert torch.equal(spatial_shift(x, 1 / 16), x)  # round(7/16) = 0 channels per group


def test_beta_abs_with_the_paper_rotation_is_minmax():
    """Theorem 2: with β = 0.5 and R = [[I, −I], [I, I]]/√2, Rᵀ·βAbs(R·x) = (max, min) of pairs (i, i+W/2)."""
    width = 12
    half = width // 2
    eye = torch.eye(half, dtype=torch.float64)
    r = torch.cat([torch.cat([eye, -eye], 1), torch.cat([eye, eye], 1)], 0) / math.sqrt(2)
    assert torch.allclose(r.t() @ r, torch.eye(width, dtype=torch.float64), atol=1e-15)
    torch.manual_seed(10)
    x = torch.randn(3, TOKENS, TOKENS, width, dtype=torch.float64)
    y = beta_abs(x @ r.t(), 0.5) @ r  # row-vector convention: R·token is token @ Rᵀ
    first, second = x[..., :half], x[..., half:]
    minmax = torch.cat([torch.maximum(first, second), torch.minimum(first, second)], dim=-1)
    assert torch.allclose(y, minmax, atol=1e-12, rtol=0)
    # And β-Abs alone: |·| on exactly the first β·W channels.
    assert torch.equal(beta_abs(x, 0.5), torch.cat([first.abs(), second], dim=-1))
    assert torch.equal(beta_abs(x, 0.0), x)
    assert torch.equal(beta_abs(x, 1.0), x.abs())


def test_l2_pool_value_and_finite_gradient_at_zero():
    torch.manual_seed(11)
    x = torch.randn(2, TOKENS, TOKENS, 5, dtype=torch.float64)
    x[0] = 0.0  # a whole sample at zero
    x[1, :, :, 2] = 0.0  # and one channel of the other
    x.requires_grad_()
    pooled = l2_spatial_pool(x)
    assert torch.allclose(pooled, x.detach().pow(2).sum(dim=(1, 2)).sqrt(), atol=1e-14, rtol=0)
    weights = torch.randn(pooled.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((pooled * weights).sum(), x)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[0], torch.zeros_like(grad[0]))
    assert torch.equal(grad[1, :, :, 2], torch.zeros_like(grad[1, :, :, 2]))
    # Elsewhere it is the true gradient x/‖x‖ (per channel) times the upstream weight.
    expected = x.detach()[1] / pooled.detach()[1] * weights[1]
    nonzero = [c for c in range(5) if c != 2]
    assert torch.allclose(grad[1][..., nonzero], expected[..., nonzero], atol=1e-14, rtol=0)
    # The whole backbone at an input that maps to all-zero tokens: the centred image 0.5 with a bias-free,
    # pos-free model gives zero features and a finite gradient.
    model = make_backbone(WIDE).double()
    with torch.no_grad():
        for block in model.blocks:
            block.pos.zero_()
            block.bias.zero_()
    image = torch.full((1, *IMAGE_SHAPE), 0.5, dtype=torch.float64, requires_grad=True)
    feats = model.features(image)
    assert torch.equal(feats, torch.zeros_like(feats))
    (grad,) = torch.autograd.grad(feats.sum(), image)
    assert torch.isfinite(grad).all()


def test_patch_embedding_is_isometric_or_projecting():
    torch.manual_seed(12)
    x = torch.rand(5, *IMAGE_SHAPE, dtype=torch.float64)
    wide, narrow = make_embed(WIDE), make_embed(NARROW)
    assert not wide.transposed and narrow.transposed
    assert wide.matrix().shape == (WIDE, 3 * PATCH**2) and narrow.matrix().shape == (NARROW, 3 * PATCH**2)
    norm = lambda t: torch.linalg.vector_norm(t.flatten(1), dim=1)
    assert torch.allclose(norm(wide(x)), norm(x), rtol=1e-6, atol=0)  # fp32-orthogonal weights
    # Projection: E has orthonormal rows (E·Eᵀ = I), so it can only shorten a patch.
    e = narrow.matrix()
    assert torch.allclose(e @ e.t(), torch.eye(NARROW, dtype=torch.float64), atol=1e-6)
    # Each output token depends on its own P×P patch only (the patches partition the image).
    y = wide(x)
    x2 = x.clone()
    x2[:, :, 0:PATCH, 0:PATCH] += 1.0
    y2 = wide(x2)
    changed = (y2 - y).abs().amax(dim=(0, 3)) > 0
    assert changed[0, 0] and changed.sum() == 1


# ----------------------------------------------------------------------------- the bound itself


def spectral_norm_product(model: LipNeXt) -> float:
    """Π over every use of a manifold matrix of its exact ‖·‖₂, in float64."""
    return math.prod(
        torch.linalg.matrix_norm(w.detach().double(), ord=2).item() for w in model.orthogonal_uses()
    )


@pytest.mark.parametrize("width", [WIDE, NARROW])
def test_lipschitz_bound_is_about_one_for_orthogonal_weights(width):
    model = make_backbone(width, depth=3, seed=13)
    bound = model.lipschitz_bound()
    exact = spectral_norm_product(model)
    # Sound, and tight: the excess over 1 is within 1.5x of the exact product's (a Frobenius bound is 2-6x
    # off here), so a drift of 1e-5 in any matrix shows (test_operator_norm_bound_notices_a_1e5_drift).
    assert bound >= exact
    assert bound - 1 <= 1.5 * (exact - 1) + 1e-12
    assert model.orthogonality_error() < 1e-6
    assert len(list(model.orthogonal_uses())) == 1 + 3 * 3  # E, then R, R, M per block


@pytest.mark.parametrize("width", [WIDE, NARROW])
def test_lipschitz_bound_is_sound_for_perturbed_weights(width):
    model = make_backbone(width, depth=3, seed=14)
    torch.manual_seed(15)
    with torch.no_grad():
        for block in model.blocks:
            block.R.add_(1e-3 * torch.randn_like(block.R))
            block.M.add_(1e-3 * torch.randn_like(block.M))
    exact = spectral_norm_product(model)
    bound = model.lipschitz_bound()
    assert exact > 1 + 1e-3  # the perturbation matters...
    assert bound >= exact  # ...and the bound covers it
    assert bound < 1.5  # while staying meaningful
    # The network's actual stretch stays under the bound, too.
    features = copy.deepcopy(model).double().features
    _, _, largest = ascend_ratio(features, IMAGE_SHAPE, seed=16, steps=30)
    assert largest <= bound
    with torch.no_grad():
        ratio = pair_ratio(features, *random_pairs(IMAGE_SHAPE, seed=17))
    assert ratio.max().item() <= bound


def test_lipschitz_bound_grows_with_any_single_defect():
    """The stem and every block matrix are counted, as often as the forward pass applies them."""
    base = make_backbone(NARROW, depth=2, seed=18)
    base_bound = base.lipschitz_bound()
    names = [name for name, _ in base.orthogonal_parameters()]
    assert names == ["embed.weight", "blocks.0.R", "blocks.0.M", "blocks.1.R", "blocks.1.M"]
    for name in names:
        model = copy.deepcopy(base)
        param = dict(model.named_parameters())[name]
        with torch.no_grad():
            param[:, 0] *= 1.01  # a rank-one defect: ‖X‖₂ = 1.01 and the Frobenius bound is exact
        uses = 2 if name.endswith(".R") else 1  # R is applied twice per block (R, then Rᵀ inside M·Rᵀ)
        assert spectral_norm_product(model) == pytest.approx(1.01**uses, rel=1e-6), name
        assert model.lipschitz_bound() == pytest.approx(base_bound * 1.01**uses, rel=1e-6), name


@pytest.mark.parametrize("n", [16, 64, 128])
def test_operator_norm_bound_notices_a_1e5_drift(n):
    """Soundness and resolution: ‖X‖₂ − 1 is bounded from above within a few percent, both for an fp32
    orthogonal X (≈ 3e-8) and after a drift of one column by 1e-5."""
    x = random_orthogonal(n, n, torch.Generator().manual_seed(n))
    drifted = x.clone()
    drifted[:, 0] *= 1 + 1e-5
    for matrix in (x, drifted):
        exact = torch.linalg.matrix_norm(matrix.double(), ord=2).item()
        bound = operator_norm_bound(matrix)
        assert exact <= bound <= 1 + 1.3 * (exact - 1) + 1e-12
    assert operator_norm_bound(x) - 1 < 1e-7
    assert operator_norm_bound(drifted) - operator_norm_bound(x) > 0.99e-5


@pytest.mark.parametrize("n", [16, 64, 128])
def test_spectral_norm_bound_by_squaring_is_sound_and_tight(n):
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    exact = torch.linalg.matrix_norm(a, ord=2).item()
    frobenius = spectral_norm_up(a, squarings=0)
    squared = spectral_norm_up(a)  # three squarings
    assert exact <= squared <= exact * n ** (1 / 16) * (1 + 1e-9)
    assert squared < frobenius / 2  # it pays: Frobenius over-states ‖A‖₂ 2-6x here
    assert frobenius >= torch.linalg.matrix_norm(a).item()  # the Frobenius bound itself rounds up


def test_lipschitz_bound_split_across_ranks_is_identical():
    """The trainer splits the per-matrix work by rank and sums the scalars: the same float on every rank."""
    from lipnext_scale.certify import Certifier

    model = make_backbone(NARROW, depth=3, seed=21)
    whole = Certifier(model).lipschitz
    for world in (2, 3):
        shares = []
        for rank in range(world):
            seen = {}

            def keep(values, rank=rank, seen=seen):
                seen[rank] = values
                return values

            Certifier(model, share=(rank, world, keep))
            shares.append(seen[rank])
        summed = [sum(column) for column in zip(*shares)]
        assert all(sum(v != 0 for v in column) == 1 for column in zip(*shares))  # one owner per matrix

        def total(values, summed=summed):
            return summed

        assert Certifier(model, share=(0, world, total)).lipschitz == whole
        assert Certifier(model, share=(world - 1, world, total)).lipschitz == whole


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lipschitz_bound_refuses_non_fp32_weights(dtype):
    model = make_backbone(WIDE).to(dtype)
    with pytest.raises(ValueError, match="fp32"):
        model.lipschitz_bound()


def test_bf16_weights_are_far_from_orthogonal():
    """Why bf16 is refused: its rounding alone breaks orthogonality by orders of magnitude more."""
    w = random_orthogonal(64, 64)
    from lipnext_scale.model.layers import orthogonality_error

    assert orthogonality_error([w]) < 1e-6
    assert orthogonality_error([w.bfloat16()]) > 1e-3
