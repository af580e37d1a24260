"""DeepSpeed + sharded manifold optimizer on CPU (gloo), with real multi-process launches.

Parity with one process, determinism, SIGKILL (also mid-save) and resume bit-identical, resume on another
rank count, consolidation, non-finite steps. Each launch costs ~15 s (DeepSpeed start), so runs are shared
through module fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lipnext_scale import load_pretrained
from lipnext_scale.optim.sharded import owners_of, plan_buckets
from tests.conftest import QUICKSTART, REPO

DRIVER = REPO / "tests" / "dist_driver.py"
TRAIN = REPO / "lipnext_scale" / "train.py"
CONSOLIDATE = REPO / "tools" / "consolidate_ckpt.py"


def launch_env(extra: dict | None = None) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(extra or {})}


def torchrun_cmd(nproc: int, script: Path, *args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(script),
        *map(str, args),
    ]


def torchrun(nproc: int, script: Path, *args, env: dict | None = None, check: bool = True):
    proc = subprocess.run(
        torchrun_cmd(nproc, script, *args),
        env=launch_env(env),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# --- ownership (no processes) ---


def test_ownership_is_deterministic_balanced_and_covers_every_parameter():
    with torch.device("meta"):
        from lipnext_scale.model.lipnext import build_lipnext

        model = build_lipnext("L32W1024", num_classes=1000, image_size=224, patch=16)
    sizes = [(n, p.numel()) for n, p in model.named_parameters()]
    largest, total = max(s for _, s in sizes), sum(s for _, s in sizes)
    for world in (1, 2, 3, 4, 8):
        buckets = plan_buckets(sizes, world)
        owners = owners_of(buckets)
        assert owners == owners_of(plan_buckets(list(sizes), world))
        loads = [sum(s for n, s in sizes if owners[n] == r) for r in range(world)]
        assert max(loads) <= total / world + largest
        assert set(owners.values()) == set(range(world))
        for b in buckets:  # parameters of a bucket never overlap; each lies inside its owner's segment
            spans = sorted((o, o + s) for o, s in zip(b.offsets, b.sizes))
            assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:])), "segments overlap"
            if b.kind != "reduce":
                for o, s, r in zip(b.offsets, b.sizes, b.owners):
                    assert r * b.segment <= o and o + s <= (r + 1) * b.segment


# --- parity and determinism ---

PARITY_STEPS = 50


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory, digits_root) -> dict:
    runs = {}
    for key, nproc in (("1", 1), ("2", 2), ("4", 4), ("2again", 2)):
        out = tmp_path_factory.mktemp(f"parity{key}")
        torchrun(nproc, DRIVER, "parity", out, PARITY_STEPS, digits_root)
        runs[key] = (
            json.loads((out / "losses.json").read_text()),
            load_file(str(out / "masters.safetensors")),
        )
    return runs


@pytest.mark.parametrize("nproc", ["2", "4"])
def test_n_ranks_follow_one_process(parity_runs, nproc):
    one_losses, one_masters = parity_runs["1"]
    losses, masters = parity_runs[nproc]
    assert len(losses) == len(one_losses) == PARITY_STEPS
    assert one_losses[-1] < 0.6 * one_losses[0], "the parity run must actually train"
    for a, b in zip(losses, one_losses):
        assert abs(a - b) <= 1e-3 * abs(b)
    for name, value in one_masters.items():
        assert (masters[name] - value).abs().max().item() <= 1e-4, name


def test_same_rank_count_is_bit_identical(parity_runs):
    losses, masters = parity_runs["2"]
    again_losses, again_masters = parity_runs["2again"]
    assert losses == again_losses
    assert all(torch.equal(masters[k], again_masters[k]) for k in masters)


# --- checkpoints: SIGKILL, mid-save kill, resume ---

CKPT_ARGS = [
    "train.max_steps=16",
    "run.checkpoint_every=4",
    "train.log_every=1",
    "data.batch_size=32",
    "run.keep_checkpoints=3",
]


def train_args(out: Path, data_root: Path) -> list:
    return [QUICKSTART, *CKPT_ARGS, f"run.output_dir={out}", f"data.root={data_root}"]


def step_losses(run_dir: Path) -> dict[int, float]:
    """step → loss; after a resume the re-run steps overwrite the killed run's records."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_root) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    torchrun(2, TRAIN, *train_args(out, digits_root))
    return out


def test_sigkill_mid_save_resumes_from_last_complete_checkpoint_bit_identically(
    tmp_path, digits_root, uninterrupted
):
    out = tmp_path / "killed"
    killed = torchrun(2, DRIVER, "kill_during_save", 8, 1, *train_args(out, digits_root), check=False)
    assert killed.returncode != 0
    ckpts = out / "checkpoints"
    # The tag is written under a temporary name and renamed whole once complete: no global_step8 exists.
    assert (ckpts / "latest").read_text() == "global_step4"
    assert (ckpts / ".tmp-global_step8" / "rank00001.safetensors").exists()
    assert not (ckpts / "global_step8").exists()
    refused = subprocess.run(
        [sys.executable, CONSOLIDATE, ckpts / ".tmp-global_step8", tmp_path / "x.safetensors"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "incomplete checkpoint" in refused.stderr
    assert "checkpoint.json" in refused.stderr and not (tmp_path / "x.safetensors").exists()

    resumed = torchrun(2, TRAIN, *train_args(out, digits_root))
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    assert step_losses(out) == step_losses(uninterrupted)


def test_sigkill_at_an_arbitrary_moment_resumes_bit_identically(tmp_path, digits_root, uninterrupted):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        torchrun_cmd(2, TRAIN, *train_args(out, digits_root)),
        env=launch_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    latest = out / "checkpoints" / "latest"
    while time.time() < deadline and not (latest.exists() and latest.read_text() == "global_step8"):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and every rank, wherever they are
    proc.wait()
    assert latest.read_text() in {"global_step8", "global_step12"}
    torchrun(2, TRAIN, *train_args(out, digits_root))
    assert step_losses(out) == step_losses(uninterrupted)


# --- resume on another number of ranks, consolidation ---


def consolidate(ckpt_dir: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, CONSOLIDATE, ckpt_dir, output, *extra], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_consolidation_equals_gathered_masters_and_round_trips(tmp_path, uninterrupted, digits_root):
    merged = tmp_path / "merged.safetensors"
    consolidate(uninterrupted / "checkpoints", merged)
    gathered = load_file(str(uninterrupted / "model.safetensors"))
    consolidated = load_file(str(merged))
    assert consolidated.keys() == gathered.keys()
    assert all(torch.equal(consolidated[k], gathered[k]) for k in gathered)
    a, b = load_pretrained(merged), load_pretrained(uninterrupted / "model.safetensors")
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(images), b(images))
    # --tag picks an older checkpoint, which differs from the final one.
    older = tmp_path / "step12.safetensors"
    consolidate(uninterrupted / "checkpoints", older, "--tag", "global_step12")
    assert not all(torch.equal(load_file(str(older))[k], gathered[k]) for k in gathered)


def resume_on(nproc: int, source: Path, out: Path, data_root: Path, max_steps: int) -> str:
    shutil.copytree(source / "checkpoints", out / "checkpoints")
    return torchrun(nproc, TRAIN, *train_args(out, data_root), f"train.max_steps={max_steps}").stdout


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_on_another_rank_count_reads_each_owned_master(tmp_path, uninterrupted, digits_root):
    # With max_steps reached, a resumed run only re-saves: its model.safetensors is what its ranks loaded.
    one = tmp_path / "one"
    stdout = resume_on(1, uninterrupted, one, digits_root, max_steps=16)
    assert "from a 2-rank checkpoint" in stdout and "at step 16" in stdout
    assert_same_weights(one, uninterrupted)
    two = tmp_path / "two"
    assert "from a 1-rank checkpoint" in resume_on(2, one, two, digits_root, max_steps=16)
    assert_same_weights(two, uninterrupted)
    four = tmp_path / "four"
    stdout = resume_on(4, uninterrupted, four, digits_root, max_steps=16)
    assert "from a 2-rank checkpoint: the unread samples of epoch 1 are split over the new ranks" in stdout
    assert_same_weights(four, uninterrupted)
    manifest = json.loads((four / "checkpoints" / "global_step16" / "checkpoint.json").read_text())
    assert manifest["world_size"] == 4 and len(set(manifest["owners"].values())) == 4
    # ... and training goes on from there on 4 ranks exactly as it does from the 1-rank checkpoint of the same
    # step: same rank count, same masters, Adam moments, Lookahead state and data position (the 1-rank run
    # only re-saved, so both split the same unread samples of the 2-rank epoch), so bit for bit (as
    # test_same_rank_count_is_bit_identical). A rank that misreads its share of any of them diverges.
    torchrun(4, TRAIN, *train_args(four, digits_root), "train.max_steps=18")
    from_one = tmp_path / "four_from_one"
    assert "from a 1-rank checkpoint" in resume_on(4, one, from_one, digits_root, max_steps=18)
    losses, reference = step_losses(four), step_losses(from_one)
    assert sorted(losses)[-2:] == sorted(reference) == [17, 18]
    assert [losses[17], losses[18]] == [reference[17], reference[18]]
    assert_same_weights(four, from_one)


# --- non-finite steps ---


def test_non_finite_step_is_skipped_on_every_rank_and_repeated_ones_stop_the_run(tmp_path, digits_root):
    torchrun(2, DRIVER, "nonfinite", tmp_path, digits_root)
    reports = [json.loads((tmp_path / f"nonfinite_rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["step2"] == {"skipped": 0, "unchanged": False, "finite": True}
        assert report["step3"] == {"skipped": 1, "unchanged": True, "finite": True}
        assert report["stopped_at_step"] == 4
        assert (
            "2 optimizer steps in a row" in report["stopped"] and "Last good checkpoint" in report["stopped"]
        )


# --- the ImageNet recipes, at tiny width and full depth, through the same code path ---


@pytest.mark.parametrize("recipe", ["in1k_1b.yaml", "in1k_2b.yaml"])
def test_imagenet_recipe_runs_at_tiny_width_on_two_ranks(tmp_path, digits_root, recipe):
    # Same depth (32), patch, image size, precision, activation checkpointing and augmentation as the recipe;
    # width 64 and the digits (upscaled to 224) instead of ImageNet so that it runs on a CPU.
    torchrun(
        2,
        TRAIN,
        REPO / "recipes" / recipe,
        "model.size=L32W64",
        "data.source=digits",
        f"data.root={digits_root}",
        "data.batch_size=4",
        "train.max_steps=3",
        "train.log_every=1",
        "certify.batch_size=100",
        f"run.output_dir={tmp_path}",
    )
    info = json.loads((tmp_path / "run_info.json").read_text())["recipe"]
    assert info["model"]["activation_checkpointing"] == "auto" and info["train"]["precision"] == "bf16"
    assert info["model"]["image_size"] == 224 and info["data"]["augment"] == "randaugment"
    losses = step_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3] and all(v == v for v in losses.values())
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["num_samples"] == 297 and result["orthogonality_error"] < 1e-5
    assert 1.0 <= result["lipschitz_bound"] < 1.001


# --- DeepSpeed's comms logger and wall-clock breakdown, switched on by the recipe ---


def test_recipe_turns_on_deepspeeds_comms_logger_and_wall_clock_breakdown(tmp_path, digits_root):
    out = torchrun(
        2,
        TRAIN,
        QUICKSTART,
        f"run.output_dir={tmp_path}",
        f"data.root={digits_root}",
        "train.max_steps=2",
        "run.comms_logger=true",
        "run.wall_clock_breakdown=true",
    ).stdout
    # Rank 0's comms-logger table at the end lists the optimizer's collectives (exact bytes:
    # tests/test_overlap.py); one row per operation name, then one per message size.
    table = out[out.index("Comm. Op") :].split()
    assert {"reduce_scatter_tensor", "all_gather_into_tensor", "reduce", "broadcast", "all_reduce"} <= set(
        table
    )
    # DeepSpeed's per-step timer line carries the optimizer's waits, once per step (rank 0 only).
    steps = [line for line in out.splitlines() if "| step: " in line and "comm_wait_reduce: " in line]
    assert len(steps) == 2 and all("comm_wait_gather: " in line and "| fwd: " in line for line in steps)


@pytest.mark.parametrize("order", [(False, True, False), (True, False)])
def test_the_comms_logger_is_on_exactly_when_asked_also_after_another_engine(tmp_path, order):
    # DeepSpeed 0.19.8 keeps the logger's switch process-wide, turns it on whenever its config key is present,
    # and never turns it off by itself.
    from lipnext_scale import engine

    for comms_logger in order:
        engine.setup_distributed()
        try:
            config = engine.deepspeed_config(2, 2, 1, tmp_path, comms_logger=comms_logger)
            engine.initialize(torch.nn.Linear(4, 4), lambda params: torch.optim.SGD(params, lr=0.1), config)
            assert (engine.comms_summary() is not None) == comms_logger
        finally:
            engine.shutdown()
