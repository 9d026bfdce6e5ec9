"""Config → a ready run: the one place that reads ``ExperimentConfig`` to build things.

``build_run`` turns a recipe into a frozen ``Run``: the tokenizer and tokenized splits, the
student in its DeepSpeed engine with its objective, the teacher, the curated training samples
(SeqKD answers), the curation policy, the difficulty scores, the stage plans with their
samplers and the curriculum controller. Every module it calls takes plain arguments. Everything
a user can get wrong (a missing file, tokenizers that disagree) fails before a model is built.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocl_ds import distributed
from pocl_ds.checkpoint import claim_output_dir
from pocl_ds.config import ExperimentConfig, save_config
from pocl_ds.curation import CurationPolicy, SeqKDData, seqkd_responses
from pocl_ds.curriculum import (
    CurriculumController,
    StagePlan,
    baby_step_plans,
    equal_budget_epochs,
    single_stage_plan,
)
from pocl_ds.data import (
    InstructionSample,
    TokenizedSample,
    load_instructions,
    split_samples,
    target_count,
    tokenize_samples,
)
from pocl_ds.difficulty import DifficultyResult, measure_difficulty
from pocl_ds.engine import build_ds_config, create_student_engine, create_teacher, zero_stage
from pocl_ds.errors import PoclError
from pocl_ds.methods import MethodSpec, method_spec
from pocl_ds.models import (
    check_tokenizers_agree,
    load_causal_lm,
    load_tokenizer,
    output_head,
    shared_vocab_size,
    train_bpe_tokenizer,
)
from pocl_ds.objective import DistillationObjective
from pocl_ds.sampler import StageSampler
from pocl_ds.synthetic import write_synthetic_tasks
from pocl_ds.teacher_cache import TeacherCache, tokenizer_fingerprint

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class PreparedData:
    tokenizer: Any
    train: list[TokenizedSample]
    valid: list[TokenizedSample]
    test: list[TokenizedSample]
    train_raw: list[InstructionSample]
    test_raw: list[InstructionSample]


SYNTHETIC_PREFIX = "synthetic:"


def resolve_data_path(path: str, output_dir: Path, seed: int) -> str:
    """``synthetic:N`` names N generated graded tasks (the embedded default): rank 0 writes
    them to the run directory, and they are read back through the ordinary jsonl loader."""
    if not path.startswith(SYNTHETIC_PREFIX):
        return path
    count = path[len(SYNTHETIC_PREFIX) :]
    if not count.isdigit() or int(count) < 1:
        raise PoclError(f"data path {path!r}: write synthetic:N with N a positive integer")
    target = output_dir / "data" / f"synthetic_{count}_seed{seed}.jsonl"
    if distributed.is_main_process() and not target.is_file():
        write_synthetic_tasks(target, num_samples=int(count), seed=seed)
    distributed.barrier()
    return str(target)


def load_splits(
    config: ExperimentConfig, output_dir: Path
) -> tuple[list[InstructionSample], list[InstructionSample], list[InstructionSample]]:
    """Train/valid/test instruction samples: separate files, or a seeded split of train_path."""
    d = config.data

    def load(path: str, offset: int) -> list[InstructionSample]:
        return load_instructions(
            resolve_data_path(path, output_dir, d.split_seed + offset), data_format=d.format
        )

    pool = load(d.train_path, 0)
    valid = load(d.valid_path, 1) if d.valid_path else None
    test = load(d.test_path, 2) if d.test_path else None
    if valid is None or test is None:
        if d.split_sizes is not None:
            valid_size, test_size = d.split_sizes
        else:  # the paper's 1K / 0.5K out of 14K, scaled to this pool
            valid_size, test_size = len(pool) * 1000 // 14000, len(pool) * 500 // 14000
        valid_size = 0 if valid is not None else max(1, valid_size)
        test_size = 0 if test is not None else test_size
        if valid_size + test_size >= len(pool):
            raise PoclError(
                f"data.split_sizes: {valid_size} validation + {test_size} test samples leave "
                f"none of the {len(pool)} in {d.train_path} for training; lower the sizes"
            )
        train, split_valid, split_test = split_samples(
            pool,
            sizes=(len(pool) - valid_size - test_size, valid_size, test_size),
            seed=d.split_seed,
        )
        valid = valid if valid is not None else split_valid
        test = test if test is not None else split_test
    else:
        train = pool
    if d.max_train_samples is not None:
        train = train[: d.max_train_samples]
    if d.max_valid_samples is not None:
        valid = valid[: d.max_valid_samples]
    if not valid:
        raise PoclError("data.split_sizes: the validation split is empty; give it samples")
    return train, valid, test


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (``org/name`` has one slash; paths start with / . ~ or nest)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_model_paths(config: ExperimentConfig) -> None:
    """A model or tokenizer given as a local path must exist: say which field, before any load."""
    m = config.model
    for field, name in (("teacher", m.teacher), ("student", m.student), ("tokenizer", m.tokenizer)):
        if name and _looks_local(name) and not Path(name).expanduser().exists():
            raise PoclError(f"model.{field}: {name} does not exist; give a directory or a hub name")


def prepare_tokenizer(
    config: ExperimentConfig, train: list[InstructionSample], output_dir: Path
) -> Any:
    """The recipe's tokenizer; for inline (from-scratch) models a BPE trained on the training
    texts by rank 0 and saved in the run directory, so evaluation and export reuse it."""
    m = config.model
    check_model_paths(config)
    named = m.tokenizer or m.teacher or m.student
    if m.teacher and m.student and not m.tokenizer:
        check_tokenizers_agree(load_tokenizer(m.teacher), load_tokenizer(m.student))
    if named:
        return load_tokenizer(named)
    saved = output_dir / TOKENIZER_DIR
    if distributed.is_main_process() and not (saved / "tokenizer.json").is_file():
        texts = [s.prompt + "".join(s.references) for s in train]
        train_bpe_tokenizer(texts, vocab_size=m.tokenizer_vocab_size, save_dir=saved)
    distributed.barrier()
    return load_tokenizer(saved)


def prepare_data(config: ExperimentConfig, output_dir: Path) -> PreparedData:
    train, valid, test = load_splits(config, output_dir)
    tokenizer = prepare_tokenizer(config, train, output_dir)
    d = config.data

    def tokenize(samples: list[InstructionSample]) -> list[TokenizedSample]:
        return tokenize_samples(
            samples,
            tokenizer,
            max_length=d.max_length,
            max_prompt_length=d.max_prompt_length,
            overflow=d.overflow,
        )

    logger.info("data: %d train, %d validation, %d test samples", len(train), len(valid), len(test))
    return PreparedData(
        tokenizer=tokenizer,
        train=tokenize(train),
        valid=tokenize(valid),
        test=tokenize(test) if test else [],
        train_raw=train,
        test_raw=test,
    )


def prepare_models(config: ExperimentConfig, tokenizer: Any) -> tuple[Any, Any | None]:
    """(student, teacher); the teacher is None for methods that never use one (SFT)."""
    m = config.model
    vocab = len(tokenizer)
    student = load_causal_lm(
        m.student,
        inline_config=m.student_config,
        vocab_size=vocab,
        gradient_checkpointing=m.gradient_checkpointing,
        seed=config.train.seed,
    )
    if method_spec(config.distill.method).teacher == "none":
        return student, None
    teacher = load_causal_lm(
        m.teacher,
        inline_config=m.teacher_config,
        vocab_size=vocab,
        dtype=m.teacher_dtype,
        seed=config.train.seed + 1,
    )
    return student, teacher


# ----------------------------------------------------------------------------- the run


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Run:
    """Everything one training run is made of, built once from its config (``build_run``).

    The trainer gets this and only runs it: it reads no config field that decides what is
    built. ``teacher`` is set only for methods whose loss needs it at every step, and
    ``teacher_cache`` then hands the loss its states (from the teacher or its cache);
    ``samplers`` holds one ``StageSampler`` per stage of ``controller.plans``.
    """

    config: ExperimentConfig
    method: MethodSpec
    output_dir: Path
    data: PreparedData
    samples_by_index: dict[int, TokenizedSample]
    engine: Any
    teacher: Any | None
    teacher_cache: TeacherCache | None
    curation: CurationPolicy
    controller: CurriculumController
    samplers: list[StageSampler]
    difficulty: DifficultyResult | None
    zero3: bool
    device: torch.device
    vocab_size: int
    seqkd_truncated: int
    eval_suites: dict[str, list[InstructionSample]]
    timings: dict[str, float]

    def target_tokens(self, indices: Iterable[int]) -> int:
        """The target tokens of these training samples, as ``collate_for_training`` labels them."""
        on_prompt = self.method.loss_on_prompt
        return sum(
            target_count(self.samples_by_index[i], loss_on_prompt=on_prompt) for i in indices
        )

    @property
    def pad_id(self) -> int:
        return self.data.tokenizer.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.data.tokenizer.eos_token_id


def _head_width(model: Any) -> int:
    return int(output_head(model)[0].shape[0])


def build_run(config: ExperimentConfig, *, resume: str = "none") -> Run:
    """Config → a ready run on every rank: data, models, engines, curation, difficulty, plans.

    Collective. ``resume`` only decides whether an existing run in ``output_dir`` may be
    continued (see ``checkpoint.claim_output_dir``); the trainer restores the checkpoint.
    """
    build_started = time.perf_counter()
    method = method_spec(config.distill.method)
    out = Path(config.train.output_dir)
    claim_output_dir(out, resume=resume, overwrite=config.train.overwrite_output_dir)
    if distributed.is_main_process():
        save_config(config, out / "config.yaml")
    distributed.barrier()
    seed_everything(config.train.seed)
    data = prepare_data(config, out)
    student, teacher = prepare_models(config, data.tokenizer)
    widths = [_head_width(m) for m in (student, teacher) if m is not None]
    vocab_size = shared_vocab_size(len(data.tokenizer), min(widths), max(widths))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine, zero3 = _student_engine(config, method, student, vocab_size)
    if teacher is not None:
        teacher = create_teacher(
            teacher,
            partition=config.model.teacher_partition,
            dtype=DTYPES[config.model.teacher_dtype],
            micro_batch_size=config.train.micro_batch_size,
            world_size=distributed.world_size(),
            device=device,
        )
    train_samples, seqkd_truncated = data.train, 0
    if method.curation == "teacher_answers":
        train_samples, seqkd_truncated = _seqkd_samples(config, data, teacher, vocab_size)
    if method.teacher != "train":
        teacher = None  # SeqKD's teacher has written its answers: free it before training
    curation = CurationPolicy(
        on_policy=method.on_policy,
        vocab_size=vocab_size,
        on_policy_prob=config.distill.on_policy_prob,
        seed=config.train.seed,
        max_length=config.data.max_length,
        max_new_tokens=config.distill.generation_max_new_tokens,
        pad_id=data.tokenizer.pad_token_id,
        eos_id=data.tokenizer.eos_token_id,
    )
    timings = {"difficulty": 0.0, "curriculum": 0.0}
    started = time.perf_counter()
    difficulty = None
    if config.curriculum.strategy == "pocl":
        difficulty = _measure_difficulty(config, engine, data, zero3=zero3, vocab_size=vocab_size)
        timings["difficulty"] = time.perf_counter() - started
    plans = _stage_plans(config, method, [s.index for s in train_samples], difficulty)
    samplers = [_stage_sampler(config, plan) for plan in plans]
    controller = CurriculumController(
        plans,
        patience=config.curriculum.patience,
        output_dir=out,
        steps_per_epoch=[len(s) for s in samplers],
    )
    timings["curriculum"] = time.perf_counter() - started - timings["difficulty"]
    timings["setup"] = time.perf_counter() - build_started  # difficulty and plans included
    return Run(
        config=config,
        method=method,
        output_dir=out,
        data=data,
        samples_by_index={s.index: s for s in train_samples},
        engine=engine,
        teacher=teacher,
        teacher_cache=_teacher_cache(config, teacher, data, train_samples),
        curation=curation,
        controller=controller,
        samplers=samplers,
        difficulty=difficulty,
        zero3=zero3,
        device=device,
        vocab_size=vocab_size,
        seqkd_truncated=seqkd_truncated,
        eval_suites=eval_suites(config, data),
        timings=timings,
    )


def eval_suites(config: ExperimentConfig, data: PreparedData) -> dict[str, list[InstructionSample]]:
    """The final evaluation's suites: ``eval.suites``, else the test split; empty when the
    run ends without one (``eval.evaluate_at_end: false``, or nothing to evaluate on)."""
    if not config.eval.evaluate_at_end:
        return {}
    if config.eval.suites:
        return {
            name: load_instructions(path, data_format=config.data.format)
            for name, path in config.eval.suites.items()
        }
    if data.test_raw:
        return {"test": list(data.test_raw)}
    logger.info("no test split and no eval.suites: the run ends without a final evaluation")
    return {}


def _student_engine(
    config: ExperimentConfig, method: MethodSpec, student: Any, vocab_size: int
) -> tuple[Any, bool]:
    """The student inside its objective inside a DeepSpeed engine; and whether it is ZeRO-3."""
    t, d = config.train, config.distill
    ds_config = build_ds_config(
        t.ds_config,
        micro_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        world_size=distributed.world_size(),
        precision=t.precision,
        max_grad_norm=t.max_grad_norm,
    )
    objective = DistillationObjective(
        student,
        kind=method.trained_divergence(d.divergence),
        beta=d.beta,
        scale_by_temperature_squared=d.scale_by_temperature_squared,
        chunk_size=d.chunk_size,
        vocab_size=vocab_size,
    )
    engine = create_student_engine(objective, ds_config, lr=t.lr, weight_decay=t.weight_decay)
    return engine, zero_stage(ds_config) == 3


def _teacher_cache(
    config: ExperimentConfig, teacher: Any, data: PreparedData, samples: list[TokenizedSample]
) -> TeacherCache | None:
    if teacher is None:  # no teacher in the loss, nothing to cache
        return None
    cached = config.distill.teacher_cache != "none"  # only a cache needs the tokenizer's key
    cache = teacher_cache_for(
        config, teacher, tokenizer_fingerprint(data.tokenizer) if cached else ""
    )
    if cached:
        logger.info(
            "teacher cache (%s, %s): %.1f MiB once all %d training samples are in it",
            *(cache.mode, cache.dtype, cache.size_bytes(samples) / 2**20, len(samples)),
        )
    return cache


def teacher_cache_for(config: ExperimentConfig, teacher: Any, tokenizer_id: str) -> TeacherCache:
    """The run's ``TeacherCache`` (``distill.teacher_cache``; mode none runs the teacher)."""
    d = config.distill
    return TeacherCache(
        teacher,
        mode=d.teacher_cache,
        dtype=None if d.teacher_cache_dtype == "teacher" else DTYPES[d.teacher_cache_dtype],
        directory=config.train.output_dir,
        tokenizer_id=tokenizer_id,
        partitioned=config.model.teacher_partition,
    )


def _seqkd_samples(
    config: ExperimentConfig, data: PreparedData, teacher: Any, vocab_size: int
) -> SeqKDData:
    """The training samples with the teacher's answers (cached by teacher and settings)."""
    return seqkd_responses(
        teacher,
        data.train,
        cache_path=Path(config.train.output_dir) / "seqkd_responses.jsonl",
        cache_key={
            "teacher": config.model.teacher or config.model.teacher_config,
            "teacher_dtype": config.model.teacher_dtype,
        },
        vocab_size=vocab_size,
        pad_id=data.tokenizer.pad_token_id,
        eos_id=data.tokenizer.eos_token_id,
        max_length=config.data.max_length,
        max_new_tokens=config.distill.generation_max_new_tokens,
        batch_size=config.eval.batch_size,
        synced_gpus=config.model.teacher_partition,
    )


def _stage_sampler(config: ExperimentConfig, plan: StagePlan) -> StageSampler:
    return StageSampler(
        plan.sample_indices,
        stage=plan.stage,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
        seed=config.train.seed,
        micro_batch_size=config.train.micro_batch_size,
        accumulation_steps=config.train.gradient_accumulation_steps,
    )


def _measure_difficulty(
    config: ExperimentConfig, engine: Any, data: PreparedData, *, zero3: bool, vocab_size: int
) -> DifficultyResult:
    """The student's difficulty ranking of the training set, on the dataset's own responses
    (also for SeqKD, whose training responses are the teacher's: SPEC)."""
    c = config.curriculum
    return measure_difficulty(
        engine.module.model,
        data.train,
        tokenizer=data.tokenizer,
        pad_id=data.tokenizer.pad_token_id,
        eos_id=data.tokenizer.eos_token_id,
        batch_size=c.difficulty_batch_size,
        max_new_tokens=c.difficulty_max_new_tokens,
        max_total_length=config.data.max_length,
        rank_by=c.rank_by,
        order=c.order,
        num_subsets=c.num_stages,
        seed=config.train.seed,
        rrf_k=c.rrf_k,
        cache_path=Path(config.train.output_dir) / "difficulty.jsonl",
        cache_key={"student": config.model.student or config.model.student_config},
        synced_gpus=zero3,
    )


def _stage_plans(
    config: ExperimentConfig,
    method: MethodSpec,
    sample_indices: list[int],
    difficulty: DifficultyResult | None,
) -> list[StagePlan]:
    """One stage of every sample without curriculum; Baby Step over the difficulty subsets."""
    if difficulty is None:
        return single_stage_plan(
            sample_indices,
            temperature=config.distill.temperature,
            sft_weight=method.alpha(config.distill.sft_weight),
            epochs=config.train.epochs,
        )
    c = config.curriculum
    alpha_start, alpha_end = method.alpha_schedule(c.sft_weight_start, c.sft_weight_end)
    return baby_step_plans(
        difficulty.subsets,
        epochs_per_stage=c.epochs_per_stage
        or equal_budget_epochs(config.train.epochs, c.num_stages),
        temperature_start=c.temperature_start,
        temperature_end=c.temperature_end,
        sft_weight_start=alpha_start,
        sft_weight_end=alpha_end,
    )
