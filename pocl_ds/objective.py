"""The training objective as the module DeepSpeed wraps: α·CE + (1 − α)·τ²·D(p_τ, q_τ).

DeepSpeed owns the student through this wrapper, so the loss (and, under ZeRO-3, the gathering
of the output head) happens inside ``engine(...)``, where DeepSpeed expects the forward. Logits
are never materialised: the fused kernel takes final hidden states and head weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pocl_ds.divergence import fused_linear_distill_loss, gathered_head
from pocl_ds.models import final_hidden_states, output_head


@dataclass(frozen=True)
class LossTerms:
    """Per-micro-batch contributions; the sums over a step's micro-batches and ranks are the
    step's loss terms because every piece is already divided by the global token count."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def shift_for_next_token(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden [B, T, H] and labels [B, T] (HF convention) → the [B, T−1] pairs
    (state at t, token at t+1) and the response mask of the targets."""
    targets = labels[:, 1:]
    return hidden[:, :-1], targets, targets.ne(-100)


@torch.no_grad()
def teacher_inputs(
    teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
    """The frozen teacher's side of the loss: final hidden states [B, T, H] and its head.

    A ZeRO-3-partitioned head is copied out whole (it is released when the gather ends); a
    replicated one is used as it is, with no copy of its [V, H] weight per micro-batch.
    """
    hidden = final_hidden_states(teacher, input_ids, attention_mask)
    weight, bias = output_head(teacher)
    if not hasattr(weight, "ds_id"):
        return hidden, (weight.detach(), None if bias is None else bias.detach())
    with gathered_head(weight, bias):
        return hidden, (weight.detach().clone(), None if bias is None else bias.detach().clone())


class DistillationObjective(torch.nn.Module):
    """Wraps a Hugging Face causal LM; ``forward`` returns the loss terms of one micro-batch."""

    def __init__(self, model: torch.nn.Module, *, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        *,
        teacher_hidden: torch.Tensor | None,
        teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None,
        kind: str,
        temperature: float,
        beta: float | None,
        sft_weight: float,
        num_valid_tokens: float,
        scale_by_temperature_squared: bool = True,
    ) -> LossTerms:
        hidden = final_hidden_states(self.model, input_ids, attention_mask)
        hidden, targets, response_mask = shift_for_next_token(hidden, labels)
        weight, bias = output_head(self.model)
        with gathered_head(weight, bias):
            if teacher_hidden is None:
                # SFT: the kernel with the student as its own teacher would cost a second
                # pass; the CE alone comes from the same chunked path with α = 1.
                kd, ce = fused_linear_distill_loss(
                    hidden,
                    weight,
                    None,
                    None,
                    response_mask,
                    kind=kind,
                    labels=targets,
                    chunk_size=self.chunk_size,
                    num_valid_tokens=num_valid_tokens,
                    student_head_bias=bias,
                )
                return LossTerms(loss=ce, kd=kd.detach(), ce=ce.detach())
            teacher_weight, teacher_bias = teacher_head
            kd, ce = fused_linear_distill_loss(
                hidden,
                weight,
                teacher_hidden[:, :-1],
                teacher_weight,
                response_mask,
                kind=kind,
                temperature=temperature,
                beta=beta,
                labels=targets,
                chunk_size=self.chunk_size,
                scale_by_temperature_squared=scale_by_temperature_squared,
                num_valid_tokens=num_valid_tokens,
                student_head_bias=bias,
                teacher_head_bias=teacher_bias,
            )
        loss = sft_weight * ce + (1.0 - sft_weight) * kd
        return LossTerms(loss=loss, kd=kd.detach(), ce=ce.detach())
