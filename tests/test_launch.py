"""launch.sh: the exact commands its --dry-run prints, and its fail-fast checks (nothing is launched).

Every run gets a PATH holding only the few tools launch.sh needs (no deepspeed, torchrun, srun,
scontrol or nvidia-smi, unless a test puts a fake one there) and an environment without SLURM_* and
CUDA_VISIBLE_DEVICES, so the results do not depend on the machine.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch.sh"
RECIPE = "recipes/quickstart.yaml"
BASH = shutil.which("bash")
TASK_SCRIPT = 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"'
QUOTED_TASK_SCRIPT = "bash -c " + shlex.quote(TASK_SCRIPT) + " launch-task python -u lipnext_scale/train.py"


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """A PATH directory with only the external tools launch.sh uses."""
    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("cat", "dirname", "grep"):
        found = shutil.which(tool)
        assert found, tool
        (path / tool).symlink_to(found)
    return path


def fake_tool(bin_dir: Path, name: str, output: str) -> None:
    script = bin_dir / name
    script.write_text(f"#!{BASH}\nprintf '%s' {shlex.quote(output)}\n")
    script.chmod(0o755)


def launch(bin_dir: Path, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO):
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in ("CUDA_VISIBLE_DEVICES", "PATH")
    }
    base["PATH"] = str(bin_dir)
    base.update(env or {})
    return subprocess.run(
        [BASH, str(LAUNCH), *args], cwd=cwd, env=base, capture_output=True, text=True, timeout=30
    )


def dry_run(bin_dir: Path, *args: str, **kwargs) -> list[str]:
    """The printed command lines after the leading `cd REPO`."""
    proc = launch(bin_dir, "--dry-run", *args, **kwargs)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"cd {shlex.quote(str(kwargs.get('cwd', REPO)))}"
    return lines[1:]


def fails(bin_dir: Path, *args: str, **kwargs) -> str:
    """Stderr of a run that must stop with exit code 2 before launching anything."""
    proc = launch(bin_dir, *args, **kwargs)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert "error:" in proc.stderr
    return proc.stderr


# ----------------------------------------------------------------------------------------------------
# Single node


def test_launch_sh_is_executable():
    assert os.access(LAUNCH, os.X_OK)


def test_single_node_deepspeed(bin_dir):
    assert dry_run(bin_dir, "--gpus", "8", RECIPE) == [
        f"deepspeed --num_gpus 8 lipnext_scale/train.py {RECIPE}"
    ]


def test_single_node_torchrun(bin_dir):
    assert dry_run(bin_dir, "--launcher", "torchrun", "--gpus", "8", RECIPE, "train.epochs=2") == [
        f"torchrun --standalone --nproc_per_node 8 lipnext_scale/train.py {RECIPE} train.epochs=2"
    ]


def test_single_node_port(bin_dir):
    assert dry_run(bin_dir, "--gpus=4", "--port=29700", RECIPE) == [
        f"deepspeed --num_gpus 4 --master_port 29700 lipnext_scale/train.py {RECIPE}"
    ]
    assert dry_run(bin_dir, "--launcher", "torchrun", "--port", "29700", "--gpus", "4", RECIPE) == [
        "torchrun --nnodes 1 --master_addr 127.0.0.1 --master_port 29700 --nproc_per_node 4 "
        f"lipnext_scale/train.py {RECIPE}"
    ]


def test_cpu_exports_ds_accelerator(bin_dir):
    assert dry_run(bin_dir, "--cpu", "--gpus", "2", RECIPE) == [
        f"env DS_ACCELERATOR=cpu deepspeed --num_gpus 2 lipnext_scale/train.py {RECIPE}"
    ]


def test_overrides_pass_through_verbatim_and_quoted(bin_dir):
    overrides = ["train.epochs=2", "run.name=my run", "run.note=it's $HOME *", "data.path="]
    (line,) = dry_run(bin_dir, "--gpus", "2", RECIPE, *overrides)
    assert line == (
        f"deepspeed --num_gpus 2 lipnext_scale/train.py {RECIPE} train.epochs=2 'run.name=my run' "
        "'run.note=it'\\''s $HOME *' data.path="
    )
    assert shlex.split(line) == ["deepspeed", "--num_gpus", "2", "lipnext_scale/train.py", RECIPE, *overrides]


def test_cuda_visible_devices_selects_listed_gpus_for_deepspeed(bin_dir):
    # deepspeed --num_gpus would ignore CUDA_VISIBLE_DEVICES, so the listed GPUs are named.
    assert dry_run(bin_dir, "--gpus", "2", RECIPE, env={"CUDA_VISIBLE_DEVICES": "3,5,6"}) == [
        f"deepspeed --include localhost:3,5 lipnext_scale/train.py {RECIPE}"
    ]
    err = fails(bin_dir, "--dry-run", "--gpus", "4", RECIPE, env={"CUDA_VISIBLE_DEVICES": "3,5,6"})
    assert "--gpus 4 exceeds the 3 GPU(s) in CUDA_VISIBLE_DEVICES='3,5,6'" in err


def test_works_from_any_directory(bin_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The command runs in the current directory (run.output_dir is relative to it, as for train.py);
    # a recipe path not found there is taken from the repository.
    assert dry_run(bin_dir, "--gpus", "1", RECIPE, cwd=elsewhere) == [
        f"deepspeed --num_gpus 1 {REPO}/lipnext_scale/train.py {REPO}/{RECIPE}"
    ]
    local = elsewhere / "my recipe.yaml"
    local.write_text("model: {}\n")
    assert dry_run(bin_dir, "--gpus", "1", "my recipe.yaml", cwd=elsewhere) == [
        f"deepspeed --num_gpus 1 {REPO}/lipnext_scale/train.py 'my recipe.yaml'"
    ]


# ----------------------------------------------------------------------------------------------------
# SLURM


def test_slurm_with_nodelist(bin_dir):
    (line,) = dry_run(bin_dir, "--nodes", "2", "--gpus", "8", "--nodelist", "node[01-02]", RECIPE, "a.b=1")
    assert line == (
        "env MASTER_ADDR=node01 MASTER_PORT=29500 srun --nodes=2 --ntasks=16 --ntasks-per-node=8 "
        "--gpus-per-node=8 '--nodelist=node[01-02]' --kill-on-bad-exit=1 "
        f"{QUOTED_TASK_SCRIPT} {RECIPE} a.b=1"
    )
    argv = shlex.split(line)
    assert argv[argv.index("-c") + 1] == TASK_SCRIPT
    assert argv[-2:] == [RECIPE, "a.b=1"]


def test_slurm_from_allocation_env(bin_dir):
    env = {"SLURM_JOB_NODELIST": "gpu[01-03,07]", "SLURM_NNODES": "4", "SLURM_GPUS_ON_NODE": "8"}
    (line,) = dry_run(bin_dir, "--nodes", "4", "--gpus", "8", "--port", "29600", RECIPE, "x=a b", env=env)
    assert line == (
        "env MASTER_ADDR=gpu01 MASTER_PORT=29600 srun --nodes=4 --ntasks=32 --ntasks-per-node=8 "
        f"--gpus-per-node=8 --kill-on-bad-exit=1 {QUOTED_TASK_SCRIPT} {RECIPE} 'x=a b'"
    )


def test_slurm_cpu_requests_no_gpus(bin_dir):
    (line,) = dry_run(bin_dir, "--cpu", "--slurm", "--nodelist", "a,b", "--gpus", "2", RECIPE)
    assert line == (
        "env DS_ACCELERATOR=cpu MASTER_ADDR=a MASTER_PORT=29500 srun --nodes=2 --ntasks=4 "
        f"--ntasks-per-node=2 --nodelist=a,b --kill-on-bad-exit=1 {QUOTED_TASK_SCRIPT} {RECIPE}"
    )


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a,b", ["a", "b"]),
        ("n[8-10],login", ["n8", "n9", "n10", "login"]),
        ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
        ("single", ["single"]),
    ],
)
def test_nodelist_expansion_without_scontrol(bin_dir, nodelist, hosts):
    (line,) = dry_run(bin_dir, "--slurm", "--nodelist", nodelist, "--gpus", "1", RECIPE)
    assert f"MASTER_ADDR={hosts[0]} " in line
    assert f" --nodes={len(hosts)} " in line
    err = fails(
        bin_dir, "--dry-run", "--nodes", str(len(hosts) + 1), "--nodelist", nodelist, "--gpus", "1", RECIPE
    )
    assert f"which has {len(hosts)} host(s): {' '.join(hosts)}" in err


@pytest.mark.parametrize("nodelist", ["gpu[01-", "gpu[3-1]", "gpu[a-b]", "gpu01]", "a,,b", "gpu[]"])
def test_bad_nodelist(bin_dir, nodelist):
    err = fails(bin_dir, "--dry-run", "--nodelist", nodelist, "--gpus", "1", RECIPE)
    assert f"cannot expand the SLURM node list '{nodelist}'" in err


def test_scontrol_expands_the_nodelist_when_present(bin_dir):
    fake_tool(bin_dir, "scontrol", "alpha\nbeta\n")
    (line,) = dry_run(bin_dir, "--nodes", "2", "--gpus", "1", RECIPE, env={"SLURM_JOB_NODELIST": "whatever"})
    assert line.startswith("env MASTER_ADDR=alpha MASTER_PORT=29500 srun --nodes=2 --ntasks=2 ")


def test_each_task_derives_its_own_rank(bin_dir):
    """Run the printed per-task wrapper as srun would, for two different tasks."""
    (line,) = dry_run(bin_dir, "--nodes", "2", "--gpus", "4", "--nodelist", "n[1-2]", RECIPE, "k=v w")
    argv = shlex.split(line)
    wrapper = argv[argv.index("bash") : argv.index("launch-task") + 1]
    assert argv[argv.index("launch-task") + 1 :] == [
        "python",
        "-u",
        "lipnext_scale/train.py",
        RECIPE,
        "k=v w",
    ]
    show = [
        sys.executable,
        "-c",
        "import os, sys; print(os.environ['RANK'], os.environ['LOCAL_RANK'], "
        "os.environ['WORLD_SIZE'], sys.argv[1:])",
        "k=v w",
    ]
    seen = []
    for procid, localid in [(0, 0), (6, 2)]:
        env = {
            "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(localid),
            "SLURM_NTASKS": "8",
            "PATH": os.environ["PATH"],
        }
        out = subprocess.run([BASH, *wrapper[1:], *show], env=env, capture_output=True, text=True, check=True)
        seen.append(out.stdout.strip())
    assert seen == ["0 0 8 ['k=v w']", "6 2 8 ['k=v w']"]


def test_slurm_nodes_disagree_with_allocation(bin_dir):
    env = {"SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "2"}
    err = fails(bin_dir, "--dry-run", "--nodes", "3", "--gpus", "8", RECIPE, env=env)
    assert "--nodes 3 does not match" in err and "SLURM_JOB_NODELIST='node[01-02]'" in err
    assert "2 host(s): node01 node02" in err
    env = {"SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "3"}
    err = fails(bin_dir, "--dry-run", "--nodes", "2", "--gpus", "8", RECIPE, env=env)
    assert "--nodes 2 does not match the SLURM allocation: SLURM_NNODES=3" in err


def test_slurm_nodes_disagree_with_nodelist(bin_dir):
    err = fails(bin_dir, "--dry-run", "--nodes", "3", "--nodelist", "node[01-02]", "--gpus", "8", RECIPE)
    assert "--nodes 3 does not match --nodelist 'node[01-02]', which has 2 host(s): node01 node02" in err


def test_slurm_gpus_exceed_allocation(bin_dir):
    env = {"SLURM_JOB_NODELIST": "a,b", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4"}
    err = fails(bin_dir, "--dry-run", "--nodes", "2", "--gpus", "8", RECIPE, env=env)
    assert "--gpus 8 exceeds the allocation's SLURM_GPUS_ON_NODE=4" in err


def test_multi_node_without_allocation(bin_dir):
    err = fails(bin_dir, "--dry-run", "--nodes", "2", "--gpus", "8", RECIPE)
    assert "needs a SLURM allocation (SLURM_JOB_NODELIST) or --nodelist" in err


def test_slurm_rejects_launcher(bin_dir):
    err = fails(bin_dir, "--dry-run", "--launcher", "torchrun", "--nodelist", "a,b", "--gpus", "8", RECIPE)
    assert "--launcher torchrun cannot be used in a SLURM run" in err


# ----------------------------------------------------------------------------------------------------
# Hostfile


def write_hostfile(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_hostfile(bin_dir, tmp_path):
    hosts = write_hostfile(
        tmp_path / "hosts.txt",
        "# cluster\n\nworker-1 slots=8   # first host\n  worker-2 slots=16\nworker-3 slots=8\n",
    )
    assert dry_run(bin_dir, "--hostfile", str(hosts), "--gpus", "8", RECIPE, "train.epochs=2") == [
        f"deepspeed --hostfile {hosts} --num_nodes 3 --num_gpus 8 --master_addr worker-1 --master_port 29500 "
        f"lipnext_scale/train.py {RECIPE} train.epochs=2"
    ]


def test_hostfile_relative_to_cwd(bin_dir, tmp_path):
    write_hostfile(tmp_path / "hosts", "h1 slots=2\nh2 slots=2\n")
    assert dry_run(bin_dir, "--hostfile", "hosts", "--port", "1234", "--gpus", "2", RECIPE, cwd=tmp_path) == [
        "deepspeed --hostfile hosts --num_nodes 2 --num_gpus 2 --master_addr h1 "
        f"--master_port 1234 {REPO}/lipnext_scale/train.py {REPO}/{RECIPE}"
    ]


def test_hostfile_slots_fewer_than_gpus(bin_dir, tmp_path):
    hosts = write_hostfile(tmp_path / "hosts", "h1 slots=8\n# h0 slots=1\nh2 slots=4\n")
    err = fails(bin_dir, "--dry-run", "--hostfile", str(hosts), "--gpus", "8", RECIPE)
    assert "line 3: host h2 has slots=4, fewer than --gpus 8" in err


@pytest.mark.parametrize("bad", ["h2", "h2 slots=", "h2 slot=8", "h2 slots=8 extra", "h2 slots=x"])
def test_hostfile_malformed_line(bin_dir, tmp_path, bad):
    hosts = write_hostfile(tmp_path / "hosts", f"h1 slots=8\n\n{bad}\n")
    err = fails(bin_dir, "--dry-run", "--hostfile", str(hosts), "--gpus", "8", RECIPE)
    assert f"line 3 is malformed: '{bad}'" in err


def test_hostfile_without_hosts(bin_dir, tmp_path):
    hosts = write_hostfile(tmp_path / "hosts", "# nothing here\n\n   \n")
    err = fails(bin_dir, "--dry-run", "--hostfile", str(hosts), "--gpus", "1", RECIPE)
    assert "has no hosts" in err


def test_hostfile_duplicate_host(bin_dir, tmp_path):
    hosts = write_hostfile(tmp_path / "hosts", "h1 slots=8\nh1 slots=8\n")
    err = fails(bin_dir, "--dry-run", "--hostfile", str(hosts), "--gpus", "1", RECIPE)
    assert "line 2: host h1 is already listed on line 1" in err


def test_hostfile_nodes_mismatch_and_missing_file(bin_dir, tmp_path):
    hosts = write_hostfile(tmp_path / "hosts", "h1 slots=8\nh2 slots=8\n")
    err = fails(bin_dir, "--dry-run", "--nodes", "3", "--hostfile", str(hosts), "--gpus", "8", RECIPE)
    assert "--nodes 3 does not match hostfile" in err and "2 host(s): h1 h2" in err
    err = fails(bin_dir, "--dry-run", "--hostfile", str(tmp_path / "nope"), "--gpus", "8", RECIPE)
    assert "hostfile not found" in err


def test_hostfile_rejects_torchrun(bin_dir, tmp_path):
    hosts = write_hostfile(tmp_path / "hosts", "h1 slots=8\n")
    err = fails(
        bin_dir, "--dry-run", "--launcher", "torchrun", "--hostfile", str(hosts), "--gpus", "8", RECIPE
    )
    assert "--launcher torchrun cannot be used with --hostfile" in err


# ----------------------------------------------------------------------------------------------------
# Other fail-fast checks


def test_missing_recipe(bin_dir):
    assert "recipe not found: 'recipes/nope.yaml'" in fails(
        bin_dir, "--dry-run", "--gpus", "1", "recipes/nope.yaml"
    )
    assert "missing RECIPE" in fails(bin_dir, "--dry-run", "--gpus", "1")


@pytest.mark.parametrize("gpus", ["0", "-1", "x", "1.5", "", "00"])
def test_bad_gpus(bin_dir, gpus):
    err = fails(bin_dir, "--dry-run", "--gpus", gpus, RECIPE)
    assert f"--gpus must be a positive integer, got '{gpus}'" in err


def test_missing_gpus_and_values(bin_dir):
    assert "missing --gpus N" in fails(bin_dir, "--dry-run", RECIPE)
    assert "option --gpus needs a value" in fails(bin_dir, "--gpus")
    assert "option --gpus needs a value, got '--dry-run'" in fails(bin_dir, "--gpus", "--dry-run", RECIPE)
    assert "--nodes must be a positive integer, got 'two'" in fails(
        bin_dir, "--nodes", "two", "--gpus", "1", RECIPE
    )
    assert "--port must be an integer in 1..65535, got '70000'" in fails(
        bin_dir, "--port", "70000", "--gpus", "1", RECIPE
    )
    assert "--launcher must be deepspeed or torchrun, got 'mpirun'" in fails(
        bin_dir, "--launcher", "mpirun", "--gpus", "1", RECIPE
    )


def test_unknown_option(bin_dir):
    assert "unknown option '--bogus'" in fails(bin_dir, "--dry-run", "--bogus", "--gpus", "1", RECIPE)
    assert "unknown option '--bogus=3'" in fails(bin_dir, "--bogus=3", "--gpus", "1", RECIPE)
    assert "option --dry-run takes no value" in fails(bin_dir, "--dry-run=1", "--gpus", "1", RECIPE)


def test_launcher_option_after_recipe_is_refused(bin_dir):
    # Would otherwise start a real run with --dry-run handed to train.py.
    err = fails(bin_dir, "--gpus", "1", RECIPE, "train.epochs=2", "--dry-run")
    assert "launcher option '--dry-run' after the recipe path" in err


def test_gpus_exceed_visible_gpus(bin_dir):
    # Not a dry run: stops at the check, before looking for deepspeed (absent from PATH here anyway).
    fake_tool(bin_dir, "nvidia-smi", "GPU 0: NVIDIA H100 (UUID: GPU-a)\nGPU 1: NVIDIA H100 (UUID: GPU-b)\n")
    err = fails(bin_dir, "--gpus", "4", RECIPE)
    assert "--gpus 4 exceeds the 2 GPU(s) visible on this node (nvidia-smi -L)" in err
    err = fails(bin_dir, "--gpus", "2", RECIPE, env={"CUDA_VISIBLE_DEVICES": "1"})
    assert "--gpus 2 exceeds the 1 GPU(s) in CUDA_VISIBLE_DEVICES='1'" in err
    # a dry run skips the nvidia-smi check; --cpu skips both
    assert dry_run(bin_dir, "--gpus", "4", RECIPE) == [
        f"deepspeed --num_gpus 4 lipnext_scale/train.py {RECIPE}"
    ]
    assert "'deepspeed' not found in PATH" in fails(bin_dir, "--cpu", "--gpus", "4", RECIPE)


def test_missing_launcher_command(bin_dir):
    fake_tool(bin_dir, "nvidia-smi", "GPU 0: NVIDIA H100 (UUID: GPU-a)\n")
    assert "'torchrun' not found in PATH" in fails(bin_dir, "--launcher", "torchrun", "--gpus", "1", RECIPE)
    assert "'srun' not found in PATH" in fails(bin_dir, "--nodelist", "a,b", "--gpus", "1", RECIPE)


def test_help_documents_every_option(bin_dir):
    proc = launch(bin_dir, "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    for option in (
        "--gpus",
        "--nodes",
        "--launcher",
        "--hostfile",
        "--nodelist",
        "--slurm",
        "--port",
        "--python",
        "--cpu",
        "--dry-run",
        "--help",
        "Examples:",
        "gpu[01-03,07]",
        "scontrol",
    ):
        assert option in proc.stdout, option
    assert launch(bin_dir, "-h").stdout == proc.stdout


def test_gpus_without_any_gpu_is_refused_unless_cpu(bin_dir):
    err = fails(bin_dir, "--gpus", "8", "recipes/in1k_1b.yaml")
    assert "no GPU is visible here" in err and "--cpu" in err
    err = fails(bin_dir, "--nodelist", "a,b", "--gpus", "8", "recipes/in1k_1b.yaml")
    assert "no GPU is visible here" in err
    assert "'deepspeed' not found in PATH" in fails(bin_dir, "--cpu", "--gpus", "8", "recipes/in1k_1b.yaml")


def test_slurm_job_port_cpus_and_unconfigured_scontrol(bin_dir):
    # scontrol installed without a configuration (a laptop with slurm-client) fails: the script's own
    # expander takes over. The port derives from the job id; srun gets the job's CPUs per task.
    script = bin_dir / "scontrol"
    script.write_text(
        f"#!{BASH}\necho 'scontrol: fatal: Could not establish a configuration source' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    env = {
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "123456",
        "SLURM_CPUS_PER_TASK": "12",
    }
    (line,) = dry_run(bin_dir, "--cpu", "--nodes", "2", "--gpus", "1", RECIPE, env=env)
    assert line.startswith(
        "env DS_ACCELERATOR=cpu MASTER_ADDR=n1 MASTER_PORT=23456 srun --nodes=2 --ntasks=2 "
        "--ntasks-per-node=1 --cpus-per-task=12 "
    )


def test_missing_shard_manifest_is_one_line_on_rank_0(tmp_path):
    # A real 2-rank CPU launch (DeepSpeed launcher; torchrun adds its own traceback for any failed worker)
    # from a directory without the ImageNet shards.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [BASH, str(LAUNCH), "--cpu", "--gpus", "2", "recipes/in1k_1b.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "shard manifest" in errors[0] and "tools/make_shards.py" in errors[0], errors
