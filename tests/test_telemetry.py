"""Tests for pocl_ds.telemetry: logging by rank, progress bars, metrics.jsonl, run summary."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pocl_ds.errors import PoclError
from pocl_ds.telemetry import (
    MetricsWriter,
    get_logger,
    progress,
    read_metrics,
    run_summary,
    setup_logging,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    package = logging.getLogger("pocl_ds")
    handlers, level = list(root.handlers), package.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    package.setLevel(level)


# ----------------------------------------------------------------------------- logging


def test_rank_zero_logs_info_with_time(capsys, restore_logging):
    setup_logging(rank=0)
    get_logger("launch_script").info("hello %d", 7)
    err = capsys.readouterr().err
    assert "INFO pocl_ds.launch_script: hello 7" in err
    assert err[:4].isdigit() and err[10] == " "  # starts with the date


def test_other_ranks_log_only_warnings_tagged(capsys, restore_logging):
    setup_logging(rank=1, level="DEBUG")
    log = get_logger("pocl_ds.trainer")
    log.info("not shown")
    log.warning("shown")
    err = capsys.readouterr().err
    assert "not shown" not in err
    assert "[rank 1] WARNING pocl_ds.trainer: shown" in err


def test_setup_twice_keeps_one_handler(capsys, restore_logging):
    setup_logging(rank=0)
    setup_logging(rank=0)
    get_logger("x").info("once")
    assert capsys.readouterr().err.count("once") == 1


def test_unknown_level_is_a_user_error(restore_logging):
    with pytest.raises(PoclError, match="VERBOSE"):
        setup_logging(rank=0, level="VERBOSE")


# ----------------------------------------------------------------------------- progress


def test_progress_on_rank_zero_shows_bar(capsys):
    assert list(progress(range(5), desc="scoring", unit="sample", rank=0)) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "scoring" in err and "100%" in err and "5/5" in err


def test_progress_silent_on_rank_one(capsys):
    assert list(progress(range(5), desc="scoring", rank=1)) == [0, 1, 2, 3, 4]
    with progress(total=3, desc="manual", rank=1) as bar:
        bar.update(3)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# ----------------------------------------------------------------------------- metrics


def test_metrics_written_flushed_and_read(tmp_path):
    import torch

    with MetricsWriter(tmp_path / "run", tensorboard=False) as writer:
        writer.log({"step": 1, "loss": torch.tensor(2.5), "stage": 0})
        writer.log({"step": 2, "loss": 2.0, "stage": 0})
        # readable before close: every line is flushed as written
        assert read_metrics(tmp_path / "run") == [
            {"step": 1, "loss": 2.5, "stage": 0},
            {"step": 2, "loss": 2.0, "stage": 0},
        ]
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_truncate_after_drops_later_steps_and_appends_after(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        writer.log({"step": step, "loss": 1.0 / step})
    writer.log({"step": 5, "val_rouge_l": 0.3})
    assert writer.truncate_after(3) == 3
    writer.log({"step": 4, "loss": 0.1})
    writer.close()
    assert [r["step"] for r in read_metrics(writer.path)] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))


def test_torn_last_line_is_dropped_then_appended_after(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}]
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.log({"step": 2, "loss": 0.5})
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(PoclError, match=r"metrics\.jsonl:2"):
        read_metrics(path)
    with pytest.raises(PoclError, match="no metrics file"):
        read_metrics(tmp_path / "missing")


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "rank1", enabled=False)
    writer.log({"step": 1, "loss": 1.0})
    assert writer.truncate_after(0) == 0
    writer.close()
    assert not (tmp_path / "rank1").exists()


def test_writer_enabled_by_default_in_a_world_of_one(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.log({"step": 1})
    assert writer.enabled and writer.path.is_file()


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_events_written(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.log({"step": 1, "loss": 1.5, "note": "text is skipped", "use_pocl": True})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


@pytest.mark.slow
def test_only_rank_zero_writes_and_draws_under_two_ranks(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import torch.distributed as dist
            from pocl_ds.telemetry import MetricsWriter, progress

            dist.init_process_group("gloo")
            out = sys.argv[1]
            with MetricsWriter(f"{out}/rank{dist.get_rank()}", tensorboard=False) as writer:
                for step in progress(range(3), desc=f"bar-of-rank{dist.get_rank()}"):
                    writer.log({"step": step})
            dist.destroy_process_group()
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_metrics(tmp_path / "rank0")) == 3
    assert not (tmp_path / "rank1").exists()
    assert "bar-of-rank0" in result.stderr and "bar-of-rank1" not in result.stderr


def test_run_summary_lists_everything():
    text = run_summary(
        wall_time_s=3723.4,
        tokens_per_s=12345.6,
        best_val_rouge_l=0.41234,
        best_step=120,
        outputs={"metrics": "/runs/a/metrics.jsonl", "best model": "/runs/a/best"},
    )
    assert "1:02:03" in text and "12,345.6" in text and "0.4123 (step 120)" in text
    assert "/runs/a/metrics.jsonl" in text and "/runs/a/best" in text
    assert len(text.splitlines()) <= 24
    assert "n/a" in run_summary(wall_time_s=1, tokens_per_s=None, best_val_rouge_l=None, outputs={})
