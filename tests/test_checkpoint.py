"""The checkpointer in one process: atomic tags, checksums, fallback past damage, pruning; what a resume may
change; the metrics log after a resume; the plot of a log with repeated steps. (Multi-rank and
scheduler runs: tests/test_distributed.py and tests/test_slurm.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lipnext_scale.checkpoint import LATEST, Checkpointer, RngState, find_resumable, verify
from lipnext_scale.config import load_recipe
from lipnext_scale.preemption import Interrupted, recipe_changes
from lipnext_scale.trainer import Trainer
from tests.conftest import QUICKSTART, REPO, load_tool


class Counter:
    """A state object with tensors and JSON: what the checkpointer sees of the optimizer and trainer."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value, "tensors": {"weights": torch.full((1000,), float(self.value))}}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
        assert torch.equal(state["tensors"]["weights"], torch.full((1000,), float(self.value)))


def save_steps(ckpt: Checkpointer, steps, recipe=None) -> None:
    for step in steps:
        ckpt.save(step, {"trainer": Counter(step), "rng": RngState()}, recipe=recipe or {})


def test_save_is_atomic_checksummed_and_resumes(tmp_path):
    ckpt = Checkpointer(tmp_path, rank=0, world_size=1, keep=2)
    save_steps(ckpt, [1, 2, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step2", "global_step3", LATEST]
    manifest = verify(tmp_path / "global_step3")
    assert manifest["checksums"]["rank00000.safetensors"]["bytes"] > 4000
    tag_dir, manifest, notes = ckpt.find()
    assert tag_dir.name == "global_step3" and notes == []
    trainer = Counter()
    ckpt.load(tag_dir, manifest, {"trainer": trainer, "rng": RngState()})
    assert trainer.value == 3


def test_killed_save_leaves_latest_on_the_previous_checkpoint_and_is_cleaned_up(tmp_path):
    def die(step, rank):
        raise KeyboardInterrupt  # as if the process died after its rank file, before the manifest

    save_steps(Checkpointer(tmp_path, 0, 1), [1])
    try:
        save_steps(Checkpointer(tmp_path, 0, 1, after_rank_file=die), [2])
    except KeyboardInterrupt:
        pass
    assert (tmp_path / ".tmp-global_step2" / "rank00000.safetensors").exists()
    assert not (tmp_path / "global_step2").exists() and (tmp_path / LATEST).read_text() == "global_step1"
    assert find_resumable(tmp_path)[0].name == "global_step1"
    save_steps(Checkpointer(tmp_path, 0, 1), [3])
    assert not (tmp_path / ".tmp-global_step2").exists()


def test_damaged_newest_falls_back_to_the_previous_and_says_why(tmp_path):
    ckpt = Checkpointer(tmp_path, 0, 1, keep=3)
    save_steps(ckpt, [1, 2, 3])
    newest = tmp_path / "global_step3" / "rank00000.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated
    middle = tmp_path / "global_step2" / "rank00000.safetensors"
    data = bytearray(middle.read_bytes())
    data[-1] ^= 1  # same size, one bit flipped
    middle.write_bytes(bytes(data))
    tag_dir, _, notes = ckpt.find()
    assert tag_dir.name == "global_step1"
    assert "global_step3/rank00000.safetensors: damaged" in notes[0] and "bytes" in notes[0]
    assert "global_step2/rank00000.safetensors: damaged: its sha256" in notes[1]


def test_pruning_keeps_the_newest_verified_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path, 0, 1, keep=1)
    save_steps(ckpt, [1, 2, 3])
    assert sorted(p.name for p in tmp_path.glob("global_step*")) == ["global_step3"]
    # Saving again at the same step (a resume with nothing left to do) replaces it without a gap.
    save_steps(ckpt, [3])
    assert verify(tmp_path / "global_step3")["step"] == 3 and not list(tmp_path.glob(".tmp-*"))


def test_only_changes_that_do_not_change_the_run_are_accepted():
    base = load_recipe(QUICKSTART).to_dict()
    safe = load_recipe(QUICKSTART, ["train.epochs=45", "train.log_every=3", "run.checkpoint_minutes=5"])
    refused, accepted = recipe_changes(base, safe.to_dict())
    assert refused == [] and [line.split(":")[0] for line in accepted] == [
        "run.checkpoint_minutes",
        "train.epochs",
        "train.log_every",
    ]
    changed = load_recipe(QUICKSTART, ["model.size=L6W64", "optim.lr=0.05", "train.epochs=45"])
    refused, _ = recipe_changes(base, changed.to_dict())
    assert [line.split(":")[0] for line in refused] == ["model.size", "optim.lr"]


def small_run(out: Path, digits_root: Path, *overrides: str) -> list[str]:
    """Overrides of a small quickstart run in `out`."""
    return [f"run.output_dir={out}", f"data.root={digits_root}", "model.size=L6W64", *overrides]


def run_train(out: Path, digits_root: Path, *overrides: str, **kwargs):
    cmd = [sys.executable, str(REPO / "lipnext_scale" / "train.py"), str(QUICKSTART)]
    args = small_run(out, digits_root, "train.log_every=1")
    return subprocess.Popen(
        [*cmd, *args, *overrides],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        **kwargs,
    )


def test_ctrl_c_checkpoints_then_resume_continues_the_log_and_refuses_a_changed_model(tmp_path, digits_root):
    out = tmp_path / "run"
    proc = run_train(out, digits_root, "train.max_steps=500")
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and '"loss"' in (out / "metrics.jsonl").read_text()):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-2000:]
    assert "Traceback" not in stderr and "SIGINT: finishing the current step" in stderr
    stopped = int(stderr.split("stopped by SIGINT after step ")[1].split(";")[0])
    assert (out / "checkpoints" / LATEST).read_text() == f"global_step{stopped}"

    refused = run_train(out, digits_root, "model.size=L8W128", f"train.max_steps={stopped + 2}")
    _, stderr = refused.communicate(timeout=300)
    assert refused.returncode == 2 and "model.size" in stderr
    assert "run.output_dir" in stderr and "run.resume=false" in stderr

    resumed = run_train(out, digits_root, f"train.max_steps={stopped + 2}")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / f'global_step{stopped}'} at step {stopped}" in stdout
    assert "train.max_steps: 500 in the checkpoint" in stdout and "schedule is recomputed" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, stopped + 3))


def test_a_checkpoint_at_an_epoch_end_resumes_with_the_right_epoch_count(tmp_path, digits_root):
    # 1500 digits in batches of 500: 3 steps an epoch; the first run ends (and saves) at an epoch's end.
    short = ["data.batch_size=500", "train.epochs=3", "run.checkpoint_every=3"]
    for max_steps in (3, 6):
        proc = run_train(tmp_path, digits_root, *short, f"train.max_steps={max_steps}")
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in records if "eval" in r] == [(3, 1), (6, 2)]
    in_progress = [(r["step"], r["epoch"]) for r in records if "loss" in r]
    assert in_progress == [(s, 1 + (s > 3)) for s in range(1, 7)]


def test_plot_run_draws_each_step_once(tmp_path):
    plot = load_tool("plot_run")
    lines = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    steps, _ = plot.read_metrics(tmp_path)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]


def test_a_checkpoint_directory_not_every_rank_sees_is_refused_at_start_up(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(REPO / "tests" / "dist_driver.py"), "not_shared", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        message = (tmp_path / f"not_shared_rank{rank}.txt").read_text()
        assert "not shared by every rank (rank 1 on" in message and "run.output_dir" in message


class SignalDuringEvaluation:
    """The real validation loader; a stop signal arrives as its second batch is read."""

    def __init__(self, loader, stop):
        self.loader, self.stop = loader, stop

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index == 1:
                self.stop.received = "SIGUSR1"
            yield batch


def test_a_stop_during_evaluation_checkpoints_and_the_resume_evaluates_first(tmp_path, digits_root):
    overrides = small_run(tmp_path, digits_root, "data.batch_size=100", "train.max_steps=2")  # 3 val batches
    trainer = Trainer(load_recipe(QUICKSTART, overrides))
    try:
        trainer.val_loader = SignalDuringEvaluation(trainer.val_loader, trainer.stop)
        with pytest.raises(Interrupted, match="stopped by SIGUSR1 after step 2"):
            trainer.fit()
    finally:
        trainer.close()
    assert (tmp_path / "checkpoints" / LATEST).read_text() == "global_step2"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not any("eval" in r for r in records)

    resumed = Trainer(load_recipe(QUICKSTART, overrides))
    try:
        assert resumed.step == 2 and resumed._evaluation_pending()
        result = resumed.fit()
        resumed.save(result)
    finally:
        resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [2]
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    again = Trainer(load_recipe(QUICKSTART, overrides))  # the final checkpoint holds the evaluation
    try:
        assert not again._evaluation_pending()
    finally:
        again.close()


def test_a_stop_during_an_evaluation_inside_a_step_keeps_the_last_checkpoint(tmp_path, digits_root):
    # 25 micro-batches of 60 an epoch, 2 a step: epoch 1 ends one micro-batch into step 13, whose
    # accumulated gradients no checkpoint can hold; the stop must not write one at step 12 after them.
    overrides = small_run(
        tmp_path,
        digits_root,
        "data.batch_size=120",
        "train.micro_batch_size=60",
        "train.epochs=2",
        "run.checkpoint_every=5",
    )
    trainer = Trainer(load_recipe(QUICKSTART, overrides))
    try:
        trainer.val_loader = SignalDuringEvaluation(trainer.val_loader, trainer.stop)
        with pytest.raises(Interrupted, match="after step 12; checkpoint .*global_step10"):
            trainer.fit()
        assert trainer.engine.micro_steps == 25
    finally:
        trainer.close()
    assert (tmp_path / "checkpoints" / LATEST).read_text() == "global_step10"
