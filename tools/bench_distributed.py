#!/usr/bin/env python
"""Memory and speed of the sharded manifold optimizer, for one recipe at several world sizes, side by side.

    python tools/bench_distributed.py RECIPE.yaml [--ranks 1 2 4] [--steps 6] [section.key=value ...]

For each N it launches N processes (torchrun; gloo on CPUs, NCCL on GPUs) running the real DeepSpeed engine
and sharded optimizer on random images at the recipe's micro-batch, and reports:

- optimizer state bytes of the largest rank against the unsharded total (goal: ≤ total/N + the largest
  matrix's state);
- optimizer-step time against forward+backward time (median over steps, after one warm-up step);
- bytes each rank sends per step (reduce-scatter of fp32 gradients + all-gather of compute-dtype weights,
  ring algorithms, padding included) against a plain ring all-reduce of the fp32 gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(recipe_path: str, overrides: list[str], steps: int, result_file: Path) -> None:
    import torch

    from lipnext_scale import distributed
    from lipnext_scale import engine as ds
    from lipnext_scale.build import manifold_hyper, named_parameters_with_kinds, resolve_precision
    from lipnext_scale.config import load_recipe
    from lipnext_scale.optim.sharded import ShardedManifoldOptimizer
    from lipnext_scale.pretrained import build_model

    recipe = load_recipe(recipe_path, overrides)
    info = ds.setup_distributed()
    torch.manual_seed(0)
    micro = recipe.train.micro_batch_size or max(1, recipe.data.batch_size // info.world_size)
    model = build_model(recipe).to(info.device)
    config = ds.deepspeed_config(micro * info.world_size, micro, info.world_size, Path(tempfile.mkdtemp()))
    config.pop("csv_monitor")
    engine, optimizer = ds.initialize(
        model,
        lambda _: ShardedManifoldOptimizer(named_parameters_with_kinds(model), manifold_hyper(recipe), 1.0),
        config,
    )
    dtype = resolve_precision(recipe.train.precision, info.device)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    size = recipe.model.image_size
    images = torch.rand(micro, 3, size, size, device=info.device)
    labels = torch.randint(0, recipe.model.num_classes, (micro,), device=info.device)

    def sync():
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        distributed.barrier()

    fwd_bwd, opt_step = [], []
    for _ in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(engine(images), labels)
        engine.backward(loss)
        sync()
        t1 = time.perf_counter()
        engine.step()
        sync()
        fwd_bwd.append(t1 - t0)
        opt_step.append(time.perf_counter() - t1)

    n, layout = info.world_size, optimizer.layout
    weight_bytes = torch.tensor([], dtype=dtype).element_size()
    comm = distributed.comm_device()
    mine = torch.tensor(optimizer.optimizer_bytes(), dtype=torch.int64, device=comm)
    per_rank = distributed.all_gather(mine).tolist()
    largest = torch.tensor(max(map(optimizer.state_bytes, optimizer.state), default=0), device=comm)
    largest_state = distributed.all_reduce_max(largest).item()
    if info.is_main:
        result = {
            "world_size": n,
            "params": sum(p.numel() for p in model.parameters()),
            "optimizer_bytes_per_rank": per_rank,
            "optimizer_bytes_total": sum(per_rank),
            "largest_matrix_state_bytes": largest_state,
            "fwd_bwd_s": statistics.median(fwd_bwd[1:]),
            "opt_step_s": statistics.median(opt_step[1:]),
            "sent_bytes_per_step": (n - 1) * layout.segment * (4 + weight_bytes),
            "allreduce_bytes_per_step": 2 * (n - 1) / n * sum(p.numel() for p in model.parameters()) * 4,
            "device": str(info.device),
            "dtype": str(dtype),
        }
        result_file.write_text(json.dumps(result))
    ds.shutdown()


def launch(n: int, recipe: str, overrides: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            __file__,
            "--worker",
            str(out),
            "--steps",
            str(steps),
            recipe,
            *overrides,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{n} ranks failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def report(results: list[dict]) -> str:
    base = results[0]
    lines = [
        f"params {base['params']:,}  device {base['device']}  compute dtype {base['dtype']}",
        "ranks | opt MiB largest rank | total MiB | largest/total | goal ≤ 1/N + 1 matrix | "
        "step ms | fwd+bwd ms | step/fwd+bwd | sent MiB/step | all-reduce MiB | sent/all-reduce",
    ]
    for r in results:
        n, total, largest = r["world_size"], r["optimizer_bytes_total"], max(r["optimizer_bytes_per_rank"])
        goal = (total / n + r["largest_matrix_state_bytes"]) / total
        sent_ratio = r["sent_bytes_per_step"] / r["allreduce_bytes_per_step"] if n > 1 else float("nan")
        step_ms, fb_ms = 1e3 * r["opt_step_s"], 1e3 * r["fwd_bwd_s"]
        sent, allreduce = mib(r["sent_bytes_per_step"]), mib(r["allreduce_bytes_per_step"])
        lines.append(
            f"{n:5d} | {mib(largest):>20} | {mib(total):>9} | {largest / total:13.3f} | {goal:21.3f} | "
            f"{step_ms:7.1f} | {fb_ms:10.1f} | {step_ms / fb_ms:12.2f} | {sent:>13} | {allreduce:>14} | "
            f"{sent_ratio:15.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args()
    if args.worker:
        worker(args.recipe, args.overrides, args.steps, args.worker)
        return
    print(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(report([launch(n, args.recipe, args.overrides, args.steps) for n in args.ranks]))


if __name__ == "__main__":
    main()
