"""Baby-Step schedule, equal budget and the rank-0 controller (2 gloo ranks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pocl_ds.curriculum import (
    CurriculumController,
    StagePlan,
    baby_step_plans,
    baby_step_schedule,
    equal_budget_epochs,
    single_stage_plan,
)
from pocl_ds.errors import PoclError
from pocl_ds.sampler import shard_indices
from tests.launchers import run

REPO = Path(__file__).resolve().parents[1]


def _flat(pairs):
    return [x for pair in pairs for x in pair]


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_schedule_matches_spec_formulas(n):
    schedule = baby_step_schedule(
        n, temperature_start=1.0, temperature_end=2.0, sft_weight_start=0.3, sft_weight_end=0.0
    )
    assert len(schedule) == n
    for i, (temperature, sft_weight) in enumerate(schedule, start=1):
        assert temperature == pytest.approx(1.0 + (2.0 - 1.0) * (i - 1) / (n - 1), abs=1e-12)
        assert sft_weight == pytest.approx(0.3 - (0.3 - 0.0) * (i - 1) / (n - 1), abs=1e-12)
    assert schedule[0] == (1.0, 0.3)
    assert schedule[-1] == pytest.approx((2.0, 0.0))


def test_schedule_paper_values_and_on_policy():
    assert _flat(baby_step_schedule(4)) == pytest.approx(
        _flat([(1.0, 0.3), (4 / 3, 0.2), (5 / 3, 0.1), (2.0, 0.0)])
    )
    on_policy = baby_step_schedule(4, on_policy=True)
    assert [a for _, a in on_policy] == [0.0] * 4
    assert [t for t, _ in on_policy] == pytest.approx([1.0, 4 / 3, 5 / 3, 2.0])
    custom = baby_step_schedule(
        3, temperature_start=2.0, temperature_end=1.0, sft_weight_start=0.0, sft_weight_end=0.5
    )
    assert _flat(custom) == pytest.approx(_flat([(2.0, 0.0), (1.5, 0.25), (1.0, 0.5)]))


def test_single_stage_schedule_takes_start_values():
    assert baby_step_schedule(1, temperature_start=1.5, sft_weight_start=0.2) == [(1.5, 0.2)]
    with pytest.raises(PoclError, match="num_stages"):
        baby_step_schedule(0)


@pytest.mark.parametrize(
    ("epochs", "stages", "expected"),
    [(20, 4, 8), (10, 4, 4), (2, 4, 1), (5, 2, 3), (5, 3, 3), (1, 1, 1), (3, 1, 3)],
)
def test_equal_budget_epochs(epochs, stages, expected):
    assert equal_budget_epochs(epochs, stages) == expected


def test_equal_budget_matches_visit_count_when_exact():
    # E·N visits of the baseline = p·N·(n+1)/2 visits of Baby Step.
    for stages in range(1, 8):
        epochs = stages + 1
        p = equal_budget_epochs(epochs, stages)
        assert p * (stages + 1) / 2 == epochs


def test_baby_step_plans_are_cumulative_unions():
    subsets = [[4, 1], [0, 5], [3], [2]]
    plans = baby_step_plans(subsets, epochs_per_stage=[1, 2, 3, 4])
    assert [p.sample_indices for p in plans] == [
        (4, 1),
        (4, 1, 0, 5),
        (4, 1, 0, 5, 3),
        (4, 1, 0, 5, 3, 2),
    ]
    assert [p.stage for p in plans] == [1, 2, 3, 4]
    assert [p.epochs for p in plans] == [1, 2, 3, 4]
    assert _flat([(p.temperature, p.sft_weight) for p in plans]) == pytest.approx(
        _flat(baby_step_schedule(4))
    )
    with pytest.raises(PoclError, match="epochs_per_stage"):
        baby_step_plans(subsets, epochs_per_stage=[1, 2])
    with pytest.raises(PoclError, match="epochs_per_stage"):
        baby_step_plans(subsets, epochs_per_stage=0)


def test_single_stage_plan():
    (plan,) = single_stage_plan(range(5), temperature=2.0, sft_weight=0.1, epochs=3)
    assert plan == StagePlan(1, (0, 1, 2, 3, 4), 2.0, 0.1, 3)


def _plans():
    return baby_step_plans([[0, 1, 2], [3, 4], [5, 6], [7]], epochs_per_stage=3)


def test_controller_runs_stages_and_writes_summary(tmp_path):
    controller = CurriculumController(_plans(), output_dir=tmp_path, steps_per_epoch=[2, 3, 4, 4])
    summary = json.loads((tmp_path / "curriculum.json").read_text())
    assert [s["size"] for s in summary["stages"]] == [3, 5, 7, 8]
    assert [s["steps"] for s in summary["stages"]] == [6, 9, 12, 12]
    assert summary["stages"][0]["status"] == "running"
    seen = []
    while (plan := controller.current_plan()) is not None:
        epochs = 0
        while True:
            epochs += 1
            if controller.report_validation(None):
                break
        seen.append((plan.stage, epochs))
        controller.finish_stage(steps=10 * plan.stage, wall_s=1.5)
    assert seen == [(1, 3), (2, 3), (3, 3), (4, 3)]
    stages = json.loads((tmp_path / "curriculum.json").read_text())["stages"]
    assert [s["steps"] for s in stages] == [10, 20, 30, 40]
    assert [s["planned_steps"] for s in stages] == [6, 9, 12, 12]
    assert {s["status"] for s in stages} == {"done"}
    assert all(s["ended_by"] == "epochs" and s["wall_s"] == 1.5 for s in stages)
    assert stages[1]["temperature"] == pytest.approx(4 / 3)
    assert stages[1]["sft_weight"] == pytest.approx(0.2)


def test_controller_patience_advances_early():
    plans = baby_step_plans([[0], [1]], epochs_per_stage=10)
    controller = CurriculumController(plans, patience=2, mode="max", min_delta=0.01)
    # Improves, improves, then two epochs within min_delta of the best: the stage ends.
    outcomes = [controller.report_validation(m) for m in (0.1, 0.2, 0.205, 0.19)]
    assert outcomes == [False, False, False, True]
    assert controller.best_metric == 0.2
    controller.finish_stage(steps=4)
    # The best restarts with the new stage; a loss-like metric would use mode="min".
    assert controller.best_metric is None
    assert controller.report_validation(0.05) is False


def test_controller_min_mode():
    plans = single_stage_plan([0, 1], temperature=1.0, sft_weight=0.0, epochs=10)
    controller = CurriculumController(plans, patience=1, mode="min")
    assert [controller.report_validation(m) for m in (3.0, 2.0, 2.5)] == [False, False, True]


def test_controller_state_round_trip(tmp_path):
    controller = CurriculumController(_plans(), patience=2, output_dir=tmp_path)
    for metric in (0.3, 0.2, 0.1):
        if controller.report_validation(metric):
            controller.finish_stage(steps=7)
    controller.report_validation(0.4)
    state = json.loads(json.dumps(controller.state_dict()))  # checkpoints store it as JSON

    resumed = CurriculumController(_plans(), patience=2, output_dir=tmp_path)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == controller.state_dict()
    assert resumed.current_plan() == controller.current_plan()
    assert resumed.current_plan().stage == 2
    assert resumed.report_validation(0.1) == controller.report_validation(0.1)
    assert resumed.state_dict() == controller.state_dict()

    other = CurriculumController(
        baby_step_plans([[0, 1, 2], [3, 4], [5, 6], [7]], epochs_per_stage=4)
    )
    with pytest.raises(PoclError, match="different stage plan"):
        other.load_state_dict(state)


def test_controller_rejects_bad_options():
    with pytest.raises(PoclError, match="no stages"):
        CurriculumController([])
    with pytest.raises(PoclError, match="patience"):
        CurriculumController(_plans(), patience=0)


# ------------------------------------------------------------------ two ranks


def _worker(out_dir: str) -> None:
    """Each rank builds its own (different) plans; all must follow rank 0's."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    subsets = [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11], [12, 13, 14]]
    if rank != 0:
        subsets = [list(reversed(s)) for s in reversed(subsets)]
    controller = CurriculumController(
        baby_step_plans(subsets, epochs_per_stage=3), patience=1, output_dir=out_dir
    )
    record = {"plans": [], "shards": [], "ended_by": []}
    while (plan := controller.current_plan()) is not None:
        record["plans"].append(
            [plan.stage, list(plan.sample_indices), plan.temperature, plan.sft_weight, plan.epochs]
        )
        for epoch in range(plan.epochs):
            record["shards"].append(
                shard_indices(
                    plan.sample_indices,
                    rank=rank,
                    world_size=world,
                    shuffle_key=f"{plan.stage}:{epoch}",
                )
            )
            # Rank 0's metric stops improving after one epoch (patience 1 ends the stage at
            # epoch 2); rank 1's keeps improving (it would run all 3 epochs). Rank 0 must win.
            metric = (1.0 - 0.1 * epoch) if rank == 0 else (1.0 + epoch)
            if controller.report_validation(metric):
                break
        record["ended_by"].append(controller.ended_by)
        controller.finish_stage(steps=1)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_rank0_plan_and_disjoint_shards(tmp_path):
    done = run("torchrun", __file__, [str(tmp_path)], timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["plans"] == rank1["plans"]
    assert rank0["plans"][0][1] == [0, 1, 2, 3, 4]
    assert rank0["ended_by"] == rank1["ended_by"] == ["patience"] * 4
    assert len(rank0["shards"]) == len(rank1["shards"]) == 8
    for epoch_shards, plan in zip(
        zip(rank0["shards"], rank1["shards"], strict=True),
        [p for p in rank0["plans"] for _ in range(2)],
        strict=True,
    ):
        first, second = epoch_shards
        assert len(first) == len(second)
        assert set(first) | set(second) == set(plan[1])
        if len(plan[1]) % 2 == 0:
            assert not set(first) & set(second)
    summary = json.loads((tmp_path / "curriculum.json").read_text())
    assert [s["size"] for s in summary["stages"]] == [5, 9, 12, 15]


if __name__ == "__main__":
    _worker(sys.argv[1])
