#!/usr/bin/env python
"""Cost of the manifold optimizer step per owned matrix, by dtype, against the same rank's model FLOPs.

    python tools/bench_optimizer.py [--widths 512 1024] [--steps 5] [--emulate-steps 0] [--device cpu]
    python tools/bench_optimizer.py --drift recipes/quickstart.yaml [--drift-steps 920]

1. Measured (this machine): the real `ManifoldOptimizer` step on one W×W orthogonal matrix and one stem
   matrix (in1k shape, 3·16² = 768 columns), random gradients at lr 1e-3, Lookahead k = 5 (one sync in
   five steps), the products of every step counted by dtype as they are dispatched.
2. Projected (GPU rates, DESIGN.md §7): the same counts from the planner at W = 4096 (in1k_1b, 8 ranks) and
   5760 (in1k_2b, 16 ranks) for the owner with the most matrices, against forward + backward of that
   rank's micro-batch at the measured bf16 rate. The retraction's plan depends on ‖A‖₂'s bound; it is
   taken for an Adam step of random signs (entries ±lr, the shape of early and noise-dominated steps),
   whose bound is ρ̂ = lr·W^(3/4) (checked against the measured ones at the measured widths).
3. With --emulate-steps N: orthogonality over N steps when the step's products run on TF32 or bf16 tensor
   cores, EMULATED on the CPU by rounding each product's inputs to 10 (TF32) or 7 (bf16) mantissa bits
   and accumulating in fp32, with Newton–Schulz re-orthogonalisation in float64 every 100 steps.
4. With --drift RECIPE (alone): the recipe's model and optimizer over --drift-steps steps (random
   gradients): the Lipschitz bound as fp32 rounding accumulates, and after the final re-orthogonalisation.
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipnext_scale.model.layers import gram_defect, random_orthogonal  # noqa: E402
from lipnext_scale.optim import ManifoldHyper, ManifoldOptimizer, lr_schedule  # noqa: E402
from lipnext_scale.optim.fastexp import (  # noqa: E402
    newton_schulz,
    newton_schulz_iterations,
    retraction_orders,
    series_factor,
    skew,
    spectral_bound,
)
from lipnext_scale.optim.sharded import owners_of, plan_buckets  # noqa: E402

# TFLOP/s (DESIGN.md §7): H100 SXM datasheet, bf16 as measured on the H200.
RATES = {"bf16": 790.0, "tf32": 495.0, torch.float32: 67.0, torch.float64: 67.0}
GOAL_SHARE = 0.05
LR = 1e-3
LOOKAHEAD_K = 5
REORTH_EVERY = 100
STEM_COLUMNS = 3 * 16 * 16
TOKENS_PER_IMAGE = 196
# Recipe shapes: (width, depth, ranks, micro-batch per rank).
RECIPES = {"in1k_1b": (4096, 32, 8, 128), "in1k_2b": (5760, 32, 16, 64)}

aten = torch.ops.aten


class ProductCounter(TorchDispatchMode):
    """FLOPs of every matrix product dispatched inside the block, keyed by the inputs' dtype."""

    def __init__(self):
        super().__init__()
        self.flops: collections.Counter = collections.Counter()
        self.other: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (aten.mm.default, aten.addmm.default):
            a, b = args[-2], args[-1]
            self.flops[a.dtype] += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif func in (aten.bmm.default, aten.baddbmm.default):
            a, b = args[-2], args[-1]
            self.flops[a.dtype] += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        elif "linalg" in func.__name__ or "svd" in func.__name__:
            self.other[func.__name__] += 1
        return out


def model_flops_per_micro_batch(width: int, depth: int, images: int) -> float:
    """Forward + backward FLOPs of one micro-batch, a local stand-in for the project's model-FLOPs formula:
    6·P·N for the token matmuls (P = 2·W² per block, N tokens; the stem and head add < 0.1%) plus the
    block's fused M·Rᵀ, 6·W³ per block per micro-batch (forward 2·W³, backward 4·W³)."""
    tokens = images * TOKENS_PER_IMAGE
    return depth * (6 * 2 * width**2 * tokens + 6 * width**3)


def seconds(flops: dict, rates: dict = RATES) -> float:
    return sum(f / (rates[dtype] * 1e12) for dtype, f in flops.items())


# ----------------------------------------------------------------------------- measured


def measure(rows: int, cols: int, steps: int, device: torch.device) -> tuple[float, dict, list]:
    """Median seconds per step (`steps` steps), and product FLOPs per step by dtype averaged over one
    Lookahead period (k steps, one sync), of the real optimizer on one matrix."""
    torch.manual_seed(0)
    kind = "orthogonal" if rows == cols else "stiefel"
    w = torch.nn.Parameter(random_orthogonal(rows, cols).to(device))
    hyper = ManifoldHyper(lr=LR, euclidean_lr=LR, lookahead_k=LOOKAHEAD_K, reorthogonalize_every=0)
    opt = ManifoldOptimizer([("w", w, kind)], hyper)
    grads = [torch.randn(rows, cols, device=device) for _ in range(max(steps, LOOKAHEAD_K))]
    w.grad = grads[0]
    opt.step()  # warm-up (and the planner's one-off table)
    opt.step_count = 0
    times = []
    for g in grads[:steps]:
        w.grad = g
        synchronize(device)
        start = time.perf_counter()
        opt.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    counter = ProductCounter()
    opt.step_count = 0
    with counter:
        for g in grads[:LOOKAHEAD_K]:
            w.grad = g
            opt.step()
    flops = {dtype: f / LOOKAHEAD_K for dtype, f in counter.flops.items()}
    return statistics.median(times), flops, sorted(counter.other)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_bound(width: int) -> float:
    """ρ̂ of a random-sign Adam step at `width`, as the optimizer computes it (for the projection's check)."""
    g = torch.Generator().manual_seed(1)
    a = LR * torch.sign(skew(torch.randn(width, width, generator=g, dtype=torch.float64)))
    return spectral_bound(torch.linalg.matrix_norm(a @ a).item(), torch.linalg.matrix_norm(a).item(), width)


# ----------------------------------------------------------------------------- projected


def square_step_flops(width: int) -> dict:
    """Per-step product FLOPs of one W×W orthogonal matrix by dtype, amortising Lookahead syncs (1 in k) and
    re-orthogonalisation (1 in 100, from a drift of 1e-5: two Newton–Schulz iterations)."""
    unit = 2 * width**3
    rho = LR * width**0.75
    step = retraction_orders([rho], 1)[0]
    # α·ΣA over k steps: random directions add like √k (α = 1/2).
    sync = retraction_orders([rho * 0.5 * math.sqrt(LOOKAHEAD_K)], 1)[0]
    ns = newton_schulz_iterations(1e-5)
    fp64 = (
        unit * (step.products + 1) + unit * (sync.products + 1) / LOOKAHEAD_K + unit * 2 * ns / REORTH_EVERY
    )
    return {torch.float32: unit, torch.float64: fp64, "plan": (step, sync)}


def stem_step_flops(width: int) -> dict:
    """Per-step product FLOPs of the stem (W × 768 stored tall): four fp32 products for the Riemannian
    gradient and its projection, a float64 Gram and Newton–Schulz (count from ‖DᵀD‖_F for D of entries ±lr),
    the Lookahead polar amortised."""
    n, p = max(width, STEM_COLUMNS), min(width, STEM_COLUMNS)
    unit = 2 * n * p * p
    defect = math.sqrt(p) * n * LR**2 + p * math.sqrt(n) * LR**2
    ns = newton_schulz_iterations(defect) or 0
    return {torch.float32: 4 * unit, torch.float64: unit * 2 * ns * (1 + 1 / LOOKAHEAD_K)}


def project(name: str) -> dict:
    width, depth, ranks, micro = RECIPES[name]
    # Model order (stem first), as the trainer lists them: the real ownership rule of the sharded optimizer.
    sizes = {"stem": width * STEM_COLUMNS, **{f"b{i}.{m}": width * width for i in range(depth) for m in "RM"}}
    owners = owners_of(plan_buckets(list(sizes.items()), ranks))
    busiest = max(range(ranks), key=lambda r: sum(1 for o in owners.values() if o == r))
    mine = [n for n, r in owners.items() if r == busiest]
    squares = sum(1 for n in mine if n != "stem")
    square = square_step_flops(width)
    stem = stem_step_flops(width) if "stem" in mine else {}
    flops = collections.Counter()
    for dtype in (torch.float32, torch.float64):
        flops[dtype] = squares * square[dtype] + stem.get(dtype, 0)
    model = model_flops_per_micro_batch(width, depth, micro)
    opt_s, model_s = seconds(flops), model / (RATES["bf16"] * 1e12)
    return {
        "width": width, "ranks": ranks, "micro": micro, "squares": squares, "stem": bool(stem),
        "plan": square["plan"], "flops": flops, "model": model, "opt_s": opt_s, "model_s": model_s,
    }  # fmt: skip


# ----------------------------------------------------------------------------- tensor-core emulation


def rounded(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """fp32 → the nearest value with `mantissa_bits` explicit mantissa bits (round to nearest even)."""
    if mantissa_bits >= 23:
        return x
    bits = x.float().view(torch.int32)
    drop = 23 - mantissa_bits
    lsb = (bits >> drop) & 1
    bits = (bits + ((1 << (drop - 1)) - 1) + lsb) & ~((1 << drop) - 1)
    return bits.view(torch.float32)


def emulated_mm(precision: str):
    if precision == "fp64":
        return lambda a, b: a.double() @ b.double()
    bits = {"fp32": 23, "tf32": 10, "bf16": 7}[precision]
    return lambda a, b: rounded(a.float(), bits) @ rounded(b.float(), bits)


def emulate(width: int, steps: int, precision: str) -> dict:
    """Training on a task with a known answer, min ‖X·C − B‖² over X ∈ SO(W) with B = Q*·C, by Riemannian
    Adam (lr 1e-2, warm-up and cosine) whose products (XᵀG, the series, X·(T − I)) all run in `precision`,
    X ← X + X·(T − I) kept in fp32, Newton–Schulz in float64 every REORTH_EVERY steps and after the last.
    The step A is rounded to the product precision first (odd-symmetric rounding keeps it skew)."""
    mm = emulated_mm(precision)
    g = torch.Generator().manual_seed(0)
    x = random_orthogonal(width, width, generator=g)
    skew_target = torch.randn(width, width, generator=g, dtype=torch.float64)
    skew_target = skew(skew_target) * (2.0 / torch.linalg.matrix_norm(skew(skew_target), ord=2))
    q_star = (x.double() @ torch.linalg.matrix_exp(skew_target)).float()
    c = torch.randn(width, 2 * width, generator=g) / math.sqrt(2 * width)
    b = q_star @ c
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    loss0 = (x @ c - b).pow(2).sum().item()
    per_step, worst, after = [], 0.0, []
    for t in range(1, steps + 1):
        lr = 1e-2 * lr_schedule(t - 1, steps // 10, steps)
        grad = 2 * (x @ c - b) @ c.t()
        omega = skew(mm(x.t(), grad).float())
        m.mul_(0.9).add_(omega, alpha=0.1)
        v.mul_(0.999).addcmul_(omega, omega, value=0.001)
        a = skew(-lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8))
        a = a.double() if precision == "fp64" else rounded(a, {"fp32": 23, "tf32": 10, "bf16": 7}[precision])
        a2 = mm(a, a).to(a.dtype)
        rho = spectral_bound(torch.linalg.matrix_norm(a2).item(), torch.linalg.matrix_norm(a).item(), width)
        t_minus_i = series_factor(a, a2, retraction_orders([rho], 1)[0], mm=lambda p, q: mm(p, q).to(p.dtype))
        t_minus_i.diagonal().sub_(1.0)
        x = (x + mm(x, t_minus_i)).float()
        defect = torch.linalg.matrix_norm(gram_defect(x), ord=2).item()
        if t <= 3:
            per_step.append(defect)
        worst = max(worst, defect)
        if t % REORTH_EVERY == 0 or t == steps:
            y = x.double()
            d = y.t() @ y
            d.diagonal().sub_(1.0)
            x = newton_schulz(y, d, newton_schulz_iterations(torch.linalg.matrix_norm(d).item())).float()
            after.append(torch.linalg.matrix_norm(gram_defect(x), ord=2).item())
    return {
        "first_steps": max(per_step), "worst": worst, "after": max(after),
        "loss": (x @ c - b).pow(2).sum().item() / loss0, "distance": (x - q_star).abs().max().item(),
    }  # fmt: skip


# ----------------------------------------------------------------------------- drift on a recipe's model


def recipe_drift(recipe_path: str, steps: int) -> list[tuple[int, float, float]]:
    """The recipe's optimizer (its hyperparameters, warm-up + cosine) on the recipe's model for `steps` steps
    with random gradients — orthogonality does not depend on what the gradients are — then the final
    re-orthogonalisation the trainer does: (step, Lipschitz bound, max |XᵀX − I|) along the way."""
    from lipnext_scale.build import manifold_hyper, named_parameters_with_kinds
    from lipnext_scale.config import load_recipe
    from lipnext_scale.pretrained import build_model

    recipe = load_recipe(recipe_path, [])
    torch.manual_seed(0)
    model = build_model(recipe)
    opt = ManifoldOptimizer(named_parameters_with_kinds(model), manifold_hyper(recipe))
    warmup = steps // 20
    out = []
    for step in range(1, steps + 1):
        opt.set_lr_factor(lr_schedule(step - 1, warmup, steps))
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        if step % (steps // 4) == 0 or step == steps:
            out.append((step, model.lipschitz_bound(), model.orthogonality_error()))
    opt.reorthogonalize_masters()
    out.append((-1, model.lipschitz_bound(), model.orthogonality_error()))
    return out


# ----------------------------------------------------------------------------- report


def fmt_flops(flops: dict) -> str:
    names = {torch.float32: "fp32", torch.float64: "fp64"}
    return ", ".join(f"{names.get(k, k)} {v / 1e9:.2f}" for k, v in sorted(flops.items(), key=str) if v)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", type=int, nargs="*", default=[512, 1024], help="none: skip part 1")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--emulate-steps", type=int, default=0)
    parser.add_argument("--emulate-width", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="where the measured steps run (cuda on a GPU)")
    parser.add_argument("--drift", metavar="RECIPE", help="only: the recipe model's bound over --drift-steps")
    parser.add_argument("--drift-steps", type=int, default=920)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":  # the step's fp32 products in IEEE fp32, as the trainer leaves them
        torch.backends.cuda.matmul.allow_tf32 = False
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} threads"

    if args.drift:
        torch.set_num_threads(1)  # a quickstart's W = 128 matrices: a second thread costs more than it gives
        print(f"{args.drift}: {args.drift_steps} optimizer steps, random gradients, the recipe's optimizer")
        for step, bound, error in recipe_drift(args.drift, args.drift_steps):
            when = f"step {step:>5}" if step > 0 else "re-orthogonalised at the end"
            print(f"   {when}: Lipschitz bound {bound:.7f}, max |XᵀX − I| {error:.2e}")
        return

    print(f"1. measured on this machine ({where}), median of {args.steps} steps")
    print("   matrix          ms/step   GFLOP/step by dtype (counted)            projected plan")
    for width in args.widths:
        for rows, cols in ((width, width), (max(width, STEM_COLUMNS), min(width, STEM_COLUMNS))):
            sec, flops, other = measure(rows, cols, args.steps, device)
            line = f"   {rows:>5} x {cols:<5}  {sec * 1e3:8.1f}   {fmt_flops(flops):40s}"
            if rows == cols:
                proj = square_step_flops(width)
                line += f" analytic {fmt_flops({k: v for k, v in proj.items() if k != 'plan'})}; "
                line += f"ρ̂ measured {measured_bound(width):.3f} vs lr·W^¾ {LR * width**0.75:.3f}"
            if other:
                line += f"  (also: {', '.join(other)})"
            print(line)

    print("\n2. projected at the GPU rates (TFLOP/s: fp64 67, fp32 67, tf32 495, bf16 790 measured)")
    for name in RECIPES:
        p = project(name)
        step, sync = p["plan"]
        share = p["opt_s"] / (p["opt_s"] + p["model_s"])
        print(
            f"   {name}: W={p['width']}, {p['ranks']} ranks, busiest owner {p['squares']} W×W"
            f"{' + stem' if p['stem'] else ''}; plan per step order {step.order}/{step.squarings} squarings,"
            f" Lookahead order {sync.order}/{sync.squarings}"
        )
        print(
            f"     optimizer {fmt_flops(p['flops'])} GFLOP → {p['opt_s'] * 1e3:.1f} ms;"
            f" model fwd+bwd (micro-batch {p['micro']}) {p['model'] / 1e12:.1f} TFLOP"
            f" → {p['model_s'] * 1e3:.1f} ms at 790; optimizer share {100 * share:.1f}%"
            f" (goal ≤ {100 * GOAL_SHARE:.0f}%: {'met' if share <= GOAL_SHARE else 'MISSED'})"
        )
        if share > GOAL_SHARE:
            allowed = GOAL_SHARE / (1 - GOAL_SHARE) * p["model_s"]
            rate = sum(p["flops"].values()) / allowed / 1e12
            print(
                f"     missed by {p['opt_s'] / allowed:.1f}x: the goal needs ≤ {allowed * 1e3:.1f} ms,"
                f" i.e. the step's products at ≥ {rate:.0f} TFLOP/s (tensor cores), not 67 (fp32/fp64)"
            )
            all_bf16 = sum(p["flops"].values()) / (RATES["bf16"] * 1e12)
            all_bf16_share = all_bf16 / (all_bf16 + p["model_s"])
            print(
                f"     the same products at the bf16 rate: {all_bf16 * 1e3:.1f} ms,"
                f" share {100 * all_bf16_share:.1f}%"
            )

    if args.emulate_steps:
        print(
            f"\n3. EMULATED tensor-core products (inputs rounded, fp32 accumulation), W={args.emulate_width},"
            f" {args.emulate_steps} steps, Newton–Schulz (float64) every {REORTH_EVERY}: ‖XᵀX − I‖₂, training"
        )
        for precision in ("fp64", "fp32", "tf32", "bf16"):
            r = emulate(args.emulate_width, args.emulate_steps, precision)
            print(
                f"   {precision}: one step {r['first_steps']:.1e}, worst between re-orthogonalisations"
                f" {r['worst']:.1e}, after them {r['after']:.1e}; final loss / initial {r['loss']:.1e},"
                f" max |X − Q*| {r['distance']:.1e}"
            )


if __name__ == "__main__":
    main()
