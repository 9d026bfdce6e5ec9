"""The Baby-Step training scheduler and the rank-0 curriculum controller (SPEC "Training
Scheduler", paper §3.2–3.3, Algorithm 1).

Stage i = 1..n trains on d_1 ∪ … ∪ d_i with its own temperature τ_i and SFT weight α_i. A run
without curriculum is the same machinery with one stage of all samples, so the trainer has a
single loop::

    controller = CurriculumController(plans, patience=..., output_dir=...)
    while (plan := controller.current_plan()) is not None:
        sampler = StageSampler(plan.sample_indices, stage=plan.stage, ...)
        while True:
            sampler.set_epoch(controller.epochs_run)
            for step_batches in sampler:
                ...train...
            if controller.report_validation(metric):  # validate at each epoch's end
                break
        controller.finish_stage(steps=steps_run_in_stage)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pocl_ds import atomic, distributed
from pocl_ds.errors import PoclError

logger = logging.getLogger(__name__)

CURRICULUM_FILE = "curriculum.json"


def baby_step_schedule(
    num_stages: int,
    *,
    temperature_start: float = 1.0,
    temperature_end: float = 2.0,
    sft_weight_start: float = 0.3,
    sft_weight_end: float = 0.0,
    on_policy: bool = False,
) -> list[tuple[float, float]]:
    """(τ_i, α_i) for stages i = 1..n, linear in (i−1)/(n−1) (paper Eq. 3–4).

    τ_i = τ_0 + (τ_n − τ_0)·(i−1)/(n−1) and α_i = α_0 − (α_0 − α_n)·(i−1)/(n−1); α is 0 at every
    stage for on-policy KD. With n = 1 the fraction (i−1)/(n−1) is 0/0; the single stage takes
    the start values (τ_0, α_0), as stage 1 does for every n.
    """
    if num_stages < 1:
        raise PoclError(f"curriculum.num_stages: got {num_stages}, must be >= 1")
    schedule = []
    for i in range(1, num_stages + 1):
        fraction = (i - 1) / (num_stages - 1) if num_stages > 1 else 0.0
        temperature = temperature_start + (temperature_end - temperature_start) * fraction
        sft_weight = sft_weight_start - (sft_weight_start - sft_weight_end) * fraction
        schedule.append((temperature, 0.0 if on_policy else sft_weight))
    return schedule


def equal_budget_epochs(baseline_epochs: int, num_stages: int) -> int:
    """Epochs per stage p = 2E/(n+1), so Baby Step makes as many sample visits as E epochs.

    Stage i sees i/n of the data, so p epochs per stage visit p·N·(n+1)/2 samples in all. The
    result is rounded to the nearest integer, halves up, and is at least 1: E = 20, n = 4 → 8
    (exact, the paper's setting); E = 2, n = 4 → 0.8 → 1; E = 5, n = 2 → 3.33 → 3.
    """
    if baseline_epochs < 1:
        raise PoclError(f"train.epochs: got {baseline_epochs}, must be >= 1")
    if num_stages < 1:
        raise PoclError(f"curriculum.num_stages: got {num_stages}, must be >= 1")
    return max(1, math.floor(2 * baseline_epochs / (num_stages + 1) + 0.5))


@dataclass(frozen=True)
class StagePlan:
    """One stage: which samples, at which τ and α, for at most how many epochs (1-based stage)."""

    stage: int
    sample_indices: tuple[int, ...]
    temperature: float
    sft_weight: float
    epochs: int


def baby_step_plans(
    subsets: Sequence[Sequence[int]],
    *,
    epochs_per_stage: int | Sequence[int],
    temperature_start: float = 1.0,
    temperature_end: float = 2.0,
    sft_weight_start: float = 0.3,
    sft_weight_end: float = 0.0,
    on_policy: bool = False,
) -> list[StagePlan]:
    """Stage i trains on d_1 ∪ … ∪ d_i (``subsets`` in the order they are introduced)."""
    num_stages = len(subsets)
    epochs = (
        [epochs_per_stage] * num_stages
        if isinstance(epochs_per_stage, int)
        else list(epochs_per_stage)
    )
    if len(epochs) != num_stages or any(e < 1 for e in epochs):
        raise PoclError(
            f"curriculum.epochs_per_stage: got {epochs_per_stage!r}; need one integer >= 1 "
            f"or one per stage ({num_stages})"
        )
    schedule = baby_step_schedule(
        num_stages,
        temperature_start=temperature_start,
        temperature_end=temperature_end,
        sft_weight_start=sft_weight_start,
        sft_weight_end=sft_weight_end,
        on_policy=on_policy,
    )
    plans, seen = [], []
    for i, (subset, (temperature, sft_weight)) in enumerate(
        zip(subsets, schedule, strict=True), start=1
    ):
        seen.extend(subset)
        plans.append(StagePlan(i, tuple(seen), temperature, sft_weight, epochs[i - 1]))
    return plans


def single_stage_plan(
    sample_indices: Sequence[int], *, temperature: float, sft_weight: float, epochs: int
) -> list[StagePlan]:
    """The plan of a run without curriculum: one stage, all samples, fixed τ and α."""
    if epochs < 1:
        raise PoclError(f"train.epochs: got {epochs}, must be >= 1")
    return [StagePlan(1, tuple(sample_indices), temperature, sft_weight, epochs)]


def _plans_digest(plans: Sequence[StagePlan]) -> str:
    text = json.dumps([asdict(p) for p in plans], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class CurriculumController:
    """Walks the stages of a plan and keeps every rank on rank 0's decisions.

    Rank 0's ``plans`` are broadcast at construction (the other ranks' are ignored), and rank 0
    alone decides when a stage ends early, so a rank whose inputs differ can never train a
    different stage. ``report_validation`` is collective; the rest is local.

    A stage ends after ``plan.epochs`` epochs or, with ``patience``, once the validation metric
    has not improved by more than ``min_delta`` for ``patience`` consecutive epochs (``mode``
    "max" for ROUGE-L, "min" for a loss); the best value restarts with each stage, whose data
    and τ differ from the last one's.
    """

    def __init__(
        self,
        plans: Sequence[StagePlan],
        *,
        patience: int | None = None,
        mode: Literal["max", "min"] = "max",
        min_delta: float = 0.0,
        output_dir: str | os.PathLike | None = None,
        steps_per_epoch: Sequence[int] | None = None,
    ) -> None:
        self.plans: list[StagePlan] = list(distributed.broadcast_object(list(plans)))
        if not self.plans:
            raise PoclError("curriculum: the plan has no stages")
        if patience is not None and patience < 1:
            raise PoclError(f"curriculum.patience: got {patience}, must be >= 1 or unset")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.output_dir = Path(output_dir) if output_dir is not None else None
        # optimizer steps per epoch of each stage (the samplers' lengths), for curriculum.json
        self.steps_per_epoch = None if steps_per_epoch is None else list(steps_per_epoch)
        self.stage_index = 0
        self.epochs_run = 0
        self.best_metric: float | None = None
        self.epochs_since_best = 0
        self.ended_by: str | None = None
        self.history: list[dict[str, Any]] = []
        self.write_summary()
        self._log_stage_start()

    @property
    def finished(self) -> bool:
        return self.stage_index >= len(self.plans)

    def current_plan(self) -> StagePlan | None:
        """The stage to train now, or None when every stage is done."""
        return None if self.finished else self.plans[self.stage_index]

    def report_validation(self, metric: float | None) -> bool:
        """Record the end of an epoch of the current stage; True when the stage is over.

        Collective. ``metric`` is the epoch's validation metric, or None when none was
        measured (such an epoch never counts towards ``patience``).
        """
        if self.finished:
            raise RuntimeError("report_validation called after the last stage finished")
        decision = None
        if distributed.is_main_process():
            decision = self._decide(metric)
        (
            self.epochs_run,
            self.best_metric,
            self.epochs_since_best,
            self.ended_by,
        ) = distributed.broadcast_object(decision)
        return self.ended_by is not None

    def _decide(self, metric: float | None) -> tuple[int, float | None, int, str | None]:
        epochs_run, best, since_best = self.epochs_run + 1, self.best_metric, self.epochs_since_best
        if metric is not None and math.isfinite(metric):
            sign = 1.0 if self.mode == "max" else -1.0
            if best is None or sign * (metric - best) > self.min_delta:
                best, since_best = metric, 0
            else:
                since_best += 1
        ended_by = None
        if self.patience is not None and since_best >= self.patience:
            ended_by = "patience"
        elif epochs_run >= self.plans[self.stage_index].epochs:
            ended_by = "epochs"
        return epochs_run, best, since_best, ended_by

    def finish_stage(self, *, steps: int, **extra: Any) -> None:
        """Close the current stage after ``steps`` optimizer steps and move to the next one.

        ``extra`` (JSON-able) is written into the stage's entry of ``curriculum.json``.
        """
        if self.finished:
            raise RuntimeError("finish_stage called after the last stage finished")
        plan = self.plans[self.stage_index]
        self.history.append(
            {
                "stage": plan.stage,
                "epochs_run": self.epochs_run,
                "steps": steps,
                "ended_by": self.ended_by or "caller",
                "best_metric": self.best_metric,
                **extra,
            }
        )
        if distributed.is_main_process():
            logger.info(
                "curriculum: stage %d/%d done after %d epochs, %d steps (%s)",
                plan.stage,
                len(self.plans),
                self.epochs_run,
                steps,
                self.ended_by or "stopped by caller",
            )
        self.stage_index += 1
        self.epochs_run, self.best_metric, self.epochs_since_best = 0, None, 0
        self.ended_by = None
        self.write_summary()
        self._log_stage_start()

    def _log_stage_start(self) -> None:
        if self.finished or not distributed.is_main_process():
            return
        plan = self.plans[self.stage_index]
        logger.info(
            "curriculum: stage %d/%d on %d samples, temperature %.4g, sft_weight %.4g, "
            "up to %d epochs",
            plan.stage,
            len(self.plans),
            len(plan.sample_indices),
            plan.temperature,
            plan.sft_weight,
            plan.epochs,
        )

    def summary(self) -> dict[str, Any]:
        """The content of ``curriculum.json``: one entry per stage, planned and as run."""
        stages = []
        for i, plan in enumerate(self.plans):
            planned_steps = (
                plan.epochs * self.steps_per_epoch[i] if self.steps_per_epoch is not None else None
            )
            entry: dict[str, Any] = {
                "stage": plan.stage,
                "size": len(plan.sample_indices),
                "temperature": plan.temperature,
                "sft_weight": plan.sft_weight,
                "epochs": plan.epochs,
                "planned_steps": planned_steps,
                "steps": planned_steps,
                "status": "done" if i < self.stage_index else "planned",
            }
            if i < len(self.history):
                entry.update(self.history[i])
            elif i == self.stage_index:
                entry.update(status="running", epochs_run=self.epochs_run)
            stages.append(entry)
        return {"patience": self.patience, "mode": self.mode, "stages": stages}

    def write_summary(self) -> None:
        """Rank 0 rewrites ``<output_dir>/curriculum.json`` atomically."""
        if self.output_dir is None or not distributed.is_main_process():
            return
        atomic.write_text(
            self.output_dir / CURRICULUM_FILE, json.dumps(self.summary(), indent=1) + "\n"
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-stage; plans are checked, not stored."""
        return {
            "plans_digest": _plans_digest(self.plans),
            "stage_index": self.stage_index,
            "epochs_run": self.epochs_run,
            "best_metric": self.best_metric,
            "epochs_since_best": self.epochs_since_best,
            "ended_by": self.ended_by,
            "history": [dict(entry) for entry in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; the plans must be the ones the state was saved with."""
        if state["plans_digest"] != _plans_digest(self.plans):
            raise PoclError(
                "curriculum: the checkpoint was written with a different stage plan (subsets, "
                "temperatures, SFT weights or epochs changed); resume with the original "
                "settings and difficulty.jsonl, or start a new output_dir"
            )
        self.stage_index = int(state["stage_index"])
        self.epochs_run = int(state["epochs_run"])
        self.best_metric = state["best_metric"]
        self.epochs_since_best = int(state["epochs_since_best"])
        self.ended_by = state["ended_by"]
        self.history = [dict(entry) for entry in state["history"]]
        self.write_summary()
