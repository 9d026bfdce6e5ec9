"""launch/split_overlap.py: evaluation records that also appear verbatim in the training data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from launch.split_overlap import overlap_report
from pocl_ds.data import InstructionSample

SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "split_overlap.py"


def _sample(i: int, prompt: str, answer: str, level: int = 1) -> InstructionSample:
    return InstructionSample(
        index=i, instruction="", input="", references=(answer,), prompt=prompt,
        difficulty=level, category="reverse",
    )  # fmt: skip


def test_seen_means_same_prompt_and_same_target():
    train = [_sample(0, "a", "a"), _sample(1, "a b", "b a", 2)]
    evaluated = [
        _sample(0, "a", "a"),  # seen
        _sample(1, "a b", "a b", 2),  # same prompt, another answer: not seen
        _sample(2, "c", "c"),
        _sample(3, "a b", "b a", 2),  # seen
    ]
    report = overlap_report(train, evaluated)
    assert report == {"records": 4, "seen": 2, "seen_by_cell": {"reverse 1": 1, "reverse 2": 1}}


def test_command_line_prints_the_share_per_file(tmp_path):
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    row = {"instruction": "Reverse the list.", "input": "a b", "output": "b a"}
    train = write("train.jsonl", [row])
    test = write("test.jsonl", [row, {**row, "input": "c d", "output": "d c"}])
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--train", str(train), str(test), "--json", str(tmp_path / "o.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{test}: 1 of 2 records (50 %) are in {train}" in done.stdout
    assert json.loads((tmp_path / "o.json").read_text())[str(test)]["seen"] == 1
