"""launch/difficulty_check.py: ρ of each difficulty signal against the known level."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.difficulty_check import level_report
from pocl_ds.data import InstructionSample, load_instructions
from pocl_ds.models import load_causal_lm, train_bpe_tokenizer
from pocl_ds.synthetic import write_synthetic_tasks

SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "difficulty_check.py"


def _sample(i: int, level: int, category: str) -> InstructionSample:
    return InstructionSample(
        index=i,
        instruction="",
        input="",
        references=("x",),
        prompt="p",
        difficulty=level,
        category=category,
    )


def test_signals_that_follow_the_level_score_rho_one_and_inverted_ones_minus_one():
    samples = [_sample(i, level, "a") for i, level in enumerate([1, 2, 3, 4, 1, 2, 3, 4])]
    ce = [0.1, 0.5, 0.9, 1.3, 0.2, 0.6, 1.0, 1.4]  # harder level, higher CE
    rouge = [0.9, 0.7, 0.5, 0.3, 0.8, 0.6, 0.4, 0.2]  # harder level, lower ROUGE-L
    report = level_report(samples, ce, rouge)
    rho = report["spearman"]
    assert rho["ce"] == pytest.approx(0.976, abs=1e-3)  # ties within a level broken by index
    assert rho["rouge"] == pytest.approx(0.976, abs=1e-3)
    assert rho["fusion"] == pytest.approx(0.976, abs=1e-3)
    inverted = level_report(samples, [-v for v in ce], [-v for v in rouge])["spearman"]
    assert inverted["ce"] == pytest.approx(-0.976, abs=1e-3)
    assert inverted["fusion"] == pytest.approx(-0.976, abs=1e-3)


def test_per_level_means_are_grouped_by_category_and_level():
    samples = [_sample(0, 1, "a"), _sample(1, 1, "a"), _sample(2, 2, "b")]
    cells = level_report(samples, [1.0, 3.0, 5.0], [0.5, 0.0, 1.0])["by_level"]
    assert cells == [
        {"category": "a", "level": 1, "samples": 2, "ce": 2.0, "rouge_l": 25.0},
        {"category": "b", "level": 2, "samples": 1, "ce": 5.0, "rouge_l": 100.0},
    ]


def test_cli_scores_a_saved_model_and_writes_the_report(tmp_path):
    data = write_synthetic_tasks(tmp_path / "tasks.jsonl", num_samples=40, seed=0, scale="easy")
    samples = load_instructions(data)
    model_dir = tmp_path / "model"
    tokenizer = train_bpe_tokenizer(
        [s.prompt + s.references[0] for s in samples], vocab_size=300, save_dir=model_dir
    )
    tiny = {
        "family": "gpt2",
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "max_positions": 512,
    }
    load_causal_lm(inline_config=tiny, vocab_size=len(tokenizer), seed=0).save_pretrained(model_dir)
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--json",
            str(out),
            "--max-length",
            "512",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Spearman ρ of measured rank against known level" in done.stdout
    report = json.loads(out.read_text())
    assert set(report["spearman"]) == {"ce", "rouge", "fusion"}
    assert all(-1 <= v <= 1 for v in report["spearman"].values())
    assert sum(cell["samples"] for cell in report["by_level"]) == 40


def test_cli_refuses_data_without_a_difficulty_field(tmp_path):
    data = tmp_path / "plain.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tmp_path), "--data", str(data)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "no difficulty field" in done.stderr
