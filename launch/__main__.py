"""Print (or, with --run, execute) the command that launches training in one of four modes.

    python -m launch torchrun  --nproc-per-node 4 -- --config configs/demo.yaml
    python -m launch multinode --nnodes 2 --nproc-per-node 4 --endpoint node0:29400 --id run1 \\
        --max-restarts 3 -- --config configs/demo.yaml
    python -m launch deepspeed --hostfile hostfile --master-addr node0 -- \\
        --config configs/demo_deepspeed.yaml
    python -m launch slurm --nodes 2 --nproc-per-node 4 --out job.sbatch -- --config ...

Everything after `--` goes to `python -m train`. Without --run the command is printed (one
line, shell-quoted) to copy or to edit; `--run` replaces this process with it (under this
interpreter). `slurm` writes an sbatch script (stdout, or --out). See docs/launch.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from launch.commands import (
    deepspeed_hostfile,
    slurm_script,
    torchrun_multinode,
    torchrun_single,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)

    def mode(name: str, help: str) -> argparse.ArgumentParser:
        sub = modes.add_parser(name, help=help)
        if name != "slurm":
            sub.add_argument("--run", action="store_true", help="execute instead of printing")
        sub.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train arguments")
        return sub

    single = mode("torchrun", "torchrun on one node (standalone rendezvous)")
    single.add_argument("--nproc-per-node", type=int, required=True)

    multi = mode("multinode", "torchrun on several nodes: c10d rendezvous, restarts")
    multi.add_argument("--nnodes", required=True, help="N or MIN:MAX")
    multi.add_argument("--nproc-per-node", type=int, required=True)
    multi.add_argument("--endpoint", required=True, help="host:port of the rendezvous store")
    multi.add_argument("--id", required=True, help="rendezvous id shared by all nodes")
    multi.add_argument("--max-restarts", type=int, default=3)

    ds = mode("deepspeed", "the deepspeed launcher over a hostfile")
    ds.add_argument("--hostfile", required=True, help='lines "host slots=N"')
    ds.add_argument("--master-addr", required=True, help="address of the first host")
    ds.add_argument("--master-port", type=int, default=29500)
    ds.add_argument(
        "--no-ssh-check", action="store_true", help="skip the ssh probe (a localhost hostfile)"
    )

    slurm = mode("slurm", "an sbatch script (torchrun per node, rendezvous from SLURM)")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--nproc-per-node", type=int, required=True)
    slurm.add_argument("--time", default="24:00:00")
    slurm.add_argument("--job-name", default="halotron")
    slurm.add_argument("--rdzv-port", type=int, default=29400)
    slurm.add_argument("--max-restarts", type=int, default=3)
    slurm.add_argument("--out", help="write the script here instead of stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    if args.mode == "slurm":
        script = slurm_script(
            args.nodes, args.nproc_per_node, train_args, job_name=args.job_name,
            time=args.time, rdzv_port=args.rdzv_port, max_restarts=args.max_restarts,
        )  # fmt: skip
        if args.out:
            Path(args.out).write_text(script)
        else:
            sys.stdout.write(script)
        return 0
    run = args.run
    if args.mode == "torchrun":
        cmd = torchrun_single(args.nproc_per_node, train_args, executable=run)
    elif args.mode == "multinode":
        cmd = torchrun_multinode(
            args.nnodes, args.nproc_per_node, args.endpoint, args.id, train_args,
            max_restarts=args.max_restarts, executable=run,
        )  # fmt: skip
    else:
        cmd = deepspeed_hostfile(
            args.hostfile, args.master_addr, train_args, master_port=args.master_port,
            ssh_check=not args.no_ssh_check, executable=run,
        )  # fmt: skip
    if not run:
        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)  # the launcher takes this process over (signals reach it directly)


if __name__ == "__main__":
    sys.exit(main())
