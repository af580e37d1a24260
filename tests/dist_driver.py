"""Multi-process scenarios for tests/test_distributed.py, run under `torchrun --nproc_per_node N`.

Every rank builds the real Trainer (DeepSpeed engine, sharded optimizer) from the quickstart recipe and is
fed its slice of the same fixed global batches, so N ranks and one process see identical data.

    dist_driver.py parity OUT STEPS DATA_ROOT        losses + gathered masters after STEPS steps
    dist_driver.py nonfinite OUT DATA_ROOT           a NaN micro-batch on the last rank is skipped everywhere
    dist_driver.py kill_during_save STEP RANK RECIPE [OVERRIDES]
                                                     train.py's run, but rank RANK is SIGKILLed once its
                                                     file of checkpoint STEP is written (before the manifest)
    dist_driver.py not_shared OUT                    each rank sees its own checkpoint directory (node-local
                                                     disks): check_shared refuses, naming the blind ranks
    dist_driver.py overlap OUT STEPS DATA_ROOT       bf16, 2 micro-batches per step: overlapped collectives,
                                                     synchronous ones, overlapped resumed half-way
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from lipnext_scale.config import load_recipe
from lipnext_scale.trainer import TooManySkippedSteps, Trainer

REPO = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 64


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    images = torch.tensor(digits.images[:1500], dtype=torch.float32)[:, None] / 16
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return images, torch.tensor(digits.target[:1500])


def build_trainer(out: Path, data_root: str, *extra: str) -> Trainer:
    overrides = [
        f"run.output_dir={out}",
        f"data.root={data_root}",
        f"data.batch_size={GLOBAL_BATCH}",
        "train.precision=fp32",
        "train.log_every=1",
        "run.resume=false",
        "optim.reorthogonalize_every=20",
        *extra,
    ]
    return Trainer(load_recipe(REPO / "recipes" / "quickstart.yaml", overrides))


def rank_slice(trainer: Trainer, step: int, images: torch.Tensor, labels: torch.Tensor):
    start = (step * GLOBAL_BATCH) % (len(images) - GLOBAL_BATCH)
    per_rank = GLOBAL_BATCH // trainer.dist.world_size
    lo = start + trainer.dist.rank * per_rank
    return images[lo : lo + per_rank], labels[lo : lo + per_rank]


# Two summation orders (one process vs. N ranks) differ by ~1e-7 relative in the first gradient; training
# amplifies that (β-Abs and Adam flip on rounding-sized values). Measured N=2 vs. 1 after 50 steps: at the
# quickstart's lr 5e-3 with EMMA, losses 2.7e-2 apart and masters 2.0e-2; at lr 1e-3, 9.7e-4 and 1.7e-3; at
# lr 2e-4 with CE and Adam eps 1e-4, 4.5e-5 and 5.0e-5. Parity is checked in that last regime.
PARITY_OVERRIDES = ["optim.lr=2e-4", "optim.euclidean_lr=2e-4", "optim.eps=1e-4", "train.loss=ce"]


def run_parity(out: Path, steps: int, data_root: str) -> None:
    trainer = build_trainer(out, data_root, *PARITY_OVERRIDES)
    images, labels = digits_tensors()
    losses = []
    for step in range(steps):
        while not trainer.train_micro_batch(*rank_slice(trainer, step, images, labels)):
            pass
        losses.append(trainer.step_stats(eps=0.0)["loss"])
    state = trainer.fp32_state()
    if trainer.is_main:
        (out / "losses.json").write_text(json.dumps(losses))
        save_file(state, str(out / "masters.safetensors"))
    trainer.close()


def run_nonfinite(out: Path, data_root: str) -> None:
    trainer = build_trainer(out, data_root, "train.max_consecutive_skips=2")
    images, labels = digits_tensors()
    last = trainer.dist.world_size - 1
    report = {}
    for step in range(6):
        x, y = rank_slice(trainer, step, images, labels)
        if step >= 3 and trainer.dist.rank == last:
            x = torch.full_like(x, float("nan"))
        before = {k: v.clone() for k, v in trainer.fp32_state().items()}
        try:
            trainer.train_micro_batch(x, y)
        except TooManySkippedSteps as exc:
            report["stopped"] = str(exc)
            report["stopped_at_step"] = step
            break
        after = trainer.fp32_state()
        report[f"step{step}"] = {
            "skipped": trainer.optimizer.skipped_steps,
            "unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
        }
    (out / f"nonfinite_rank{trainer.dist.rank}.json").write_text(json.dumps(report))
    trainer.close()


def run_kill_during_save(kill_step: int, kill_rank: int, recipe: str, overrides: list[str]) -> None:
    def kill_here(step: int, rank: int) -> None:
        if (step, rank) == (kill_step, kill_rank):
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = Trainer(load_recipe(recipe, overrides), after_rank_file=kill_here)
    trainer.save(trainer.fit())
    trainer.close()


def run_not_shared(out: Path) -> None:
    from lipnext_scale import engine
    from lipnext_scale.checkpoint import Checkpointer
    from lipnext_scale.config import ConfigError

    info = engine.setup_distributed()
    try:
        Checkpointer(out / f"node{info.rank}", info.rank, info.world_size).check_shared()
        message = "accepted"
    except ConfigError as exc:
        message = str(exc)
    (out / f"not_shared_rank{info.rank}.txt").write_text(message)
    engine.shutdown()


def run_overlap(out: Path, steps: int, data_root: str) -> None:
    """One Trainer (bf16, 2 micro-batches per step), three trajectories from the same optimizer state: every
    collective overlapped; every collective waited for as soon as issued (overlap=False), from the step-0
    state;
    overlapped again from the state saved at steps/2 (resume). Rank 0 writes, per trajectory and step, the
    loss and a sha256 of all gathered fp32 masters, and the overlapped run's communication bytes."""
    world = int(os.environ["WORLD_SIZE"])
    extra = ["train.precision=bf16", f"train.micro_batch_size={GLOBAL_BATCH // (2 * world)}"]
    trainer = build_trainer(out, data_root, *PARITY_OVERRIDES, *extra)
    optimizer = trainer.optimizer
    assert optimizer.overlap and trainer.accumulation == 2
    images, labels = digits_tensors()
    report, saved = {}, {}

    def snapshot(step: int) -> None:
        tensors = {k: v.detach().clone() for k, v in optimizer.state_tensors().items()}
        saved[step] = (tensors, optimizer.step_count)

    def restore(step: int) -> None:
        tensors, step_count = saved[step]
        optimizer.load_state_tensors(tensors, step_count)
        optimizer.broadcast_weights()
        trainer.step = step

    def train(name: str, start: int) -> None:
        record = report.setdefault(name, {"losses": [], "masters": []})
        for step in range(start, steps):
            if step == steps // 2 and name == "overlap":
                snapshot(step)
            x, y = rank_slice(trainer, step, images, labels)
            half = len(y) // 2
            assert not trainer.train_micro_batch(x[:half], y[:half])
            assert trainer.train_micro_batch(x[half:], y[half:])
            record["losses"].append(trainer.step_stats(eps=0.0)["loss"])
            state = trainer.fp32_state()
            digest = hashlib.sha256()
            for key in sorted(state):
                digest.update(state[key].contiguous().view(torch.uint8).numpy().tobytes())
            record["masters"].append(digest.hexdigest())

    snapshot(0)
    train("overlap", 0)
    report["comm_bytes"] = dict(optimizer.comm_bytes)
    optimizer.overlap = False
    restore(0)
    train("sync", 0)
    optimizer.overlap = True
    restore(steps // 2)
    train("resumed", steps // 2)
    if trainer.is_main:
        (out / "overlap.json").write_text(json.dumps(report))
    trainer.close()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "not_shared":
        run_not_shared(out)
    elif mode == "kill_during_save":
        run_kill_during_save(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:])
    elif mode == "parity":
        run_parity(out, int(sys.argv[3]), sys.argv[4])
    elif mode == "overlap":
        run_overlap(out, int(sys.argv[3]), sys.argv[4])
    elif mode == "nonfinite":
        run_nonfinite(out, sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
