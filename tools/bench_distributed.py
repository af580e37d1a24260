#!/usr/bin/env python
"""Memory and speed of the sharded manifold optimizer, for one recipe at several world sizes, side by side.

    python tools/bench_distributed.py RECIPE.yaml [--ranks 1 2 4] [--steps 6] [--comms-logger] [key=value ...]

For each N it launches N processes (torchrun; gloo on CPUs, NCCL on GPUs) running the real DeepSpeed engine
and sharded optimizer on random images at the recipe's micro-batch, and reports:

- optimizer state bytes of the largest rank against the unsharded total (goal: ≤ total/N + the largest
  matrix's state);
- bytes each rank sends per step (reduce-scatter/reduce of fp32 gradients + all-gather/broadcast of
  compute-dtype weights, ring algorithms: (N-1)/N of each payload, padding included), against an unpadded
  fp32 reduce-scatter + compute-dtype all-gather (goal ≤ 1.01) and against a plain fp32 all-reduce;
- the share of reduction bytes issued before the last backward hook fired (goal ≥ 90%);
- forward + backward + step wall time (median after one warm-up step) with every collective waited for at
  once (synchronous) and overlapped, and the host time blocked in waits per step: on CPUs (gloo) that is
  the exposed communication time; on GPUs waits only order streams, so compare the step times there.
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


def worker(recipe_path: str, overrides: list[str], steps: int, result_file: Path, comms_logger: bool) -> None:
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
    if comms_logger:
        config["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    engine, optimizer = ds.initialize(
        model,
        lambda _: ShardedManifoldOptimizer(named_parameters_with_kinds(model), manifold_hyper(recipe), 1.0),
        config,
    )
    optimizer.wait_before_forward(model)
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

    def iterations(overlap: bool) -> dict:
        """Median wall time of forward + backward + step, host time blocked on communication per step, and
        the bytes of the last `steps` steps (one warm-up step first)."""
        optimizer.overlap = overlap
        times, waits = [], []
        for i in range(steps + 1):
            if i == 1:
                before = dict(optimizer.comm_bytes)
            sync()
            waited = optimizer.wait_seconds
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(engine(images), labels)
            engine.backward(loss)
            engine.step()
            sync()
            times.append(time.perf_counter() - t0)
            waits.append(optimizer.wait_seconds - waited)
        sent = {k: (v - before[k]) / steps for k, v in optimizer.comm_bytes.items()}
        return {"step_s": statistics.median(times[1:]), "blocked_s": statistics.median(waits[1:]), **sent}

    # Both modes on one engine (a second DeepSpeed engine in one process cannot start): synchronous first.
    synchronous, overlapped = iterations(False), iterations(True)
    n = info.world_size
    comm = distributed.comm_device()
    mine = torch.tensor(optimizer.optimizer_bytes(), dtype=torch.int64, device=comm)
    per_rank = distributed.all_gather(mine).tolist()
    largest = torch.tensor(max(map(optimizer.state_bytes, optimizer.state), default=0), device=comm)
    largest_state = distributed.all_reduce_max(largest).item()
    if info.is_main:
        params = sum(p.numel() for p in model.parameters())
        element = torch.tensor([], dtype=dtype).element_size()
        result = {
            "world_size": n,
            "params": params,
            "optimizer_bytes_per_rank": per_rank,
            "optimizer_bytes_total": sum(per_rank),
            "largest_matrix_state_bytes": largest_state,
            "synchronous": synchronous,
            "overlapped": overlapped,
            # Ring (or chain) algorithms: each rank sends (N-1)/N of a collective's payload on average.
            "sent_bytes_per_step": (n - 1) / n * (overlapped["reduce"] + overlapped["gather"]),
            "unpadded_bytes_per_step": (n - 1) / n * params * (4 + element),
            "allreduce_bytes_per_step": 2 * (n - 1) / n * params * 4,
            "buckets": [b.kind for b in optimizer.buckets],
            "device": str(info.device),
            "dtype": str(dtype),
        }
        result_file.write_text(json.dumps(result))
    if comms_logger:
        ds.comms_summary()
    ds.shutdown()


def launch(n: int, recipe: str, overrides: list[str], steps: int, comms_logger: bool = False) -> dict:
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
            *(["--comms-logger"] if comms_logger else []),
            recipe,
            *overrides,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{n} ranks failed:\n{proc.stderr[-4000:]}")
        if comms_logger:
            print(proc.stdout[-6000:])
        return json.loads(out.read_text())


def mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def report(results: list[dict]) -> str:
    base = results[0]
    lines = [
        f"params {base['params']:,}  device {base['device']}  compute dtype {base['dtype']}",
        "ranks | opt MiB largest rank | largest/total | goal ≤ 1/N + 1 matrix | sent MiB/step | "
        "sent/unpadded RS+AG | sent/all-reduce | RS bytes before last hook | step ms sync | "
        "step ms overlap | blocked ms sync | blocked ms overlap",
    ]
    for r in results:
        n, total, largest = r["world_size"], r["optimizer_bytes_total"], max(r["optimizer_bytes_per_rank"])
        goal = (total / n + r["largest_matrix_state_bytes"]) / total
        o, s = r["overlapped"], r["synchronous"]
        many = n > 1
        unpadded = r["sent_bytes_per_step"] / r["unpadded_bytes_per_step"] if many else float("nan")
        allreduce = r["sent_bytes_per_step"] / r["allreduce_bytes_per_step"] if many else float("nan")
        before = o["reduce_before_last_hook"] / o["reduce"] if o["reduce"] else float("nan")
        lines.append(
            f"{n:5d} | {mib(largest):>20} | {largest / total:13.3f} | {goal:21.3f} | "
            f"{mib(r['sent_bytes_per_step']):>13} | {unpadded:19.4f} | {allreduce:15.3f} | {before:25.1%} | "
            f"{1e3 * s['step_s']:12.1f} | {1e3 * o['step_s']:15.1f} | {1e3 * s['blocked_s']:15.1f} | "
            f"{1e3 * o['blocked_s']:18.1f}"
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
    parser.add_argument(
        "--comms-logger", action="store_true", help="route through deepspeed.comm and print its comms summary"
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args()
    if args.worker:
        worker(args.recipe, args.overrides, args.steps, args.worker, args.comms_logger)
        return
    print(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    print(report([launch(n, args.recipe, args.overrides, args.steps, args.comms_logger) for n in args.ranks]))


if __name__ == "__main__":
    main()
