"""The launchers' command line: options and overrides in any order, the resume command."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

import pytest

from pocl_ds.cli import resume_command
from tests.launchers import REPO, environment

TRAIN = REPO / "launch" / "train.py"
TINY = str(REPO / "launch" / "configs" / "tiny.yaml")


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", TINY, "--resume", "auto", "train.lr=-1.0"],
        ["train.lr=-1.0", "--config", TINY, "--resume", "auto"],
        ["--config", TINY, "train.seed=3", "--resume", "auto", "train.lr=-1.0"],
    ],
    ids=["override-last", "override-first", "interleaved"],
)
def test_options_and_overrides_in_any_order_reach_config_validation(argv):
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(TRAIN), *argv],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 2, done.stderr[-2000:]
    # The override was parsed and validated (not "unrecognized arguments"), before torch loads.
    assert done.stderr.strip().splitlines() == [
        "error: train.lr: got -1.0, allowed range (0.0, 1.0]"
    ], done.stderr[-2000:]
    assert seconds < 10, seconds  # well under a second on a quiet machine


SCRIPT_ARGS = ["launch/train.py", "--config", "r.yaml", "train.lr=1e-3", "--resume", "none"]


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (
            [SCRIPT_ARGS[0], "--local_rank=1", *SCRIPT_ARGS[1:]],
            {"CROSS_SIZE": "1", "LOCAL_SIZE": "2", "RANK": "1", "WORLD_SIZE": "2"},
            "deepspeed --num_gpus=2 launch/train.py --config r.yaml train.lr=1e-3",
        ),
        (
            SCRIPT_ARGS,
            {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2"},
            "torchrun --nproc_per_node=4 --nnodes=2 launch/train.py --config r.yaml train.lr=1e-3",
        ),
        (
            [*SCRIPT_ARGS[:4], "--resume=step-00000006", "train.seed=1"],
            {"SLURM_NTASKS": "8"},
            "srun -n 8 python launch/train.py --config r.yaml train.lr=1e-3 train.seed=1",
        ),
        (
            ["launch/train.py", "--config", "my recipe.yaml", "--local-rank", "0"],
            {},
            "python launch/train.py --config 'my recipe.yaml'",
        ),
    ],
    ids=["deepspeed", "torchrun", "slurm", "python"],
)
def test_resume_command_names_the_launcher_and_the_same_arguments(argv, environ, expected):
    command = resume_command(argv, environ)
    assert command == expected + " --resume auto"
    assert shlex.split(command)[-2:] == ["--resume", "auto"]
