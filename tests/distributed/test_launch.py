"""The launch commands (`python -m launch`) and the SLURM script, without a cluster.

The single-node torchrun, multi-node c10d and deepspeed-launcher modes are run for real in
test_deepspeed_train.py and test_elastic_restart.py; here the printed commands are checked,
and the sbatch script is executed by bash with `scontrol` and `srun` replaced by small fakes
(exported bash functions: scontrol prints the allocation's host names, srun prints what it
would start), so that the rendezvous it derives from SLURM_JOB_NODELIST / SLURM_NNODES /
SLURM_JOB_ID can be checked.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from launch.commands import slurm_script


def _launch_print(args: list[str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "launch", *args], capture_output=True, text=True, check=True
    ).stdout
    return shlex.split(out)


def test_printed_commands():
    single = _launch_print(["torchrun", "--nproc-per-node", "4", "--", "--config", "c.yaml"])
    assert single == [
        "python", "-m", "launch.agent", "--standalone", "--nnodes", "1", "--nproc-per-node", "4",
        "-m", "train", "--config", "c.yaml",
    ]  # fmt: skip
    multi = _launch_print(
        ["multinode", "--nnodes", "2", "--nproc-per-node", "8", "--endpoint", "n0:29400",
         "--id", "j1", "--max-restarts", "2", "--", "--config", "c.yaml"]
    )  # fmt: skip
    assert multi[:5] == [
        "env",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
        "python",
        "-m",
        "launch.agent",
    ]
    joined = " ".join(multi)
    assert "--rdzv-backend c10d --rdzv-endpoint n0:29400 --rdzv-id j1 --max-restarts 2" in joined
    assert joined.endswith("-m train --config c.yaml --resume auto")
    ds = _launch_print(
        ["deepspeed", "--hostfile", "hf", "--master-addr", "n0", "--", "train.engine=deepspeed"]
    )
    assert ds == [
        "deepspeed", "--hostfile", "hf", "--master_addr", "n0", "--master_port", "29500",
        "--no_local_rank", "--module", "train", "train.engine=deepspeed",
    ]  # fmt: skip
    explicit = _launch_print(
        ["multinode", "--nnodes", "1:4", "--nproc-per-node", "1", "--endpoint", "h:1",
         "--id", "x", "--", "--resume", "yes"]
    )  # fmt: skip
    assert explicit[-2:] == ["--resume", "yes"] and "--nnodes" in explicit


def test_slurm_script_derives_the_rendezvous_from_slurm_variables(tmp_path):
    script = tmp_path / "job.sbatch"
    out = subprocess.run(
        [sys.executable, "-m", "launch", "slurm", "--nodes", "2", "--nproc-per-node", "4",
         "--time", "01:00:00", "--out", str(script), "--", "--config", "configs/demo.yaml"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout == ""
    text = script.read_text()
    assert text == slurm_script(2, 4, ["--config", "configs/demo.yaml"], time="01:00:00")
    assert "#SBATCH --nodes=2" in text and "#SBATCH --requeue" in text
    assert "{{" not in text

    # Fakes as exported bash functions (no freshly written executables to exec).
    fakes = (
        'scontrol() { [ "$1 $2" = "show hostnames" ] && printf "gpu-a\\ngpu-b\\n"; }; '
        'srun() { echo "store=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE"; echo "$@"; }; '
        "export -f scontrol srun; "
    )
    env = dict(os.environ, SLURM_JOB_NODELIST="gpu-[a-b]", SLURM_NNODES="2", SLURM_JOB_ID="4242")
    run = subprocess.run(
        ["bash", "-c", fakes + f"bash {shlex.quote(str(script))}"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "rendezvous gpu-a:29400" in run.stdout
    assert "store=1" in run.stdout
    srun_line = run.stdout.strip().splitlines()[-1]
    assert srun_line.split() == [
        "--kill-on-bad-exit=0", "python", "-m", "launch.agent", "--nnodes", "2",
        "--nproc-per-node", "4",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu-a:29400", "--rdzv-id", "4242",
        "--max-restarts", "3", "-m", "train", "--config", "configs/demo.yaml",
        "--resume", "auto",
    ]  # fmt: skip
