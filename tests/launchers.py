"""Start a script on 2 CPU ranks under each launcher, the way a user would."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAUNCHERS = ("deepspeed", "torchrun", "mpirun")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_available(launcher: str) -> str | None:
    """None when the launcher can run here, else why not (for pytest.skip)."""
    if launcher == "mpirun":
        if shutil.which("mpirun") is None:
            return "mpirun not installed (apt-get install openmpi-bin libopenmpi-dev)"
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            return "mpi4py not installed (pip install -e .[mpi])"
    return None


def command(launcher: str, script: str | Path, args: list[str], nprocs: int = 2) -> list[str]:
    port = str(free_port())
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nprocs}",
            f"--master_port={port}",
            str(script),
            *args,
        ]
    if launcher == "deepspeed":
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        return [deepspeed, f"--num_gpus={nprocs}", f"--master_port={port}", str(script), *args]
    if launcher == "mpirun":
        return [
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            str(nprocs),
            "-x",
            f"MASTER_PORT={port}",
            sys.executable,
            str(script),
            *args,
        ]
    if launcher == "python":
        return [sys.executable, str(script), *args]
    raise ValueError(launcher)


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
    )
    # The same cache as launch/env.sh: DeepSpeed's shm op compiles once per machine.
    env.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pocl_ds" / "torch_extensions")
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def run(
    launcher: str,
    script: str | Path,
    args: list[str] | None = None,
    *,
    nprocs: int = 2,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run the job to its end; on ``timeout`` kill its whole process group (launcher and
    ranks, so a hang leaves no orphans) and fail with what it printed."""
    cmd = command(launcher, script, args or [], nprocs)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"{launcher} job timed out after {timeout:.0f} s:\n{stdout[-2000:]}{stderr[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
