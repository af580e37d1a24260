#!/usr/bin/env python
"""The checks only a GPU can answer, in one go on one GPU, each with its log.

    python tools/gpu_checks.py LOG_DIR [--work DIR] [--only NAME ...] [--smoke]

Runs, in order (each a subprocess with its own time limit; a failure is reported and the rest still run):

    env         torch, CUDA, the GPU, and which of DALI / DeepSpeed / webdataset import
    block_1b    tools/bench_block.py recipes/in1k_1b.yaml --micro-batch 128: MFU and non-matmul share
    block_2b    tools/bench_block.py recipes/in1k_2b.yaml --micro-batch 64 --no-model (the block alone)
    data        sample photos → shards → tools/bench_data.py --device cuda: DALI GPU decoding vs PIL
    quickstart  lipnext_scale/train.py recipes/quickstart.yaml on the GPU: accuracy, CRA, time
    optimizer   tools/bench_optimizer.py --device cuda at W = 4096 and 5760: the manifold step per owned
                matrix, measured, beside its projection to in1k_1b/in1k_2b
    memory_1b   the dry run (tools/plan_memory.py --dry-run: one step faked, torch's MemTracker) of
                recipes/in1k_1b.yaml as this one GPU runs it below, and of the recipe on 8 ranks (the
                per-rank peak one GPU of 8 must hold); then 3 steps of recipes/in1k_1b.yaml on this one GPU
                (micro-batch 64, batch 128) on the data check's sample-photo shards: the trainer's measured
                peak memory beside the plan and the dry run

LOG_DIR gets one `<name>.log` per check and `summary.txt` (8 files: what a device machine sends back at
most); run directories, shards and checkpoints go to --work (default: a temporary folder), so LOG_DIR stays
small. Exit status 1 if any check failed.

Device time: a task gets 15 minutes of it, machine start included, so the checks are budgeted 12 minutes
(720 s) in all, as per-check time limits (LIMIT_S): env 15 + block_1b 75 + block_2b 45 + data 100 +
quickstart 90 + optimizer 60 + memory_1b 335 (dry runs ≈ 2 × 15–30 s on the CPU, the 1B run builds,
steps, evaluates and saves a 1B model) = 720 s. These are budgets, not measurements: no GPU has run them yet;
the first session that does should rebalance them from the times in summary.txt. One device command may run
600 s at most, so use two calls that share --work, e.g. `--only env block_1b block_2b data quickstart
optimizer` (385 s) and then `--only memory_1b` (335 s; it reads the data check's shards).

`--smoke` runs the same commands at toy sizes on the CPU (the tests use it; 600 s per check), so the script
is known to work before a GPU is spent on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKS = ("env", "block_1b", "block_2b", "data", "quickstart", "optimizer", "memory_1b")
# Seconds per check on a GPU, DEVICE_BUDGET_S in all (module docstring).
LIMIT_S = {"env": 15, "block_1b": 75, "block_2b": 45, "data": 100, "quickstart": 90, "optimizer": 60,
           "memory_1b": 335}  # fmt: skip
DEVICE_BUDGET_S = 720
SMOKE_LIMIT_S = 600  # per check with --smoke: toy sizes, but a slow shared CPU
ENV_PROBE = """
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("gpu", props.name, round(props.total_memory / 2**30, 1), "GiB")
for name in ("nvidia.dali", "deepspeed", "webdataset"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__, exc)
"""


def commands(work: Path, smoke: bool) -> dict[str, list[list[str]]]:
    """{check: [argv, ...]}; `--smoke` shrinks every size and runs on the CPU."""
    py = sys.executable
    photos, shards = work / "photos", work / "shards"
    train_manifest = shards / "photos-train.manifest.json"
    val_manifest = shards / "photos-val.manifest.json"
    tiny = ["model.size=L32W64"] if smoke else []
    block_steps = ["--steps", "2"] if smoke else []
    data_args = (
        ["--device", "cpu", "--batch-size", "8", "--batches", "2", "--warmup", "1", "--threads", "1"]
        if smoke
        else ["--device", "cuda", "--batch-size", "256", "--seconds", "10", "--threads", "16"]
    )
    make_shards = [py, str(REPO / "tools" / "make_shards.py"), "folder"]
    quick = ["train.max_steps=2", "train.epochs=1"] if smoke else []
    # Batch 128 = 2 micro-batches of 64 per step: one evaluation (at the end), not one per pass over the
    # sample photos, to stay inside the budget. The dry run takes the same settings.
    memory = (
        ["data.batch_size=16", "train.micro_batch_size=8", "train.max_steps=1", "certify.batch_size=8"]
        if smoke
        else ["data.batch_size=128", "train.micro_batch_size=64", "train.max_steps=3",
              "certify.batch_size=128"]
    )  # fmt: skip
    plan_memory = [py, "tools/plan_memory.py", "recipes/in1k_1b.yaml", "--dry-run", *tiny]
    return {
        "env": [[py, "-c", ENV_PROBE]],
        "block_1b": [[py, "tools/bench_block.py", "recipes/in1k_1b.yaml", "--micro-batch",
                      "2" if smoke else "128", *block_steps, *tiny]],
        "block_2b": [[py, "tools/bench_block.py", "recipes/in1k_2b.yaml", "--micro-batch",
                      "2" if smoke else "64", "--no-model", *block_steps, *tiny]],
        "data": [
            [py, "tools/sample_photos.py", str(photos / "train"), "--count", "32" if smoke else "3000"],
            [py, "tools/sample_photos.py", str(photos / "val"), "--count", "16" if smoke else "512",
             "--seed", "1"],
            [*make_shards, str(photos / "train"), str(shards), "--prefix", "photos-train", "--workers",
             "1" if smoke else "16"],
            [*make_shards, str(photos / "val"), str(shards), "--prefix", "photos-val", "--no-shuffle",
             "--classes-from", str(train_manifest), "--workers", "1" if smoke else "16"],
            [py, "tools/bench_data.py", str(train_manifest), "--augment", "rrc_flip", "--image-size",
             "224", *data_args],
        ],
        "optimizer": [[py, "tools/bench_optimizer.py", "--device", "cpu" if smoke else "cuda", "--widths",
                       *(["64"] if smoke else ["4096", "5760"]), "--steps", "1" if smoke else "3"]],
        "quickstart": [[py, "lipnext_scale/train.py", "recipes/quickstart.yaml",
                        f"run.output_dir={work / 'quickstart'}", *quick]],
        "memory_1b": [
            [*plan_memory, "--gpus", "1", *memory],
            [*plan_memory, "--gpus", "8"],
            [py, "lipnext_scale/train.py", "recipes/in1k_1b.yaml", *tiny, *memory,
                       "data.source=shards", f"data.train_manifest={train_manifest}",
                       f"data.val_manifest={val_manifest}", "run.checkpoint_every=0",
                       f"run.output_dir={work / 'in1k_1b'}"],
        ],
    }  # fmt: skip


# tools/plan_memory.py --dry-run's PEAK row: MemTracker's peak, the plan's.
DRY_RUN_PEAK = re.compile(r"^  PEAK\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+\(micro-batch", re.MULTILINE)


def memory_summary(run_dir: Path, log: Path) -> str:
    """The plan's peak and the largest measured peak from a run's metrics.jsonl, and the dry runs' peaks from
    the check's log (this GPU's run, then the recipe on 8 ranks)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plan = next(r["memory_plan"] for r in records if "memory_plan" in r)
    measured = max(r["peak_memory_gib"] for r in records if "peak_memory_gib" in r)
    (dry, _), (dry8, plan8) = [tuple(map(float, m)) for m in DRY_RUN_PEAK.findall(log.read_text())]
    return (
        f"planned peak {plan['peak_gib']:.2f} GiB, dry run {dry:.2f}, measured {measured:.2f} GiB "
        f"(measured/planned {measured / plan['peak_gib']:.2f}, measured/dry run {measured / dry:.2f}; "
        f"{plan['measured_as']}); 8 ranks, per rank: dry run {dry8:.2f}, plan {plan8:.2f} GiB"
    )


def optimizer_summary(log: Path) -> str:
    """The projected optimizer share of the step from tools/bench_optimizer.py's output, if it prints one."""
    share = re.search(r"optimizer share [^\n]*", log.read_text())
    return share.group(0) if share else ""


def run_check(name: str, argvs: list[list[str]], log: Path, limit_s: float) -> tuple[bool, float]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    with log.open("w") as f:
        for argv in argvs:
            f.write(f"$ {' '.join(argv)}\n")
            f.flush()
            left = limit_s - (time.perf_counter() - start)
            try:
                rc = subprocess.run(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=max(1.0, left)).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                f.write(f"\n{name}: stopped after {limit_s:.0f} s\n")
                return False, time.perf_counter() - start
            if rc != 0:
                f.write(f"\n{name}: exit status {rc}\n")
                return False, time.perf_counter() - start
    return True, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("log_dir", type=Path)
    parser.add_argument(
        "--work", type=Path, default=None, help="runs, shards, checkpoints (default: temporary)"
    )
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--limit-s", type=float, default=None, help="time limit of every check")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="lipnext_gpu_checks_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, also where a GPU exists
    plan = commands(work, args.smoke)
    lines, failed = [], []
    for name in args.only:
        log = args.log_dir / f"{name}.log"
        limit = args.limit_s or (SMOKE_LIMIT_S if args.smoke else LIMIT_S[name])
        ok, seconds = run_check(name, plan[name], log, limit)
        result = f"{name:<11} {'ok' if ok else 'FAILED':<6} {seconds:7.1f} s"
        if ok and name == "memory_1b":
            result += "   " + memory_summary(work / "in1k_1b", log)
        if ok and name == "optimizer":
            result += "   " + optimizer_summary(log)
        lines.append(result)
        print(result, flush=True)
        if not ok:
            failed.append(name)
    (args.log_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {args.log_dir})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
