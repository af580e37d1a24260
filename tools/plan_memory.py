#!/usr/bin/env python
"""Per-rank GPU memory of a recipe under the sharded manifold optimizer; the largest micro-batch that fits.

    python tools/plan_memory.py RECIPE.yaml --gpus N [--nodes K] [--gpu-memory-gib 80] [--reserve 0.1]
                                [--dry-run [--rank R]] [--json] [section.key=value ...]
    python tools/plan_memory.py RECIPE.yaml --padding-table [--max-ranks 128]

The second form prints, for every world size from 2 to --max-ranks, the collectives' padding share (goal
≤ 1%) and the bucket kinds (optim/sharded.py: `plan_buckets`).

What is counted and how: `lipnext_scale/memory_plan.py`. Nothing is allocated (meta device).

--dry-run also runs one real training step of the recipe at its real shape and world size with fake tensors
and torch's fake process group, and prints the per-rank peak that torch's MemTracker sees in each phase
beside the plan's figure (`lipnext_scale/dryrun.py`): seconds and a few hundred MB of host memory at 2B, no
GPU. The rank simulated is the one with the most optimizer state, unless --rank names another.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lipnext_scale.config import load_recipe  # noqa: E402
from lipnext_scale.dryrun import CATEGORIES, DryRun, dry_run  # noqa: E402
from lipnext_scale.memory_plan import GIB, plan  # noqa: E402
from lipnext_scale.optim.sharded import issued_before_last_hook, plan_buckets  # noqa: E402
from lipnext_scale.pretrained import build_model  # noqa: E402


def gib(x: float) -> str:
    return f"{x / GIB:8.2f}"


def format_plan(p: dict, title: str = "") -> str:
    b = p["compute_dtype"]
    act = p["activations"]
    order = ("master", "exp_avg", "exp_avg_sq", "slow", "step_sum")
    by_key = dict(sorted(p["optimizer_by_key_largest_rank"].items(), key=lambda kv: order.index(kv[0])))
    names = {
        "master": "fp32 masters",
        "exp_avg": "Adam first moments",
        "exp_avg_sq": "Adam second moments",
        "slow": "Lookahead slow weights",
        "step_sum": "Lookahead skew step sums",
    }

    verdict = "fits" if p["fits"] else "DOES NOT FIT"

    def row(label: str, nbytes: int, note: str = "") -> str:
        return f"  {label:<62}{nbytes / GIB:8.2f}{note}"

    lines = [
        f"{title}{p['size']}  {p['params']:,} parameters  compute {b}  {p['world_size']} ranks  "
        f"GPU {p['gpu_memory_gib']:g} GiB - {p['reserve']:.0%} reserve = {p['usable'] / GIB:.1f} GiB usable",
        f"micro-batch {p['micro_batch']} per rank"
        + ("" if p["micro_batch_valid"] else " (does NOT divide data.batch_size / ranks)")
        + f", model.activation_checkpointing {p['activation_checkpointing']}"
        + (" (auto: least recomputation that fits)" if p["activation_checkpointing_asked"] == "auto" else "")
        + f", second mix {'fused (M·Rᵀ formed)' if act['fused'] else 'unfused (two token matmuls)'}",
        "",
        f"  {'per rank':<62}{'GiB':>8}",
        row(f"weights ({b}, every rank)", p["weights"]),
        row("fp32 gradients: owned accumulators (largest rank)", p["grad_accumulators"]),
        row("fp32 gradients: send buffers, two buckets + the tail (at most)", p["buckets"]),
        row("fp32 gradients at the backward peak (accumulators + buffers)", p["backward_grads"]),
        *(row(f"{names.get(k, k)} (owned; largest rank)", v) for k, v in by_key.items()),
        row(
            f"= optimizer state, largest rank (unsharded {p['optimizer_unsharded'] / GIB:.1f})",
            max(p["optimizer_per_rank"]),
        ),
        row("activations kept after forward", act["kept"]),
        row("activation peak in backward (+ input, working set, recompute)", act["peak"]),
        row(f"transient {b} gradients (3 x largest matrix)", p["transient_grads"]),
        row("optimizer-step transients (activations freed)", p["step_transient"]),
        row(
            f"evaluation: {p['evaluation']['chunk_batches']} x {p['evaluation']['batch']} images, masters "
            + ("gathered" if p["evaluation"]["fp32_copy"] else "streamed by block"),
            p["evaluation"]["extra"],
        ),
        f"  collectives' padding {p['padding'] / p['params']:.3%} of the parameters",
        row("PEAK", p["peak"], f"   {verdict} in {p['usable'] / GIB:.1f} usable"),
        row("(start-up peak: fp32 weights + state, during the cast)", p["init_peak"]),
        "",
        f"act. checkpointing | act. peak GiB | peak GiB @ micro {p['micro_batch']:<4} | fits | "
        "largest micro-batch | largest dividing batch/ranks",
    ]
    for o in p["options"]:
        lines.append(
            f"{o['activation_checkpointing']:18d} | {o['activation_peak'] / GIB:13.2f} | "
            f"{o['peak'] / GIB:21.2f} | "
            f"{'yes' if o['fits'] else 'NO':>4} | {o['largest_micro_batch']:19d} | "
            f"{o['largest_valid_micro_batch']:28d}"
        )
    return "\n".join(lines)


def format_dry_run(r: DryRun) -> str:
    shown = [c for c in CATEGORIES if c != "Buffer" or any(p.at_peak.get(c) for p in r.phases)]
    head = "".join(f"{c[:10]:>11}" for c in shown)
    lines = [
        f"dry run: one training step faked (FakeTensorMode on cpu, fake process group), rank {r.rank} of "
        f"{r.world_size}, micro-batch {r.micro_batch}"
        + (f" x {r.accumulation} accumulated" if r.accumulation > 1 else "")
        + f", {r.compute_dtype}, {r.seconds:.0f} s",
        "",
        f"  {'per rank, GiB':<16}{'MemTracker':>11}{'plan':>8}{'ratio':>7}{'host reads':>11}"
        f"   at the peak:{head}",
    ]
    for p in r.phases:
        cats = "".join(f"{p.at_peak.get(c, 0) / GIB:11.2f}" for c in shown)
        lines.append(
            f"  {p.name:<16}{p.peak / GIB:11.2f}{p.planned / GIB:8.2f}{p.ratio:7.3f}{p.host_reads:11d}"
            f"{'':>15}{cats}"
        )
    lines += [
        f"  {'PEAK':<16}{r.peak / GIB:11.2f}{r.plan['peak'] / GIB:8.2f}{r.ratio:7.3f}"
        "   (micro-batch, optimizer step, evaluation; start-up beside it, as in the plan)",
        "",
        *(f"  {c}: {CATEGORIES[c]}" for c in shown),
        "  start-up: everything is made inside the tracker there, so its peak counts it all as Activation.",
        "  host reads: .item()/bool()/.tolist() of a device tensor (a GPU sync), answered by the dry run.",
    ]
    return "\n".join(lines)


def padding_table(recipe, max_ranks: int) -> str:
    import torch

    with torch.device("meta"):
        model = build_model(recipe)
    sizes = [(n, p.numel()) for n, p in model.named_parameters()]
    total = sum(s for _, s in sizes)
    lines = [
        "ranks | padding % | scatter buckets | reduce (leftover) | tail | largest bucket MiB fp32 | "
        "reduced before the last backward hook"
    ]
    for n in range(2, max_ranks + 1):
        buckets = plan_buckets(sizes, n)
        kinds = [b.kind for b in buckets]
        lines.append(
            f"{n:5d} | {100 * sum(b.padding for b in buckets) / total:9.4f} | {kinds.count('scatter'):15d} | "
            f"{kinds.count('reduce'):17d} | {kinds.count('tail'):4d} | "
            f"{max(b.numel for b in buckets) * 4 / 2**20:23.1f} | {issued_before_last_hook(sizes, n):.2%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--gpus", type=int, help="GPUs (ranks) per node (required unless --padding-table)")
    parser.add_argument("--padding-table", action="store_true", help="padding share at 2..--max-ranks ranks")
    parser.add_argument("--max-ranks", type=int, default=128)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--reserve", type=float, default=0.10, help="fraction kept free (default 0.10)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--dry-run", action="store_true", help="also run one step faked: MemTracker's peaks")
    parser.add_argument("--rank", type=int, default=None, help="rank to simulate (default: the largest)")
    args = parser.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.padding_table:
        print(f"{args.recipe}: padding of the sharded optimizer's collectives\n")
        print(padding_table(recipe, args.max_ranks))
        return
    if args.gpus is None:
        parser.error("--gpus is required (or --padding-table)")
    world_size = args.gpus * args.nodes
    result = plan(recipe, world_size, args.gpu_memory_gib, args.reserve)
    result.update(recipe=args.recipe, overrides=args.overrides, gpus=args.gpus, nodes=args.nodes)
    if args.rank is not None and not 0 <= args.rank < world_size:
        parser.error(f"--rank {args.rank}: ranks are 0..{world_size - 1}")
    faked = dry_run(recipe, world_size, args.recipe, rank=args.rank) if args.dry_run else None
    if args.json:
        if faked:
            result["dry_run"] = {
                **{k: v for k, v in dataclasses.asdict(faked).items() if k != "plan"},
                "peak": faked.peak,
                "ratio": faked.ratio,
            }
        print(json.dumps(result, indent=2))
        return
    print(format_plan(result, f"{args.recipe}  {args.nodes} node(s) × {args.gpus} GPUs\n"))
    if faked:
        print("\n" + format_dry_run(faked))


if __name__ == "__main__":
    main()
