"""A recipe's ingredients: the tokenizer, the tokenized splits, the student and the teacher.

This is the one place that reads ``ExperimentConfig`` to call the data and model modules, which
take plain arguments. Everything a user can get wrong here (a missing file, tokenizers that
disagree) fails before any model is built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocl_ds import distributed
from pocl_ds.config import ExperimentConfig
from pocl_ds.data import (
    InstructionSample,
    TokenizedSample,
    load_instructions,
    split_samples,
    tokenize_samples,
)
from pocl_ds.errors import PoclError
from pocl_ds.models import (
    check_tokenizers_agree,
    load_causal_lm,
    load_tokenizer,
    train_bpe_tokenizer,
)
from pocl_ds.synthetic import write_synthetic_tasks

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
    """(student, teacher); the teacher is None for SFT, which needs none."""
    m = config.model
    vocab = len(tokenizer)
    student = load_causal_lm(
        m.student,
        inline_config=m.student_config,
        vocab_size=vocab,
        gradient_checkpointing=m.gradient_checkpointing,
        seed=config.train.seed,
    )
    if config.distill.method == "sft":
        return student, None
    teacher = load_causal_lm(
        m.teacher,
        inline_config=m.teacher_config,
        vocab_size=vocab,
        dtype=m.teacher_dtype,
        seed=config.train.seed + 1,
    )
    return student, teacher
