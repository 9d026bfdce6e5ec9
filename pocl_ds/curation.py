"""Where the training responses come from: ground truth, SeqKD teacher outputs, on-policy samples.

- ``ground_truth``: the dataset's responses, untouched.
- ``seqkd``: the teacher answers every training prompt once (greedy); the answers are cached in
  the run directory, keyed by the teacher and every generation setting, and replace the
  references for plain SFT.
- ``on_policy`` (GKD): before each optimizer step, with probability λ, the current student's
  fresh samples (temperature 1) replace the responses of that step's prompts.

A generated answer that ends with an EOS is finished and keeps its EOS target. One that ran
out of its token budget (``max_new_tokens`` or the total length limit) is cut off: it is stored
without EOS, so the student is never taught to stop where the teacher or student was merely
interrupted. Such answers are counted and logged. Generation only draws ids of the tokenizer
(``vocab_size``), never a padded embedding row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pocl_ds import atomic, distributed
from pocl_ds.config import changed_fields
from pocl_ds.data import TokenizedSample
from pocl_ds.engine import weights_fingerprint
from pocl_ds.generation import Generations, distributed_generate, generate, prompt_seed
from pocl_ds.models import unwrap_model

logger = logging.getLogger(__name__)

# Bumped whenever the meaning of the cached answers changes, so old caches are regenerated.
SEQKD_CACHE_VERSION = 2
# Config fields that name the file or library the teacher was read with, not what it computes.
_CONFIG_FIELDS_NOT_KEYED = ("_name_or_path", "transformers_version")


def _with_response(
    sample: TokenizedSample,
    response: Sequence[int],
    *,
    finished: bool,
    eos_id: int,
    max_length: int,
) -> TokenizedSample:
    """``sample`` answering ``response``: EOS appended only when the answer was finished."""
    room = max(1, max_length - len(sample.prompt_ids))
    ids = [*response, eos_id] if finished else list(response)
    return replace(sample, response_ids=tuple(ids[:room]))


class SeqKDData(NamedTuple):
    """The samples with the teacher's answers, and how many answers hit the token budget."""

    samples: list[TokenizedSample]
    truncated: int


def _prompts_fingerprint(samples: Sequence[TokenizedSample]) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps([sample.index, list(sample.prompt_ids)]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _model_config(model: torch.nn.Module) -> dict[str, Any]:
    config = unwrap_model(model).config.to_dict()
    for name in _CONFIG_FIELDS_NOT_KEYED:
        config.pop(name, None)
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _read_seqkd_cache(
    cache_path: Path, key: Mapping[str, Any], num_samples: int
) -> tuple[Generations | None, str]:
    """The cached answers if ``cache_path`` was written under ``key``, and why not if not."""
    if not cache_path.is_file():
        return None, f"no cache at {cache_path}"
    try:
        lines = cache_path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0]) if lines else {}
        records = [json.loads(line) for line in lines[1:]]
    except (OSError, ValueError) as err:
        return None, f"unreadable cache {cache_path}: {err}"
    old_key = header.get("key")
    if not isinstance(old_key, Mapping):
        return None, f"{cache_path} was written by an older version"
    if old_key != key:
        return None, "changed: " + "; ".join(changed_fields(old_key, key))
    if len(records) != num_samples:
        return None, f"{cache_path} holds {len(records)} answers for {num_samples} prompts"
    return Generations(
        [list(r["response_ids"]) for r in records], [bool(r["finished"]) for r in records]
    ), "key matches"


def _write_seqkd_cache(
    cache_path: Path,
    key: Mapping[str, Any],
    samples: Sequence[TokenizedSample],
    answers: Generations,
) -> None:
    lines = [json.dumps({"key": key, "num_samples": len(samples)})]
    lines += [
        json.dumps({"index": s.index, "response_ids": ids, "finished": finished})
        for s, ids, finished in zip(samples, answers.tokens, answers.finished, strict=True)
    ]
    atomic.write_text(cache_path, "\n".join(lines) + "\n")


def seqkd_responses(
    teacher: torch.nn.Module,
    samples: list[TokenizedSample],
    *,
    cache_path: Path,
    cache_key: Mapping[str, Any],
    pad_id: int,
    eos_id: int,
    vocab_size: int,
    max_length: int,
    max_new_tokens: int,
    batch_size: int,
    synced_gpus: bool,
) -> SeqKDData:
    """The samples with the teacher's greedy answers as responses (generated once, cached).

    Collective: every rank passes the same samples and gets the same result. The cache
    (``cache_path``, written by rank 0) is reused only when its key matches: the teacher's
    weights fingerprint and model config, the caller's JSON-able ``cache_key`` (e.g. the
    teacher's name and dtype), the prompts and every generation setting. Otherwise the answers
    are regenerated and the log says what changed.
    """
    key = json.loads(
        json.dumps(
            {
                "version": SEQKD_CACHE_VERSION,
                "teacher_weights": weights_fingerprint(teacher),
                "teacher_config": _model_config(teacher),
                "teacher": dict(cache_key),
                "prompts": _prompts_fingerprint(samples),
                "generation": {
                    "greedy": True,
                    "max_new_tokens": max_new_tokens,
                    "max_total_length": max_length,
                    "vocab_size": vocab_size,
                    "batch_size": batch_size,
                    "eos_id": eos_id,
                    "pad_id": pad_id,
                },
            },
            sort_keys=True,
        )
    )
    answers, reason = None, ""
    if distributed.is_main_process():
        answers, reason = _read_seqkd_cache(cache_path, key, len(samples))
    answers, reason = distributed.broadcast_object((answers, reason))
    if answers is not None:
        logger.info("SeqKD: reusing %d teacher answers from %s", len(samples), cache_path)
    else:
        logger.info("SeqKD: generating teacher answers for %d prompts (%s)", len(samples), reason)
        answers = distributed_generate(
            teacher,
            [s.prompt_ids for s in samples],
            pad_id=pad_id,
            eos_id=eos_id,
            max_new_tokens=max_new_tokens,
            max_total_length=max_length,
            batch_size=batch_size,
            greedy=True,
            vocab_size=vocab_size,
            synced_gpus=synced_gpus,
            desc="teacher answers",
            return_finished=True,
        )
        if distributed.is_main_process():
            _write_seqkd_cache(cache_path, key, samples, answers)
        distributed.barrier()
    truncated = answers.finished.count(False)
    logger.info(
        "SeqKD: %d of %d teacher answers cut off by the token budget (max_new_tokens %d, "
        "max_length %d): kept without EOS",
        truncated,
        len(samples),
        max_new_tokens,
        max_length,
    )
    curated = [
        _with_response(s, ids, finished=finished, eos_id=eos_id, max_length=max_length)
        for s, ids, finished in zip(samples, answers.tokens, answers.finished, strict=True)
    ]
    return SeqKDData(curated, truncated)


def on_policy_seeds(seed: int, step: int, rank: int, count: int) -> list[int]:
    """Sampler seeds of the ``count`` prompts a rank samples at an optimizer step.

    Keyed by (seed, step, rank, position), so no two ranks, steps or positions share draws,
    and seed 42 at step 1 is unrelated to seed 43 at step 0.
    """
    return [prompt_seed(seed, step, rank, position) for position in range(count)]


class CurationPolicy:
    """Decides, step by step, whether a step trains on its data or on the student's samples.

    ``truncated_samples`` counts, over the run and all ranks, the student samples that hit the
    token budget (stored without EOS).
    """

    def __init__(
        self,
        *,
        on_policy: bool,
        on_policy_prob: float,
        seed: int,
        max_length: int,
        max_new_tokens: int,
        pad_id: int,
        eos_id: int,
        vocab_size: int,
    ) -> None:
        self.on_policy = on_policy
        self.on_policy_prob = on_policy_prob
        self.seed = seed
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.on_policy_steps = 0
        self.truncated_samples = 0

    def uses_student_samples(self, step: int) -> bool:
        """The same coin on every rank: it is drawn from a hash of (seed, step), not from a
        shared RNG, so no two (seed, step) pairs share a coin."""
        if not self.on_policy:
            return False
        coin = torch.Generator().manual_seed(prompt_seed(self.seed, step))
        return float(torch.rand((), generator=coin)) < self.on_policy_prob

    def apply(
        self,
        student: torch.nn.Module,
        micro_batches: list[list[TokenizedSample]],
        *,
        step: int,
        synced_gpus: bool,
    ) -> list[list[TokenizedSample]]:
        """The step's micro-batches, their responses replaced by fresh student samples when the
        step's coin says so. Collective on such steps (every rank draws the same coin)."""
        if not self.uses_student_samples(step):
            return micro_batches
        self.on_policy_steps += 1
        flat = [s for mb in micro_batches for s in mb]
        was_training = student.training
        student.eval()
        with torch.no_grad():
            samples = generate(
                student,
                [s.prompt_ids for s in flat],
                pad_id=self.pad_id,
                eos_id=self.eos_id,
                max_new_tokens=self.max_new_tokens,
                max_total_length=self.max_length,
                batch_size=len(flat),
                greedy=False,
                prompt_seeds=on_policy_seeds(self.seed, step, distributed.rank(), len(flat)),
                vocab_size=self.vocab_size,
                synced_gpus=synced_gpus,
                progress=False,
                return_finished=True,
            )
        student.train(was_training)
        self.truncated_samples += int(distributed.all_reduce_sum(samples.finished.count(False)))
        fresh = [
            _with_response(s, r, finished=done, eos_id=self.eos_id, max_length=self.max_length)
            for s, r, done in zip(flat, samples.tokens, samples.finished, strict=True)
        ]
        out, start = [], 0
        for mb in micro_batches:
            out.append(fresh[start : start + len(mb)])
            start += len(mb)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "on_policy_steps": self.on_policy_steps,
            "truncated_samples": self.truncated_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.on_policy_steps = int(state["on_policy_steps"])
        # Checkpoints written before truncation was counted resume from 0.
        self.truncated_samples = int(state.get("truncated_samples", 0))
