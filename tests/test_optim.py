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
from lipnext_scale.optim.fastexp import (
    DEFECT_TARGET,
    SERIES_ORDERS,
    WORST_CASE_NORM,
    SeriesPlan,
    _largest_norm,
    defect_coefficients,
    gram_minus_identity,
    newton_schulz,
    newton_schulz_iterations,
    read_scalars,
    retraction_orders,
    series_defect_bound,
    series_factor,
    spectral_bound,
)
from lipnext_scale.optim.fastexp import read_scalars as manifold_read

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


def spectral(x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x.double(), ord=2).item()


def measured_defect(t: torch.Tensor) -> float:
    """‖TᵀT − I‖₂ in float64."""
    return spectral(gram_defect(t))


def plan_for(a: torch.Tensor):
    a2 = a @ a
    norms = torch.linalg.matrix_norm(a2).item(), torch.linalg.matrix_norm(a).item()
    rho_hat = spectral_bound(*norms, a.shape[0])
    return a2, rho_hat, retraction_orders([rho_hat], 1)[0]


def test_defect_coefficients_are_the_series_products():
    """c_n of T_kᵀT_k − I against a direct expansion of T_k(−x)·T_k(x) as polynomials (exact rationals)."""
    from fractions import Fraction

    for k in (2, 4, 6, 8, 16):
        t = [Fraction(1, math.factorial(j)) for j in range(k + 1)]
        product = [Fraction(0)] * (2 * k + 1)
        for i in range(k + 1):
            for j in range(k + 1):
                product[i + j] += (-1) ** i * t[i] * t[j]
        assert product[0] == 1 and all(c == 0 for c in product[1 : k + 1])
        expected = tuple((n, abs(float(c))) for n, c in enumerate(product) if n > k and c)
        assert defect_coefficients(k) == expected
    assert defect_coefficients(2) == ((4, 0.25),)
    assert defect_coefficients(4) == ((6, 1 / 72), (8, 1 / 576))


# Spectral norms across every regime of the planner: order 2, 4, 6, 8 and scaling-and-squaring.
NORMS = [0.005, 0.0141, 0.05, 0.2, 0.6, 1.5, 4.0, 12.0]


@pytest.mark.parametrize("width", [8, 33, 96])
@pytest.mark.parametrize("rank2", [False, True], ids=["full", "one_plane"])
def test_retraction_defect_is_within_its_bound(width, rank2):
    """Measured ‖TᵀT − I‖₂ (float64) never exceeds the plan's bound at the true ‖A‖₂, which is itself
    ≤ DEFECT_TARGET; and the estimate ρ̂ from ‖A²‖_F is ≥ ‖A‖₂."""
    for i, rho in enumerate(NORMS):
        a = random_skew(width, 1.0, seed=100 + i, rank2=rank2)
        a = a * (rho / spectral(a))
        a2, rho_hat, plan = plan_for(a)
        assert rho_hat >= rho * (1 - 1e-12)
        t = series_factor(a, a2, plan)
        bound = series_defect_bound(plan.order, rho, plan.squarings)
        assert bound <= DEFECT_TARGET
        assert measured_defect(t) <= bound + 1e-14 * (1 + rho), (rho, plan)
        # The map is still (close to) the exponential, so the steps go where Adam points them.
        assert (t - torch.linalg.matrix_exp(a)).abs().max().item() <= 1e-6 * max(1.0, rho)


@pytest.mark.parametrize("order", [2, 4, 8])
@pytest.mark.parametrize("squarings", [0, 2])
def test_defect_bound_is_tight_at_the_edge_of_each_plan(order, squarings):
    """Teeth: for one rotation plane the bound is attained (up to the sign of the next terms), so an
    overstated coefficient, a dropped term or a wrong squaring rule fails one side of this test."""
    reach = _largest_norm(order, squarings)
    a = random_skew(12, 1.0, seed=7, rank2=True)
    a = a * (reach / spectral(a))
    t = series_factor(a, a @ a, SeriesPlan(order, squarings))
    bound = series_defect_bound(order, reach, squarings)
    assert bound == pytest.approx(DEFECT_TARGET, rel=1e-6)
    assert 0.8 * bound <= measured_defect(t) <= bound * (1 + 1e-6)


def test_plans_are_the_cheapest_meeting_the_target():
    by_cost = {}
    for k in SERIES_ORDERS:
        for s in range(8):
            by_cost.setdefault(SeriesPlan(k, s).products, []).append(_largest_norm(k, s))
    for rho in [1e-4, 0.01, 0.05, 0.1, 0.3, 0.6, 1.0, 3.0, 20.0]:
        plan = retraction_orders([rho], 1)[0]
        assert series_defect_bound(plan.order, rho, plan.squarings) <= DEFECT_TARGET
        cheaper = [r for cost, reaches in by_cost.items() if cost < plan.products for r in reaches]
        assert all(r < rho for r in cheaper), (rho, plan)
    assert retraction_orders([0.01], 1)[0] == SeriesPlan(2, 0)  # one product: A² itself
    assert retraction_orders([float("nan")], 1)[0].products == 1


def test_fake_tensors_take_the_worst_case_plan_without_a_host_read():
    """Under FakeTensorMode (the dry run) nothing can be read on the host: the planners assume the worst."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    worst = retraction_orders([WORST_CASE_NORM], 1)[0]
    assert retraction_orders(None, 3) == [worst] * 3
    assert newton_schulz_iterations(None) == newton_schulz_iterations(0.5)
    with FakeTensorMode():
        a = torch.randn(16, 16, dtype=torch.float64)
        a = a - a.t()
        assert read_scalars([torch.linalg.matrix_norm(a)]) is None
        t = fast_exp(a)
        assert t.shape == (16, 16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_exp_is_orthogonal_and_close_to_the_exponential(dtype):
    for i, rho in enumerate(NORMS):
        a = random_skew(24, 1.0, seed=i)
        a = (a * (rho / spectral(a))).to(dtype)
        t = fast_exp(a)
        assert t.dtype == dtype and t.shape == a.shape
        rounding = 1e-13 if dtype == torch.float64 else 1e-5
        assert measured_defect(t) <= DEFECT_TARGET + rounding
        assert (t.double() - torch.linalg.matrix_exp(a.double())).abs().max().item() <= 1e-6 * max(1, rho)


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


def test_reorthogonalize_masters_ends_a_run_at_the_fresh_level():
    torch.manual_seed(24)
    r, e = square_and_tall(seed=24)
    opt = ManifoldOptimizer(
        [("r", r, "orthogonal"), ("e", e, "stiefel")], hyper(lr=1e-2, lookahead_k=5, reorthogonalize_every=0)
    )
    for _ in range(300):
        r.grad, e.grad = torch.randn_like(r), torch.randn_like(e)
        opt.step()
    state = opt.state[r]
    drifted = torch.linalg.matrix_norm(gram_defect(state["master"])).item()
    opt.reorthogonalize_masters()
    for p in (r, e):
        assert torch.equal(p.detach(), opt.state[p]["master"])
    for x in (state["master"], state["slow"], opt.state[e]["master"]):
        assert torch.linalg.matrix_norm(gram_defect(x)).item() <= 4e-7 < drifted / 2, drifted


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


@pytest.mark.parametrize("step", [1e-4, 1e-2, 0.2, 0.5, 1.5])
def test_stiefel_polar_by_newton_schulz_matches_the_svd(step):
    """The stem's per-step retraction: polar(X + D) for a tangent D, by Newton–Schulz with the iteration count
    from ‖YᵀY − I‖_F, equals the SVD's polar factor to float64 rounding (and falls back to it past 0.5)."""
    g = torch.Generator().manual_seed(21)
    x = random_orthogonal(96, 24, generator=g).double()
    d = torch.randn(96, 24, generator=g, dtype=torch.float64)
    d = d - x @ ((x.t() @ d + d.t() @ x) / 2)  # tangent at X
    y = x + d * (step / torch.linalg.matrix_norm(d, ord=2))
    gram = gram_minus_identity(y)
    bound = torch.linalg.matrix_norm(gram).item()
    iterations = newton_schulz_iterations(bound)
    assert (iterations is None) == (bound > 0.5)
    reference = polar(y)
    if iterations is not None:
        assert (newton_schulz(y, gram, iterations) - reference).abs().max().item() <= 1e-13
    got = ManifoldOptimizer._polar(y, gram, bound)
    assert got.dtype == torch.float32
    assert (got.double() - reference).abs().max().item() <= 1e-7
    assert defect(got) <= 1e-6


def test_polar_in_float32_is_orthonormal():
    x = perturbed((20, 20), [0.2, -0.1], seed=6).float()
    y = polar(x)
    assert y.dtype == torch.float32 and defect(y) <= 1e-6


def test_one_host_read_per_step_for_all_matrices(monkeypatch):
    """The retraction plans of every owned matrix (Lookahead syncs and re-orthogonalisations included) come
    from one `read_scalars` per step, and nothing else reads a tensor on the host (.item(), bool())."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import lipnext_scale.optim.manifold as manifold

    class HostReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                HostReads.count += 1
            return func(*args, **(kwargs or {}))

    reads = []
    monkeypatch.setattr(manifold, "read_scalars", lambda xs: reads.append(len(xs)) or manifold_read(xs))
    torch.manual_seed(22)
    params = [torch.nn.Parameter(random_orthogonal(16, 16)) for _ in range(3)]
    params += [torch.nn.Parameter(random_orthogonal(20, 6)), torch.nn.Parameter(torch.zeros(5))]
    kinds = ["orthogonal"] * 3 + ["stiefel", "euclidean"]
    opt = ManifoldOptimizer(
        [(f"p{i}", p, k) for i, (p, k) in enumerate(zip(params, kinds))],
        hyper(lr=1e-2, lookahead_k=2, reorthogonalize_every=3),
    )
    with HostReads():
        for _ in range(6):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    assert HostReads.count == 0
    # Scalars per step: 2 per orthogonal matrix (+2 at syncs; at re-orthogonalisations +1 for the slow
    # weights and +1 for the master unless the sync overwrites it), 1 for the stem (+1 at syncs).
    assert reads == [7, 3 * 4 + 2, 3 * 2 + 1 + 3 * 2, 3 * 4 + 2, 7, 3 * 4 + 2 + 3]


def test_stem_steps_and_lookahead_need_no_svd(monkeypatch):
    """At a realistic lr the stem's polar factors (every step, and at Lookahead syncs) come from
    Newton–Schulz: the defect bounds are tight enough to stay under its limit."""
    import lipnext_scale.optim.manifold as manifold

    svds = []
    monkeypatch.setattr(manifold, "polar", lambda y: svds.append(y.shape) or polar(y))
    torch.manual_seed(23)
    w = torch.nn.Parameter(random_orthogonal(768, 192))
    opt = ManifoldOptimizer([("w", w, "stiefel")], hyper(lr=1e-3, lookahead_k=5))
    for _ in range(10):
        w.grad = torch.randn_like(w)
        opt.step()
    assert svds == []
    assert defect(opt.state[w]["master"]) <= 1e-6


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
