"""Where the training responses come from: ground truth, SeqKD teacher outputs, on-policy samples.

- ``ground_truth``: the dataset's responses, untouched.
- ``seqkd``: the teacher answers every training prompt once (greedy); the answers are cached in
  the run directory and replace the references for plain SFT.
- ``on_policy`` (GKD): before each optimizer step, with probability λ, the current student's
  fresh samples (temperature 1) replace the responses of that step's prompts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pocl_ds import distributed
from pocl_ds.data import TokenizedSample
from pocl_ds.generation import distributed_generate, generate

logger = logging.getLogger(__name__)


def _with_response(
    sample: TokenizedSample, response: Sequence[int], *, eos_id: int, max_length: int
) -> TokenizedSample:
    room = max(1, max_length - len(sample.prompt_ids))
    ids = [*response, eos_id][:room]
    return replace(sample, response_ids=tuple(ids))


def seqkd_responses(
    teacher: torch.nn.Module,
    samples: list[TokenizedSample],
    *,
    cache_path: Path,
    pad_id: int,
    eos_id: int,
    max_length: int,
    max_new_tokens: int,
    batch_size: int,
    synced_gpus: bool,
) -> list[TokenizedSample]:
    """The samples with the teacher's greedy answers as responses (generated once, cached)."""
    key = [[s.index, list(s.prompt_ids)] for s in samples]
    cached = None
    if cache_path.is_file():
        lines = cache_path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0]) if lines else {}
        if header.get("prompts") == key and header.get("max_new_tokens") == max_new_tokens:
            cached = [json.loads(line)["response_ids"] for line in lines[1:]]
            logger.info("SeqKD: reusing %d teacher responses from %s", len(cached), cache_path)
    if cached is None or len(cached) != len(samples):
        logger.info("SeqKD: generating teacher responses for %d prompts", len(samples))
        cached = distributed_generate(
            teacher,
            [s.prompt_ids for s in samples],
            pad_id=pad_id,
            eos_id=eos_id,
            max_new_tokens=max_new_tokens,
            max_total_length=max_length,
            batch_size=batch_size,
            greedy=True,
            synced_gpus=synced_gpus,
            desc="seqkd",
        )
        if distributed.is_main_process():
            tmp = cache_path.with_name(cache_path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(json.dumps({"prompts": key, "max_new_tokens": max_new_tokens}) + "\n")
                for s, ids in zip(samples, cached, strict=True):
                    handle.write(json.dumps({"index": s.index, "response_ids": ids}) + "\n")
            os.replace(tmp, cache_path)
        distributed.barrier()
    return [
        _with_response(s, ids, eos_id=eos_id, max_length=max_length)
        for s, ids in zip(samples, cached, strict=True)
    ]


class CurationPolicy:
    """Decides, step by step, whether a step trains on its data or on the student's samples."""

    def __init__(
        self,
        *,
        method: str,
        on_policy_prob: float,
        seed: int,
        max_length: int,
        max_new_tokens: int,
        pad_id: int,
        eos_id: int,
    ) -> None:
        self.on_policy = method == "gkd"
        self.on_policy_prob = on_policy_prob
        self.seed = seed
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.on_policy_steps = 0

    def uses_student_samples(self, step: int) -> bool:
        """The same coin on every rank: it is drawn from (seed, step), not from a shared RNG."""
        if not self.on_policy:
            return False
        coin = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return float(torch.rand((), generator=coin)) < self.on_policy_prob

    def apply(
        self,
        student: torch.nn.Module,
        micro_batches: list[list[TokenizedSample]],
        *,
        step: int,
        synced_gpus: bool,
    ) -> list[list[TokenizedSample]]:
        if not self.uses_student_samples(step):
            return micro_batches
        self.on_policy_steps += 1
        flat = [s for mb in micro_batches for s in mb]
        was_training = student.training
        student.eval()
        with torch.no_grad():
            responses = generate(
                student,
                [s.prompt_ids for s in flat],
                pad_id=self.pad_id,
                eos_id=self.eos_id,
                max_new_tokens=self.max_new_tokens,
                max_total_length=self.max_length,
                batch_size=len(flat),
                greedy=False,
                seed=self.seed + step,
                synced_gpus=synced_gpus,
                progress=False,
            )
        student.train(was_training)
        fresh = [
            _with_response(s, r, eos_id=self.eos_id, max_length=self.max_length)
            for s, r in zip(flat, responses, strict=True)
        ]
        out, start = [], 0
        for mb in micro_batches:
            out.append(fresh[start : start + len(mb)])
            start += len(mb)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"on_policy_steps": self.on_policy_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.on_policy_steps = int(state["on_policy_steps"])
