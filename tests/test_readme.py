"""README.md's machine-readable blocks equal what the code produces (tools/check_readme.py)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from lipnext_scale.config import Recipe, load_recipe
from lipnext_scale.readme_check import parse_table, read_block, recipe_key_table, replace_block
from tests.conftest import QUICKSTART, REPO, load_tool

README = REPO / "README.md"
check_readme = load_tool("check_readme")


def test_recipe_key_table_is_generated_from_the_config() -> None:
    for section in dataclasses.fields(Recipe):
        for f in dataclasses.fields(section.default_factory()):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help text for the README table"
    assert read_block(README.read_text(), "recipe-keys") == recipe_key_table(), (
        "README.md's recipe-key table is stale: python tools/check_readme.py keys --write"
    )


FILL_TEST_FIGURES = (
    "README.md's test-figures block holds no clean/CRA table: fill it with python lipnext_scale/train.py "
    "recipes/quickstart.yaml train.epochs=12 train.log_every=5 run.output_dir=runs/test_quickstart && "
    "python tools/check_readme.py figures runs/test_quickstart --block test-figures --write"
)


def test_quickstart_figures_are_at_the_quickstart_radii() -> None:
    eps = load_recipe(QUICKSTART).certify.eps
    for block in ("quickstart-figures", "test-figures"):
        try:
            figures = parse_table(read_block(README.read_text(), block))
        except ValueError as exc:
            raise AssertionError(f"{block}: {exc}. {FILL_TEST_FIGURES}") from None
        assert sorted(figures.cra) == sorted(f"{e:.4f}" for e in eps), block
        assert 0 <= figures.clean <= 100 and 1 <= figures.bound < 1.01


def test_readme_test_figures_match_the_trained_quickstart(
    trained_quickstart: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The suite's own run (tests/conftest.py) against README.md's test-figures block, then the check must
    fail when one README figure is moved beyond the tolerance."""
    args = ["figures", str(trained_quickstart), "--block", "test-figures"]
    assert check_readme.main(args) == 0, capsys.readouterr() + (FILL_TEST_FIGURES,)

    text = README.read_text()
    block = read_block(text, "test-figures")
    clean = parse_table(block).clean
    moved = block.replace(f"{clean:8.2f}%", f"{clean - 1.6:8.2f}%", 1)
    assert moved != block
    planted = tmp_path / "README.md"
    planted.write_text(replace_block(text, "test-figures", moved))
    capsys.readouterr()
    assert check_readme.main(["--readme", str(planted), *args]) == 1
    assert f"clean: README {clean - 1.6:.2f}%, run" in capsys.readouterr().out
    assert check_readme.main(["--readme", str(planted), *args, "--tolerance", "2"]) == 0


def test_check_readme_write_replaces_only_its_block(tmp_path: Path, trained_quickstart: Path) -> None:
    copy = tmp_path / "README.md"
    shutil.copy(README, copy)
    before = copy.read_text()
    emptied = replace_block(before, "test-figures", "")
    copy.write_text(emptied)
    assert check_readme.main(["--readme", str(copy), "figures", str(trained_quickstart), "--block",
                              "test-figures"]) == 2  # fmt: skip
    assert check_readme.main(["--readme", str(copy), "figures", str(trained_quickstart), "--block",
                              "test-figures", "--write"]) == 0  # fmt: skip
    after = copy.read_text()
    assert (
        read_block(after, "test-figures").startswith("```\n")
        and replace_block(after, "test-figures", "") == emptied
    )
    assert check_readme.main(["--readme", str(copy), "figures", str(trained_quickstart), "--block",
                              "test-figures", "--exact"]) == 0  # fmt: skip


def test_every_design_citation_resolves() -> None:
    """Docstrings, recipes and docs cite "DESIGN.md §n"; DESIGN.md must exist and have section n."""
    import re

    design = (REPO / "DESIGN.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", design, flags=re.M))
    cited = {}
    for path in [*REPO.glob("lipnext_scale/**/*.py"), *REPO.glob("tools/*.py"), *REPO.glob("tests/*.py"),
                 *REPO.glob("recipes/*.yaml"), REPO / "README.md"]:  # fmt: skip
        for number in re.findall(r"DESIGN\.md,? §(\d+)", path.read_text()):
            cited.setdefault(number, []).append(path.relative_to(REPO))
    assert cited, "no citations found: the pattern is wrong"
    missing = {n: paths for n, paths in cited.items() if n not in sections}
    assert not missing, f"DESIGN.md has no section for {missing}"


def test_readme_python_snippet_runs_on_a_trained_run(trained_quickstart: Path) -> None:
    """The "From Python" snippet, as written, on the suite's quickstart run (its path swapped in)."""
    text = README.read_text()
    snippet = text[text.index("From Python, on a batch") :]
    snippet = snippet[snippet.index("```python\n") + len("```python\n") :]
    snippet = snippet[: snippet.index("```")]
    assert snippet.count("runs/quickstart/") == 2
    names: dict = {}
    exec(compile(snippet.replace("runs/quickstart/", f"{trained_quickstart}/"), "README.md", "exec"), names)
    images, labels, pred, radius = names["images"], names["labels"], names["pred"], names["radius"]
    assert images.shape == (8, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert pred.shape == labels.shape == radius.shape == (8,)
    assert (pred == labels).sum() >= 6 and (radius >= 0).all()  # a trained model on held-out digits
