"""The POCL difficulty measurer (SPEC "Difficulty Measurer", paper §3.1).

Each training sample gets two signals from the student as it is before distillation: its mean
response-token cross-entropy under teacher forcing (lower = easier) and the ROUGE-L F of its
greedy output against the references (higher = easier). The two rank lists are fused with
reciprocal rank fusion, the samples are sorted easiest first and cut into ``n`` contiguous
subsets d_1..d_n that the Baby-Step scheduler adds one per stage.

The pure functions (``rank_with_ties``, ``reciprocal_rank_fusion``, ``order_samples``,
``partition``) hold all of the method's arithmetic; ``measure_difficulty`` runs the model across
ranks and caches the scores in the run directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from pocl_ds import atomic, distributed
from pocl_ds.config import changed_fields
from pocl_ds.data import IGNORE_INDEX, TokenizedSample, collate_for_training
from pocl_ds.engine import weights_fingerprint
from pocl_ds.errors import PoclError
from pocl_ds.generation import distributed_generate
from pocl_ds.metrics import rouge_l
from pocl_ds.models import unwrap_model
from pocl_ds.telemetry import progress

logger = logging.getLogger(__name__)

RankBy = Literal["fusion", "rouge", "ce"]
Order = Literal["easy_to_hard", "hard_to_easy", "random"]
RANK_BY: tuple[str, ...] = ("fusion", "rouge", "ce")
ORDERS: tuple[str, ...] = ("easy_to_hard", "hard_to_easy", "random")
RRF_K = 60
# Bumped whenever the meaning of the cached numbers changes, so old caches are recomputed.
CACHE_VERSION = 1


# ---------------------------------------------------------------------------- pure functions


def rank_with_ties(
    values: Sequence[float], *, descending: bool, tie_keys: Sequence[int] | None = None
) -> list[int]:
    """1-based competition-free ranks of ``values``: rank 1 is the largest when ``descending``.

    Equal values are ordered by ``tie_keys`` (default: their position), so every sample gets a
    distinct rank and the order never depends on sort stability or the number of ranks. A NaN
    ranks last in either direction: a sample the student cannot score is treated as hardest.

    Returns ``ranks`` with ``ranks[i]`` the rank of ``values[i]``.
    """
    keys = range(len(values)) if tie_keys is None else tie_keys
    if len(keys) != len(values):
        raise ValueError(f"tie_keys has {len(keys)} entries for {len(values)} values")
    sign = -1.0 if descending else 1.0

    def sort_key(i: int) -> tuple[bool, float, int]:
        value = float(values[i])
        nan = math.isnan(value)
        return (nan, 0.0 if nan else sign * value, keys[i])

    ranks = [0] * len(values)
    for rank, i in enumerate(sorted(range(len(values)), key=sort_key), start=1):
        ranks[i] = rank
    return ranks


def reciprocal_rank_fusion(
    rank_ce: Sequence[int], rank_rouge: Sequence[int], k: int = RRF_K
) -> list[float]:
    """Fused score FR_i = 1/(k + r_ce,i) + 1/(k + r_rl,i); higher = easier (paper Eq. 2)."""
    if len(rank_ce) != len(rank_rouge):
        raise ValueError(f"rank lists differ in length: {len(rank_ce)} vs {len(rank_rouge)}")
    return [1.0 / (k + a) + 1.0 / (k + b) for a, b in zip(rank_ce, rank_rouge, strict=True)]


@dataclass(frozen=True)
class Ranking:
    """Every per-sample number of the measurer, aligned with the input lists."""

    rank_ce: list[int]
    rank_rouge: list[int]
    fused: list[float]
    order: list[int]  # positions, in the order the curriculum introduces them


def check_options(*, rank_by: str, order: str) -> None:
    """Raise ``PoclError`` for an unknown ``rank_by`` or ``order``."""
    if rank_by not in RANK_BY:
        raise PoclError(f"rank_by: got {rank_by!r}, expected one of {', '.join(RANK_BY)}")
    if order not in ORDERS:
        raise PoclError(f"order: got {order!r}, expected one of {', '.join(ORDERS)}")


def order_samples(
    ce: Sequence[float],
    rouge: Sequence[float],
    *,
    rank_by: RankBy = "fusion",
    order: Order = "easy_to_hard",
    seed: int = 0,
    k: int = RRF_K,
    tie_keys: Sequence[int] | None = None,
) -> Ranking:
    """Rank samples by difficulty and return the order the curriculum uses.

    ``ce[i]`` and ``rouge[i]`` belong to the sample at position ``i``; ``tie_keys[i]`` is its
    sample index (default ``i``). ``rank_by`` picks the signal: ``fusion`` sorts by the RRF
    score descending, ``ce``/``rouge`` by their own rank; ties always go to the lower sample
    index. ``hard_to_easy`` is exactly the reverse of ``easy_to_hard``; ``random`` ignores
    the scores and shuffles with ``seed`` (Python's Mersenne Twister, the same on every
    platform).
    """
    check_options(rank_by=rank_by, order=order)
    if len(ce) != len(rouge):
        raise ValueError(f"ce has {len(ce)} entries, rouge {len(rouge)}")
    keys = list(range(len(ce))) if tie_keys is None else list(tie_keys)
    rank_ce = rank_with_ties(ce, descending=False, tie_keys=keys)
    rank_rouge = rank_with_ties(rouge, descending=True, tie_keys=keys)
    fused = reciprocal_rank_fusion(rank_ce, rank_rouge, k)
    primary = {"fusion": rank_with_ties(fused, descending=True, tie_keys=keys)}
    primary["ce"], primary["rouge"] = rank_ce, rank_rouge
    if order == "random":
        # Shuffle samples sorted by index, so the order depends on the seed and the sample
        # indices only, never on the scores or the input order.
        curriculum_order = sorted(range(len(ce)), key=keys.__getitem__)
        random.Random(seed).shuffle(curriculum_order)
    else:
        curriculum_order = sorted(range(len(ce)), key=primary[rank_by].__getitem__)
        if order == "hard_to_easy":
            curriculum_order.reverse()
    return Ranking(rank_ce, rank_rouge, fused, curriculum_order)


def partition(sorted_indices: Sequence[int], n: int) -> list[list[int]]:
    """Cut an ordered list into ``n`` contiguous subsets d_1..d_n, first = introduced first.

    Sizes are ⌊N/n⌋ or ⌊N/n⌋+1 and the larger subsets come first (the N mod n leftovers go to
    d_1, d_2, ...), so the early stages, which Baby Step trains on the most often, never get
    fewer samples than the later ones.
    """
    total = len(sorted_indices)
    if n < 1:
        raise PoclError(f"num_subsets: got {n}, must be >= 1")
    if n > total:
        raise PoclError(
            f"num_subsets: {n} subsets need at least {n} training samples, got {total}; "
            "lower curriculum.num_stages or add data"
        )
    base, extra = divmod(total, n)
    subsets, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        subsets.append(list(sorted_indices[start : start + size]))
        start += size
    return subsets


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class DifficultyRecord:
    """One line of ``difficulty.jsonl``; ranks are 1-based, ``subset`` is 1 for d_1."""

    index: int
    ce: float
    rouge_l: float
    rank_ce: int
    rank_rouge: int
    fused: float
    subset: int


@dataclass(frozen=True)
class DifficultyResult:
    """What the measurer hands the curriculum.

    ``records`` follow the input sample order; ``order`` lists sample indices in the order the
    curriculum introduces them; ``subsets[j]`` holds the sample indices of d_(j+1).
    """

    records: list[DifficultyRecord]
    order: list[int]
    subsets: list[list[int]]
    reused: bool


def build_result(
    sample_ids: Sequence[int],
    ce: Sequence[float],
    rouge: Sequence[float],
    *,
    rank_by: RankBy,
    order: Order,
    num_subsets: int,
    seed: int,
    k: int,
    reused: bool,
) -> DifficultyResult:
    """Turn raw scores (aligned with ``sample_ids``) into ranks, order and subsets."""
    ranking = order_samples(
        ce, rouge, rank_by=rank_by, order=order, seed=seed, k=k, tie_keys=sample_ids
    )
    position_subsets = partition(ranking.order, num_subsets)
    subset_of = {pos: j + 1 for j, subset in enumerate(position_subsets) for pos in subset}
    records = [
        DifficultyRecord(
            index=sample_ids[i],
            ce=float(ce[i]),
            rouge_l=float(rouge[i]),
            rank_ce=ranking.rank_ce[i],
            rank_rouge=ranking.rank_rouge[i],
            fused=ranking.fused[i],
            subset=subset_of[i],
        )
        for i in range(len(sample_ids))
    ]
    return DifficultyResult(
        records=records,
        order=[sample_ids[i] for i in ranking.order],
        subsets=[[sample_ids[i] for i in subset] for subset in position_subsets],
        reused=reused,
    )


# ---------------------------------------------------------------------------- fingerprints


def data_fingerprint(samples: Sequence[TokenizedSample]) -> str:
    """SHA-256 of the samples' indices, token ids and references, in order."""
    digest = hashlib.sha256()
    for sample in samples:
        line = [sample.index, sample.prompt_ids, sample.response_ids, sample.references]
        digest.update(json.dumps(line, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------------- cache files


def meta_path_for(cache_path: str | os.PathLike) -> Path:
    """The sidecar holding the cache key: ``difficulty.jsonl`` → ``difficulty.meta.json``."""
    path = Path(cache_path)
    return path.with_name(path.name.split(".")[0] + ".meta.json")


def write_cache(
    cache_path: str | os.PathLike,
    result: DifficultyResult,
    *,
    key: Mapping[str, Any],
    ordering: Mapping[str, Any],
) -> None:
    """Write ``difficulty.jsonl`` then its sidecar, each atomically.

    The sidecar records the jsonl's SHA-256, so a crash between the two writes or a later
    edit of the jsonl shows up as a mismatch and the scores are recomputed.
    """
    body = "".join(json.dumps(dataclasses.asdict(record)) + "\n" for record in result.records)
    path = Path(cache_path)
    atomic.write_text(path, body)
    meta = {
        "key": dict(key),
        "ordering": dict(ordering),
        "num_samples": len(result.records),
        "jsonl_sha256": hashlib.sha256(body.encode("utf-8")).hexdigest(),
    }
    atomic.write_text(meta_path_for(path), json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _key_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Why the cached scores do not serve ``new``: fingerprints by name, settings by value."""
    labels = {"weights": "student weights changed", "data": "training data changed"}
    reasons = [label for name, label in labels.items() if old.get(name) != new.get(name)]
    settings = [{k: v for k, v in key.items() if k not in labels} for key in (old, new)]
    return "; ".join(reasons + changed_fields(*settings)) or "key changed"


def read_cache(
    cache_path: str | os.PathLike, *, key: Mapping[str, Any], sample_ids: Sequence[int]
) -> tuple[tuple[list[float], list[float]] | None, str]:
    """Cached (ce, rouge_l) aligned with ``sample_ids`` if the key matches, and why not if not."""
    path = Path(cache_path)
    meta_path = meta_path_for(path)
    if not path.is_file() or not meta_path.is_file():
        return None, f"no cache at {path}"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        body = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        return None, f"unreadable cache {meta_path}: {err}"
    if hashlib.sha256(body.encode("utf-8")).hexdigest() != meta.get("jsonl_sha256"):
        return None, f"{path} does not match its sidecar {meta_path.name}"
    if meta.get("key") != json.loads(json.dumps(dict(key))):
        return None, _key_difference(meta.get("key") or {}, key)
    scores: dict[int, tuple[float, float]] = {}
    for record in map(json.loads, body.splitlines()):
        scores[int(record["index"])] = (float(record["ce"]), float(record["rouge_l"]))
    if sorted(scores) != sorted(sample_ids):
        return None, f"{path} lists other samples than the training set"
    return (
        [scores[i][0] for i in sample_ids],
        [scores[i][1] for i in sample_ids],
    ), "key matches"


# ---------------------------------------------------------------------------- scoring


def _global_batches(samples: Sequence[TokenizedSample], batch_size: int) -> list[list[int]]:
    """Positions grouped into batches of similar length; depends on nothing but the data.

    Sorting by length (longest first, ties by position) keeps padding low, and forming the
    batches before sharding makes each sample's batch, hence its bits, independent of the
    number of ranks.
    """
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    by_length = sorted(range(len(samples)), key=lambda i: (-lengths[i], i))
    return [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]


@torch.no_grad()
def _cross_entropy_batch(
    module: torch.nn.Module, samples: Sequence[TokenizedSample], pad_id: int
) -> list[float]:
    """Mean response-token CE of each sample, teacher forced: list of length B."""
    batch = collate_for_training(list(samples), pad_id)
    device = next(module.parameters()).device
    input_ids = batch["input_ids"].to(device)  # [B, T]
    logits = module(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"][:, 1:].to(device)  # [B, T-1]; logits at t predict token t+1
    token_ce = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [B, T-1]
    mask = labels != IGNORE_INDEX
    per_sample = (token_ce * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_sample.cpu().tolist()


def _cross_entropy_scores(
    module: torch.nn.Module,
    samples: Sequence[TokenizedSample],
    batches: list[list[int]],
    pad_id: int,
    synced_gpus: bool,
    balance: bool,
) -> list[float]:
    """Teacher-forced CE of every sample (aligned with ``samples``), over the ranks."""
    world = distributed.world_size()

    def cross_entropy_share(share: Iterable[list[int]]) -> list[list[float]]:
        values = []
        if not synced_gpus:  # a static share, or batches claimed as the rank frees up (no total)
            total = len(share) if isinstance(share, list) else None
            bar = progress(total=total, desc="difficulty: cross-entropy", unit="batch")
            for batch in share:
                values.append(_cross_entropy_batch(module, [samples[p] for p in batch], pad_id))
                bar.update(1)
            bar.close()
            return values
        share = list(share)  # ZeRO-3: equal rounds on every rank, each forward collective
        bar = progress(total=len(batches), desc="difficulty: cross-entropy", unit="batch")
        for step in range(math.ceil(len(batches) / world)):
            if step < len(share):
                values.append(
                    _cross_entropy_batch(module, [samples[p] for p in share[step]], pad_id)
                )
            else:
                _cross_entropy_batch(module, [samples[p] for p in batches[0]], pad_id)
            bar.update(min(world, len(batches) - step * world))
        bar.close()
        return values

    per_batch = distributed.score_and_gather(batches, cross_entropy_share, balance=balance)
    ce = [0.0] * len(samples)
    for positions, values in zip(batches, per_batch, strict=True):
        for p, value in zip(positions, values, strict=True):
            ce[p] = value
    return ce


def score_samples(
    model: torch.nn.Module,
    samples: Sequence[TokenizedSample],
    *,
    tokenizer: Any,
    pad_id: int,
    eos_id: int,
    batch_size: int,
    max_new_tokens: int,
    max_total_length: int | None = None,
    synced_gpus: bool = False,
    balance: bool = True,
) -> tuple[list[float], list[float]]:
    """(ce, rouge_l) of every sample, aligned with ``samples``, on every rank.

    Collective: every rank calls it with the same samples and scores its round-robin share of
    the globally formed batches (``distributed.score_and_gather``). ``synced_gpus`` (ZeRO-3)
    makes ranks with fewer batches run throw-away forwards so each rank joins every parameter
    gather. Without it, and with ``balance``, ranks claim batches as they free up: greedy
    outputs end at different lengths, so equal counts of batches are unequal work. Greedy
    outputs never contain ids past ``len(tokenizer)``.
    """
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    try:
        batches = _global_batches(samples, batch_size)
        dynamic = balance and not synced_gpus
        ce = _cross_entropy_scores(module, samples, batches, pad_id, synced_gpus, dynamic)

        outputs = distributed_generate(
            model,
            [s.prompt_ids for s in samples],
            pad_id=pad_id,
            eos_id=eos_id,
            max_new_tokens=max_new_tokens,
            max_total_length=max_total_length,
            batch_size=batch_size,
            greedy=True,
            vocab_size=len(tokenizer),
            synced_gpus=synced_gpus,
            balance=dynamic,
            desc="difficulty: greedy outputs",
        )
        rouge = distributed.score_and_gather(
            list(range(len(samples))),
            lambda share: [
                rouge_l(
                    tokenizer.decode(outputs[p], skip_special_tokens=True), samples[p].references
                )
                for p in share
            ],
        )
    finally:
        module.train(was_training)
    return ce, rouge


def measure_difficulty(
    model: torch.nn.Module,
    samples: Sequence[TokenizedSample],
    *,
    tokenizer: Any,
    pad_id: int,
    eos_id: int,
    batch_size: int,
    max_new_tokens: int,
    max_total_length: int | None = None,
    rank_by: RankBy = "fusion",
    order: Order = "easy_to_hard",
    num_subsets: int = 4,
    seed: int = 0,
    rrf_k: int = RRF_K,
    cache_path: str | os.PathLike | None = None,
    cache_key: Mapping[str, Any] | None = None,
    synced_gpus: bool = False,
    balance: bool = True,
) -> DifficultyResult:
    """Score, rank and partition the training samples with the student before distillation.

    Collective: call on every rank with the same samples; every rank returns the same result.
    ``model`` is a plain module or a DeepSpeed engine. With ``cache_path``
    (``<output_dir>/difficulty.jsonl``) the scores are reused when the key — the student's
    weights, the samples, the scoring settings and the caller's JSON-able ``cache_key`` — matches
    the sidecar's, and recomputed otherwise; the ordering settings (``rank_by``, ``order``,
    ``num_subsets``, ``seed``, ``rrf_k``) only re-sort cached scores. Rank 0 writes the files.
    ``balance``: see ``score_samples`` (False: the static round-robin share, for comparison).
    """
    sample_ids = [s.index for s in samples]
    if len(set(sample_ids)) != len(sample_ids):
        raise PoclError("difficulty: training samples must have distinct `index` values")
    # Fail on bad options before the expensive part, not after it.
    partition(sample_ids, num_subsets)
    check_options(rank_by=rank_by, order=order)
    scoring = {
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "max_total_length": max_total_length,
        "pad_id": pad_id,
        "eos_id": eos_id,
    }
    key = {
        "version": CACHE_VERSION,
        # the fingerprint gathers a ZeRO-3 model: only worth it when there is a cache
        "weights": weights_fingerprint(model) if cache_path is not None else None,
        "data": data_fingerprint(samples),
        "scoring": scoring,
        "extra": dict(cache_key or {}),
    }
    ordering = {
        "rank_by": rank_by,
        "order": order,
        "num_subsets": num_subsets,
        "seed": seed,
        "rrf_k": rrf_k,
    }
    cached = _cached_scores(cache_path, key, sample_ids)
    if cached is not None:
        ce, rouge = cached
    else:
        ce, rouge = score_samples(
            model, samples, tokenizer=tokenizer, synced_gpus=synced_gpus, balance=balance, **scoring
        )
    result = build_result(
        sample_ids,
        ce,
        rouge,
        rank_by=rank_by,
        order=order,
        num_subsets=num_subsets,
        seed=seed,
        k=rrf_k,
        reused=cached is not None,
    )
    if cache_path is not None and distributed.is_main_process():
        write_cache(cache_path, result, key=key, ordering=ordering)
    _log_summary(result)
    return result


def _cached_scores(
    cache_path: str | os.PathLike | None, key: Mapping[str, Any], sample_ids: Sequence[int]
) -> tuple[list[float], list[float]] | None:
    """(ce, rouge_l) from the cache when its key matches (rank 0 reads, all ranks get it)."""
    cached, reason = None, "no cache path"
    if cache_path is not None and distributed.is_main_process():
        cached, reason = read_cache(cache_path, key=key, sample_ids=sample_ids)
    cached, reason = distributed.broadcast_object((cached, reason))
    if cached is not None:
        logger.info("difficulty: reusing scores from %s", cache_path)
    elif cache_path is not None and distributed.is_main_process():
        logger.info("difficulty: recomputing (%s)", reason)
    return cached


def _log_summary(result: DifficultyResult) -> None:
    if not distributed.is_main_process():
        return
    by_index = {r.index: r for r in result.records}
    for j, subset in enumerate(result.subsets, start=1):
        ce = [by_index[i].ce for i in subset]
        rouge = [by_index[i].rouge_l for i in subset]
        logger.info(
            "difficulty: d_%d has %d samples, mean CE %.4f, mean ROUGE-L %.4f",
            j,
            len(subset),
            sum(ce) / len(ce),
            sum(rouge) / len(rouge),
        )
