"""Which samples a rank trains on, in which order and in which micro-batches, stage by stage.

A ``StageSampler`` serves one curriculum stage on one rank: each epoch it shuffles the stage's
samples by (seed, stage, epoch), takes this rank's shard, cuts it into micro-batches and groups
them into optimizer steps. Its length, in optimizer steps per epoch, is the run's only step
count: the LR schedule, the progress bar and ``curriculum.json`` all read it. Its state (epoch,
steps done) is part of every checkpoint, so a resumed run continues with the very next batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

from pocl_ds.errors import PoclError


def shard_indices(
    indices: Sequence[int],
    *,
    rank: int,
    world_size: int,
    shuffle_key: str,
    drop_last: bool = False,
) -> list[int]:
    """This rank's share of one epoch over ``indices``, shuffled by ``shuffle_key``.

    Every rank computes the same permutation and takes every ``world_size``-th element from
    position ``rank``, so the shards are disjoint and together cover the stage. Shards have
    equal length so all ranks run the same number of steps: by default the permutation is
    padded with its own first ⌈N/w⌉·w − N elements (< w samples seen twice in the epoch, as
    torch's DistributedSampler does); with ``drop_last`` its last N mod w elements are left out
    this epoch instead (a different few each epoch). The key is a string, hashed by SHA-512 in
    ``random.Random``, so distinct keys never share a permutation by arithmetic accident.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    order = list(indices)
    random.Random(shuffle_key).shuffle(order)
    if drop_last:
        order = order[: len(order) - len(order) % world_size]
    elif order:
        padding = -len(order) % world_size
        order += (order * math.ceil(padding / len(order)))[:padding]
    return order[rank::world_size]


class StageSampler:
    """One stage's optimizer steps on this rank, epoch by epoch.

    Iterating yields, for each remaining optimizer step of the current epoch, its
    ``accumulation_steps`` micro-batches of sample indices. A trailing shard that does not fill
    a whole optimizer step is left out of the epoch (a different few samples each epoch).
    """

    def __init__(
        self,
        sample_indices: Sequence[int],
        *,
        stage: int,
        rank: int,
        world_size: int,
        seed: int,
        micro_batch_size: int,
        accumulation_steps: int,
    ) -> None:
        self.sample_indices = tuple(sample_indices)
        self.stage = stage
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = accumulation_steps
        self.epoch = 0
        self.steps_done = 0
        self._every_rank: tuple[int, list[list[list[int]]]] | None = None  # (epoch, batches)
        per_rank = math.ceil(len(self.sample_indices) / world_size)
        self._steps = math.ceil(per_rank / micro_batch_size) // accumulation_steps
        if self._steps == 0:
            raise PoclError(
                f"stage {stage}: {len(self.sample_indices)} samples over {world_size} ranks give "
                f"fewer than train.gradient_accumulation_steps={accumulation_steps} micro-batches "
                f"of {micro_batch_size}; lower the batch size or the accumulation steps"
            )

    def __len__(self) -> int:
        """Optimizer steps per epoch (the same every epoch and on every rank)."""
        return self._steps

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (0-based within the stage) from its first step."""
        self.epoch = epoch
        self.steps_done = 0

    def epoch_micro_batches(self, epoch: int, rank: int | None = None) -> list[list[int]]:
        """Every micro-batch of ``epoch`` on this rank (or ``rank``), in order (whole optimizer
        steps only)."""
        shard = shard_indices(
            self.sample_indices,
            rank=self.rank if rank is None else rank,
            world_size=self.world_size,
            shuffle_key=f"pocl-shard:{self.seed}:{self.stage}:{epoch}",
        )
        size = self.micro_batch_size
        batches = [shard[i : i + size] for i in range(0, len(shard), size)]
        return batches[: self._steps * self.accumulation_steps]

    def global_batch(self, step: int) -> list[int]:
        """The samples of optimizer step ``step`` (0-based) of the current epoch on every rank:
        each rank knows the whole global batch without asking the others."""
        if self._every_rank is None or self._every_rank[0] != self.epoch:
            shares = [self.epoch_micro_batches(self.epoch, r) for r in range(self.world_size)]
            self._every_rank = (self.epoch, shares)
        a = self.accumulation_steps
        return [
            i
            for share in self._every_rank[1]
            for mb in share[step * a : (step + 1) * a]
            for i in mb
        ]

    def __iter__(self) -> Iterator[list[list[int]]]:
        batches = self.epoch_micro_batches(self.epoch)
        accumulation = self.accumulation_steps
        while self.steps_done < self._steps:
            start = self.steps_done * accumulation
            self.steps_done += 1
            yield batches[start : start + accumulation]

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "epoch": self.epoch, "steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["stage"]) != self.stage:
            raise ValueError(f"sampler state of stage {state['stage']} loaded into {self.stage}")
        self.epoch = int(state["epoch"])
        self.steps_done = int(state["steps_done"])
