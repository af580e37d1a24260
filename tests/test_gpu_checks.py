"""tools/gpu_checks.py at toy sizes on the CPU: every check's command runs, so a GPU is not spent on typos."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, load_tool


def test_gpu_checks_smoke_runs_every_check_and_keeps_its_logs_small(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_checks.py"), str(logs), "--work", str(tmp_path / "work"),
         "--smoke"],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (logs / "summary.txt").read_text().splitlines()
    names = ["env", "block_1b", "block_2b", "data", "quickstart", "optimizer", "memory_1b"]
    assert [line.split()[0] for line in summary] == names
    # The optimizer benchmark is skipped only where its tool is absent (it comes from another branch).
    absent = not (REPO / "tools" / "bench_optimizer.py").exists()
    statuses = {line.split()[0]: line.split()[1] for line in summary}
    assert statuses.pop("optimizer") == ("skipped" if absent else "ok")
    assert set(statuses.values()) == {"ok"}
    assert "planned peak" in summary[-1] and "dry run" in summary[-1] and "measured" in summary[-1]
    assert "8 ranks, per rank: dry run" in summary[-1]
    # What a device machine sends back: at most 8 files, none in sub-folders.
    files = sorted(p.name for p in logs.iterdir())
    assert files == sorted([f"{n}.log" for n in names] + ["summary.txt"]) and len(files) <= 8
    assert "non-matmul share" in (logs / "block_1b.log").read_text()
    assert "dali/wds:" in (logs / "data.log").read_text()
    assert "Lipschitz bound of the backbone" in (logs / "quickstart.log").read_text()
    assert (logs / "memory_1b.log").read_text().count("MemTracker") == 2  # the two dry runs' tables
    assert "projected at the GPU rates" in (logs / "optimizer.log").read_text()


def test_gpu_checks_report_a_failing_check_and_go_on(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_checks.py"), str(logs), "--work", str(tmp_path / "work"),
         "--smoke", "--only", "memory_1b", "env"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    # memory_1b needs the photo shards that the data check writes: it fails, env still runs.
    assert done.returncode == 1
    summary = (logs / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [["memory_1b", "FAILED"], ["env", "ok"]]
    assert "memory_1b" in done.stderr and "exit status" in (logs / "memory_1b.log").read_text()


def test_gpu_checks_fit_the_device_time_budget() -> None:
    """15 minutes of device time per task, machine start included: the checks' limits add up to 12."""
    gpu_checks = load_tool("gpu_checks")
    assert set(gpu_checks.LIMIT_S) == set(gpu_checks.CHECKS)
    assert sum(gpu_checks.LIMIT_S.values()) <= gpu_checks.DEVICE_BUDGET_S == 12 * 60
