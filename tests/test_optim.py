"""The manifold optimizer keeps weights orthogonal and still optimises (DESIGN.md §2).

FastExp against the exact exponential in each of its regimes; the orthogonality of the fp32 masters after
one step and after 1,000 steps without re-orthogonalisation; polar / Newton–Schulz re-orthogonalisation;
convergence of Riemannian Adam to a known orthogonal solution (square and Stiefel); manifold Lookahead;
the Euclidean NAdam/AdamW against torch's own; bf16 compute weights written from fp32 masters; the schedule.
"""

from __future__ import annotations

import math

import pytest
import torch

from lipnext_scale.model.layers import gram_defect, orthogonality_error, random_orthogonal
from lipnext_scale.optim import (
    ManifoldHyper,
    ManifoldOptimizer,
    fast_exp,
    lr_schedule,
    polar,
    reorthogonalize,
)
from lipnext_scale.optim.fastexp import FOURTH_ORDER_MAX_NORM, SECOND_ORDER_MAX_NORM

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def random_skew(n: int, norm: float, seed: int, dtype=torch.float64, rank2: bool = False) -> torch.Tensor:
    """A random skew matrix of Frobenius norm `norm`; rank2: a single rotation plane, whose spectral norm
    ‖A‖_F/√2 is the largest a skew matrix of that Frobenius norm can have (the worst case for truncation)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2 if rank2 else n, generator=g, dtype=torch.float64)
    a = a[:, :1] @ a[:, 1:2].t() if rank2 else a
    a = a - a.t()
    return (a * (norm / torch.linalg.matrix_norm(a, ord="fro"))).to(dtype)


def defect(x: torch.Tensor) -> float:
    return orthogonality_error([x])


def hyper(**kw) -> ManifoldHyper:
    kw.setdefault("lr", 1e-3)
    kw.setdefault("euclidean_lr", 1e-3)
    return ManifoldHyper(**kw)


# ----------------------------------------------------------------------------- FastExp

# One norm inside each regime, and each just below its threshold (the worst case of its truncation).
REGIMES = {
    "second_order": [0.3 * SECOND_ORDER_MAX_NORM, 0.999 * SECOND_ORDER_MAX_NORM],
    "fourth_order": [1.2 * SECOND_ORDER_MAX_NORM, 0.999 * FOURTH_ORDER_MAX_NORM],
    "exact": [1.001 * FOURTH_ORDER_MAX_NORM, 0.7, 3.0],
}


def taylor_remainder(norm: float, order: int) -> float:
    """‖exp(A) − T_k(A)‖ ≤ ‖A‖^(k+1)/(k+1)! · e^‖A‖ (Frobenius norms)."""
    return norm ** (order + 1) / math.factorial(order + 1) * math.exp(norm)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_fast_exp_matches_matrix_exp(regime, dtype):
    assert SECOND_ORDER_MAX_NORM < FOURTH_ORDER_MAX_NORM
    rounding = 1e-14 if dtype == torch.float64 else 2e-6
    for i, (norm, rank2) in enumerate((n, r) for n in REGIMES[regime] for r in (False, True)):
        a = random_skew(24, norm, seed=i, dtype=dtype, rank2=rank2)
        exact = torch.linalg.matrix_exp(a.double())
        got = fast_exp(a)
        assert got.dtype == dtype and got.shape == a.shape
        err = (got.double() - exact).abs().max().item()
        if regime == "second_order":
            truncation = taylor_remainder(norm, 2)
        elif regime == "fourth_order":
            truncation = taylor_remainder(norm, 4)
        else:
            truncation = 0.0
        assert err <= truncation + rounding, (norm, err, truncation)
        # The documented orthogonality defect: ‖A‖⁴/4 (2nd order), ‖A‖⁶/72 (4th order), below 1e-8.
        documented = {"second_order": norm**4 / 4, "fourth_order": norm**6 / 72}.get(regime, 0.0)
        assert defect(got) <= documented + 10 * rounding
        if dtype == torch.float64:
            assert defect(got) < 1e-8


def test_fast_exp_regimes_are_distinct_truncations():
    """Teeth for the above: each regime really is the truncation it claims (not a cheaper one)."""
    n = 24
    a = random_skew(n, 0.999 * SECOND_ORDER_MAX_NORM, seed=3, rank2=True)
    eye = torch.eye(n, dtype=torch.float64)
    t2 = eye + a + a @ a / 2
    assert torch.allclose(fast_exp(a), t2, atol=1e-15, rtol=0)
    a = random_skew(n, 0.999 * FOURTH_ORDER_MAX_NORM, seed=4, rank2=True)
    a2 = a @ a
    t4 = eye + a + a2 / 2 + a2 @ a / 6 + a2 @ a2 / 24
    assert torch.allclose(fast_exp(a), t4, atol=1e-15, rtol=0)
    # At the thresholds the truncations' defects are far above fp64 rounding yet below 1e-8: the thresholds
    # are what keep the per-step drift small.
    assert 1e-10 < defect(t2) < 1e-8
    assert 1e-10 < defect(t4) < 1e-8


# ----------------------------------------------------------------------------- orthogonality under steps


def square_and_tall(seed: int, square: int = 32, tall: tuple[int, int] = (48, 16)):
    torch.manual_seed(seed)
    r = torch.nn.Parameter(random_orthogonal(square, square))
    e = torch.nn.Parameter(random_orthogonal(*tall))
    return r, e


@pytest.mark.parametrize("lr", [3e-4, 1e-3, 1e-2, 1e-1])
def test_one_step_keeps_masters_orthogonal(lr):
    r, e = square_and_tall(seed=1)
    r0, e0 = r.detach().clone(), e.detach().clone()
    opt = ManifoldOptimizer([("r", r, "orthogonal"), ("e", e, "stiefel")], hyper(lr=lr))
    torch.manual_seed(2)
    r.grad = torch.randn_like(r)
    e.grad = torch.randn_like(e)
    opt.step()
    for p, p0 in ((r, r0), (e, e0)):
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32
        assert defect(master) <= 1e-6
        assert torch.equal(p.detach(), master)
        # It moved, by about lr per entry (Adam's first step is ±lr in the Lie algebra / tangent space).
        moved = (master - p0).abs().max().item()
        assert 0.2 * lr < moved < 5 * lr


def run_steps(kind: str, lr: float, steps: int, seed: int, **kw):
    """`steps` Riemannian Adam steps with fresh random gradients; yields (step, master) at the start and
    every 100 steps."""
    torch.manual_seed(seed)
    shape = (32, 32) if kind == "orthogonal" else (48, 16)
    p = torch.nn.Parameter(random_orthogonal(*shape))
    opt = ManifoldOptimizer([("w", p, kind)], hyper(lr=lr, **kw))
    # A fixed target plus noise: the walk goes somewhere, as in training, rather than diffusing.
    target = torch.randn(shape)
    yield 0, opt.state[p]["master"].clone()
    for step in range(1, steps + 1):
        p.grad = p.detach() - target + 0.5 * torch.randn(shape)
        opt.step()
        if step % 100 == 0:
            yield step, opt.state[p]["master"].clone()


@pytest.mark.parametrize("kind", ["orthogonal", "stiefel"])
@pytest.mark.parametrize("lr", [3e-4, 1e-3, 1e-2])
def test_thousand_steps_without_reorthogonalisation_stay_orthogonal(kind, lr):
    (_, start), *checkpoints = run_steps(kind, lr, 1000, seed=3, reorthogonalize_every=0, lookahead_k=0)
    assert [step for step, _ in checkpoints] == list(range(100, 1001, 100))
    worst = max(defect(master) for _, master in checkpoints)
    assert worst <= 1e-5, worst
    # Far from a no-op: the weights travelled well beyond the fp32 rounding they must not accumulate.
    assert (checkpoints[-1][1] - start).abs().max().item() > 0.1


def test_reorthogonalisation_every_k_steps_removes_a_defect():
    """X·exp(A) preserves XᵀX, so a defect stays until the periodic polar re-orthogonalisation removes it."""
    torch.manual_seed(4)
    x0 = random_orthogonal(24, 24)
    x0[:, 0] *= 1.001  # XᵀX − I = diag(0.002001, 0, …)
    p = torch.nn.Parameter(x0)
    opt = ManifoldOptimizer([("w", p, "orthogonal")], hyper(lr=1e-2, reorthogonalize_every=10))
    frobenius_defect = lambda: torch.linalg.matrix_norm(gram_defect(opt.state[p]["master"])).item()
    for step in range(1, 21):
        p.grad = torch.randn(24, 24)
        opt.step()
        if step % 10:
            assert frobenius_defect() == pytest.approx(0.002001, rel=1e-3), step  # invariant under X·exp(A)
        else:
            assert defect(opt.state[p]["master"]) <= 1e-6, step
            assert torch.equal(p.detach(), opt.state[p]["master"])
            p.data[:, 0] *= 1.001


def perturbed(shape: tuple[int, int], singular_defects: list[float], seed: int) -> torch.Tensor:
    """A float64 matrix with orthonormal-but-for-`singular_defects` columns: σ_i² = 1 + d_i."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    u, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = torch.ones(cols, dtype=torch.float64)
    s[: len(singular_defects)] = torch.tensor(singular_defects, dtype=torch.float64).add(1).sqrt()
    return u @ torch.diag(s) @ v.t()


# Defects: fp32 drift; moderate; the largest Newton–Schulz accepts (Frobenius 0.5); SVD fallback; far off.
DEFECTS = {
    "drift": [1e-6, -1e-6],
    "moderate": [0.05, -0.03],
    "newton_schulz_limit": [0.49],
    "newton_schulz_limit_negative": [-0.49],
    "svd_fallback": [0.6, -0.4],
    "far": [3.0, -0.9],
}


@pytest.mark.parametrize("shape", [(24, 24), (40, 12)])
@pytest.mark.parametrize("case", list(DEFECTS))
def test_reorthogonalize_and_polar_give_orthonormal_columns(case, shape):
    x = perturbed(shape, DEFECTS[case], seed=5)
    reference = polar(x)
    # The polar factor: orthonormal columns, and UᵀX symmetric positive definite (X = U·H).
    assert defect(reference) <= 1e-13
    h = reference.t() @ x
    assert torch.allclose(h, h.t(), atol=1e-13, rtol=0)
    assert torch.linalg.eigvalsh(h).min().item() > 0
    # reorthogonalize in float64 agrees with it to float64 precision...
    y = reorthogonalize(x)
    assert y.dtype == torch.float64
    assert defect(y) <= 1e-10, defect(y)
    assert (y - reference).abs().max().item() <= 1e-10
    # ...and on fp32 input returns fp32 orthonormal to fp32 rounding.
    y32 = reorthogonalize(x.float())
    assert y32.dtype == torch.float32
    assert defect(y32) <= 1e-6
    assert (y32.double() - reference).abs().max().item() <= 1e-6


def test_polar_in_float32_is_orthonormal():
    x = perturbed((20, 20), [0.2, -0.1], seed=6).float()
    y = polar(x)
    assert y.dtype == torch.float32 and defect(y) <= 1e-6


# ----------------------------------------------------------------------------- convergence


def procrustes_problem(shape: tuple[int, int], seed: int):
    """min ‖X·A − B‖² over XᵀX = I with B = Q*·A and A of full row rank: the unique solution is Q*."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    x0 = random_orthogonal(rows, cols, generator=g)
    if rows == cols:
        # exp keeps X in its connected component of O(n): put Q* in x0's component, a fair distance away.
        q_star = (x0.double() @ torch.linalg.matrix_exp(random_skew(rows, 2.0, seed=seed + 1))).float()
    else:
        q_star = random_orthogonal(rows, cols, generator=g)  # the Stiefel manifold is connected
    a = torch.randn(cols, 4 * cols, generator=g)
    return x0, q_star, a, q_star @ a


@pytest.mark.parametrize("shape", [(8, 8), (12, 5)], ids=["square", "stiefel"])
@pytest.mark.parametrize("lookahead_k", [0, 5])
def test_riemannian_adam_converges_to_the_orthogonal_solution(shape, lookahead_k):
    x0, q_star, a, b = procrustes_problem(shape, seed=7)
    kind = "orthogonal" if shape[0] == shape[1] else "stiefel"
    x = torch.nn.Parameter(x0.clone())
    h = hyper(lr=3e-2, lookahead_k=lookahead_k, reorthogonalize_every=0)
    opt = ManifoldOptimizer([("x", x, kind)], h)
    steps = 400
    start_distance = (x0 - q_star).abs().max().item()
    for step in range(steps):
        opt.set_lr_factor(lr_schedule(step, 20, steps))
        x.grad = None
        loss = (x @ a - b).pow(2).sum()
        loss.backward()
        opt.step()
        assert defect(opt.state[x]["master"]) <= 1e-6, step
    assert start_distance > 0.5
    assert (x.detach() - q_star).abs().max().item() < 1e-3
    assert (x.detach() @ a - b).pow(2).sum().item() < 1e-4


# ----------------------------------------------------------------------------- Lookahead


@pytest.mark.parametrize("kind", ["orthogonal", "stiefel"])
def test_manifold_lookahead_syncs_on_the_manifold(kind):
    shape = (16, 16) if kind == "orthogonal" else (20, 8)
    torch.manual_seed(8)
    p = torch.nn.Parameter(random_orthogonal(*shape))
    k = 5
    opt = ManifoldOptimizer([("w", p, kind)], hyper(lr=1e-2, lookahead_k=k, reorthogonalize_every=0))
    state = opt.state[p]
    target = torch.randn(shape)
    for step in range(1, 201):
        slow_before = state["slow"].clone()
        p.grad = p.detach() - target + 0.3 * torch.randn(shape)
        opt.step()
        assert defect(state["master"]) <= 1e-6
        assert defect(state["slow"]) <= 1e-6
        if step % k == 0:
            assert torch.equal(state["master"], state["slow"])  # fast weights restart from the slow ones
            assert not torch.equal(state["slow"], slow_before)  # which moved...
        else:
            assert torch.equal(state["slow"], slow_before)  # ...only at syncs
    assert torch.equal(p.detach(), state["master"])


@pytest.mark.parametrize("kind", ["orthogonal", "stiefel"])
def test_lookahead_moves_slow_weights_alpha_of_the_way(kind):
    """At a sync the slow weights go α of the fast weights' way: along exp(α·ΣA) on O(n), by a polar-
    retracted average on the Stiefel manifold. A twin with no sync in reach shows where the fast weights were.
    """
    shape = (12, 12) if kind == "orthogonal" else (15, 6)
    torch.manual_seed(9)
    k, alpha = 4, 0.5
    x0 = random_orthogonal(*shape)
    p, twin = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
    h = dict(lr=1e-2, lookahead_alpha=alpha, reorthogonalize_every=0)
    opt = ManifoldOptimizer([("w", p, kind)], hyper(lookahead_k=k, **h))
    ref = ManifoldOptimizer([("w", twin, kind)], hyper(lookahead_k=1000, **h))
    for _ in range(k):
        g = torch.randn(shape)
        p.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    slow, fast = opt.state[p]["slow"].double(), ref.state[twin]["master"].double()
    assert torch.equal(opt.state[p]["slow"], p.detach())
    x0 = x0.double()
    if kind == "orthogonal":
        total = ref.state[twin]["step_sum"].double()
        assert torch.allclose(total, -total.t(), atol=0)
        # ΣA describes the fast weights' motion (up to the steps' commutators)...
        mismatch = torch.linalg.matrix_norm(x0 @ torch.linalg.matrix_exp(total) - fast)
        assert mismatch < 0.05 * torch.linalg.matrix_norm(fast - x0)
        # ...and the slow weights moved by exactly exp(α·ΣA).
        assert torch.allclose(slow, x0 @ torch.linalg.matrix_exp(alpha * total), atol=1e-6, rtol=0)
    else:
        assert torch.allclose(slow, polar(x0 + alpha * (fast - x0)), atol=1e-6, rtol=0)
    # Geometrically: about half-way.
    assert torch.linalg.matrix_norm(slow - x0) == pytest.approx(
        alpha * torch.linalg.matrix_norm(fast - x0).item(), rel=0.05
    )


# ----------------------------------------------------------------------------- Euclidean parameters


@pytest.mark.parametrize("method", ["nadam", "adamw"])
def test_euclidean_methods_decrease_a_quadratic(method):
    torch.manual_seed(10)
    scales = torch.logspace(-1, 1, 20)
    center = torch.randn(20)
    x = torch.nn.Parameter(torch.zeros(20))
    opt = ManifoldOptimizer([("x", x, "euclidean")], hyper(euclidean_lr=5e-2, euclidean_method=method))
    loss0 = (scales * (x.detach() - center) ** 2).sum().item()
    for step in range(300):
        opt.set_lr_factor(lr_schedule(step, 10, 300))
        x.grad = None
        (scales * (x - center) ** 2).sum().backward()
        opt.step()
    loss = (scales * (x.detach() - center) ** 2).sum().item()
    assert loss < 1e-3 * loss0


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(weight_decay):
    torch.manual_seed(11)
    x = torch.nn.Parameter(torch.randn(7, 3))
    y = torch.nn.Parameter(x.detach().clone())
    h = hyper(euclidean_lr=1e-2, euclidean_method="adamw", weight_decay=weight_decay)
    ours = ManifoldOptimizer([("x", x, "euclidean")], h)
    ref = torch.optim.AdamW([y], lr=1e-2, betas=h.betas, eps=h.eps, weight_decay=weight_decay)
    for _ in range(25):
        g = torch.randn(7, 3)
        x.grad, y.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(x, y, atol=1e-6, rtol=0)
    assert not torch.allclose(x, torch.zeros_like(x))


def test_nadam_matches_torch_with_constant_momentum():
    """Dozat's NAdam with constant β1 is torch's NAdam with its momentum schedule switched off
    (μ_t = β1·(1 − ½·0.96^(t·ψ)) → β1 as ψ → ∞)."""
    torch.manual_seed(12)
    x = torch.nn.Parameter(torch.randn(9))
    y = torch.nn.Parameter(x.detach().clone())
    h = hyper(euclidean_lr=1e-2, euclidean_method="nadam")
    ours = ManifoldOptimizer([("x", x, "euclidean")], h)
    ref = torch.optim.NAdam([y], lr=1e-2, betas=h.betas, eps=h.eps, momentum_decay=1e9)
    for _ in range(25):
        g = torch.randn(9)
        x.grad, y.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(x, y, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- bf16 compute weights


def test_bf16_compute_weights_are_written_from_fp32_masters():
    torch.manual_seed(13)
    r = torch.nn.Parameter(random_orthogonal(32, 32))
    e = torch.nn.Parameter(random_orthogonal(48, 16))
    b = torch.nn.Parameter(torch.randn(16))
    opt = ManifoldOptimizer(
        [("r", r, "orthogonal"), ("e", e, "stiefel"), ("b", b, "euclidean")],
        hyper(lr=1e-2, euclidean_lr=1e-2, lookahead_k=0),
    )
    # As the trainer does: cast after the optimizer has taken its fp32 masters.
    for p in (r, e, b):
        p.data = p.data.to(torch.bfloat16)
    starts = {id(p): opt.state[p]["master"].clone() for p in (r, e, b)}
    for _ in range(50):
        for p in (r, e, b):
            p.grad = torch.randn(p.shape).to(torch.bfloat16)
        opt.step()
    for p in (r, e, b):
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
        assert master.data_ptr() != p.data_ptr()
        assert torch.equal(p.detach(), master.to(torch.bfloat16))  # the copy is the rounded master
        assert (master - starts[id(p)]).abs().max().item() > 0.05  # the master was updated
    for p in (r, e):
        master = opt.state[p]["master"]
        assert defect(master) <= 1e-6  # updates went to the fp32 truth...
        assert defect(p.detach()) > 1e-4  # ...while the bf16 copy is far from orthogonal


# ----------------------------------------------------------------------------- schedule


def test_lr_schedule_warmup_then_cosine():
    warmup, total, floor = 10, 110, 0.1
    factors = [lr_schedule(s, warmup, total, floor) for s in range(total + 5)]
    assert factors[0] == pytest.approx(1 / warmup)
    assert all(b - a == pytest.approx(1 / warmup) for a, b in zip(factors[: warmup - 1], factors[1:warmup]))
    assert factors[warmup - 1] == pytest.approx(1.0)
    assert factors[warmup] == pytest.approx(1.0)  # the cosine starts at its top
    decay = factors[warmup : total + 1]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    assert factors[warmup + (total - warmup) // 2] == pytest.approx(floor + (1 - floor) / 2)
    quarter = warmup + (total - warmup) // 4
    assert factors[quarter] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert factors[total] == pytest.approx(floor)
    assert factors[total + 4] == pytest.approx(floor)  # clamped past the end
    assert lr_schedule(0, 0, 100) == pytest.approx(1.0)  # no warm-up
    assert lr_schedule(100, 0, 100) == pytest.approx(0.0)


def test_set_lr_factor_scales_each_group_from_its_base():
    r = torch.nn.Parameter(random_orthogonal(4, 4))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = ManifoldOptimizer([("r", r, "orthogonal"), ("b", b, "euclidean")], hyper(lr=0.02, euclidean_lr=0.5))
    opt.set_lr_factor(0.5)
    opt.set_lr_factor(0.25)
    lrs = {g["kind"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"orthogonal": pytest.approx(0.005), "euclidean": pytest.approx(0.125)}
    assert gram_defect(r).abs().max().item() < 1e-6
