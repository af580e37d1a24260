"""Certify a saved model on a shard set: what `tools/certify.py` runs, importable and testable.

`certify_model_file(...)` loads `model.safetensors`, checks the data against the model, certifies every
image (fp32, sound, or a cascade of both), and returns the `certify.json` record: clean accuracy, CRA,
per-class figures, the radius distribution, an optional audit, and the CRA curve drawn to a PNG.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from lipnext_scale.audit import audit
from lipnext_scale.certify import Certifier, certification_counts, summarize
from lipnext_scale.data import build_loader
from lipnext_scale.data.shards import read_manifest
from lipnext_scale.model.lipnext import LipNeXt
from lipnext_scale.pretrained import build_model, load_pretrained, read_recipe

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
HIST_BINS = 32
CURVE_POINTS = 512
NO_REPORTED_CRA = (
    "the recipe sets no certify.reported_cra (the paper's numbers for the configurations it reports are "
    "in DESIGN.md §6 and the CIFAR/Tiny-ImageNet/ImageNet recipes), so no published points are drawn"
)
MODEL_FILE = "model.safetensors"


class CertifyError(ValueError):
    """A request certify cannot honour; the message says what to do instead."""


def resolve_weights(path: Path) -> Path:
    """A model file, or a run directory holding model.safetensors."""
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise CertifyError(
                f"{path} is a directory without {MODEL_FILE}; pass a run directory or the file"
            )
        return path / MODEL_FILE
    if not path.is_file():
        raise CertifyError(f"{path}: no such file or run directory")
    return path


def default_out(weights: Path, data: Path) -> Path:
    """<run dir>/certify-<data name>: results on other data never overwrite each other."""
    name = data.name.removesuffix(".json").removesuffix(".manifest")
    return weights.parent / f"certify-{name}"


def check_data(manifest_path: Path, recipe) -> None:
    """Refuse a shard set whose classes or stored image size do not fit the model."""
    manifest = read_manifest(manifest_path)
    m = recipe.model
    if manifest.num_classes != m.num_classes:
        raise CertifyError(
            f"{manifest_path}: {manifest.num_classes} classes, but the model has {m.num_classes}; certify on "
            "the split the model was trained for (labels index the model's classes)"
        )
    size = manifest.meta.get("image_size")
    if size is not None and size != m.image_size:
        raise CertifyError(
            f"{manifest_path}: images stored at {size} px, the model takes {m.image_size} px; write the "
            f"split at {m.image_size} px (tools/make_shards.py --image-size {m.image_size})"
        )


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


def certify_batches(certifier: Certifier, batches, eps_list: list[float]) -> dict:
    """Counts through `certification_counts` (the trainer's code), plus every (radius, pred, label)."""
    kept: list = []
    start = time.perf_counter()
    counts = certification_counts(certifier, batches, eps_list, keep=kept)
    seconds = time.perf_counter() - start
    if kept:
        radius, pred, label = (torch.cat(column) for column in zip(*kept))
    else:
        radius, pred, label = (
            torch.zeros(0, dtype=torch.float64),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0),
        )
    return {"counts": counts, "radius": radius, "pred": pred, "label": label, "seconds": seconds}


def per_class(pred: torch.Tensor, label: torch.Tensor, radius: torch.Tensor, eps: float, n: int) -> list:
    rows = []
    for c in range(n):
        mine = label == c
        total = int(mine.sum())
        correct = int((mine & (pred == c)).sum())
        certified = int((mine & (pred == c) & (radius > eps)).sum())
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
    """Exact CRA(ε) = share of points correct with radius > ε, on a fine grid from 0 to `upto`."""
    grid = np.linspace(0.0, upto, CURVE_POINTS)
    r = np.sort(effective[hit].numpy())
    certified = len(r) - np.searchsorted(r, grid, side="right")  # count of r > ε
    return grid, certified / max(1, len(hit))


def label_offsets(points: list[tuple[float, float]], xspan: float, yspan: float) -> list[tuple[int, int]]:
    """Text offsets (points) for the CRA labels: a label closer than a label's size to the previous one
    (in axis fractions) goes below its marker instead of above, so neighbours do not overlap."""
    offsets, last = [], None
    for x, y in points:
        near = last is not None and abs(x - last[0]) / xspan < 0.12 and abs(y - last[1]) / yspan < 0.08
        below = near and offsets[-1][1] > 0
        offsets.append((4, -12) if below else (4, 4))
        last = (x, y)
    return offsets


def plot_curve(path: Path, grid, cra, result: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    ax.plot(grid, 100 * cra, color="tab:blue", lw=1.8, label="CRA (exact, from radii)")
    points = [(row["eps"], 100 * row["cra"]) for row in result["cra"]]
    for (x, y), offset in zip(points, label_offsets(points, grid[-1], 100.0)):
        ax.axvline(x, color="0.75", lw=0.8, ls="--")
        ax.plot(x, y, "o", color="tab:red", ms=5)
        ax.annotate(f"{y:.1f}%", (x, y), textcoords="offset points", xytext=offset, fontsize=8)
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


def gather_images(loader, indices: list[int]) -> torch.Tensor:
    """The images at `indices` of a (deterministic, shard-ordered) evaluation stream."""
    wanted, found, seen = set(indices), {}, 0
    for images, _ in loader:
        for i in range(len(images)):
            if seen + i in wanted:
                found[seen + i] = images[i]
        seen += len(images)
        if len(found) == len(wanted):
            break
    return torch.stack([found[i] for i in indices]) if indices else torch.zeros(0)


def first_images(batches, limit: int):
    """The first `limit` (images, labels) of a stream, the last batch cut short."""
    seen = 0
    for images, labels in batches:
        if seen >= limit:
            return
        take = min(len(images), limit - seen)
        yield images[:take], labels[:take]
        seen += take


def cascade(fp32: dict, sound_certifier: Certifier, images_of, eps_list: list[float]) -> dict:
    """Sound radii, computed (float64) only where fp32 certifies anything: points correct with fp32 radius
    > min ε. Everywhere else the point counts as uncertified in both modes, which can only under-state."""
    hit = fp32["pred"] == fp32["label"]
    todo = torch.nonzero(hit & (fp32["radius"] > min(eps_list))).flatten().tolist()
    radius = torch.zeros_like(fp32["radius"])
    pred = fp32["pred"].clone()
    start = time.perf_counter()
    for lo in range(0, len(todo), 256):
        idx = todo[lo : lo + 256]
        r, p = sound_certifier(images_of(idx))
        radius[idx], pred[idx] = r.cpu(), p.cpu()
    return {
        "radius": radius,
        "pred": pred,
        "label": fp32["label"],
        "rechecked": len(todo),
        "seconds": time.perf_counter() - start,
    }


def certify_model_file(
    weights: Path,
    data: Path,
    *,
    eps_list: list[float],
    out: Path | None = None,
    batch_size: int | None = None,
    mode: str = "fp32",
    audit_points: int = 0,
    audit_steps: int = 100,
    audit_restarts: int = 3,
    apgd: bool = True,
    limit: int | None = None,
    device: str = "cpu",
    offload: bool = False,
    log=print,
) -> dict:
    """Certify `weights` (a model file or run directory) on the shard set `data`; write certify.json and
    cra_curve.png to `out` (default: `default_out`). mode: "fp32", "sound" or "cascade" (fp32 first, the
    fp32-certified points re-checked in sound mode; the CRA reported is the sound one). `limit`: only the
    first that many images of the split (a quick look at a large model on a CPU)."""
    weights = resolve_weights(Path(weights))
    data = Path(data)
    if not data.is_file():
        raise CertifyError(f"{data}: no such manifest")
    recipe = read_recipe(weights)
    check_data(data, recipe)
    out = Path(out) if out is not None else default_out(weights, data)
    out.mkdir(parents=True, exist_ok=True)
    model = load_offloaded(weights).to(device) if offload else load_pretrained(weights, device=device)
    batch_size = batch_size or recipe.certify.batch_size

    def loader():
        batches = build_loader(
            data,
            batch_size=batch_size,
            train=False,
            image_size=recipe.model.image_size,
            augment=recipe.data.augment,
            backend=recipe.data.backend,
            device=device,
        )
        return batches if limit is None else first_images(batches, limit)

    first = "fp32" if mode == "cascade" else mode
    certifier = Certifier(model, first)
    got = certify_batches(certifier, loader(), eps_list)
    timing = {f"{first}_seconds": got["seconds"]}
    mode_counts = {first: got["counts"][1:-1].tolist()}
    if mode == "cascade":
        sound = Certifier(model, "sound")
        checked = cascade(got, sound, lambda idx: gather_images(loader(), idx), eps_list)
        hit = checked["pred"] == checked["label"]
        mode_counts["sound"] = [int((hit & (checked["radius"] > e)).sum()) for e in eps_list]
        timing["sound_recheck_seconds"] = checked["seconds"]
        timing["sound_rechecked_points"] = checked["rechecked"]
        counts = torch.tensor([int(hit.sum()), *mode_counts["sound"], len(hit)])
        got = {**got, **{k: checked[k] for k in ("radius", "pred", "label")}, "counts": counts}
        certifier = sound
    result = summarize(got["counts"], eps_list, certifier.lipschitz, mode)
    radius, pred, label = got["radius"], got["pred"], got["label"]
    hit = pred == label
    effective = torch.where(hit, radius, torch.zeros_like(radius))
    reported = recipe.certify.reported_cra
    result.update(
        {
            "weights": str(weights),
            "data": str(data),
            "batch_size": batch_size,
            "limit": limit,
            "offload": offload,
            "model_size": recipe.model.size,
            "num_classes": recipe.model.num_classes,
            "certified_per_mode": {m: dict(zip(map(str, eps_list), c)) for m, c in mode_counts.items()},
            "timing": timing,
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
    largest = float(effective.max()) if len(effective) else 0.0
    upto = max(*eps_list, *(e for e, _ in reported), largest) * 1.05
    grid, cra = cra_curve(effective, hit, upto)
    curve_png = out / "cra_curve.png"
    plot_curve(curve_png, grid, cra, result, f"{weights.name}: {recipe.model.size}, {mode}, n={len(label)}")
    result["cra_curve_png"] = str(curve_png)

    if audit_points:
        if not apgd:
            log("audit: APGD not run (--no-apgd)")
        pick = torch.nonzero(hit & (radius > 0)).flatten()[:audit_points].tolist()
        images = gather_images(loader(), pick)
        report = audit(certifier, images, radius[pick], steps=audit_steps, restarts=audit_restarts, apgd=apgd)
        report["sample_indices"] = pick
        result["audit"] = report

    path = out / "certify.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    result["certify_json"] = str(path)
    return result
