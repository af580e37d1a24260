"""Stopping a run cleanly: signals, the ranks' agreement to stop, and what a resume may change.

SIGINT (Ctrl-C), SIGTERM (preemption, `scancel`) and SIGUSR1 (`sbatch --signal=B:USR1@120`, forwarded by
launch.sh) only set a flag. After every optimizer step the ranks sum their flags (and rank 0's "a
periodic checkpoint is due") in one all-reduce of two numbers, so they all stop after the same step,
save one complete checkpoint and exit with `EXIT_REQUEUE`.
"""

from __future__ import annotations

import os
import signal
import socket

import torch

from lipnext_scale.distributed import all_reduce_sum

# EX_TEMPFAIL: "try again later". launch.sh requeues a Slurm batch job that ends with it.
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Interrupted(Exception):
    """Raised by Trainer.fit after the checkpoint of an agreed stop is complete."""

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class StopRequest:
    """The first stop signal sets a flag; a second Ctrl-C quits at once without a checkpoint."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.received: str | None = None

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            self._say(f"{name} again: quitting without a checkpoint")
            os._exit(130)
        if self.received is None:
            self.received = name
            self._say(
                f"{name}: finishing the current step, then saving a checkpoint (Ctrl-C again to quit now)"
            )

    def _say(self, text: str) -> None:
        # os.write: print() from a signal handler can hit a half-written stdout buffer.
        os.write(2, f"[rank {self.rank} on {socket.gethostname()}] {text}\n".encode())

    def flags(self, checkpoint_due: bool) -> list[float]:
        """[stop, checkpoint due] of this rank, for all ranks to agree on (summed: any rank raises one)."""
        return [float(self.received is not None), float(checkpoint_due)]

    def agreed(self, checkpoint_due: bool, device: torch.device) -> tuple[bool, bool]:
        """(stop, checkpoint due) as all ranks agree: one all-reduce of two numbers (collective)."""
        flags = torch.stack([torch.full((), f, device=device) for f in self.flags(checkpoint_due)])
        stop, due = (all_reduce_sum(flags) > 0).tolist()
        return stop, due


# Recipe keys a resume may change. Everything else changes the run (model shape, data, optimisation,
# schedule) and is refused. train.epochs and train.max_steps recompute the schedule (and say so).
SAFE_TO_CHANGE = (
    "run.",
    "certify.",
    "train.log_every",
    "train.max_consecutive_skips",
    "train.epochs",
    "train.max_steps",
    "model.compile",
    "model.checkpoint_every",  # activation checkpointing: memory, not results
    "model.activation_checkpointing",
    "data.root",  # the loader checks the data's own digest
    "data.train_manifest",
    "data.val_manifest",
    "data.eval_batch_size",
)
SCHEDULE_KEYS = ("train.epochs", "train.max_steps")


def _flatten(recipe: dict) -> dict[str, object]:
    return {f"{s}.{k}": v for s, section in recipe.items() for k, v in section.items()}


def recipe_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(refused, accepted) differences between the checkpoint's recipe and this run's, as 'key: a → b'."""
    old, new = _flatten(saved), _flatten(now)
    refused, accepted = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if _same(a, b):
            continue
        line = f"{key}: {a!r} in the checkpoint, {b!r} now"
        (accepted if key.startswith(SAFE_TO_CHANGE) else refused).append(line)
    return refused, accepted


def _same(a, b) -> bool:
    # JSON turns tuples into lists.
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
