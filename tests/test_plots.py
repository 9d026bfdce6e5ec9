"""Tests for pocl_ds.plots: every figure is drawn as a PNG, also from empty inputs."""

from __future__ import annotations

import math
import random
import struct
from pathlib import Path

from pocl_ds.plots import (
    difficulty_spearman,
    plot_curriculum_timeline,
    plot_difficulty,
    plot_method_scores,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_width: int = 300, min_height: int = 200) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= min_width and height >= min_height
    assert len(data) > 5_000  # an empty canvas compresses to far less than drawn axes


def synthetic_run() -> tuple[list[dict], list[dict]]:
    stages = [
        {
            "stage": i,
            "temperature": 1 + i / 3,
            "sft_weight": 0.3 - 0.1 * i,
            "num_samples": 25 * (i + 1),
        }
        for i in range(4)
    ]
    metrics: list[dict] = []
    step = 0
    for stage in range(4):
        for epoch in range(2):
            for _ in range(5 + 3 * stage):
                step += 1
                loss = 3.0 / math.sqrt(step) + 0.1 * stage
                metrics.append(
                    {
                        "stage": stage,
                        "epoch": epoch,
                        "step": step,
                        "loss": loss,
                        "kd": loss * 0.8,
                        "ce": loss * 0.2,
                        "temperature": stages[stage]["temperature"],
                        "sft_weight": stages[stage]["sft_weight"],
                        "lr": 1e-4,
                        "tokens_per_s": 900.0,
                        "samples_seen": step * 4,
                    }
                )
            metrics.append(
                {"step": step, "val_loss": 2.0 / (1 + step / 20), "val_rouge_l": 0.1 + step / 400}
            )
    return metrics, stages


def test_plot_curriculum_timeline_writes_png(tmp_path):
    metrics, stages = synthetic_run()
    path = plot_curriculum_timeline(metrics, stages, tmp_path / "plots" / "timeline.png")
    assert path == tmp_path / "plots" / "timeline.png"
    assert_png(path)


def test_plot_curriculum_timeline_uses_given_stage_starts(tmp_path):
    metrics, stages = synthetic_run()
    explicit = [{**s, "start_step": 1 + 20 * s["stage"]} for s in stages]
    assert_png(plot_curriculum_timeline(metrics, explicit, tmp_path / "timeline.png"))


def test_plot_difficulty_writes_png(tmp_path):
    rng = random.Random(0)
    known = {index: 1 + index % 5 for index in range(60)}
    noisy = {index: level + rng.gauss(0, 1.0) for index, level in known.items()}
    order = sorted(noisy, key=lambda index: (noisy[index], index))
    records = [
        {"index": index, "score": 1 / (60 + rank), "rank": rank, "subset": (rank - 1) * 4 // 60}
        for rank, index in enumerate(order, start=1)
    ]
    assert_png(plot_difficulty(records, tmp_path / "difficulty.png", known), min_width=1000)
    assert_png(plot_difficulty(records, tmp_path / "scores_only.png"))


def test_plot_method_scores_writes_png(tmp_path):
    results = {
        "SFT": [20.1, 21.0, 19.5],
        "KD (fkl)": [23.0, 23.4, 22.8],
        "KD+POCL": [25.1, 24.2, 25.6],
    }
    assert_png(plot_method_scores(results, tmp_path / "methods.png"))


def test_plots_survive_empty_inputs(tmp_path):
    # a run that crashed before its first step still gets its pictures drawn
    assert plot_curriculum_timeline([], [], tmp_path / "timeline.png").stat().st_size > 0
    assert plot_difficulty([], tmp_path / "difficulty.png", {1: 1}).stat().st_size > 0
    assert plot_method_scores({}, tmp_path / "methods.png").stat().st_size > 0


def test_difficulty_spearman_of_a_perfect_and_a_reversed_ranking():
    records = [{"index": i, "rank": i + 1} for i in range(8)]
    assert difficulty_spearman(records, {i: i // 2 for i in range(8)}) > 0.9
    assert difficulty_spearman(records, {i: -i for i in range(8)}) == -1.0
    assert difficulty_spearman(records, {}) is None
