"""launch/demo.py end to end at a reduced size (--quick) on 2 CPU ranks under DeepSpeed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.launchers import REPO, environment, free_port, run

DEMO = REPO / "launch" / "demo.py"
SINGLE_RUNS = ("Teacher (SFT)", "Student base (pre-trained)")
STUDENTS = ("SFT", "KD (fkl)", "KD (fkl) + POCL")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_missing_data_file_is_a_one_line_user_error(tmp_path):
    result = run("python", DEMO, ["--data", str(tmp_path / "none.jsonl")], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "none.jsonl: no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_sh_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(REPO / "launch" / "demo.sh")], capture_output=True)
    assert result.returncode == 0, result.stderr


def run_quick_demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``demo.py --quick`` on 2 ranks, as launch/demo.sh launches it."""
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    launch = [deepspeed, "--num_gpus=2", f"--master_port={free_port()}"]
    result = subprocess.run(
        [*launch, str(DEMO), "--quick", *extra, "--output", str(out)],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_quick_demo_writes_table_and_plots(tmp_path):
    out = tmp_path / "demo"
    result = run_quick_demo(out)

    results = out / "results"
    table = (results / "table.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    for method in (*SINGLE_RUNS, *STUDENTS):
        assert method in rows, (method, table)
    assert "POCL's own overhead" in table
    assert "Spearman ρ" in table
    assert "pocl_ds demo results" in result.stdout
    # The results table once: the evaluation's own table stays in results/eval/table.md.
    assert result.stdout.count("| KD (fkl) + POCL |") == 1, result.stdout[-3000:]

    # Every student from the pre-trained student base, one run per training seed (--quick: 1).
    report = json.loads((results / "eval" / "eval.json").read_text(encoding="utf-8"))
    assert list(report["models"]) == [*SINGLE_RUNS, *(f"{m} · seed 1" for m in STUDENTS)]
    for method, model in report["models"].items():
        scores = model["suites"]["test"]["rouge_l"]
        assert sorted(scores["per_seed"]) == ["10", "20"], method
        assert 0.0 <= scores["mean"] <= 100.0

    summary = json.loads((results / "summary.json").read_text(encoding="utf-8"))
    assert 0.0 < summary["pocl_overhead_fraction"] < 1.0
    runs = summary["runs"]
    assert runs["kd_pocl/seed1"]["timings"]["difficulty"] > 0.0
    assert runs["kd/seed1"]["timings"]["difficulty"] == 0.0
    assert runs["teacher_base"]["method"] == runs["student_base"]["method"] == "pretrain"
    assert -1.0 <= summary["difficulty_spearman"]["1"] <= 1.0
    assert summary["rouge_l_per_training_seed"]["KD (fkl)"]["1"] >= 0.0
    corpus = summary["pretraining_corpus"]
    assert corpus["train_records"] == 512 and corpus["valid_records"] == 32
    # The students' configs name the bases they started from.
    student = yaml.safe_load((out / "kd" / "seed1" / "config.yaml").read_text())
    assert student["model"]["student"] == str(out / "student_base" / "final")
    teacher = yaml.safe_load((out / "teacher" / "config.yaml").read_text())
    assert teacher["model"]["student"] == str(out / "teacher_base" / "final")
    # The POCL student ran one stage per difficulty subset; the others one stage.
    stages = json.loads((out / "kd_pocl" / "seed1" / "curriculum.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["done"] * 3
    assert sum(1 for _ in (out / "kd_pocl" / "seed1" / "difficulty.jsonl").open()) == 256
    # No evaluated task is a training task, and the demo's families are the three it names.
    splits = {
        name: [json.loads(line) for line in (out / "data" / f"{name}.jsonl").open()]
        for name in ("train", "valid", "test")
    }
    assert len(splits["train"]) == 256
    trained = {r["prompt"] for r in splits["train"]}
    for held_out in ("valid", "test"):
        assert not trained & {r["prompt"] for r in splits[held_out]}, held_out
    assert {r["category"] for r in splits["train"]} == {"reverse", "sort", "lookup"}
    # Generation may write every answer in full: a budget shorter than the longest answer
    # would cap the scores of the longest tasks and fake a difficulty gradient.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "teacher_base" / "final")
    longest = max(
        len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1  # and the EOS
        for records in splits.values()
        for record in records
        for answer in record["output"]
    )
    budgets = (
        student["eval"]["max_new_tokens"],
        yaml.safe_load((out / "kd_pocl" / "seed1" / "config.yaml").read_text())["curriculum"][
            "difficulty_max_new_tokens"
        ],
    )
    assert min(budgets) >= longest, (budgets, longest)

    for png in (
        "rouge_l_by_method.png",
        "teacher_curriculum_timeline.png",
        "kd_pocl_curriculum_timeline.png",
        "kd_pocl_difficulty.png",
    ):
        assert (results / png).read_bytes()[:8] == PNG_MAGIC, png


@pytest.mark.slow
def test_stop_after_teacher_trains_bases_and_teacher_only(tmp_path):
    out = tmp_path / "demo"
    run_quick_demo(out, "--stop-after", "teacher")
    for trained in ("teacher_base", "student_base", "teacher"):
        assert (out / trained / "final" / "config.json").is_file(), trained
    assert not (out / "kd").exists() and not (out / "results").exists()
