"""Keep README.md's figures and recipe-key table equal to what the code produces.

README.md holds machine-readable blocks between ``<!-- NAME: begin ... -->`` and ``<!-- NAME: end -->``:

- ``quickstart-figures``: the table `train.py recipes/quickstart.yaml` prints at the end (`format_table`);
- ``test-figures``: the same for the shortened quickstart the test suite trains (tests/conftest.py);
- ``recipe-keys``: the recipe-key table, generated from the config fields' ``help`` metadata.

`tools/check_readme.py` is the command line (check, or ``--write`` to regenerate a block).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lipnext_scale.certify import format_table
from lipnext_scale.config import recipe_keys

# Accuracies on the quickstart's 297 test images move in steps of 1/297 = 0.34 points. On other CPUs
# (different rounding, and training at the quickstart's lr is chaotic) we have seen clean accuracy and CRA
# differ from the README by up to 0.68 points (2 images) at 40 epochs; 1.5 points allows 4 images.
TOLERANCE_POINTS = 1.5
# The bound depends on the orthogonality defect of the fp32 masters, itself at rounding level.
BOUND_TOLERANCE = 1e-4

_BLOCK = r"<!-- {name}: begin[^\n]*-->\n(?P<body>.*?)<!-- {name}: end -->"


def read_block(text: str, name: str) -> str:
    """The text between the ``name`` begin and end markers (ValueError if there is no such block)."""
    match = re.search(_BLOCK.format(name=re.escape(name)), text, flags=re.S)
    if match is None:
        raise ValueError(f"no '<!-- {name}: begin -->' … '<!-- {name}: end -->' block")
    return match.group("body")


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the body of block ``name`` replaced by ``body`` (markers kept)."""
    match = re.search(_BLOCK.format(name=re.escape(name)), text, flags=re.S)
    if match is None:
        raise ValueError(f"no '<!-- {name}: begin -->' … '<!-- {name}: end -->' block")
    body = body if body.endswith("\n") else body + "\n"
    return text[: match.start("body")] + body + text[match.end("body") :]


@dataclass(frozen=True)
class Figures:
    """Clean accuracy and CRA in percent (as printed, two decimals), CRA keyed by ε as printed."""

    clean: float
    cra: dict[str, float]
    bound: float


_ROW = re.compile(r"^\s*(clean|\d+\.\d{4})\s+(\d+\.\d{2})%\s*$")
_BOUND = re.compile(r"^Lipschitz bound of the backbone: (\d+\.\d+)")


def parse_table(text: str) -> Figures:
    """Figures from the text `format_table` prints (a README block may wrap it in a code fence)."""
    clean, cra, bound = None, {}, None
    for line in text.splitlines():
        if m := _ROW.match(line):
            if m.group(1) == "clean":
                clean = float(m.group(2))
            else:
                cra[m.group(1)] = float(m.group(2))
        elif m := _BOUND.match(line.strip()):
            bound = float(m.group(1))
    if clean is None or not cra or bound is None:
        raise ValueError(
            "not a clean/CRA table with a Lipschitz bound line (see lipnext_scale.certify.format_table)"
        )
    return Figures(clean, cra, bound)


def run_table(run_dir: str | Path) -> str:
    """The table a finished run printed, rebuilt from its eval.json."""
    path = Path(run_dir) / "eval.json"
    try:
        return format_table(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no eval.json; train the run first") from None


def compare(
    expected: Figures,
    actual: Figures,
    tolerance: float = TOLERANCE_POINTS,
    bound_tolerance: float = BOUND_TOLERANCE,
) -> list[str]:
    """Every figure of ``actual`` that is more than the tolerance from ``expected`` (empty: they agree)."""
    problems = []
    if set(expected.cra) != set(actual.cra):
        problems.append(f"radii differ: README {sorted(expected.cra)}, run {sorted(actual.cra)}")
    pairs = [("clean", expected.clean, actual.clean)]
    pairs += [(f"CRA@{eps}", expected.cra[eps], actual.cra[eps]) for eps in expected.cra if eps in actual.cra]
    for name, want, got in pairs:
        if abs(want - got) > tolerance:
            problems.append(f"{name}: README {want:.2f}%, run {got:.2f}% (tolerance ±{tolerance} points)")
    if abs(expected.bound - actual.bound) > bound_tolerance:
        problems.append(
            f"Lipschitz bound: README {expected.bound:.6f}, run {actual.bound:.6f} "
            f"(tolerance ±{bound_tolerance})"
        )
    return problems


def figures_block(table: str) -> str:
    return f"```\n{table}\n```\n"


def recipe_key_table() -> str:
    """README.md's recipe-key table in Markdown, one row per key, from the config fields' metadata."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning, allowed in recipe_keys():
        text = f"{meaning}; {allowed}" if meaning and allowed else meaning or allowed
        lines.append(f"| `{key}` | {default} | {text.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"
