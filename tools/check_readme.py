#!/usr/bin/env python
"""Check README.md's machine-readable blocks against the code, or regenerate them.

    check_readme.py figures RUN_DIR [--block quickstart-figures] [--tolerance 1.5] [--exact] [--write]
    check_readme.py keys [--write]

figures  compares the clean/CRA table in README block --block with the one RUN_DIR's eval.json gives:
         each accuracy within --tolerance points and the Lipschitz bound within 1e-4 (default), or the
         printed table character for character (--exact: what a rerun on the same machine gives).
         Blocks: quickstart-figures (`python lipnext_scale/train.py recipes/quickstart.yaml`) and
         test-figures (the shortened run of tests/conftest.py's trained_quickstart).
keys     compares the recipe-key table with the one generated from lipnext_scale/config.py's field help.

--write replaces the block with what the run or the code gives. Exit status 0 when they agree, 1 when not
(each difference is listed), 2 on a missing file or block.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lipnext_scale.readme_check import (
    TOLERANCE_POINTS,
    compare,
    figures_block,
    parse_table,
    read_block,
    recipe_key_table,
    replace_block,
    run_table,
)

README = Path(__file__).resolve().parent.parent / "README.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--readme", type=Path, default=README, help="the README to check (default: the repo's)"
    )
    sub = parser.add_subparsers(dest="what", required=True)
    figures = sub.add_parser("figures", help="a run's clean/CRA table against a README block")
    figures.add_argument("run_dir", type=Path, help="a finished run directory (holds eval.json)")
    figures.add_argument("--block", default="quickstart-figures", help="README block name")
    figures.add_argument("--tolerance", type=float, default=TOLERANCE_POINTS, help="points, per accuracy")
    figures.add_argument("--exact", action="store_true", help="the printed table, character for character")
    figures.add_argument("--write", action="store_true", help="put the run's table into the README block")
    keys = sub.add_parser("keys", help="the recipe-key table against lipnext_scale/config.py")
    keys.add_argument("--write", action="store_true", help="regenerate the README's table")
    args = parser.parse_args(argv)

    try:
        text = args.readme.read_text()
        if args.what == "figures":
            block, generated = args.block, figures_block(run_table(args.run_dir))
        else:
            block, generated = "recipe-keys", recipe_key_table()
        current = read_block(text, block)
        if args.write:
            args.readme.write_text(replace_block(text, block, generated))
            print(f"{args.readme}: block '{block}' rewritten")
            return 0
        exact = args.what == "keys" or args.exact
        if exact:
            problems = (
                [] if current == generated else [f"block '{block}' differs; the code gives:\n{generated}"]
            )
        else:
            problems = compare(parse_table(current), parse_table(generated), tolerance=args.tolerance)
    except (OSError, ValueError) as exc:
        print(f"check_readme: error: {args.readme}: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"{args.readme}: {problem}")
    if not problems:
        within = "" if exact else f" (within ±{args.tolerance} points)"
        print(f"{args.readme}: block '{block}' agrees{within}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
