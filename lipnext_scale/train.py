"""Train a LipNeXt: `python lipnext_scale/train.py RECIPE.yaml [section.key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from lipnext_scale.config import ConfigError, load_recipe
from lipnext_scale.trainer import TooManySkippedSteps, Trainer


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(recipe, local_rank=args.local_rank)
    except ConfigError as exc:  # settings that only the world size can refute (batch vs. ranks)
        print(f"error: {args.recipe}: {exc}", file=sys.stderr)
        return 2
    try:
        trainer.save(trainer.fit())
    except TooManySkippedSteps as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
