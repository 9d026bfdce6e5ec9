"""launch/experiment.py: grid files, the results it writes, and a grid on 2 CPU ranks that is
killed part-way and resumed with the same command."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch.experiment import (
    config_differences,
    finished_result,
    load_grid,
    plan_runs,
    results_markdown,
    summarize,
    trained_summary,
)
from pocl_ds.errors import PoclError
from tests.launchers import REPO, environment

EXPERIMENT = REPO / "launch" / "experiment.py"
GRIDS = REPO / "launch" / "configs" / "experiments"
SHIPPED = (
    "main",
    "rank_by",
    "order",
    "temperature",
    "alpha",
    "stages",
    "restart",
    "budget",
    "dolly",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_grid(**changes) -> dict:
    """2 cells of the tiny recipe on 64 synthetic tasks, a few optimizer steps each."""
    grid = {
        "purpose": "report",
        "recipe": str(REPO / "launch" / "configs" / "tiny.yaml"),
        "overrides": [
            "data.train_path=synthetic:64",
            "data.split_sizes=[8, 8]",
            "train.max_steps=4",
            "train.micro_batch_size=4",
            "eval.valid_rouge_samples=4",
            "eval.max_new_tokens=8",
            "eval.batch_size=8",
            "curriculum.num_stages=2",
            "curriculum.difficulty_max_new_tokens=4",
        ],
        "quick": ["train.max_steps=3"],
        "baseline": "kd",
        "training_seeds": [1, 2, 3],
        "sampling_seeds": [10, 20],
        "suites": {"synthetic": "test"},
        "cells": [
            {"name": "kd", "overrides": []},
            {"name": "kd_pocl", "overrides": ["curriculum.strategy=pocl"]},
        ],
    }
    grid.update(changes)
    return grid


def write_grid(tmp_path: Path, grid: dict, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- grid files


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_grid_loads_and_every_cell_builds(name):
    grid = load_grid(GRIDS / f"{name}.yaml")
    runs = plan_runs(grid, Path("runs/experiments") / name)
    assert len(runs) == len(grid.cells) * len(grid.training_seeds)
    assert grid.baseline in [c.name for c in grid.cells]
    assert len(grid.training_seeds) >= (5 if name == "main" else 3)
    if grid.purpose == "select":  # choosing settings: validation only
        assert grid.split == "valid" and set(grid.suites.values()) == {"valid"}
    assert all(r.config.train.seed == r.seed for r in runs)
    assert all(r.config.eval.evaluate_at_end is False for r in runs)
    assert {r.config.distill.method for r in runs} == {"kd"}
    assert {r.config.curriculum.strategy for r in runs} == {"none", "pocl"}


def test_shipped_grids_cover_the_paper_ablations():
    cells = {name: [c.name for c in load_grid(GRIDS / f"{name}.yaml").cells] for name in SHIPPED}
    by = {
        name: [r.config for r in plan_runs(load_grid(GRIDS / f"{name}.yaml"), Path("x"))]
        for name in ("rank_by", "order", "stages", "budget", "main")
    }
    assert {c.curriculum.rank_by for c in by["rank_by"]} == {"fusion", "ce", "rouge"}
    assert {c.curriculum.order for c in by["order"]} == {"easy_to_hard", "hard_to_easy", "random"}
    assert {c.curriculum.num_stages for c in by["stages"] if c.curriculum.strategy == "pocl"} == {
        2,
        3,
        4,
    }
    assert {c.train.epochs for c in by["budget"]} == {2, 6, 12, 20}
    assert {c.distill.divergence for c in by["main"]} == {"fkl", "rkl"}
    assert cells["temperature"] == ["kd", "t1_to_2", "t1_fixed", "t2_fixed", "t2_to_1"]
    assert cells["alpha"] == ["kd", "a03_to_0", "a0_to_03", "a0_fixed"]
    assert "continuous_E2" in cells["restart"]
    assert ("continuous_E2", "kd_E2") in load_grid(GRIDS / "restart.yaml").comparisons


def test_dolly_grid_names_the_shared_data_through_the_environment(tmp_path, monkeypatch):
    lines = (GRIDS / "dolly.yaml").read_text(encoding="utf-8").splitlines()
    assert not [line for line in lines if "shared" in line and not line.startswith("#")]
    monkeypatch.setenv("POCL_DATA_DIR", str(tmp_path / "data"))
    grid = load_grid(GRIDS / "dolly.yaml")
    config = plan_runs(grid, tmp_path / "out")[0].config
    assert config.data.train_path == str(tmp_path / "data" / "dolly" / "train_1k.jsonl")
    assert grid.suites == {"dolly": "dolly", "selfinst": "selfinst", "vicuna": "vicuna"}
    assert grid.purpose == "report" and grid.split == "test"


def test_a_grid_for_choosing_settings_refuses_test_scores(tmp_path):
    with pytest.raises(PoclError, match="settings are chosen on validation, never on test"):
        load_grid(write_grid(tmp_path, tiny_grid(purpose="select", split="test")))
    # select defaults to the validation split: a test suite there is refused
    with pytest.raises(PoclError, match="'test' is test data but the grid reports the valid"):
        load_grid(write_grid(tmp_path, tiny_grid(purpose="select")))
    with pytest.raises(PoclError, match="'dolly' is test data"):
        load_grid(write_grid(tmp_path, tiny_grid(purpose="select", suites={"d": "dolly"})))
    grid = load_grid(write_grid(tmp_path, tiny_grid(purpose="select", suites={"s": "valid"})))
    assert grid.split == "valid"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seeds": [1]}, "unknown key 'seeds'"),
        ({"baseline": "nope"}, "baseline 'nope' of cell 'kd' is not a cell"),
        ({"training_seeds": [1, 1]}, "training_seeds: expected a non-empty list of distinct"),
        ({"purpose": "explore"}, "purpose: got 'explore'"),
        ({"recipe": "missing.yaml"}, "missing.yaml does not exist"),
        ({"cells": [{"name": "kd", "overrides": ["train.seed=3"]}]}, "train.seed=3' is set by"),
        ({"cells": [{"name": "kd"}, {"name": "kd"}]}, "two cells are named 'kd'"),
        ({"cells": [{"name": "a b"}]}, "must be letters, digits"),
        (
            {"cells": [{"name": "kd", "overrides": ["train.lr=-1"]}]},
            "cell 'kd': train.lr: got -1.0, allowed range",
        ),
        ({"quick": ["train.max_steps=0"]}, "cell 'kd': train.max_steps: got 0"),
        ({"overrides": ["data.train_path=${NO_SUCH_VARIABLE}/x"]}, "unset variable"),
        ({"comparisons": [["kd_pocl", "sft"]]}, "comparisons[0]: 'sft' is not a cell"),
        ({"comparisons": [["kd", "kd"]]}, "comparisons[0]: expected [cell, other cell]"),
    ],
)
def test_bad_grids_fail_naming_the_key(tmp_path, changes, message):
    with pytest.raises(PoclError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_grid(write_grid(tmp_path, tiny_grid(**changes)))


def test_bad_grid_exits_2_before_any_launcher(tmp_path):
    grid = write_grid(tmp_path, tiny_grid(baseline="nope"))
    result = subprocess.run(
        [sys.executable, str(EXPERIMENT), str(grid)],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "baseline 'nope' of cell 'kd' is not a cell" in result.stderr
    assert "re-launching" not in result.stderr


def test_config_differences_name_the_changed_fields():
    grid = load_grid(GRIDS / "rank_by.yaml")
    first, second = (r.config.to_dict() for r in plan_runs(grid, Path("x"))[:2])
    assert config_differences(first, first) == []
    changed = config_differences(first, second)
    assert any(c.startswith("train.seed: 1 -> 2") for c in changed)


def test_a_run_directory_of_other_settings_is_refused_not_mixed(tmp_path):
    grid = load_grid(write_grid(tmp_path, tiny_grid()))
    run, other = plan_runs(grid, tmp_path / "out")[:2]  # seeds 1 and 2 of cell kd
    run.directory.mkdir(parents=True)
    (run.directory / "config.yaml").write_text(yaml.safe_dump(other.config.to_dict()))
    with pytest.raises(PoclError, match=r"config.yaml was made with other settings") as error:
        trained_summary(run)
    assert "train.seed: 2 -> 1" in str(error.value)
    (run.directory / "config.yaml").write_text(yaml.safe_dump(run.config.to_dict()))
    assert trained_summary(run) is None  # the same run, not trained to its end: continue it
    result = {"config": run.config.to_dict(), "split": "test", "suites": {"synthetic": "test"}}
    (run.directory / "result.json").write_text(json.dumps({**result, "sampling_seeds": [10]}))
    with pytest.raises(PoclError, match="evaluated on other suites, seeds or split"):
        finished_result(grid, run)
    (run.directory / "result.json").write_text(json.dumps({**result, "sampling_seeds": [10, 20]}))
    assert finished_result(grid, run)["config"] == run.config.to_dict()


# ----------------------------------------------------------------------------- results


def fake_result(cell: str, seed: int, score: float) -> dict:
    return {"cell": cell, "training_seed": seed, "score": {"synthetic": score, "avg": score}}


def test_results_hold_every_run_the_cell_spread_and_the_paired_interval(tmp_path):
    grid = load_grid(write_grid(tmp_path, tiny_grid()))
    kd = {1: 10.0, 2: 12.0, 3: 13.0}
    pocl = {1: 11.0, 2: 14.0, 3: 16.0}  # differences 1, 2, 3
    results = {("kd", s): fake_result("kd", s, v) for s, v in kd.items()}
    results |= {("kd_pocl", s): fake_result("kd_pocl", s, v) for s, v in pocl.items()}
    document = json.loads(json.dumps(summarize(grid, results)))  # as results.json holds it
    assert document["finished_runs"] == document["total_runs"] == 6
    assert [(r["cell"], r["training_seed"]) for r in document["runs"]] == [
        ("kd", 1),
        ("kd", 2),
        ("kd", 3),
        ("kd_pocl", 1),
        ("kd_pocl", 2),
        ("kd_pocl", 3),
    ]
    cell = document["cells"]["kd_pocl"]
    assert cell["n"] == 3
    assert cell["rouge_l"]["avg"]["mean"] == pytest.approx(41 / 3)
    assert cell["rouge_l"]["avg"]["std"] == pytest.approx(2.5166, abs=1e-4)  # ddof = 1
    diff = cell["vs_baseline"]["avg"]
    assert diff["interval"] == "paired t, 95%"
    assert diff["per_seed"] == {"1": 1.0, "2": 2.0, "3": 3.0}
    assert (diff["mean"], diff["std"], diff["n"]) == (2.0, 1.0, 3)
    assert (diff["low"], diff["high"]) == pytest.approx((2 - 2.484, 2 + 2.484), abs=1e-3)
    assert document["cells"]["kd"]["vs_baseline"] is None
    table = results_markdown(document)
    assert "| kd_pocl | 3 | 13.67 ± 2.52 | +2.00 [-0.48, +4.48] vs kd |" in table
    assert "| kd | 3 | 11.67 ± 1.53 | baseline |" in table


def test_comparisons_add_paired_differences_beside_the_baseline(tmp_path):
    """A third cell whose baseline is kd_pocl, compared with kd as well: both differences."""
    cells = [
        {"name": "kd", "overrides": []},
        {"name": "kd_pocl", "overrides": ["curriculum.strategy=pocl"]},
        {"name": "variant", "overrides": ["curriculum.strategy=pocl"], "baseline": "kd_pocl"},
    ]
    grid = load_grid(write_grid(tmp_path, tiny_grid(cells=cells, comparisons=[["variant", "kd"]])))
    scores = {"kd": (10.0, 12.0, 13.0), "kd_pocl": (9.0, 9.0, 9.0), "variant": (14.0, 13.0, 17.0)}
    results = {
        (cell, seed): fake_result(cell, seed, values[seed - 1])
        for cell, values in scores.items()
        for seed in (1, 2, 3)
    }
    document = json.loads(json.dumps(summarize(grid, results)))
    assert document["cells"]["variant"]["vs_baseline"]["avg"]["mean"] == pytest.approx(17 / 3)
    [comparison] = document["comparisons"]
    assert (comparison["cell"], comparison["versus"]) == ("variant", "kd")
    diff = comparison["difference"]["avg"]
    assert diff["per_seed"] == {"1": 4.0, "2": 1.0, "3": 4.0}
    assert (diff["low"], diff["high"]) == pytest.approx((3 - 4.303, 3 + 4.303), abs=1e-3)
    table = results_markdown(document)
    assert "| variant | +3.00 [-1.30, +7.30] vs kd |" in table
    assert "Other paired differences" not in results_markdown({**document, "comparisons": []})


def test_results_with_one_seed_have_no_interval_and_say_why(tmp_path):
    grid = load_grid(write_grid(tmp_path, tiny_grid()))
    results = {("kd", 1): fake_result("kd", 1, 5.0), ("kd_pocl", 1): fake_result("kd_pocl", 1, 7.0)}
    document = summarize(grid, results)
    cell = document["cells"]["kd_pocl"]
    assert cell["rouge_l"]["avg"]["std"] is None
    diff = cell["vs_baseline"]["avg"]
    assert diff["mean"] == 2.0 and diff["low"] is None and diff["high"] is None
    assert "at least 2" in diff["why"]
    assert document["finished_runs"] == 2 and document["total_runs"] == 6
    assert "+2.00 [n/a: a t-interval needs at least 2 values, got 1]" in results_markdown(document)


# ----------------------------------------------------------------------------- end to end


def start(args: list[str], log: Path) -> subprocess.Popen:
    """Plain python, as a user would type it: the script re-launches itself on 2 ranks."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, str(EXPERIMENT), *args],
            cwd=REPO,
            env=environment(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: the launcher and both ranks
        )


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def metric_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
def test_grid_runs_on_two_ranks_survives_a_kill_and_resumes(tmp_path):
    grid = write_grid(tmp_path, tiny_grid())
    out = tmp_path / "out"
    args = [str(grid), "--output", str(out), "--quick"]
    first = out / "kd" / "seed1" / "result.json"

    proc = start(args, tmp_path / "killed.txt")
    try:
        deadline = time.monotonic() + 240
        while not first.is_file():
            assert proc.poll() is None, (tmp_path / "killed.txt").read_text()[-4000:]
            assert time.monotonic() < deadline, "no result.json in time"
            time.sleep(0.05)
    finally:
        kill_group(proc)
    assert "re-launching on 2 ranks" in (tmp_path / "killed.txt").read_text()
    first_bytes = first.read_bytes()
    assert not (out / "kd_pocl" / "seed2" / "result.json").exists()

    proc = start(args, tmp_path / "resumed.txt")
    try:
        code = proc.wait(timeout=300)
    finally:
        kill_group(proc)
    log = (tmp_path / "resumed.txt").read_text()
    assert code == 0, log[-4000:]
    assert "run 1/4 kd seed 1: skipped (finished before)" in log
    assert "run 4/4 kd_pocl seed 2: finished" in log
    assert first.read_bytes() == first_bytes

    document = json.loads((out / "results.json").read_text())
    assert document["training_seeds"] == [1, 2] and document["sampling_seeds"] == [10]
    assert document["finished_runs"] == document["total_runs"] == 4
    assert len(document["runs"]) == 4
    for run in document["runs"]:
        assert set(run["eval"]["suites"]["synthetic"]["rouge_l"]["per_seed"]) == {"10"}
        # every run trained its own 3 steps once: no two runs mixed in one directory
        assert metric_steps(Path(run["run_dir"])) == [1, 2, 3]
    diff = document["cells"]["kd_pocl"]["vs_baseline"]["avg"]
    assert diff["interval"] == "paired t, 95%" and diff["n"] == 2
    assert diff["low"] <= diff["mean"] <= diff["high"]
    assert set(diff["per_seed"]) == {"1", "2"}
    assert document["cells"]["kd_pocl"]["rouge_l"]["avg"]["std"] is not None
    assert "| kd_pocl | 2 |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
