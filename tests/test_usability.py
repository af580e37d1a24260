"""What a new user sees: errors that name their origin and the fix, and a console that says what happens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lipnext_scale.config import ConfigError, load_recipe
from lipnext_scale.console import ConsoleLog, memory_text
from lipnext_scale.engine import _say_if_compiling_comm_op
from lipnext_scale.train import main as train_main
from lipnext_scale.trainer import Trainer
from tests.conftest import QUICKSTART


def test_misspelt_override_is_blamed_on_the_command_line_with_the_nearest_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe(QUICKSTART, ["train.epoch=3"])
    message = str(info.value)
    assert message.startswith("command line: override 'train.epoch=3': unknown key 'train.epoch'")
    assert "did you mean 'train.epochs'?" in message
    with pytest.raises(ConfigError, match=r"unknown section 'trian' .*did you mean 'train'\?"):
        load_recipe(QUICKSTART, ["trian.epochs=3"])


def test_misspelt_recipe_key_is_blamed_on_the_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run:\n  checkpoint_evry: 5\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe, ["train.epochs=3"])
    assert str(info.value).startswith(f"{recipe}: unknown key 'run.checkpoint_evry' (did you mean ")
    assert "'run.checkpoint_every'" in str(info.value)


def test_train_help_says_where_the_recipe_keys_are(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_main(["--help"])
    assert "README.md" in capsys.readouterr().out


def test_memory_is_shown_in_mib_when_small() -> None:
    assert memory_text(0.05) == "51M"
    assert memory_text(0.69) == "707M"
    assert memory_text(16.25) == "16.2G"


def test_console_log_tees_stdout_and_restores_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sys.stdout
    log = ConsoleLog(tmp_path / "console.log")
    print("plan: 51M")
    log.close()
    log.close()
    assert sys.stdout is before
    print("after")
    assert (tmp_path / "console.log").read_text() == "plan: 51M\n"
    assert capsys.readouterr().out == "plan: 51M\nafter\n"
    ConsoleLog(tmp_path / "console.log", "a").close()  # a resumed run appends
    assert (tmp_path / "console.log").read_text() == "plan: 51M\n"


def test_deepspeed_op_compile_is_announced_only_when_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    _say_if_compiling_comm_op()
    assert "DeepSpeed is compiling its deepspeed_shm_comm op" in capsys.readouterr().out
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    _say_if_compiling_comm_op()
    assert capsys.readouterr().out == ""


def test_trained_quickstart_keeps_its_console(trained_quickstart: Path) -> None:
    text = (trained_quickstart / "console.log").read_text()
    assert "memory plan per rank" in text and "epoch 12: clean" in text
    assert "Lipschitz bound of the backbone" in text and "train:" not in text  # no progress bar


def test_max_steps_inside_an_epoch_says_how_far_it_got(
    tmp_path: Path, digits_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = load_recipe(
        QUICKSTART, [f"run.output_dir={tmp_path}", f"data.root={digits_root}", "train.max_steps=3"]
    )
    trainer = Trainer(recipe)
    try:
        trainer.fit()
    finally:
        trainer.close()
    share = 3 / len(trainer.train_loader)  # micro-batches; one per step here
    assert f"step 3 (epoch 1, {share:.0%} done): clean" in capsys.readouterr().out
    assert "epoch 0" not in (tmp_path / "console.log").read_text()
