"""The pre-training corpora: disjoint from the tasks they must not contain, sized, reproducible."""

from __future__ import annotations

import json
import re

import pytest

from pocl_ds.data import load_instructions
from pocl_ds.errors import PoclError
from pocl_ds.pretraining import (
    CHUNK_WORDS,
    NGRAM,
    python_docs_corpus,
    stdlib_docstrings,
    synthetic_corpus,
)
from pocl_ds.synthetic import write_synthetic_tasks


def _texts(path):
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8")]


def test_synthetic_corpus_holds_no_task_of_the_task_data(tmp_path):
    tasks = load_instructions(
        write_synthetic_tasks(tmp_path / "tasks.jsonl", num_samples=400, seed=0, scale="easy")
    )
    out = tmp_path / "corpus"
    description = synthetic_corpus(
        out, exclude=tasks, num_tasks=600, num_valid=40, seeds=(1001, 1002), scale="easy"
    )
    texts = _texts(out / "train.jsonl")
    assert len(texts) == description["train_records"] == 600
    # Half the tasks as templated text (prompt + answer), half as plain statements.
    templated = [t for t in texts if t.startswith("Below is an instruction")]
    assert len(templated) == 300
    assert any(" plus " in t for t in texts) and any("read backwards" in t for t in texts)
    taken = {s.prompt + s.references[0] for s in tasks}
    assert not taken.intersection(templated)
    valid = load_instructions(out / "valid.jsonl")
    assert len(valid) == description["valid_records"] == 40
    assert not {(s.prompt, s.references[0]) for s in valid} & {
        (s.prompt, s.references[0]) for s in tasks
    }
    assert not {s.prompt + s.references[0] for s in valid} & set(templated)
    # The same arguments write the same corpus.
    synthetic_corpus(
        tmp_path / "again",
        exclude=tasks,
        num_tasks=600,
        num_valid=40,
        seeds=(1001, 1002),
        scale="easy",
    )
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()


def test_synthetic_corpus_too_small_for_the_request_says_so(tmp_path):
    with pytest.raises(PoclError, match=r"only .* tasks differ from the task data"):
        synthetic_corpus(
            tmp_path, exclude=[], num_tasks=10**6, num_valid=1, seeds=(1,), scale="easy"
        )


def test_docs_corpus_drops_a_docstring_sharing_an_ngram_with_an_excluded_text(tmp_path):
    docs = stdlib_docstrings()
    assert len(docs) > 1000 and all(len(d.split()) >= 20 for d in docs)
    victim = next(d for d in docs if len(d.split()) >= 40)
    # An evaluation text that quotes NGRAM words of it, inside other words.
    quote = " ".join(re.findall(r"\w+", victim)[10 : 10 + NGRAM])
    out = tmp_path / "docs"
    description = python_docs_corpus(
        out, exclude_texts=[f"As the manual says, {quote}, indeed."], num_valid=5
    )
    kept = _texts(out / "train.jsonl")
    assert not any(quote in " ".join(re.findall(r"\w+", text)) for text in kept)
    assert all(len(t.split()) <= CHUNK_WORDS for t in kept if "\n\n" in t)
    assert description["dropped_for_overlap"] >= 1
    valid = load_instructions(out / "valid.jsonl")
    assert len(valid) == 5 and all(s.instruction == "Continue the text." for s in valid)
    assert all(s.references[0] for s in valid)
    assert description["train_words"] == sum(len(t.split()) for t in kept)
