"""What every launcher shares: argument errors as user errors, the command that resumes an
interrupted run, and a ``main`` that cannot hang.

Kept free of torch imports so a bad recipe or flag is reported in well under a second.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence

from pocl_ds.errors import PoclError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a ``PoclError`` (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise PoclError(f"command line: {message}")


# A run stopped by a signal exits as a shell reports it: 130 after Ctrl-C; after SIGTERM (a
# cluster's preemption notice) 0, as the run saved its work and a requeue resumes it.
EXIT_CODE_AFTER = {"SIGINT": 130, "SIGTERM": 0}


def resume_command(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The command line that continues this run: this job's launcher (as far as its
    environment tells), the script with its arguments, and ``--resume auto``."""
    argv = list(sys.argv if argv is None else argv)
    env = os.environ if environ is None else environ
    args, rest = [], iter(argv[1:])
    for arg in rest:
        name = arg.split("=", 1)[0]
        if name in ("--resume", "--local_rank", "--local-rank"):
            if "=" not in arg:
                next(rest, None)  # the option's value
            continue
        args.append(arg)
    return shlex.join([*_launcher(env), argv[0], *args, "--resume", "auto"])


def _launcher(env: Mapping[str, str]) -> list[str]:
    """The launcher's command words: torchrun and the DeepSpeed launcher by the variables
    they set, SLURM by its own, else plain python (mpirun installs no signal handler)."""
    if "TORCHELASTIC_RUN_ID" in env:
        nodes = int(env.get("GROUP_WORLD_SIZE", "1"))
        words = ["torchrun", f"--nproc_per_node={env.get('LOCAL_WORLD_SIZE', '1')}"]
        return words + ([f"--nnodes={nodes}"] if nodes > 1 else [])
    if "CROSS_SIZE" in env and "LOCAL_SIZE" in env:  # deepspeed.launcher.launch
        nodes = int(env["CROSS_SIZE"])
        words = ["deepspeed", f"--num_gpus={env['LOCAL_SIZE']}"]
        return words + ([f"--num_nodes={nodes}"] if nodes > 1 else [])
    if "SLURM_NTASKS" in env:
        return ["srun", "-n", env["SLURM_NTASKS"], "python"]
    return ["python"]


def _distributed_world() -> tuple[int, int]:
    if "torch" not in sys.modules:
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def release_shm_buffer(environ: dict[str, str] | None = None) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment in /dev/shm.

    DeepSpeed's shared-memory all-reduce (its CPU accelerator) maps one 66 MB segment per rank,
    named after the user, MASTER_ADDR, MASTER_PORT and the rank, and never unlinks it: every
    CPU job would leave its segments behind, in RAM, until the machine reboots. At exit every
    peer has long opened the segment, and an unlinked segment stays mapped in processes still
    holding it, so each rank removes its own name.
    """
    env = os.environ if environ is None else environ
    parts = (env.get("MASTER_ADDR"), env.get("MASTER_PORT"), env.get("RANK"))
    if None in parts:
        return
    addr, port, rank = parts
    name = f"/dev/shm/{SHM_BUFFER_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"
    with contextlib.suppress(OSError):
        os.unlink(name)


def run_main(main: Callable[[], int | None]) -> None:
    """Run a launcher's ``main`` so that any failure ends the whole job promptly.

    A user error (``PoclError``) prints one line and exits 2; anything else prints its
    traceback and exits 1. ``os._exit`` skips interpreter teardown on purpose: tearing down a
    process group (or MPI) whose peer has died blocks, and the launcher only kills the other
    ranks once this one has gone.
    """
    code = 0
    try:
        code = main() or 0
    except PoclError as err:
        sys.stderr.write(f"error: {err}\n")
        code = 2
    except KeyboardInterrupt:
        code = 130
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 2)
    except BaseException:  # any crash must end the job, not hang it
        sys.stderr.write(f"[rank {_distributed_world()[0]}] " + traceback.format_exc())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    _, world = _distributed_world()
    if code == 0 and world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        # mpirun counts an exit without MPI_Finalize as a failure, so a clean run finalizes;
        # a failed one aborts instead, which also stops the ranks blocked in a collective.
        if code == 0:
            MPI.Finalize()
        else:
            MPI.COMM_WORLD.Abort(code)
    release_shm_buffer()
    logging.shutdown()
    os._exit(code)
