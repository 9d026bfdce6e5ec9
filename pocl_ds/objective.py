"""The training objective as the module DeepSpeed wraps: α·CE + (1 − α)·τ²·D(p_τ, q_τ).

DeepSpeed owns the student through this wrapper, so the loss (and, under ZeRO-3, the gathering
of the output head) happens inside ``engine(...)``, where DeepSpeed expects the forward. Logits
are never materialised: the fused kernel takes final hidden states and head weights.

What stays fixed for a run (divergence, β, τ² scaling, chunk size, the compared vocabulary) is
bound at construction; what a curriculum stage or a batch changes (τ, α, the token divisor,
the teacher's tensors) is passed per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pocl_ds.data import IGNORE_INDEX
from pocl_ds.divergence import DEFAULT_CHUNK_SIZE, fused_linear_distill_loss, resolve_divergence
from pocl_ds.engine import gathered_parameters
from pocl_ds.errors import PoclError
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
    return hidden[:, :-1], targets, targets.ne(IGNORE_INDEX)


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
    with gathered_parameters(weight, bias):
        return hidden, (weight.detach().clone(), None if bias is None else bias.detach().clone())


class DistillationObjective(torch.nn.Module):
    """Wraps a Hugging Face causal LM; ``forward`` returns the loss terms of one micro-batch.

    Args:
        model: the student.
        kind: the divergence trained (one of ``divergence.KINDS``), or None for no
            distillation term (SFT, SeqKD: the loss is the CE).
        beta: mixture weight of jsd/skl/srkl (None: the divergence's default).
        scale_by_temperature_squared: multiply the divergence by τ² (SPEC default).
        chunk_size: tokens per chunk of the fused kernel.
        vocab_size: the tokenizer's size (``models.shared_vocab_size``): head rows past it
            (padded embedding tables) take no part in the divergence or the CE.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        kind: str | None,
        vocab_size: int,
        beta: float | None = None,
        scale_by_temperature_squared: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        if kind is not None:
            resolve_divergence(kind, beta)  # a bad kind or β stops the run here, not mid-step
        self.model = model
        self.kind = kind
        self.beta = beta
        self.scale_by_temperature_squared = scale_by_temperature_squared
        self.chunk_size = chunk_size
        self.vocab_size = vocab_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        *,
        teacher_hidden: torch.Tensor | None = None,
        teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        temperature: float = 1.0,
        sft_weight: float,
        num_valid_tokens: float,
    ) -> LossTerms:
        """input_ids, attention_mask, labels: [B, T]; teacher_hidden: [B, T, H_t] and
        teacher_head: (weight [V_t, H_t], bias or None) from ``teacher_inputs``; temperature τ,
        sft_weight α ∈ [0, 1] and the divisor of `fused_linear_distill_loss`.

        With no distillation term (kind None or α = 1) the teacher is not needed and the KD
        kernel does not run: the loss is the CE and ``kd`` is 0.
        """
        distill = self.kind is not None and sft_weight < 1.0
        if distill and (teacher_hidden is None or teacher_head is None):
            raise PoclError(
                f"kind={self.kind!r} with sft_weight={sft_weight} needs the teacher's hidden "
                "states and head; pass teacher_inputs(...) or train with sft_weight=1"
            )
        hidden = final_hidden_states(self.model, input_ids, attention_mask)
        hidden, targets, response_mask = shift_for_next_token(hidden, labels)
        weight, bias = output_head(self.model)
        common = {
            "labels": targets,
            "chunk_size": self.chunk_size,
            "num_valid_tokens": num_valid_tokens,
            "student_head_bias": bias,
            "vocab_size": self.vocab_size,
        }
        with gathered_parameters(weight, bias):
            if not distill:
                # The CE from the same chunked path; without a teacher the kernel forms no
                # divergence, so a non-finite one can never reach the loss.
                kd, ce = fused_linear_distill_loss(
                    hidden, weight, None, None, response_mask, kind=None, **common
                )
                return LossTerms(loss=ce, kd=kd.detach(), ce=ce.detach())
            teacher_weight, teacher_bias = teacher_head
            # the teacher's state at t is compared with the student's at t: the same shift
            # The kernel weighs the terms itself: one gradient, four matmuls (not six).
            loss, kd, ce = fused_linear_distill_loss(
                hidden,
                weight,
                teacher_hidden[:, :-1],
                teacher_weight,
                response_mask,
                kind=self.kind,
                temperature=temperature,
                beta=self.beta,
                scale_by_temperature_squared=self.scale_by_temperature_squared,
                teacher_head_bias=teacher_bias,
                sft_weight=sft_weight,
                **common,
            )
        return LossTerms(loss=loss, kd=kd, ce=ce)
