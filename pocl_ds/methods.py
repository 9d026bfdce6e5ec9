"""What each distillation method means: the one place that compares method names.

Every other module asks the method's ``MethodSpec`` (does it need the teacher while training, or
only to generate; which divergence does it train; how is α set; are its samples on-policy),
so adding a method is one row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TeacherUse = Literal["none", "generate", "train"]
Curation = Literal["ground_truth", "teacher_answers", "student_samples"]


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table.

    - ``teacher``: "train" runs the teacher at every step (its distributions are the target),
      "generate" only before training (SeqKD's answers), "none" never.
    - ``divergence``: the divergence it always trains (GKD: JSD); None takes
      ``distill.divergence``; irrelevant when ``distills`` is False.
    - ``sft_weight``: a fixed α (SFT and SeqKD are pure CE: α = 1; the config refuses another);
      None takes the configured α.
    - ``default_alpha``: (α_0, α_n) of the POCL schedule when the recipe sets none. SPEC: 0.3 → 0
      off-policy, 0 throughout on-policy (an explicit setting is honoured).
    - ``loss_on_prompt``: every token is a target, the prompt's too (causal-LM pre-training of
      a base model); otherwise only the response's tokens are.
    """

    name: str
    teacher: TeacherUse
    curation: Curation
    distills: bool
    divergence: str | None = None
    sft_weight: float | None = None
    default_alpha: tuple[float, float] = (0.3, 0.0)
    loss_on_prompt: bool = False

    @property
    def on_policy(self) -> bool:
        return self.curation == "student_samples"

    def trained_divergence(self, configured: str) -> str | None:
        """The divergence this method's loss uses; None when it has no distillation term."""
        if not self.distills:
            return None
        return self.divergence or configured

    def alpha(self, configured: float | None) -> float:
        """α of a run without curriculum: the fixed α, else the recipe's, else 0."""
        if self.sft_weight is not None:
            return self.sft_weight
        return 0.0 if configured is None else configured

    def alpha_schedule(self, start: float | None, end: float | None) -> tuple[float, float]:
        """(α_0, α_n) of a POCL run: the fixed α, else the recipe's values, else the default."""
        if self.sft_weight is not None:
            return self.sft_weight, self.sft_weight
        default_start, default_end = self.default_alpha
        return (
            default_start if start is None else start,
            default_end if end is None else end,
        )

    def label(self, configured_divergence: str) -> str:
        """How logs name what is trained: ``kd (fkl)``, ``gkd (jsd)``, ``seqkd``."""
        divergence = self.trained_divergence(configured_divergence)
        return self.name if divergence is None else f"{self.name} ({divergence})"


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("sft", teacher="none", curation="ground_truth", distills=False, sft_weight=1.0),
        MethodSpec(
            "pretrain",
            teacher="none",
            curation="ground_truth",
            distills=False,
            sft_weight=1.0,
            loss_on_prompt=True,
        ),
        MethodSpec("kd", teacher="train", curation="ground_truth", distills=True),
        MethodSpec(
            "seqkd", teacher="generate", curation="teacher_answers", distills=False, sft_weight=1.0
        ),
        MethodSpec(
            "gkd",
            teacher="train",
            curation="student_samples",
            distills=True,
            divergence="jsd",
            default_alpha=(0.0, 0.0),
        ),
    )
}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
