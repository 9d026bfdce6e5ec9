"""Process-group setup that behaves the same under every launcher, and object collectives.

Launchers and how each one tells a process who it is:

- ``deepspeed --num_gpus N`` and ``torchrun --nproc_per_node N``: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT.
- ``mpirun -np N``: Open MPI / PMI variables; ranks and the master address come from mpi4py.
- SLURM (``srun``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the job's node list.
- plain ``python``: nothing; a world of one.

Everything is turned into the torch variables above, then ``deepspeed.init_distributed`` starts
the process group, so the rest of the code never asks which launcher ran it. Going past one
machine is the launcher's job (a DeepSpeed hostfile, ``torchrun --nnodes``, ``srun -N``).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_PORT = 29500
Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def _export_from_mpi() -> None:
    # Finalizing MPI at exit makes a job with one failed rank hang forever in MPI_Finalize, so
    # switch it off before mpi4py (or DeepSpeed's own discovery) first imports MPI.
    import mpi4py

    mpi4py.rc.finalize = False
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    master = comm.bcast(socket.gethostbyname(socket.gethostname()) if rank == 0 else None, 0)
    port = comm.bcast(
        int(os.environ.get("MASTER_PORT", 0)) or _free_port() if rank == 0 else None, 0
    )
    local_rank = int(
        os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("MPI_LOCALRANKID", 0))
    )
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local_rank),
        MASTER_ADDR=os.environ.get("MASTER_ADDR", master),
        MASTER_PORT=str(port),
    )


def detect_launcher(environ: dict[str, str] | None = None) -> str:
    """Name the launcher that started this process: torch, mpi, slurm or none."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torch"
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env:
        return "mpi"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    return "none"


def init_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Start the process group (idempotent) and return this process's place in it."""
    launcher = detect_launcher()
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _local_rank(), launcher)
    if launcher == "mpi":
        _export_from_mpi()
    elif launcher == "slurm":
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        )
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
        os.environ.setdefault("MASTER_PORT", str(DEFAULT_PORT))
    elif launcher == "none":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = get_accelerator().communication_backend_name()
    if not torch.cuda.is_available():
        backend = "gloo"  # the CPU accelerator may name ccl, which needs oneCCL; gloo just works
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(_local_rank())
    info = DistInfo(dist.get_rank(), dist.get_world_size(), _local_rank(), launcher)
    logger.debug("initialised %s", info)
    return info


def share_cores() -> None:
    """Give each rank on this machine its share of the cores, unless OMP_NUM_THREADS already
    says how many: ranks that each take every core fight over them. Call before any work."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Every rank returns rank ``src``'s ``obj`` (picklable)."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank returns ``[obj of rank 0, obj of rank 1, ...]``."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


_queues_opened = 0  # the same count on every rank: each queue's key in the store


def claim_indices(count: int) -> Iterator[int]:
    """0 … count − 1, each handed to exactly one rank: whichever asks for the next one first.

    Collective: every rank opens the same queues in the same order (the key of a queue is its
    number). Ranks take items through the process group's key-value store (one small request
    per item), so a rank whose items run long takes fewer: the work balances by time, not by
    count. One rank: 0 … count − 1 in order.
    """
    global _queues_opened
    _queues_opened += 1
    if world_size() == 1:
        return iter(range(count))
    store = dist.distributed_c10d._get_default_store()
    key = f"pocl_ds/queue/{_queues_opened}"

    def claims() -> Iterator[int]:
        while (index := store.add(key, 1) - 1) < count:
            yield index

    return claims()


def score_and_gather(
    items: Sequence[Item],
    score_share: Callable[[Iterable[Item]], Sequence[Result]],
    *,
    balance: bool = False,
) -> list[Result]:
    """Each rank scores its share of ``items``; every rank returns all results in item order.

    Collective: every rank passes the same ``items``. Rank r gets items r, r + world,
    r + 2·world, ... (round robin, so a list sorted by cost spreads the costly items evenly);
    with ``balance`` a rank takes the next unclaimed item whenever it is free
    (``claim_indices``), for items whose cost is unknown in advance (generation), as long as
    ``score_share`` needs no step-by-step agreement between ranks. ``score_share`` gets the
    share (a list, or an iterator with ``balance``) and returns one picklable result per item,
    in order, possibly none. A result depends only on its item, never on the number of ranks or
    on who scored it, so one rank and many give the same list.
    """
    world, me = world_size(), rank()
    if balance and world > 1:
        claims, claimed = claim_indices(len(items)), []

        def share_items() -> Iterator[Item]:
            for index in claims:
                claimed.append(index)
                yield items[index]

        results = list(score_share(share_items()))
        if len(results) != len(claimed):
            raise ValueError(
                f"score_share returned {len(results)} results for {len(claimed)} items"
            )
        merged: list[Any] = [None] * len(items)
        for indices, part in all_gather_objects((claimed, results)):
            for index, result in zip(indices, part, strict=True):
                merged[index] = result
        return merged
    share = list(items[me::world])
    results = list(score_share(share))
    if len(results) != len(share):
        raise ValueError(f"score_share returned {len(results)} results for {len(share)} items")
    merged: list[Any] = [None] * len(items)
    for source, part in enumerate(all_gather_objects(results)):
        expected = len(range(source, len(items), world))
        if len(part) != expected:
            raise RuntimeError(
                f"rank {source} scored {len(part)} items where {expected} were its share: every "
                "rank must pass the same items to score_and_gather"
            )
        merged[source::world] = part
    return merged


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Rank ``dst`` returns every rank's ``obj`` in rank order; the others return None."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_reduce_sums(values: torch.Tensor) -> list[float]:
    """Sum a vector over ranks in one collective; the sums as Python floats (one host read).

    ``values`` may live on the device (the trainer's loss sums): it is reduced in float64 there.
    """
    vector = values.detach().to(torch.float64).reshape(-1)
    if world_size() > 1:
        if torch.cuda.is_available():
            vector = vector.cuda()
        dist.all_reduce(vector)
    return vector.tolist()


def all_reduce_sum(value: float | int) -> float:
    """Sum a Python number over ranks (used for global token counts and timings)."""
    if world_size() == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if torch.cuda.is_available():
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor.item())
