"""Certified radii and certified robust accuracy (DESIGN.md §1).

For a backbone with Lipschitz bound L and head rows w_i, the prediction ŷ cannot change within

    r(x) = min_{j≠ŷ} (z_ŷ − z_j) / (L · ‖w_ŷ − w_j‖₂)

L comes from `LipNeXt.lipschitz_bound()`, a sound bound computed from the fp32 weights in float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from lipnext_scale.model.lipnext import LipNeXt

DEFAULT_EPS = (36 / 255, 72 / 255, 108 / 255, 1.0)


def require_fp32(model: LipNeXt) -> None:
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"certify with fp32 weights only; the model holds {sorted(map(str, dtypes))}")


# fp32 matmul settings that round to fewer mantissa bits: TF32 (10 bits) on GPUs, bf16 passes on CPUs.
_REDUCED_FP32_MATMULS = ("tf32", "bf16")


def _fp32_matmul_settings() -> dict[str, str]:
    b = torch.backends
    return {"cuda": b.cuda.matmul.fp32_precision, "mkldnn": b.mkldnn.matmul.fp32_precision}


def require_exact_fp32_matmuls() -> None:
    """Refuse to certify logits computed with reduced-precision fp32 matmuls.

    TF32 perturbs logits by about 1e-3 relative, far beyond what the Lipschitz bound accounts for, so a
    margin near a certified radius could be wrong. `exact_fp32_matmuls()` is the way to compute them.
    """
    reduced = {k: v for k, v in _fp32_matmul_settings().items() if v in _REDUCED_FP32_MATMULS}
    if reduced:
        raise ValueError(
            f"reduced-precision fp32 matmuls are enabled ({reduced}, e.g. by "
            "torch.set_float32_matmul_precision('high')): certificates need exact fp32 logits; compute them "
            "inside lipnext_scale.exact_fp32_matmuls()"
        )


@contextlib.contextmanager
def exact_fp32_matmuls() -> Iterator[None]:
    """IEEE fp32 matmuls inside, whatever the process set (TF32 for training, say); restored on exit."""
    b = torch.backends
    saved = _fp32_matmul_settings()
    b.cuda.matmul.fp32_precision = b.mkldnn.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision = saved["cuda"], saved["mkldnn"]


@torch.no_grad()
def head_pair_distances(model: LipNeXt) -> torch.Tensor:
    """‖w_i − w_j‖₂ for all class pairs of the normalised head, in float64, by explicit differences."""
    w = model.head.normalized_weight().detach().to(device="cpu", dtype=torch.float64)
    return torch.stack([torch.linalg.vector_norm(w - row, dim=1) for row in w])


@torch.no_grad()
def certified_radius(
    model: LipNeXt,
    logits: torch.Tensor,
    lipschitz: float | None = None,
    pair_distances: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(radius, pred) per sample, radius in the L2 norm of [0,1] pixel space.

    `lipschitz` and `pair_distances` may be passed in to avoid recomputing them for every batch; they must
    come from the same fp32 weights that produced `logits`, computed with exact fp32 matmuls (refused when
    TF32 or bf16-based fp32 matmuls are enabled; see `exact_fp32_matmuls`).
    """
    require_fp32(model)
    require_exact_fp32_matmuls()
    if lipschitz is None:
        lipschitz = model.lipschitz_bound()
    if pair_distances is None:
        pair_distances = head_pair_distances(model)
    z = logits.detach().to(device="cpu", dtype=torch.float64)
    pred = z.argmax(dim=1)
    margins = z.gather(1, pred[:, None]) - z
    distances = pair_distances[pred]
    ratio = margins / (lipschitz * distances)
    ratio.scatter_(1, pred[:, None], float("inf"))
    return ratio.min(dim=1).values, pred


@torch.no_grad()
def certification_counts(
    model: LipNeXt,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps_list: list[float],
    lipschitz: float,
    pair_distances: torch.Tensor,
) -> torch.Tensor:
    """[correct, certified at each ε…, total] over `batches`: counts, so ranks can sum theirs."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(eps_list) + 2, dtype=torch.long)
    device = next(model.parameters()).device
    for images, labels in batches:
        with exact_fp32_matmuls():
            radius, pred = certified_radius(model, model(images.to(device)), lipschitz, pair_distances)
        hit = pred == labels.cpu()
        counts[0] += hit.sum()
        counts[1:-1] += torch.stack([(hit & (radius >= eps)).sum() for eps in eps_list])
        counts[-1] += len(labels)
    model.train(was_training)
    return counts


def summarize(counts: torch.Tensor, eps_list: list[float], lipschitz: float) -> dict:
    total = int(counts[-1])
    if total == 0:
        raise ValueError("evaluation saw no samples")
    return {
        "clean_acc": int(counts[0]) / total,
        "cra": [{"eps": eps, "cra": int(c) / total} for eps, c in zip(eps_list, counts[1:-1])],
        "lipschitz_bound": lipschitz,
        "num_samples": total,
    }


def evaluate(
    model: LipNeXt,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    eps_list: Iterable[float] = DEFAULT_EPS,
) -> dict:
    """Clean accuracy and CRA at each ε over `batches` of (images in [0,1], labels); fp32 weights only."""
    require_fp32(model)
    eps_list = list(eps_list)
    lipschitz = model.lipschitz_bound()
    counts = certification_counts(model, batches, eps_list, lipschitz, head_pair_distances(model))
    return summarize(counts, eps_list, lipschitz)


def format_table(result: dict) -> str:
    """The clean/CRA table printed at the end of a run."""
    lines = [f"{'ε':>10}  {'accuracy':>9}", f"{'clean':>10}  {100 * result['clean_acc']:8.2f}%"]
    for row in result["cra"]:
        lines.append(f"{row['eps']:10.4f}  {100 * row['cra']:8.2f}%")
    lines.append(f"Lipschitz bound of the backbone: {result['lipschitz_bound']:.6f} (fp32 weights, float64)")
    return "\n".join(lines)
