"""Attacks on certificates: gradient attacks inside the radius and a search over floating-point rounding.

A violation is a point x' with ‖x' − x‖₂ < r (the norm computed in float64 and rounded up, so the
claim is real) at which the *certified classifier* (`Certifier.logits`: fp32 forward in "fp32" mode,
float64 in "sound" mode) predicts something else than at x. Attacks:

- PGD-L2 (random restarts, float32, on the fp32 forward) inside `scale`·r, in all of R^n and clamped to
  [0, 1]; torchattacks' APGD-L2 (clamped) — `apgd=True` requires torchattacks (install it with
  `pip install --no-deps torchattacks==3.5.1`: its declared requirements pin `requests~=2.25` and pull
  torchvision, neither of which it imports for APGD).
- The rounding search (Jin, Ohrimenko & Rubinstein, arXiv 2205.10159): along each point's best attack
  direction, bisect to the last float32 point of the certified ball, then try float32 neighbours of it
  (every coordinate moved by at most one ulp, kept inside the ball) for a prediction change. It is
  where a certificate that ignores rounding breaks first, because there the exact margin is smallest.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lipnext_scale.certify import Certifier, fp32_forward
from lipnext_scale.rounding import norm_up

AUDIT_SCALE = 0.999
APGD_INSTALL = "pip install --no-deps torchattacks==3.5.1"


def margin(logits: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """z_ŷ − max_{j≠ŷ} z_j: negative once the prediction changes."""
    own = logits.gather(1, pred[:, None])[:, 0]
    other = logits.scatter(1, pred[:, None], float("-inf")).max(dim=1).values
    return own - other


class Fp32Logits(nn.Module):
    """The fp32 forward pass with a fixed P per block, as a module (what gradient attacks differentiate)."""

    def __init__(self, certifier: Certifier):
        super().__init__()
        self.model = certifier.model
        self.products = certifier.products if certifier.products is not None else self.model.mixing_products()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return fp32_forward(self.model, images, self.products)


def _project(delta: torch.Tensor, x: torch.Tensor, budget: torch.Tensor, clamp: bool) -> torch.Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    delta = delta * (budget / norms).clamp(max=1.0).view(-1, 1, 1, 1)
    if clamp:  # moves every coordinate towards x, so the norm stays within budget
        delta = (x + delta).clamp(0, 1) - x
    return delta


def pgd_l2(logits_fn, x, pred, budget, *, steps: int, restarts: int, clamp: bool, seed: int):
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
        m = margin(logits_fn(xs + delta), ps)
        with torch.no_grad():
            mm = m.detach().view(restarts, len(x)).cpu()
            d = delta.detach().view(restarts, *x.shape).cpu()
            idx = mm.argmin(dim=0)
            better = mm.min(dim=0).values < best_margin
            best_margin = torch.where(better, mm.min(dim=0).values, best_margin)
            best_delta[better] = d[idx[better], torch.arange(len(x))[better]].to(x.device)
        (grad,) = torch.autograd.grad(m.sum(), delta)
        with torch.no_grad():
            g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = _project(delta.detach() - step * g, xs, bs, clamp)
    return best_margin, best_delta


def apgd_l2(module: nn.Module, x, pred, budget, steps: int) -> list[torch.Tensor]:
    """torchattacks' APGD-L2 (two restarts) per point at its own budget; ImportError names the install."""
    try:
        import torchattacks
    except ImportError as e:
        raise ImportError(f"APGD needs torchattacks: {APGD_INSTALL}") from e
    out = []
    for i in range(len(x)):  # one ε per point
        attack = torchattacks.APGD(module, norm="L2", eps=float(budget[i]), steps=steps, n_restarts=2, seed=i)
        out.append((attack(x[i : i + 1], pred[i : i + 1]) - x[i : i + 1])[0])
    return out


def _inside(candidates: torch.Tensor, x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """‖candidate − x‖₂ < radius, with the norm of the float64 difference rounded up: a sure claim."""
    diff = candidates.double() - x.double()  # exact: both are fp32
    return norm_up(diff, dim=tuple(range(1, diff.dim()))).cpu() < radius


@torch.no_grad()
def rounding_search(
    predict,
    x: torch.Tensor,
    pred: torch.Tensor,
    radius: torch.Tensor,
    direction: torch.Tensor,
    *,
    tries: int = 64,
    seed: int = 0,
) -> list[dict]:
    """For each point: bisect along `direction` to the last float32 point inside the certified ball, then
    evaluate it, the float32 points just before it on the line, and `tries` one-ulp neighbours of it that
    stay inside the ball. Returns one record per violation (`predict` maps fp32 images to labels)."""
    gen = torch.Generator().manual_seed(seed)
    found = []
    for i in range(len(x)):
        xi = x[i : i + 1]
        d = direction[i : i + 1].double()
        d_norm = float(d.norm())
        if d_norm == 0.0 or not radius[i] > 0:
            continue
        v = d / d_norm
        lo, hi = 0.0, float(radius[i]) * 1.01
        for _ in range(64):  # the largest t with fl32(x + t·v) inside the ball
            mid = 0.5 * (lo + hi)
            if _inside((xi.double() + mid * v).float(), xi, radius[i : i + 1])[0]:
                lo = mid
            else:
                hi = mid
        edge = (xi.double() + lo * v).float()
        line = torch.cat([(xi.double() + lo * (1 - k * 1e-7) * v).float() for k in range(8)])
        away = torch.where(v > 0, math.inf, -math.inf).float()
        toward = -away
        steps = torch.randint(-1, 2, (tries, *xi.shape[1:]), generator=gen).to(x.device)
        # Outward one-ulp moves along the direction, inward ones against it, and random mixtures.
        outward = torch.nextafter(edge.expand(tries, -1, -1, -1), away.expand(tries, -1, -1, -1))
        inward = torch.nextafter(edge.expand(tries, -1, -1, -1), toward.expand(tries, -1, -1, -1))
        neighbours = torch.where(steps > 0, outward, torch.where(steps < 0, inward, edge.expand_as(outward)))
        candidates = torch.cat([edge, line, neighbours])
        keep = _inside(candidates, xi, radius[i : i + 1].expand(len(candidates)))
        candidates = candidates[keep.to(candidates.device)]
        if len(candidates) == 0:
            continue
        labels = predict(candidates).cpu()
        moved = labels != pred[i].cpu()
        for j in torch.nonzero(moved).flatten().tolist():
            # Confirmed alone: an fp32 forward pass can round differently inside a larger batch.
            labels[j] = predict(candidates[j : j + 1]).cpu()[0]
            if labels[j] == pred[i].cpu():
                continue
            diff = candidates[j : j + 1].double() - xi.double()
            found.append(
                {
                    "attack": "rounding_search",
                    "index": i,
                    "pred": int(pred[i]),
                    "adversarial_pred": int(labels[j]),
                    "delta_norm": float(norm_up(diff)),
                    "certified_radius": float(radius[i]),
                    "example": candidates[j].cpu(),
                }
            )
            break
    return found


def audit(
    certifier: Certifier,
    images: torch.Tensor,
    radius: torch.Tensor,
    *,
    steps: int = 100,
    restarts: int = 3,
    scale: float = AUDIT_SCALE,
    seed: int = 0,
    apgd: bool = True,
    rounding_tries: int = 64,
    keep_examples: bool = False,
) -> dict:
    """Attack each image inside `scale` × its `radius` (its certified radius, in a sound audit), then run
    the rounding search at the full radius. A violation: the certified classifier's prediction at x' differs
    from that at x while ‖x' − x‖₂ < radius (float64 norm rounded up). With `keep_examples`, the report's
    "examples" lists each violation's x' (float32), for anyone to re-check."""
    model = certifier.model
    model.eval()
    device = model.embed.weight.device
    x = images.to(device=device, dtype=torch.float32)
    module = Fp32Logits(certifier)

    def predict(batch: torch.Tensor) -> torch.Tensor:
        return certifier.logits(batch).argmax(dim=1)

    with torch.no_grad():
        pred = predict(x)
        clean_margin = margin(module(x), pred).cpu()
    radius = radius.to(torch.float64).cpu()
    budget = (scale * radius).to(torch.float32).to(device)
    variants, directions = {}, None
    for name, clamp in (("pgd_l2", False), ("pgd_l2_clamp01", True)):
        _, delta = pgd_l2(module, x, pred, budget, steps=steps, restarts=restarts, clamp=clamp, seed=seed)
        variants[name] = delta
        if directions is None:
            directions = delta
    if apgd:
        variants["apgd_l2"] = torch.stack(apgd_l2(module, x, pred, budget, steps))
    violations, worst, examples = [], {}, []
    for name, delta in variants.items():
        adv = (x + delta).float()
        with torch.no_grad():
            moved = predict(adv).cpu()
            margins = margin(module(adv), pred).cpu()
        inside = _inside(adv, x, radius)
        worst[name] = float((margins / clean_margin).min()) if len(x) else None
        for i in range(len(x)):
            if moved[i] != pred[i].cpu() and inside[i]:
                moved[i] = predict(adv[i : i + 1]).cpu()[0]  # confirmed alone, as in the rounding search
                if moved[i] == pred[i].cpu():
                    continue
                violations.append(
                    {
                        "attack": name,
                        "index": i,
                        "pred": int(pred[i]),
                        "adversarial_pred": int(moved[i]),
                        "delta_norm": float(norm_up((adv[i] - x[i]).double())),
                        "certified_radius": float(radius[i]),
                    }
                )
                examples.append(adv[i].detach().cpu())
    # Where PGD never left x (its best δ is 0), search along the margin's steepest descent instead.
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(margin(module(xg), pred).sum(), xg)
    still = directions.flatten(1).norm(dim=1) == 0
    directions = torch.where(still.view(-1, 1, 1, 1), -grad, directions)
    rounding = rounding_search(predict, x, pred, radius, directions, tries=rounding_tries, seed=seed)
    violations += rounding
    examples += [v.pop("example") for v in rounding]
    report = {
        "mode": certifier.mode,
        "num_points": len(x),
        "scale": scale,
        "steps": steps,
        "restarts": restarts,
        "attacks": [*variants, "rounding_search"],
        "apgd": "torchattacks APGD-L2" if apgd else "not run (apgd=False)",
        "min_margin_ratio": worst,  # min over points of attacked / clean margin; < 0: flipped
        "rounding_search": {"tries_per_point": rounding_tries, "violations": len(rounding)},
        "violations": violations,
        "violation_rate": len({v["index"] for v in violations}) / len(x) if len(x) else 0.0,
    }
    if keep_examples:
        report["examples"] = examples
    return report
