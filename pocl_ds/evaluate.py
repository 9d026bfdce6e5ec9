"""Evaluation: ROUGE-L and exact match of models over instruction suites and sampling seeds.

SPEC (Evaluation): sample at temperature 1.0 with no top-k/top-p filtering, at most 512
tokens in total, seeds 10/20/30/40/50; ROUGE-L F × 100 against the references (max over
them), averaged over a suite's prompts, then the mean and standard deviation over seeds.
Generation is shared out across ranks (``distributed_generate``) and so is scoring; every
rank ends with the whole report, and rank 0 writes it:

- ``eval.json``: settings, and per model × suite the per-seed scores, mean and std;
- ``generations.jsonl``: one line per model, suite, seed and prompt;
- ``table.md``: the paper's Table 1 shape, rows = models, columns = suites, then Avg.

The Avg. column averages the suites within each seed first, then takes the mean and std of
those per-seed averages, so it has the same meaning as every other cell.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pocl_ds import atomic, distributed
from pocl_ds.data import IGNORE_INDEX, TokenizedSample, collate_for_training, prompt_bos
from pocl_ds.engine import gathered_for_generation
from pocl_ds.errors import PoclError
from pocl_ds.generation import distributed_generate
from pocl_ds.metrics import exact_match, rouge_l
from pocl_ds.models import unwrap_model

logger = logging.getLogger(__name__)

DEFAULT_SEEDS = (10, 20, 30, 40, 50)
DEFAULT_MAX_TOTAL_LENGTH = 512
DEFAULT_MAX_PROMPT_LENGTH = 256
# SPEC: plain sampling at temperature 1, no top-k/top-p filtering
SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
REPORTED_AS = {
    "scale": "ROUGE-L F and exact match x 100, mean over prompts per seed",
    "std": "population (ddof=0) over seeds",
}
EVAL_JSON = "eval.json"
GENERATIONS_JSONL = "generations.jsonl"
TABLE_MD = "table.md"


@dataclass(frozen=True)
class SuiteScores:
    """One model on one suite: per-seed means over prompts, on the ×100 scale.

    ``prompts_cut`` counts the prompts cut from the left (to ``max_prompt_length`` or to fit
    the model's positions).
    """

    model: str
    suite: str
    num_prompts: int
    rouge_l: dict[int, float]
    exact_match: dict[int, float]
    prompts_cut: int = 0


@dataclass(frozen=True)
class GenerationRecord:
    """One generated response and its scores (ROUGE-L on the ×100 scale, exact match 0/1)."""

    model: str
    suite: str
    seed: int
    index: int
    prompt: str
    generation: str
    references: tuple[str, ...]
    rouge_l: float
    exact_match: float


@dataclass
class EvalReport:
    """Scores and generations of one or more models; ``settings`` describe how they were made."""

    scores: list[SuiteScores] = field(default_factory=list)
    generations: list[GenerationRecord] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def models(self) -> list[str]:
        """Model names in evaluation order."""
        return list(dict.fromkeys(s.model for s in self.scores))

    def suites(self) -> list[str]:
        """Suite names in first-seen order."""
        return list(dict.fromkeys(s.suite for s in self.scores))

    def get(self, model: str, suite: str) -> SuiteScores | None:
        return next((s for s in self.scores if s.model == model and s.suite == suite), None)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof = 0; 0.0 for a single value)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], *, max_prompt_length: int | None
) -> tuple[list[list[int]], int]:
    """Token ids of each rendered prompt, cut from the left to ``max_prompt_length``.

    Cutting from the left keeps the ``### Response:`` cue the model answers after (and the
    BOS, when there is one). Returns the ids and how many prompts were cut.
    """
    # The same BOS rule as training, so a model is evaluated on the prompt ids it learnt.
    bos = prompt_bos(tokenizer)
    encoded, cut = [], 0
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if max_prompt_length is not None and len(bos) + len(ids) > max_prompt_length:
            keep = max(1, max_prompt_length - len(bos))
            ids = ids[len(ids) - keep :]
            cut += 1
        encoded.append(bos + ids)
    return encoded, cut


def prompt_limit(
    positions: int | None,
    *,
    max_total_length: int,
    max_prompt_length: int | None,
    max_new_tokens: int | None,
) -> int | None:
    """The most prompt tokens a model is given: ``max_prompt_length``, and few enough to leave
    room for the answer in the model's ``positions`` (None: unknown, no such limit).

    The room kept is ``max_new_tokens``, else what the settings leave an answer
    (``max_total_length - max_prompt_length``: 256 under SPEC's 512/256), else one token; it
    is at most half of the positions. A model with SPEC's 512 positions or more is never cut
    beyond ``max_prompt_length``; a 128-position one gets prompts of at most 64 tokens.
    """
    if positions is None:
        return max_prompt_length
    if max_new_tokens is not None:
        room = max_new_tokens
    elif max_prompt_length is not None:
        room = max_total_length - max_prompt_length
    else:
        room = 1
    fit = positions - min(max(room, 1), positions // 2)
    return fit if max_prompt_length is None else min(max_prompt_length, fit)


def _score_shared(
    generations: Sequence[str], references: Sequence[Sequence[str]]
) -> list[tuple[float, float]]:
    """(ROUGE-L, exact match) per generation, scored across ranks."""
    return distributed.score_and_gather(
        list(zip(generations, references, strict=True)),
        lambda share: [(rouge_l(text, refs), exact_match(text, refs)) for text, refs in share],
    )


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    suites: Mapping[str, Sequence[Any]],
    *,
    name: str = "model",
    seeds: Sequence[int] = DEFAULT_SEEDS,
    greedy: bool = False,
    batch_size: int = 8,
    max_total_length: int = DEFAULT_MAX_TOTAL_LENGTH,
    max_prompt_length: int | None = DEFAULT_MAX_PROMPT_LENGTH,
    max_new_tokens: int | None = None,
    synced_gpus: bool = False,
    progress: bool = True,
) -> EvalReport:
    """Generate for every prompt of every suite under every seed and score it.

    Args:
        model: a Hugging Face causal LM or a DeepSpeed engine around one; call on every rank.
        tokenizer: its tokenizer (EOS ends a response; PAD pads; ids past ``len(tokenizer)``
            in a padded embedding table are never sampled).
        suites: suite name -> samples with ``prompt`` (rendered text) and ``references``
            (``InstructionSample`` from ``pocl_ds.data.load_instructions``).
        seeds: sampling seeds; with ``greedy`` only the first is run (greedy ignores it).
        max_total_length: prompt + response tokens at most (SPEC: 512).
        max_prompt_length: prompts are cut from the left to this many tokens (None: never).
            Prompts are also cut to fit the model's positions (see ``prompt_limit``).
        max_new_tokens: response tokens at most; None: as many as ``max_total_length``
            leaves (SPEC).
        synced_gpus: keep ranks' forwards in step (a ZeRO-3 partitioned model).
    """
    run_seeds = _check_inputs(tokenizer, suites, seeds, greedy=greedy)
    report = EvalReport(
        settings={
            "seeds": run_seeds,
            "greedy": greedy,
            **SAMPLING,
            "max_total_length": max_total_length,
            "max_prompt_length": max_prompt_length,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "world_size": distributed.world_size(),
            **REPORTED_AS,
        }
    )
    positions = _model_positions(model, name=name, max_total_length=max_total_length)
    room = {"max_prompt_length": max_prompt_length, "max_new_tokens": max_new_tokens}
    fitted_prompt_length = prompt_limit(positions, max_total_length=max_total_length, **room)
    generation = dict(
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        max_new_tokens=max_total_length if max_new_tokens is None else max_new_tokens,
        max_total_length=max_total_length,
        batch_size=batch_size,
        greedy=greedy,
        vocab_size=len(tokenizer),
        synced_gpus=synced_gpus,
        progress=progress,
    )
    # The weights stay the same through every suite and seed: a ZeRO-3 model is gathered
    # whole once for all of them (when it fits), not once per generate call.
    with gathered_for_generation(unwrap_model(model)):
        for suite, samples in suites.items():
            prompt_ids, cut = _suite_prompts(
                tokenizer,
                samples,
                f"{name} on {suite}",
                fitted_prompt_length,
                positions,
                max_prompt_length,
            )
            scores = SuiteScores(
                name, suite, len(samples), rouge_l={}, exact_match={}, prompts_cut=cut
            )
            for seed in run_seeds:
                tokens = distributed_generate(
                    model, prompt_ids, seed=seed, desc=f"{name} {suite} seed {seed}", **generation
                )
                outputs = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
                report.generations.extend(_score_seed(scores, seed, samples, outputs))
            report.scores.append(scores)
    return report


def _suite_prompts(
    tokenizer: Any,
    samples: Sequence[Any],
    where: str,
    fitted_prompt_length: int | None,
    positions: int | None,
    max_prompt_length: int | None,
) -> tuple[list[list[int]], int]:
    """A suite's prompts as token ids, cut from the left to ``fitted_prompt_length`` (logged),
    and how many were cut."""
    texts = [sample.prompt for sample in samples]
    prompt_ids, cut = encode_prompts(tokenizer, texts, max_prompt_length=fitted_prompt_length)
    if cut:
        logger.info(
            f"{where}: {cut} of {len(texts)} prompts cut from the left to "
            f"{fitted_prompt_length} tokens (max_prompt_length {max_prompt_length}, "
            f"{positions} model positions)"
        )
    return prompt_ids, cut


def _check_inputs(
    tokenizer: Any, suites: Mapping[str, Sequence[Any]], seeds: Sequence[int], *, greedy: bool
) -> list[int]:
    """The seeds to run (greedy needs one), after refusing what cannot be evaluated."""
    if not seeds:
        raise PoclError("evaluation needs at least one seed (e.g. --seeds 10 20 30 40 50)")
    if not suites:
        raise PoclError("evaluation needs at least one suite (e.g. --data dolly.jsonl)")
    empty = [name for name, samples in suites.items() if not samples]
    if empty:  # before any generation: a late suite must not fail after the early ones ran
        raise PoclError(f"evaluation suite {empty[0]!r} has no samples")
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise PoclError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} needs EOS and PAD tokens; "
            "load it with pocl_ds.models.load_tokenizer"
        )
    if greedy and len(seeds) > 1:
        logger.info("greedy decoding is deterministic: running seed %d only", int(seeds[0]))
    return [int(seeds[0])] if greedy else [int(s) for s in seeds]


def _model_positions(model: nn.Module, *, name: str, max_total_length: int) -> int | None:
    """The model's position count (None when it has no such limit), warning when it is below
    ``max_total_length``: generation then stops at the model's last position."""
    positions = getattr(unwrap_model(model).config, "max_position_embeddings", None)
    positions = positions if isinstance(positions, int) and positions > 0 else None
    if positions is not None and positions < max_total_length:
        logger.warning(
            "%s: the model has %d positions, fewer than max_total_length=%d; generating up to %d",
            name,
            positions,
            max_total_length,
            positions,
        )
    return positions


def _score_seed(
    scores: SuiteScores, seed: int, samples: Sequence[Any], outputs: Sequence[str]
) -> list[GenerationRecord]:
    """Score one seed's outputs into ``scores``; the per-prompt records."""
    references = [tuple(sample.references) for sample in samples]
    scored = _score_shared(outputs, references)
    scores.rouge_l[seed] = 100.0 * sum(r for r, _ in scored) / len(scored)
    scores.exact_match[seed] = 100.0 * sum(e for _, e in scored) / len(scored)
    logger.info(
        "%s on %s, seed %d: ROUGE-L %.2f, exact match %.2f",
        scores.model,
        scores.suite,
        seed,
        scores.rouge_l[seed],
        scores.exact_match[seed],
    )
    return [
        GenerationRecord(
            model=scores.model,
            suite=scores.suite,
            seed=seed,
            index=getattr(sample, "index", position),
            prompt=sample.prompt,
            generation=output,
            references=refs,
            rouge_l=100.0 * rouge,
            exact_match=em,
        )
        for position, (sample, output, refs, (rouge, em)) in enumerate(
            zip(samples, outputs, references, scored, strict=True)
        )
    ]


@torch.no_grad()
def validation_scores(
    model: nn.Module,
    samples: Sequence[TokenizedSample],
    tokenizer: Any,
    *,
    batch_size: int,
    rouge_samples: int | None,
    max_new_tokens: int,
    max_total_length: int,
    vocab_size: int,
    synced_gpus: bool,
    device: torch.device,
) -> dict[str, float]:
    """A training run's validation: the student's CE on the validation responses (mean over
    tokens) and the greedy ROUGE-L ×100 of its answers to the first ``rouge_samples`` prompts.

    Collective. Each rank takes every world-th batch for the CE; a rank with no batch left
    repeats the first one uncounted, as a ZeRO-3 model needs every rank's forward.
    """
    rank, world = distributed.rank(), distributed.world_size()
    pad_id = tokenizer.pad_token_id
    loss_sum, count = 0.0, 0
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    for b in range(rank, len(batches) + (-len(batches)) % world, world):
        chunk = batches[b] if b < len(batches) else batches[0]
        batch = {k: v.to(device) for k, v in collate_for_training(chunk, pad_id).items()}
        loss = model(**batch).loss
        if b < len(batches):
            tokens = int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())
            loss_sum += float(loss) * tokens
            count += tokens
    val_loss = distributed.all_reduce_sum(loss_sum) / max(1.0, distributed.all_reduce_sum(count))
    scored = samples[: rouge_samples or len(samples)]
    outputs = distributed_generate(
        model,
        [s.prompt_ids for s in scored],
        pad_id=pad_id,
        eos_id=tokenizer.eos_token_id,
        max_new_tokens=max_new_tokens,
        max_total_length=max_total_length,
        batch_size=batch_size,
        greedy=True,
        synced_gpus=synced_gpus,
        vocab_size=vocab_size,
        desc="validation",
    )
    texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    rouge = [r for r, _ in _score_shared(texts, [s.references for s in scored])]
    return {"val_loss": val_loss, "val_rouge_l": 100.0 * sum(rouge) / len(rouge)}


def merge_reports(reports: Sequence[EvalReport]) -> EvalReport:
    """One report of several models (evaluated one at a time to hold one model in memory)."""
    merged = EvalReport()
    for report in reports:
        clash = set(report.models()) & set(merged.models())
        if clash:
            raise PoclError(f"two models are both named {sorted(clash)}: give them distinct names")
        merged.scores.extend(report.scores)
        merged.generations.extend(report.generations)
        merged.settings = merged.settings or dict(report.settings)
    return merged


def evaluate(
    models: Mapping[str, nn.Module],
    suites: Mapping[str, Sequence[Any]],
    tokenizer: Any | Mapping[str, Any],
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    greedy: bool = False,
    batch_size: int = 8,
    max_total_length: int = DEFAULT_MAX_TOTAL_LENGTH,
    max_prompt_length: int | None = DEFAULT_MAX_PROMPT_LENGTH,
    max_new_tokens: int | None = None,
    synced_gpus: bool = False,
    progress: bool = True,
    output_dir: str | Path | None = None,
) -> EvalReport:
    """Evaluate each named model (one tokenizer for all, or one per name) on every suite.

    Writes ``eval.json``, ``generations.jsonl`` and ``table.md`` into ``output_dir`` (rank 0)
    when given, and logs the table. See ``evaluate_model`` for the other arguments.
    """
    reports = []
    for name, model in models.items():
        if isinstance(tokenizer, Mapping):
            if name not in tokenizer:
                raise PoclError(f"no tokenizer given for model {name!r}")
            model_tokenizer = tokenizer[name]
        else:
            model_tokenizer = tokenizer
        reports.append(
            evaluate_model(
                model,
                model_tokenizer,
                suites,
                name=name,
                seeds=seeds,
                greedy=greedy,
                batch_size=batch_size,
                max_total_length=max_total_length,
                max_prompt_length=max_prompt_length,
                max_new_tokens=max_new_tokens,
                synced_gpus=synced_gpus,
                progress=progress,
            )
        )
    report = merge_reports(reports)
    if output_dir is not None:
        write_report(report, output_dir)
    if distributed.is_main_process():
        logger.info(
            "evaluation results (ROUGE-L x 100, mean ± std over seeds):\n%s", format_table(report)
        )
    return report


def _average_over_suites(report: EvalReport, model: str, metric: str) -> dict[int, float]:
    """Per seed, the mean over the model's suites (seeds every suite has)."""
    per_suite = [getattr(s, metric) for s in report.scores if s.model == model]
    seeds = set.intersection(*(set(p) for p in per_suite)) if per_suite else set()
    return {seed: sum(p[seed] for p in per_suite) / len(per_suite) for seed in sorted(seeds)}


def _cell(values: Mapping[int, float] | None) -> str:
    if not values:
        return "–"
    mean, std = mean_std(list(values.values()))
    return f"{mean:.2f} ± {std:.2f}"


def format_table(report: EvalReport, *, metric: str = "rouge_l") -> str:
    """Markdown table: a row per model, a column per suite, then Avg.; cells "mean ± std"."""
    if metric not in ("rouge_l", "exact_match"):
        raise PoclError(f"unknown metric {metric!r}: use rouge_l or exact_match")
    suites = report.suites()
    lines = [
        "| Model | " + " | ".join([*suites, "Avg."]) + " |",
        "|---|" + "---:|" * (len(suites) + 1),
    ]
    for model in report.models():
        cells = []
        for suite in suites:
            scores = report.get(model, suite)
            cells.append(_cell(getattr(scores, metric) if scores else None))
        cells.append(_cell(_average_over_suites(report, model, metric)))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_to_json(report: EvalReport) -> dict[str, Any]:
    """The ``eval.json`` document: settings, then model -> suite -> metric -> per-seed/mean/std."""

    def summary(values: Mapping[int, float]) -> dict[str, Any]:
        mean, std = mean_std(list(values.values()))
        return {"per_seed": {str(k): v for k, v in values.items()}, "mean": mean, "std": std}

    models: dict[str, Any] = {}
    for model in report.models():
        suites = {
            s.suite: {
                "num_prompts": s.num_prompts,
                "prompts_cut": s.prompts_cut,
                "rouge_l": summary(s.rouge_l),
                "exact_match": summary(s.exact_match),
            }
            for s in report.scores
            if s.model == model
        }
        average = {
            metric: summary(_average_over_suites(report, model, metric))
            for metric in ("rouge_l", "exact_match")
        }
        models[model] = {"suites": suites, "avg": average}
    return {"settings": report.settings, "models": models}


def write_report(report: EvalReport, output_dir: str | Path) -> Path:
    """Write eval.json, generations.jsonl and table.md (rank 0 only); returns the directory."""
    directory = Path(output_dir)
    if distributed.is_main_process():
        atomic.write_text(
            directory / EVAL_JSON, json.dumps(report_to_json(report), indent=2) + "\n"
        )
        atomic.write_text(
            directory / GENERATIONS_JSONL,
            "".join(
                json.dumps(asdict(record), ensure_ascii=False) + "\n"
                for record in report.generations
            ),
        )
        atomic.write_text(
            directory / TABLE_MD,
            "ROUGE-L (×100), mean ± std over seeds\n\n"
            + format_table(report)
            + "\nExact match (×100), mean ± std over seeds\n\n"
            + format_table(report, metric="exact_match"),
        )
        logger.info("evaluation written to %s", directory)
    distributed.barrier()
    return directory
