#!/usr/bin/env python
"""Certify a saved LipNeXt on a shard set: clean accuracy, CRA, per-class figures, radii, a CRA curve.

    python tools/certify.py WEIGHTS.safetensors --data MANIFEST [--eps 36/255 72/255 108/255 1]
        [--batch-size N] [--out DIR] [--audit K] [--device cpu|cuda] [--offload]

Writes `certify.json` and `cra_curve.png` to --out (default: the weights' directory). Everything is fp32
weights with the sound float64 Lipschitz bound, through `lipnext_scale.certify` (the same counting code the
trainer's eval.json uses). `--batch-size` defaults to the recipe's `certify.batch_size`, so the numbers are
those of eval.json bit for bit. Misclassified points count as radius 0 in the radius distribution.

`--audit K` attacks K correctly classified, certified points with PGD-L2 (random restarts, float32) inside
0.999 × each point's certified radius, in all of R^n and clamped to [0, 1], plus torchattacks' APGD when it
is installed. Any prediction change inside a certified radius is a violation: listed in the JSON, exit 3.

`--offload` builds the model with `accelerate.init_empty_weights` and loads it with
`load_checkpoint_and_dispatch` onto the CPU (no second full copy of the weights in memory).
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lipnext_scale.certify import (  # noqa: E402
    DEFAULT_EPS,
    certification_counts,
    certified_radius,
    exact_fp32_matmuls,
    head_pair_distances,
    require_fp32,
    summarize,
)
from lipnext_scale.data import build_loader  # noqa: E402
from lipnext_scale.model.lipnext import LipNeXt  # noqa: E402
from lipnext_scale.pretrained import build_model, load_pretrained, read_recipe  # noqa: E402

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
HIST_BINS = 32
CURVE_POINTS = 512
AUDIT_SCALE = 0.999
EXIT_VIOLATION = 3
NO_REPORTED_CRA = (
    "the recipe sets no certify.reported_cra (DESIGN.md, the project's record of the paper, lists no "
    "per-configuration CRA numbers), so no published points are drawn"
)


def parse_eps(text: str) -> float:
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        msg = f"not a radius: {text!r} (a number or a fraction such as 36/255)"
        raise argparse.ArgumentTypeError(msg) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"radius must be positive, got {text!r}")
    return value


def load_offloaded(path: Path) -> LipNeXt:
    """accelerate's big-model loading onto the CPU: the model is built empty (meta tensors) and each weight
    is streamed in from the safetensors file one tensor at a time, so no second full copy is ever held.
    (`load_checkpoint_and_dispatch` refuses safetensors files without a {"format": "pt"} metadata entry,
    which model.safetensors does not carry, so the per-tensor equivalent is used.)"""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    recipe = read_recipe(path)
    with init_empty_weights(include_buffers=True):
        model = build_model(recipe)
    expected = set(model.state_dict())
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        if keys != expected:
            raise ValueError(
                f"{path}: weights do not match the recipe: missing {sorted(expected - keys)[:5]}, "
                f"unexpected {sorted(keys - expected)[:5]}"
            )
        for name in sorted(keys):
            set_module_tensor_to_device(model, name, "cpu", value=f.get_tensor(name), dtype=torch.float32)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"{path}: no weights for {leftover[:5]}")
    return model.float().eval()


@torch.no_grad()
def certify_loader(model: LipNeXt, batches, eps_list: list[float]) -> dict:
    """Counts through `certification_counts`, plus per-sample (radius, pred, label) captured on the way."""
    require_fp32(model)
    lipschitz = model.lipschitz_bound()
    distances = head_pair_distances(model)
    logits, labels = [], []

    def keep_labels(it):
        for images, y in it:
            labels.append(y.cpu())
            yield images, y

    hook = model.register_forward_hook(lambda _m, _i, out: logits.append(out.detach().cpu()))
    try:
        counts = certification_counts(model, keep_labels(batches), eps_list, lipschitz, distances)
    finally:
        hook.remove()
    radii, preds = [], []
    for z in logits:
        r, p = certified_radius(model, z, lipschitz, distances)
        radii.append(r)
        preds.append(p)
    radius = torch.cat(radii) if radii else torch.zeros(0, dtype=torch.float64)
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    label = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    hit = pred == label
    again = [int(hit.sum())] + [int((hit & (radius >= e)).sum()) for e in eps_list] + [len(label)]
    if again != counts.tolist():
        raise RuntimeError(f"captured radii disagree with certification_counts: {again} vs {counts.tolist()}")
    return {"counts": counts, "lipschitz": lipschitz, "radius": radius, "pred": pred, "label": label}


def per_class(pred: torch.Tensor, label: torch.Tensor, radius: torch.Tensor, eps: float, n: int) -> list:
    rows = []
    for c in range(n):
        mine = label == c
        total = int(mine.sum())
        correct = int((mine & (pred == c)).sum())
        certified = int((mine & (pred == c) & (radius >= eps)).sum())
        rows.append(
            {
                "class": c,
                "total": total,
                "correct": correct,
                "certified": certified,
                "clean_acc": correct / total if total else None,
                "cra": certified / total if total else None,
            }
        )
    return rows


def radius_distribution(effective: torch.Tensor) -> dict:
    r = effective.numpy()
    top = float(r.max()) if len(r) else 0.0
    counts, edges = np.histogram(r, bins=HIST_BINS, range=(0.0, top if top > 0 else 1.0))
    return {
        "note": "misclassified points count as radius 0",
        "mean": float(r.mean()),
        "quantiles": [{"q": q, "radius": float(np.quantile(r, q))} for q in QUANTILES],
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def cra_curve(effective: torch.Tensor, hit: torch.Tensor, upto: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact CRA(ε) = share of points correct with radius ≥ ε, on a fine grid from 0 to `upto`."""
    grid = np.linspace(0.0, upto, CURVE_POINTS)
    r = np.sort(effective[hit].numpy())
    certified = len(r) - np.searchsorted(r, grid, side="left")  # count of r >= ε
    return grid, certified / max(1, len(hit))


def plot_curve(path: Path, grid, cra, result: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    ax.plot(grid, 100 * cra, color="tab:blue", lw=1.8, label="CRA (exact, from radii)")
    for row in result["cra"]:
        ax.axvline(row["eps"], color="0.75", lw=0.8, ls="--")
        ax.plot(row["eps"], 100 * row["cra"], "o", color="tab:red", ms=5)
        ax.annotate(
            f"{100 * row['cra']:.1f}%", (row["eps"], 100 * row["cra"]), textcoords="offset points",
            xytext=(4, 4), fontsize=8,
        )
    ax.plot([], [], "o", color="tab:red", label="requested ε")
    if result.get("paper_points"):
        pts = result["paper_points"]
        label = f"published: {result['paper_configuration']}"
        ax.plot([p["eps"] for p in pts], [100 * p["cra"] for p in pts], "s", color="tab:green", label=label)
    ax.set_xlabel("ε (L2, [0,1] pixels)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, grid[-1])
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- audit


def _margin(logits: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """z_ŷ − max_{j≠ŷ} z_j: negative once the prediction changes."""
    own = logits.gather(1, pred[:, None])[:, 0]
    other = logits.scatter(1, pred[:, None], float("-inf")).max(dim=1).values
    return own - other


def _project(delta: torch.Tensor, x: torch.Tensor, budget: torch.Tensor, clamp: bool) -> torch.Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    delta = delta * (budget / norms).clamp(max=1.0).view(-1, 1, 1, 1)
    if clamp:  # moves every coordinate towards x, so the norm stays within budget
        delta = (x + delta).clamp(0, 1) - x
    return delta


def pgd_l2(model, x, pred, budget, *, steps: int, restarts: int, clamp: bool, seed: int):
    """Smallest margin found per point (float32 PGD on the margin) and the δ that reached it."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best_margin = torch.full((len(x),), float("inf"))
    best_delta = torch.zeros_like(x)
    xs, ps, bs = (t.repeat(restarts, *[1] * (t.dim() - 1)) for t in (x, pred, budget))
    noise = torch.randn(xs.shape, generator=gen).to(x.device)
    scale = torch.rand(len(xs), generator=gen).to(x.device) * bs
    delta = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * scale.view(-1, 1, 1, 1)
    delta[: len(x)] = 0  # restart 0 starts at x itself
    delta = _project(delta, xs, bs, clamp)
    step = (2.5 * bs / steps).view(-1, 1, 1, 1)
    for _ in range(steps + 1):
        delta.requires_grad_(True)
        margin = _margin(model(xs + delta), ps)
        with torch.no_grad():
            m = margin.detach().view(restarts, len(x)).cpu()
            d = delta.detach().view(restarts, *x.shape).cpu()
            idx = m.argmin(dim=0)
            better = m.min(dim=0).values < best_margin
            best_margin = torch.where(better, m.min(dim=0).values, best_margin)
            best_delta[better] = d[idx[better], torch.arange(len(x))[better]].to(x.device)
        (grad,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = _project(delta.detach() - step * g, xs, bs, clamp)
    return best_margin, best_delta


def _apgd(model, x, pred, budget, steps: int) -> list[torch.Tensor] | None:
    try:
        import torchattacks
    except ImportError:
        return None
    out = []
    for i in range(len(x)):  # one ε per point
        attack = torchattacks.APGD(model, norm="L2", eps=float(budget[i]), steps=steps, n_restarts=2)
        out.append(attack(x[i : i + 1], pred[i : i + 1]) - x[i : i + 1])
    return out


def audit(
    model: LipNeXt,
    images: torch.Tensor,
    radius: torch.Tensor,
    *,
    steps: int = 100,
    restarts: int = 3,
    scale: float = AUDIT_SCALE,
    seed: int = 0,
) -> dict:
    """Attack each image inside `scale` × its `radius` (its certified radius, in a sound audit).

    A violation: the fp32 prediction at x + δ differs from that at x while ‖δ‖₂ (float64) ≤ radius.
    Variants: PGD-L2 unconstrained (the certificate covers all of R^n), PGD-L2 with x + δ clamped to
    [0, 1], and torchattacks' APGD-L2 (which clamps) when installed."""
    model.eval()
    device = next(model.parameters()).device
    x = images.to(device=device, dtype=torch.float32)
    with torch.no_grad():
        clean_logits = model(x)
    pred = clean_logits.argmax(dim=1)
    clean_margin = _margin(clean_logits, pred).cpu()
    radius = radius.to(torch.float64).cpu()
    budget = (scale * radius).to(torch.float32).to(device)
    variants = {}
    for name, clamp in (("pgd_l2", False), ("pgd_l2_clamp01", True)):
        _, delta = pgd_l2(model, x, pred, budget, steps=steps, restarts=restarts, clamp=clamp, seed=seed)
        variants[name] = list(delta)
    apgd = _apgd(model, x, pred, budget, steps)
    if apgd is not None:
        variants["apgd_l2"] = [d[0] for d in apgd]
    violations, worst = [], {}
    for name, deltas in variants.items():
        delta = torch.stack(deltas)
        with torch.no_grad():
            logits = model(x + delta)
        moved = logits.argmax(dim=1)
        norms = delta.detach().double().flatten(1).norm(dim=1).cpu()
        margins = _margin(logits, pred).cpu()
        worst[name] = float((margins / clean_margin).min()) if len(x) else None
        for i in range(len(x)):
            if moved[i] != pred[i] and norms[i] <= radius[i]:
                violations.append(
                    {
                        "attack": name,
                        "index": i,
                        "pred": int(pred[i]),
                        "adversarial_pred": int(moved[i]),
                        "delta_norm": float(norms[i]),
                        "certified_radius": float(radius[i]),
                    }
                )
    return {
        "num_points": len(x),
        "scale": scale,
        "steps": steps,
        "restarts": restarts,
        "attacks": list(variants),
        "apgd": "torchattacks APGD-L2" if apgd is not None else "skipped: torchattacks is not installed",
        "min_margin_ratio": worst,  # min over points of attacked / clean margin; < 0: flipped
        "violations": violations,
    }


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="manifest of the evaluation shard set")
    ap.add_argument("--eps", type=parse_eps, nargs="+", default=list(DEFAULT_EPS))
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's certify.batch_size")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--audit", type=int, default=0, metavar="K")
    ap.add_argument("--audit-steps", type=int, default=100)
    ap.add_argument("--audit-restarts", type=int, default=3)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = ap.parse_args(argv)
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with exact_fp32_matmuls():  # every forward here, the audit's included, in IEEE fp32
            return run(ap, args)
    finally:
        torch.set_num_threads(previous)


def run(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.weights.is_file():
        ap.error(f"{args.weights}: no such file")
    if not args.data.is_file():
        ap.error(f"{args.data}: no such manifest")
    out = args.out or args.weights.parent
    out.mkdir(parents=True, exist_ok=True)

    recipe = read_recipe(args.weights)
    if args.offload:
        model = load_offloaded(args.weights).to(args.device)
    else:
        model = load_pretrained(args.weights, device=args.device)
    batch_size = args.batch_size or recipe.certify.batch_size
    loader = build_loader(
        args.data,
        batch_size=batch_size,
        train=False,
        image_size=recipe.model.image_size,
        augment=recipe.data.augment,
        backend=recipe.data.backend,
        device=args.device,
    )
    eps_list = list(args.eps)
    got = certify_loader(model, loader, eps_list)
    result = summarize(got["counts"], eps_list, got["lipschitz"])
    radius, pred, label = got["radius"], got["pred"], got["label"]
    hit = pred == label
    effective = torch.where(hit, radius, torch.zeros_like(radius))

    reported = recipe.certify.reported_cra
    result.update(
        {
            "weights": str(args.weights),
            "data": str(args.data),
            "batch_size": batch_size,
            "offload": args.offload,
            "model_size": recipe.model.size,
            "num_classes": recipe.model.num_classes,
            "per_class": {
                "eps": eps_list[0],
                "classes": per_class(pred, label, radius, eps_list[0], recipe.model.num_classes),
            },
            "radii": radius_distribution(effective),
            "paper_configuration": recipe.certify.reported_source or None,
            "paper_points": [{"eps": e, "cra": c} for e, c in reported] or None,
            "why": None if reported else NO_REPORTED_CRA,
        }
    )
    largest_radius = float(effective.max()) if len(effective) else 0.0
    upto = max(*eps_list, *(e for e, _ in reported), largest_radius) * 1.05
    grid, cra = cra_curve(effective, hit, upto)
    curve_png = out / "cra_curve.png"
    plot_curve(curve_png, grid, cra, result, f"{args.weights.name}: {recipe.model.size}, n={len(label)}")
    result["cra_curve_png"] = str(curve_png)

    if args.audit:
        if args.audit < 0:
            ap.error("--audit K needs K >= 0")
        pick = torch.nonzero(hit & (radius > 0)).flatten()[: args.audit].tolist()
        images = _gather_images(args.data, recipe, pick, args.device)
        report = audit(
            model, images, radius[pick], steps=args.audit_steps, restarts=args.audit_restarts
        )
        report["sample_indices"] = pick
        result["audit"] = report

    path = out / "certify.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    print(f"clean {100 * result['clean_acc']:.2f}%  " + "  ".join(
        f"CRA@{r['eps']:.4f} {100 * r['cra']:.2f}%" for r in result["cra"]
    ) + f"  (L = {result['lipschitz_bound']:.6f}, n = {result['num_samples']})")
    print(f"wrote {path} and {curve_png}")
    if args.audit:
        v = result["audit"]["violations"]
        print(f"audit: {len(pick)} points, attacks {result['audit']['attacks']}, {len(v)} violations")
        if v:
            return EXIT_VIOLATION
    return 0


def _gather_images(manifest: Path, recipe, indices: list[int], device: str) -> torch.Tensor:
    """The eval images at `indices` of the (deterministic, shard-ordered) eval stream."""
    loader = build_loader(
        manifest,
        batch_size=recipe.certify.batch_size,
        train=False,
        image_size=recipe.model.image_size,
        augment=recipe.data.augment,
        backend=recipe.data.backend,
        device=device,
    )
    wanted, found, seen = set(indices), {}, 0
    for images, _ in loader:
        for i in range(len(images)):
            if seen + i in wanted:
                found[seen + i] = images[i]
        seen += len(images)
        if len(found) == len(wanted):
            break
    return torch.stack([found[i] for i in indices]) if indices else torch.zeros(0)


if __name__ == "__main__":
    sys.exit(main())
