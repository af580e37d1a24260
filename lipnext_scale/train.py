"""Train a LipNeXt: `python lipnext_scale/train.py RECIPE.yaml [section.key=value ...]`.

Exit status: 0 finished; 2 a recipe or data error (printed once, on rank 0); 3 too many non-finite steps;
75 stopped by SIGINT/SIGTERM/SIGUSR1 after writing a complete checkpoint (run the same command again to
resume; launch.sh requeues a Slurm batch job that ends so); 1 anything else, e.g. another rank died.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch.distributed as dist

from lipnext_scale.config import ConfigError, load_recipe
from lipnext_scale.preemption import EXIT_REQUEUE, Interrupted, StopRequest
from lipnext_scale.trainer import TooManySkippedSteps, Trainer


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every recipe key, with its default and allowed values, is listed in README.md "
        "('Recipes'), generated from the field help in lipnext_scale/config.py. Shipped recipes: recipes/.",
    )
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides of recipe keys (section.key=value), e.g. train.epochs=2",
    )
    # Launchers (deepspeed) insert --local_rank=N before the user's arguments.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _where() -> str:
    return f"rank {os.environ.get('RANK', '0')} on {socket.gethostname()}"


def _last_checkpoint(recipe) -> str:
    latest = Path(recipe.run.output_dir) / "checkpoints" / "latest"
    if not latest.exists():
        return "Last complete checkpoint: none yet (the same command starts afresh)."
    tag = latest.parent / latest.read_text().strip()
    return f"Last complete checkpoint: {tag}; run the same command again to resume from it."


def _collective_failure(exc: RuntimeError) -> bool:
    """A peer died (connection reset/closed) or a collective timed out: gloo raises plain RuntimeErrors."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        mark in text for mark in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out")
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = StopRequest(int(os.environ.get("RANK", "0"))).install()
    try:
        trainer = Trainer(recipe, local_rank=args.local_rank, stop=stop)
    except ConfigError as exc:  # settings only the world size or a checkpoint can refute
        if is_main:
            print(f"error: {args.recipe}: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        if is_main:  # every rank meets it; one line is enough
            hint = "; write it with tools/make_shards.py (README: Data)" if "manifest" in str(exc) else ""
            print(f"error: {args.recipe}: {exc}{hint}", file=sys.stderr)
        return 2
    try:
        trainer.save(trainer.fit())
    except TooManySkippedSteps as exc:
        print(f"error: {exc}", file=sys.stderr)
        trainer.close()
        return 3
    except Interrupted as exc:
        if trainer.is_main:
            print(
                f"stopped by {exc.signal_name} after step {exc.step}; checkpoint {exc.checkpoint} complete. "
                f"Run the same command again to resume (exit status {EXIT_REQUEUE}).",
                file=sys.stderr,
                flush=True,
            )
        trainer.close()
        # Straight out, skipping interpreter teardown: that restores the default signal handlers, and
        # under `srun --kill-on-bad-exit` the SIGTERM that follows the first rank's exit would then kill
        # a rank still tearing down, turning srun's status 75 (requeue) into 143.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_REQUEUE)
    except RuntimeError as exc:
        if not _collective_failure(exc):
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        print(
            f"error: {_where()}: a collective failed ({first}); another rank has probably died (the launcher "
            f"names it). {_last_checkpoint(recipe)}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)  # the process group is broken: its teardown would wait on the dead rank
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
