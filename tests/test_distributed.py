"""Distributed init under every launcher: identical broadcasts, and a failing rank ends the job."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pocl_ds import distributed
from pocl_ds.cli import SHM_BUFFER_PREFIX
from tests.launchers import LAUNCHERS, REPO, environment, free_port, launcher_available, run

PROBE = REPO / "tests" / "scripts" / "dist_probe.py"
SHM = Path("/dev/shm")


def test_detect_launcher_from_environment():
    assert distributed.detect_launcher({"RANK": "0", "WORLD_SIZE": "2"}) == "torch"
    assert distributed.detect_launcher({"OMPI_COMM_WORLD_RANK": "1"}) == "mpi"
    assert distributed.detect_launcher({"PMI_RANK": "0"}) == "mpi"
    assert distributed.detect_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) == "slurm"
    assert distributed.detect_launcher({}) == "none"


def test_world_of_one_without_a_launcher(tmp_path):
    out = tmp_path / "probe.json"
    result = run("python", PROBE, ["broadcast", str(out)], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(out.read_text())
    assert probe["world_size"] == 1 and probe["launcher"] == "none"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_ranks_receive_the_same_broadcast(launcher, tmp_path):
    if reason := launcher_available(launcher):
        pytest.skip(reason)
    out = tmp_path / "probe.json"
    segments_before = set(SHM.glob(f"{SHM_BUFFER_PREFIX}_*"))
    result = run(launcher, PROBE, ["broadcast", str(out)], timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # DeepSpeed's CPU all-reduce segments (66 MB of RAM per rank) are gone with the job
    assert set(SHM.glob(f"{SHM_BUFFER_PREFIX}_*")) <= segments_before
    probe = json.loads(out.read_text())
    assert probe["world_size"] == 2
    assert [g["rank"] for g in probe["gathered"]] == [0, 1]
    first, second = (g["received"] for g in probe["gathered"])
    assert first == second and first["from"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_balanced_scoring_gives_the_slower_rank_fewer_items(launcher, tmp_path):
    """``score_and_gather(..., balance=True)``: ranks claim items through the store as they
    free up; the results are those of the static share, item for item."""
    if reason := launcher_available(launcher):
        pytest.skip(reason)
    out = tmp_path / "probe.json"
    result = run(launcher, PROBE, ["balance", str(out)], timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    probe = json.loads(out.read_text())
    assert probe["balanced"] == probe["static"] == [i * i for i in range(40)]
    slow, fast = probe["claimed"]
    assert slow + fast == 40 and fast >= 2 * slow, probe["claimed"]  # 4x the rate: ~32 vs 8


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_rank_that_raises_ends_the_job_promptly(launcher, tmp_path):
    if reason := launcher_available(launcher):
        pytest.skip(reason)
    started = time.monotonic()
    result = run(launcher, PROBE, ["raise", str(tmp_path / "x.json")], timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "rank 1 fails on purpose" in result.stdout + result.stderr
    assert elapsed < 60, f"{launcher} took {elapsed:.0f}s to end the job"


@pytest.mark.slow
def test_slurm_variables_are_understood(tmp_path):
    """Two processes that only have SLURM's variables (as under srun) form one job."""
    port = str(free_port())
    out = tmp_path / "probe.json"
    procs = []
    for rank in range(2):
        env = environment(
            {
                "SLURM_PROCID": str(rank),
                "SLURM_NTASKS": "2",
                "SLURM_LOCALID": str(rank),
                "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
                "MASTER_PORT": port,
            }
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(PROBE), "broadcast", str(out)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    probe = json.loads(out.read_text())
    assert probe["world_size"] == 2 and probe["launcher"] == "slurm"


@pytest.mark.slow
def test_two_nodes_of_one_rank_on_localhost(tmp_path):
    """torchrun --nnodes 2 with a shared rendezvous: nothing assumes a single node."""

    port = str(free_port())
    out = tmp_path / "probe.json"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(PROBE),
                "broadcast",
                str(out),
            ],
            cwd=REPO,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    probe = json.loads(out.read_text())
    assert probe["world_size"] == 2
    first, second = (g["received"] for g in probe["gathered"])
    assert first == second
