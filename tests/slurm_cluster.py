"""A real two-node Slurm cluster on this one machine, for tests/test_slurm.py (DESIGN.md §7).

munged, one slurmctld and two slurmd (`-N node1`, `-N node2`, one CPU each, their own ports), all as
root, configured under a temporary directory; node names resolve to 127.0.0.1 through /etc/hosts (added
once, idempotently). Needs root and Debian's slurmctld, slurmd, slurm-client and munge packages.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

NODES = ("node1", "node2")
PACKAGES = "slurmctld slurmd slurm-client munge"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sacct")


def missing_requirements() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "needs root (it starts munged, slurmctld and two slurmd and edits /etc/hosts)"
    absent = [t for t in TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if absent:
        return f"needs {', '.join(absent)}: apt-get install -y {PACKAGES}"
    return None


def _conf(root: Path, ctld_port: int) -> str:
    lines = [
        "ClusterName=lipnext",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "ReturnToService=2",
        "JobRequeue=1",
        "MinJobAge=600",
        "KillWait=10",
        "SchedulerParameters=defer_batch",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd-%n.log",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
    ]
    for i, node in enumerate(NODES):
        lines.append(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={17001 + i} CPUs=1")
    lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def ensure_hosts() -> None:
    """node1 and node2 resolve to 127.0.0.1 (a line appended to /etc/hosts once; also tests/ssh_hosts.py)."""
    hosts = Path("/etc/hosts")
    text = hosts.read_text()
    known = {name for line in text.splitlines() if not line.startswith("#") for name in line.split()[1:]}
    if not set(NODES) <= known:
        with open(hosts, "a") as f:
            f.write(f"127.0.0.1 {' '.join(NODES)}\n")


class SlurmCluster:
    def __init__(self, root: Path, ctld_port: int = 17817):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.ctld_port = ctld_port
        self.procs: list[subprocess.Popen] = []

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def start(self) -> SlurmCluster:
        ensure_hosts()
        for d in ("state", "spool/node1", "spool/node2", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_conf(self.root, self.ctld_port))
        socket = self.root / "munge" / "munge.socket"
        munged = [
            "munged", "--force", "--foreground", f"--socket={socket}",
            f"--pid-file={self.root}/munge/munged.pid", f"--log-file={self.root}/munge/munged.log",
            f"--seed-file={self.root}/munge/munged.seed",
        ]  # fmt: skip
        self._spawn(munged)
        self._wait_for(lambda: socket.exists(), "munged's socket")
        # Slurm's auth/munge plugin finds the socket through its configuration.
        self.conf.write_text(self.conf.read_text() + f"AuthInfo=socket={socket}\n")
        self._spawn(["slurmctld", "-D", "-f", str(self.conf)])
        self._wait_for(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld")
        for node in NODES:
            self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", node])
        self._wait_for(self._nodes_idle, "both slurmd idle")
        return self

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.root / f"{Path(cmd[0]).name}-{len(self.procs)}.out", "w")
        self.procs.append(
            subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return all(states.get(n, "").startswith("idle") for n in NODES)

    def _wait_for(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}); logs in {self.root}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}; logs in {self.root}")

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit; the job runs with this process's environment plus `env` (sbatch --export=ALL)."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr}")
        out = proc.stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: int, states: tuple[str, ...], timeout: float = 900) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}")

    def stop(self) -> None:
        self.run("scancel", "--full", "--user=root", check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
