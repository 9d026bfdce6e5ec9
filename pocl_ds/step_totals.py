"""What one optimizer step adds up over its micro-batches, summed over ranks in one all-reduce.

Per micro-batch the trainer adds the loss terms (kept on the device: no host read), whether
the loss was finite (a device flag), and the input tokens and samples (counted on the host from
the samples' lengths). After the step's last forward, ``reduce`` sums all of it and the
preemption vote over ranks in one float64 all-reduce: the step's only host-side collective.
"""

from __future__ import annotations

import torch

from pocl_ds import distributed
from pocl_ds.objective import LossTerms

KEYS = ("non_finite", "loss", "kd", "ce", "tokens", "samples", "preemption")


class StepTotals:
    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, kd, ce
        self.non_finite: list[torch.Tensor] = []  # one device flag per micro-batch
        self.tokens = 0
        self.samples = 0
        # this rank met a non-finite loss (its flag is already recorded) and took its targets out
        self.skipped = False

    def check(self, terms: LossTerms) -> torch.Tensor:
        """Record whether this micro-batch's loss is finite; the flag, still on the device."""
        flag = ~torch.isfinite(terms.loss.detach())
        self.non_finite.append(flag)
        return flag

    def add(self, terms: LossTerms, *, input_tokens: int, samples: int) -> None:
        self.sums += torch.stack([terms.loss.detach(), terms.kd, terms.ce]).double()
        self.tokens += input_tokens
        self.samples += samples

    def reduce(self, preemption_vote: float) -> dict[str, float]:
        """Sums over ranks (collective): ``non_finite`` > 0 when any rank met a non-finite
        loss; loss, kd, ce; input tokens; samples; preemption votes."""
        non_finite = torch.stack(self.non_finite).any().double().reshape(1)
        host = [float(self.tokens), float(self.samples), float(preemption_vote)]
        local = torch.cat([non_finite, self.sums, self.sums.new_tensor(host)])
        return dict(zip(KEYS, distributed.all_reduce_sums(local), strict=True))

    def culprits(self, micro_batches: list) -> list[int]:
        """This rank's samples in micro-batches whose loss was not finite (reads the flags)."""
        return [
            s.index
            for mb, flag in zip(micro_batches, self.non_finite, strict=True)
            if flag
            for s in mb
        ]
