"""Two ssh "hosts" on this one machine, for a real DeepSpeed hostfile launch (tests/test_hostfile.py,
DESIGN.md §7).

node1 and node2 resolve to 127.0.0.1 (/etc/hosts, as for tests/slurm_cluster.py). An sshd of the test's own
— its own port, host key, authorized_keys and configuration under a temporary directory — runs as root in
the foreground and is stopped at teardown; the machine's sshd, /etc/ssh and the user's ~/.ssh are left alone.

What a user writes in ~/.ssh/config (`Host node1 node2`, `StrictHostKeyChecking no`, the port and the key)
is the test's own client configuration. ssh reads ~/.ssh from the passwd entry, not from $HOME, so the
launch gets an `ssh` first on its PATH that runs /usr/bin/ssh with `-F` that file: pdsh and DeepSpeed's
reachability check both run `ssh` from PATH. DeepSpeed reads ~/.deepspeed_env from $HOME, so the launch
runs with HOME set to a directory of the test's own, holding the .deepspeed_env a user would write.

Needs root (sshd, /etc/hosts) and Debian's openssh-server and pdsh.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.slurm_cluster import NODES, ensure_hosts

PACKAGES = "openssh-server pdsh"
TOOLS = ("sshd", "ssh", "ssh-keygen", "pdsh")
SSH = "/usr/bin/ssh"


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (str(Path(d, tool)) for d in ("/usr/sbin", "/sbin") if Path(d, tool).exists()), None
    )


def missing_requirements() -> str | None:
    """Why this machine cannot run the two ssh hosts, or None."""
    if os.geteuid() != 0:
        return "needs root (it starts sshd as root and edits /etc/hosts)"
    absent = [t for t in TOOLS if _which(t) is None]
    if absent:
        return f"needs {', '.join(absent)}: apt-get install -y {PACKAGES}"
    if not Path(SSH).exists():
        return f"needs {SSH} (openssh-client)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SshHosts:
    """`start()` brings up sshd on a free port; `env()` is the environment a launch runs with."""

    def __init__(self, root: Path, deepspeed_env: dict[str, str]):
        self.root = root
        self.home = root / "home"  # HOME of the launching side: its .deepspeed_env
        self.bin = root / "bin"  # the `ssh` that reads the test's client configuration
        self.deepspeed_env = deepspeed_env
        self.hostfile = root / "hostfile"
        self.port = 0
        self.sshd: subprocess.Popen | None = None

    def start(self) -> SshHosts:
        ensure_hosts()
        for d in (self.home, self.bin):
            d.mkdir(parents=True, exist_ok=True)
        # Debian's sshd refuses to start without its privilege-separation directory (the service makes it).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        host_key, user_key = self.root / "ssh_host_ed25519_key", self.root / "id_ed25519"
        for key in (host_key, user_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
            )
        # This machine's own key, authorised for root: every "host" is this machine.
        shutil.copy(f"{user_key}.pub", self.root / "authorized_keys")
        self.port = free_port()
        sshd_config = self.root / "sshd_config"
        sshd_config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {self.root}/sshd.pid\n"
            f"AuthorizedKeysFile {self.root}/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            # The key files live under a temporary directory, which StrictModes would reject as shared.
            "StrictModes no\n"
        )
        ssh_config = self.root / "ssh_config"
        ssh_config.write_text(
            f"Host {' '.join(NODES)}\n    Port {self.port}\n    User root\n    IdentityFile {user_key}\n"
            "    IdentitiesOnly yes\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n"
            "    BatchMode yes\n    LogLevel ERROR\n"
        )
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {SSH} -F {ssh_config} "$@"\n')
        wrapper.chmod(0o755)
        # One KEY=VALUE a line: DeepSpeed splits every line at '=' (a blank line or comment is an error).
        lines = "".join(f"{k}={v}\n" for k, v in self.deepspeed_env.items())
        (self.home / ".deepspeed_env").write_text(lines)
        self.hostfile.write_text("".join(f"{node} slots=1\n" for node in NODES))

        with open(self.root / "sshd.log", "w") as log:
            self.sshd = subprocess.Popen(
                [_which("sshd"), "-D", "-e", "-f", str(sshd_config)],  # it re-executes itself: absolute path
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.time() + 30
        while self.ssh(NODES[-1], "true").returncode != 0:
            if self.sshd.poll() is not None or time.time() > deadline:
                self.stop()
                log_tail = (self.root / "sshd.log").read_text()[-2000:]
                raise RuntimeError(f"sshd did not let root in with the test's key ({self.root}):\n{log_tail}")
            time.sleep(0.2)
        return self

    def ssh(self, node: str, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin / "ssh"), node, *command], capture_output=True, text=True, timeout=30
        )

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` with HOME (for ~/.deepspeed_env) and PATH (for ssh, and the interpreter's deepspeed)."""
        path = os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), base.get("PATH", "")])
        env = {**base, "HOME": str(self.home), "PATH": path}
        env.pop("DS_ENV_FILE", None)  # another name for .deepspeed_env
        return env

    def stop(self) -> None:
        if self.sshd is not None and self.sshd.poll() is None:
            os.killpg(self.sshd.pid, signal.SIGTERM)
            try:
                self.sshd.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.sshd.pid, signal.SIGKILL)
                self.sshd.wait()
