"""tools/gpu_checks.py at toy sizes on the CPU: every check's command runs, so a GPU is not spent on typos."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_gpu_checks_smoke_runs_every_check_and_keeps_its_logs_small(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_checks.py"), str(logs), "--work", str(tmp_path / "work"),
         "--smoke"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (logs / "summary.txt").read_text().splitlines()
    names = ["env", "block_1b", "block_2b", "data", "quickstart", "optimizer", "memory_1b"]
    assert [line.split()[0] for line in summary] == names
    assert all(line.split()[1] == "ok" for line in summary)
    assert "planned peak" in summary[-1] and "measured" in summary[-1]
    # What a device machine sends back: at most 8 files, none in sub-folders.
    assert sorted(p.name for p in logs.iterdir()) == sorted([f"{n}.log" for n in names] + ["summary.txt"])
    assert "non-matmul share" in (logs / "block_1b.log").read_text()
    assert "dali/wds:" in (logs / "data.log").read_text()
    assert "Lipschitz bound of the backbone" in (logs / "quickstart.log").read_text()
    assert "projected at the GPU rates" in (logs / "optimizer.log").read_text()


def test_gpu_checks_report_a_failing_check_and_go_on(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_checks.py"), str(logs), "--work", str(tmp_path / "work"),
         "--smoke", "--only", "memory_1b", "env"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # memory_1b needs the photo shards that the data check writes: it fails, env still runs.
    assert done.returncode == 1
    summary = (logs / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [["memory_1b", "FAILED"], ["env", "ok"]]
    assert "memory_1b" in done.stderr and "exit status" in (logs / "memory_1b.log").read_text()
