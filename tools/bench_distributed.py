#!/usr/bin/env python
"""Memory, traffic and overlap of the sharded manifold optimizer, for one recipe at several world sizes.

    python tools/bench_distributed.py RECIPE.yaml [--ranks 1 2 4] [--rounds 5] [--steps 3] [--comms-logger]
                                      [--json OUT.json] [key=value ...]

For each N it launches N processes (torchrun; gloo on CPUs, NCCL on GPUs) running the real DeepSpeed engine
and sharded optimizer on random images at the recipe's micro-batch (one micro-batch per step), and reports:

- optimizer state bytes of the largest rank against the unsharded total (goal: ≤ total/N + the largest
  matrix's state);
- bytes each rank sends per step (reduce-scatter/reduce of fp32 gradients + all-gather/broadcast of
  compute-dtype weights, ring algorithms: (N-1)/N of each payload, padding included), against an unpadded
  fp32 reduce-scatter + compute-dtype all-gather (goal ≤ 1.01) and against a plain fp32 all-reduce;
- the share of reduction bytes issued before the last gradient hook of backward fired (goal ≥ 90%), and
  before the last 10% of backward: backward runs from the call of `engine.backward` to the last gradient
  hook (host clock), and a reduction counts when it was issued within the first 90% of that span;
- step time (forward + backward + optimizer step) in three modes measured side by side, interleaved in
  rounds on one engine (their order rotating from round to round): every collective overlapped; every
  collective waited for as soon as it is issued (synchronous); and no communication at all — the data
  collectives replaced by local no-ops (a reduce-scatter keeps the rank's own slice of its input) — the
  compute-only baseline. The *exposed communication time* of a mode is the median over rounds of its step
  time minus the same round's baseline step time; the share of the synchronous mode's that overlap hides
  is 1 − exposed(overlapped) / exposed(synchronous). Also the host time blocked in the optimizer's waits.

Each round runs every mode for one untimed step and then `--steps` timed steps back to back (so each timed
forward waits for the previous step's all-gathers, as in training); figures are medians over `--rounds` of
rank 0's per-step mean. On GPUs the timed span ends with a device synchronisation, which also waits for the
last step's all-gathers, and the backward span is the host's (the device may lag behind it).
`--comms-logger` turns on DeepSpeed's comms logger (our collectives go through `deepspeed.comm` in any
case) and prints its table; on GPUs it synchronises the device after every collective, so the overlap
figures are not meaningful with it. `--json` writes the raw figures (with the logger's record).
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

# Backward's share before whose end a reduction must be issued to count as early (the figure's "10%").
LATE_SHARE = 0.10
MODES = ("overlapped", "synchronous", "no_communication")


class _Layer:
    """The collectives' layer `lipnext_scale.distributed` calls (deepspeed.comm), wrapped for measurement."""

    def __init__(self, comm):
        self._comm = comm

    def __getattr__(self, name):
        return getattr(self._comm, name)


class Recording(_Layer):
    """Notes the host time and payload bytes of each gradient reduction as it is issued."""

    def __init__(self, comm):
        super().__init__(comm)
        self.issued: list[tuple[float, int]] = []

    def reduce_scatter_tensor(self, output_tensor, tensor, *args, **kwargs):
        self.issued.append((time.perf_counter(), tensor.numel() * tensor.element_size()))
        return self._comm.reduce_scatter_tensor(output_tensor, tensor, *args, **kwargs)

    def reduce(self, tensor, *args, **kwargs):
        self.issued.append((time.perf_counter(), tensor.numel() * tensor.element_size()))
        return self._comm.reduce(tensor, *args, **kwargs)


class Silent(_Layer):
    """Moves no data: every data collective leaves each rank what it has (a reduce-scatter its own slice of
    the input) and returns no work to wait for; barriers stay real, so ranks still start steps together."""

    def reduce_scatter_tensor(self, output_tensor, tensor, *args, **kwargs):
        rank, n = self._comm.get_rank(), self._comm.get_world_size()
        output_tensor.copy_(tensor.view(n, -1)[rank])

    def all_gather_into_tensor(self, *args, **kwargs):
        return None

    def reduce(self, *args, **kwargs):
        return None

    def broadcast(self, *args, **kwargs):
        return None

    def all_reduce(self, *args, **kwargs):
        return None


def worker(
    recipe_path: str, overrides: list[str], rounds: int, steps: int, result_file: Path, comms_logger: bool
) -> None:
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
    config = ds.deepspeed_config(
        micro * info.world_size, micro, info.world_size, Path(tempfile.mkdtemp()), comms_logger=comms_logger
    )
    config.pop("csv_monitor")
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
    comm = distributed.collectives()
    recording = Recording(comm)
    layers = {"overlapped": recording, "synchronous": recording, "no_communication": Silent(comm)}
    cuda = info.device.type == "cuda"
    # Reduction bytes issued in the first (1 − LATE_SHARE) of backward, and all of them (overlapped mode).
    early = {"bytes": 0, "all": 0}

    def one_step(measure_backward: bool) -> None:
        loss = torch.nn.functional.cross_entropy(engine(images), labels)
        start, first = time.perf_counter(), len(recording.issued)
        engine.backward(loss)
        if measure_backward and len(recording.issued) > first:  # (one rank: no reductions)
            issued = recording.issued[first:]
            # The last reduction is issued by the last gradient hook: backward's end, for this figure.
            cut = start + (1 - LATE_SHARE) * (issued[-1][0] - start)
            early["bytes"] += sum(b for t, b in issued if t <= cut)
            early["all"] += sum(b for _, b in issued)
        engine.step()

    def block(mode: str) -> dict:
        """One untimed step, then `steps` timed ones back to back: per-step wall time, blocked time, bytes."""
        optimizer.overlap = mode != "synchronous"
        distributed.use_collectives(layers[mode])
        one_step(False)
        if cuda:
            torch.cuda.synchronize()
        before, waited = dict(optimizer.comm_bytes), optimizer.wait_seconds
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step(mode == "overlapped")
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        sent = {k: (v - before[k]) / steps for k, v in optimizer.comm_bytes.items()}
        optimizer.wait_weights()  # the next block starts with nothing in flight
        distributed.barrier()
        distributed.use_collectives(comm)
        return {"step_s": elapsed / steps, "blocked_s": (optimizer.wait_seconds - waited) / steps, **sent}

    distributed.barrier()
    runs = {mode: [] for mode in MODES}
    for i in range(rounds):  # the modes' order rotates, so that none always follows the same one
        for mode in MODES[i % 3 :] + MODES[: i % 3]:
            runs[mode].append(block(mode))
    # The logger's record: the real modes' collectives (and DeepSpeed's start-up ones), nothing after them.
    logged = ds.comms_summary()
    summary = {}
    for mode, blocks in runs.items():
        summary[mode] = {k: statistics.median(b[k] for b in blocks) for k in ("step_s", "blocked_s")}
        summary[mode]["min_step_s"] = min(b["step_s"] for b in blocks)
        # Exposed communication: against the baseline of the same round (same load on a shared machine).
        summary[mode]["exposed_s"] = statistics.median(
            b["step_s"] - z["step_s"] for b, z in zip(blocks, runs["no_communication"])
        )
        summary[mode].update({k: sum(b[k] for b in blocks) / rounds for k in optimizer.comm_bytes})
    n = info.world_size
    comm_device = distributed.comm_device()
    mine = torch.tensor(optimizer.optimizer_bytes(), dtype=torch.int64, device=comm_device)
    per_rank = distributed.all_gather(mine).tolist()
    largest = torch.tensor(max(map(optimizer.state_bytes, optimizer.state), default=0), device=comm_device)
    largest_state = distributed.all_reduce_max(largest).item()
    if info.is_main:
        params = sum(p.numel() for p in model.parameters())
        element = torch.tensor([], dtype=dtype).element_size()
        overlapped = summary["overlapped"]
        result = {
            "world_size": n,
            "params": params,
            "optimizer_bytes_per_rank": per_rank,
            "optimizer_bytes_total": sum(per_rank),
            "largest_matrix_state_bytes": largest_state,
            **summary,
            "rounds": rounds,
            "steps": steps,
            # Ring (or chain) algorithms: each rank sends (N-1)/N of a collective's payload on average.
            "sent_bytes_per_step": (n - 1) / n * (overlapped["reduce"] + overlapped["gather"]),
            "unpadded_bytes_per_step": (n - 1) / n * params * (4 + element),
            "allreduce_bytes_per_step": 2 * (n - 1) / n * params * 4,
            "reduce_before_last_hook_share": overlapped["reduce_before_last_hook"] / overlapped["reduce"]
            if overlapped["reduce"]
            else float("nan"),
            "reduce_before_last_10pc_share": early["bytes"] / early["all"] if early["all"] else float("nan"),
            "buckets": [
                {"kind": b.kind, "numel": b.numel, "segment": b.segment, "owners": list(b.owners)}
                for b in optimizer.buckets
            ],
            "comms_logger": logged,
            "device": str(info.device),
            "dtype": str(dtype),
            "element_bytes": element,
        }
        result_file.write_text(json.dumps(result))
    ds.shutdown()


def launch(
    n: int, recipe: str, overrides: list[str], steps: int = 3, comms_logger: bool = False, rounds: int = 3
) -> dict:
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
            "--rounds",
            str(rounds),
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
            print(proc.stdout[-8000:])
        return json.loads(out.read_text())


def mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def report(results: list[dict]) -> str:
    base = results[0]
    lines = [f"params {base['params']:,}  device {base['device']}  compute dtype {base['dtype']}"]
    for r in results:
        n, total, largest = r["world_size"], r["optimizer_bytes_total"], max(r["optimizer_bytes_per_rank"])
        goal = (total / n + r["largest_matrix_state_bytes"]) / total
        o, s = r["overlapped"], r["synchronous"]
        ms = {mode: f"{1e3 * r[mode]['step_s']:.1f} ({1e3 * r[mode]['min_step_s']:.1f})" for mode in MODES}
        share = 1 - o["exposed_s"] / s["exposed_s"] if s["exposed_s"] > 0 else float("nan")
        # Outside [0, 1] the two differences are within the machine's noise (compare the one-rank row).
        hidden = f"{share:.0%}" if 0 <= share <= 1 else "n/a (noise)"
        lines += [
            f"{n} rank{'s' if n > 1 else ''}:",
            f"  optimizer state, largest rank   {mib(largest)} MiB = {largest / total:.3f} of the total "
            f"(goal ≤ 1/N + one matrix's state = {goal:.3f})",
            f"  step ms, median (min) of {r['rounds']} rounds × {r['steps']} steps: overlapped "
            f"{ms['overlapped']} | synchronous {ms['synchronous']} | no communication "
            f"{ms['no_communication']}",
            f"  exposed communication ms/step (median over rounds of step − the round's no-communication "
            f"step): overlapped {1e3 * o['exposed_s']:.1f} | synchronous {1e3 * s['exposed_s']:.1f}"
            + ("; overlap hides " + hidden if n > 1 else " (one rank communicates nothing: the noise floor)"),
        ]
        if n == 1:
            continue
        sent, before = r["sent_bytes_per_step"], r["reduce_before_last_hook_share"]
        lines += [
            f"  host blocked in waits ms/step: overlapped {1e3 * o['blocked_s']:.1f} | synchronous "
            f"{1e3 * s['blocked_s']:.1f}",
            f"  sent per step, per rank: {mib(sent)} MiB = {sent / r['unpadded_bytes_per_step']:.4f} × "
            f"unpadded fp32 reduce-scatter + {r['dtype'].removeprefix('torch.')} all-gather (goal ≤ 1.01), "
            f"{sent / r['allreduce_bytes_per_step']:.3f} × fp32 all-reduce",
            f"  reduction bytes issued before the last gradient hook: {before:.1%} (goal ≥ 90%); before the "
            f"last {LATE_SHARE:.0%} of backward (engine.backward() → last hook, host clock): "
            f"{r['reduce_before_last_10pc_share']:.1%}",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the three modes (medians over them)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    parser.add_argument(
        "--comms-logger", action="store_true", help="turn on DeepSpeed's comms logger and print its table"
    )
    parser.add_argument("--json", type=Path, help="also write every figure (list, one per rank count) here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args()
    if args.worker:
        worker(args.recipe, args.overrides, args.rounds, args.steps, args.worker, args.comms_logger)
        return
    print(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    results = [
        launch(n, args.recipe, args.overrides, args.steps, args.comms_logger, args.rounds) for n in args.ranks
    ]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(report(results))


if __name__ == "__main__":
    main()
