"""The launch commands of a training run, as argument lists (docs/launch.md shows each mode).

    from launch.commands import torchrun_single, torchrun_multinode, deepspeed_hostfile
    argv = torchrun_single(nproc_per_node=4, train_args=["--config", "configs/demo.yaml"])
    argv = torchrun_multinode(nnodes=2, nproc_per_node=4, endpoint="node0:29400", run_id="job1",
                              max_restarts=3, train_args=[...])
    argv = deepspeed_hostfile("hostfile", master_addr="node0", train_args=[...])
    script = slurm_script(nodes=2, nproc_per_node=4, train_args=[...])   # an sbatch file

Every mode starts `python -m train` on every process. Modes that restart or requeue the job
(multi-node elastic torchrun, SLURM) pass `--resume auto`, so a restarted job continues from
the newest complete checkpoint and a first start begins at step 0. The torchrun modes run
torchrun through `python -m launch.agent` (same arguments), whose exit status after a SIGTERM
is the ranks' own. `executable=True` gives the form that runs under this interpreter
(`sys.executable` for `python`, `python -m deepspeed.launcher.runner` for `deepspeed`).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

__all__ = [
    "torchrun_single",
    "torchrun_multinode",
    "deepspeed_hostfile",
    "slurm_script",
    "with_resume",
]

SLURM_TEMPLATE = Path(__file__).with_name("slurm.sbatch")

UNSHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
"""Multi-node restarts need it (torch 2.13): by default the workers of every rendezvous round
reuse the agents' c10d store, where the previous round's process-group keys (the dead ranks'
gloo/NCCL addresses) are still present, and a restarted rank 0 connects to a dead peer
("connectFullMesh failed ... Connection refused"). With it, every round's rank 0 hosts a fresh
store on a fresh port."""


def with_resume(train_args: list[str]) -> list[str]:
    """`train_args` with `--resume auto` unless they already say how to resume."""
    if any(a == "--resume" or a.startswith("--resume=") for a in train_args):
        return list(train_args)
    return [*train_args, "--resume", "auto"]


def _torchrun(executable: bool) -> list[str]:
    """torchrun as launch.agent runs it: SIGTERM / SIGUSR1 go to the workers, the exit status is
    theirs (a preempted run that checkpointed exits 0, where torchrun itself exits 1)."""
    return [sys.executable if executable else "python", "-m", "launch.agent"]


def torchrun_single(
    nproc_per_node: int, train_args: list[str], executable: bool = False
) -> list[str]:
    """One node: torchrun's standalone rendezvous (a free local port, no endpoint to pick)."""
    return [
        *_torchrun(executable), "--standalone", "--nnodes", "1",
        "--nproc-per-node", str(nproc_per_node), "-m", "train", *train_args,
    ]  # fmt: skip


def torchrun_multinode(
    nnodes: int | str,
    nproc_per_node: int,
    endpoint: str,
    run_id: str,
    train_args: list[str],
    max_restarts: int = 3,
    executable: bool = False,
) -> list[str]:
    """One agent per node (run the same command on every node): c10d rendezvous at `endpoint`
    (host:port of one of the nodes; that node hosts the store), `run_id` shared by the job.
    `nnodes` may be a range "MIN:MAX" (elastic). A failed worker makes every agent stop its
    workers and start them again, up to `max_restarts` times; `--resume auto` continues.
    Run under `env UNSHARED_STORE` (see there)."""
    return [
        "env", UNSHARED_STORE, *_torchrun(executable),
        "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
        "--max-restarts", str(max_restarts), "-m", "train", *with_resume(train_args),
    ]  # fmt: skip


def deepspeed_hostfile(
    hostfile: str,
    master_addr: str,
    train_args: list[str],
    master_port: int = 29500,
    ssh_check: bool = True,
    executable: bool = False,
) -> list[str]:
    """The deepspeed launcher over the hosts of `hostfile` ("host slots=N" lines). It starts the
    other hosts' processes over passwordless ssh (pdsh); a hostfile of one host runs locally.
    `ssh_check=False` skips its ssh probe of the first host (a localhost-only hostfile)."""
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"] if executable else ["deepspeed"]
    return [
        *launcher, "--hostfile", hostfile, "--master_addr", master_addr,
        "--master_port", str(master_port), *([] if ssh_check else ["--no_ssh_check"]),
        "--no_local_rank", "--module", "train", *train_args,
    ]  # fmt: skip


def slurm_script(
    nodes: int,
    nproc_per_node: int,
    train_args: list[str],
    job_name: str = "halotron",
    time: str = "24:00:00",
    rdzv_port: int = 29400,
    max_restarts: int = 3,
) -> str:
    """An sbatch script: one torchrun agent per node (srun), the c10d rendezvous endpoint taken
    from the job's first node and its id from SLURM_JOB_ID, `--resume auto` for requeues."""
    text = SLURM_TEMPLATE.read_text()
    values = {
        "JOB_NAME": job_name,
        "NODES": str(nodes),
        "TIME": time,
        "NPROC_PER_NODE": str(nproc_per_node),
        "RDZV_PORT": str(rdzv_port),
        "MAX_RESTARTS": str(max_restarts),
        "TRAIN_ARGS": shlex.join(with_resume(train_args)),
    }
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text
