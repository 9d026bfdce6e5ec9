"""Tests of pocl_ds.data: loaders, the SPEC template, bad input, tokenization, splits, collation."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from pocl_ds.data import (
    IGNORE_INDEX,
    InstructionSample,
    collate_for_generation,
    collate_for_training,
    load_instructions,
    prompt_bos,
    render_prompt,
    split_samples,
    tokenize_samples,
)
from pocl_ds.errors import PoclError
from pocl_ds.models import train_bpe_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("POCL_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))

# The SPEC.md template, typed out literally (not built from the library's constants).
SPEC_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Name a colour.\n"
    "\n"
    "### Input:\n"
    "The sky is blue.\n"
    "\n"
    "### Response:\n"
)
SPEC_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Name a colour.\n"
    "\n"
    "### Response:\n"
)


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


MINILLM = [
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Name a colour.", "input": "The sky is blue.", "output": ["blue", "azure"]},
    {"instruction": "Count.", "output": "1 2 3", "category": "math", "difficulty": 2},
]
DOLLY = [
    {"instruction": "Say hi.", "context": "", "response": "hi", "category": "open_qa"},
    {
        "instruction": "Name a colour.",
        "context": "The sky is blue.",
        "response": "blue",
        "category": "closed_qa",
    },
]


# ----------------------------------------------------------------------------- template


def test_template_matches_spec_character_for_character():
    assert render_prompt("Name a colour.", "The sky is blue.") == SPEC_WITH_INPUT
    assert render_prompt("Name a colour.") == SPEC_NO_INPUT
    assert render_prompt("Name a colour.", "") == SPEC_NO_INPUT


# ----------------------------------------------------------------------------- loaders


def test_minillm_jsonl(tmp_path):
    samples = load_instructions(write_jsonl(tmp_path / "d.jsonl", MINILLM))
    assert [s.index for s in samples] == [0, 1, 2]
    assert samples[0].references == ("hi",)
    assert samples[1].references == ("blue", "azure")
    assert samples[1].prompt == SPEC_WITH_INPUT
    assert samples[2].input == "" and samples[2].category == "math"
    assert samples[2].difficulty == 2 and samples[0].difficulty is None


def test_minillm_prompt_field_is_kept(tmp_path, caplog):
    record = {"instruction": "Say hi.", "output": "hi", "prompt": "custom prompt\n"}
    with caplog.at_level(logging.WARNING):
        samples = load_instructions(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert samples[0].prompt == "custom prompt\n"
    assert "differs from the SPEC template" in caplog.text


def test_dolly_layout_auto_and_named(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    for data_format in ("auto", "dolly"):
        samples = load_instructions(path, data_format=data_format)
        assert samples[1].input == "The sky is blue."
        assert samples[1].category == "closed_qa"
        assert samples[1].prompt == SPEC_WITH_INPUT


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(MINILLM), encoding="utf-8")
    assert len(load_instructions(path)) == 3


def test_parquet_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(DOLLY).to_parquet(str(path))
    samples = load_instructions(path)
    assert [s.references for s in samples] == [("hi",), ("blue",)]
    datasets.Dataset.from_list([{"instruction": "a", "response": 5}]).to_parquet(str(path))
    with pytest.raises(PoclError, match=r"d\.parquet row 1: field 'response' must be"):
        load_instructions(path)


def test_saved_dataset_directory_and_hf_format(tmp_path):
    datasets = pytest.importorskip("datasets")
    directory = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(DOLLY)}).save_to_disk(str(directory))
    assert len(load_instructions(directory)) == 2
    assert len(load_instructions(directory, split="train")) == 2
    with pytest.raises(PoclError, match="no split 'test'"):
        load_instructions(directory, split="test")


def test_hf_format_loads_through_load_dataset(tmp_path):
    # A hub name goes through datasets.load_dataset; a local data directory takes the same path.
    directory = tmp_path / "hubish"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", MINILLM)
    samples = load_instructions(str(directory), data_format="hf")
    assert [s.references[0] for s in samples] == ["hi", "blue", "1 2 3"]


def test_empty_responses_skipped_and_counted(tmp_path, caplog):
    records = [*MINILLM, {"instruction": "x", "output": "  "}, {"instruction": "y", "output": []}]
    with caplog.at_level(logging.WARNING):
        samples = load_instructions(write_jsonl(tmp_path / "d.jsonl", records))
    assert len(samples) == 3
    assert "skipped 2 record(s) with empty response (line 4, line 5)" in caplog.text


# ----------------------------------------------------------------------------- bad input

BAD_INPUT_CASES = [
    # (file content as bytes, data_format, expected message fragment)
    (
        b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
        "auto",
        r"d\.jsonl:2: malformed JSON",
    ),
    (
        b'{"instruction": "a", "output": "b"}\n{"input": "x", "output": "b"}\n',
        "auto",
        r"d\.jsonl:2: missing required field 'instruction'",
    ),
    (
        b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n',
        "minillm",
        r"d\.jsonl:2: missing required field 'output'",
    ),
    (
        b'{"instruction": "a", "output": "caf\xe9"}\n',
        "auto",
        r"d\.jsonl:1: byte 0xe9 at column \d+ is not valid UTF-8",
    ),
    (
        b'{"instruction": "a", "output": 3}\n',
        "auto",
        r"d\.jsonl:1: field 'output' must be a string or a list of strings, got int",
    ),
    (
        b'{"instruction": "a", "output": ["ok", 5]}\n',
        "auto",
        r"d\.jsonl:1: field 'output\[1\]' must be a string, got int",
    ),
    (
        b'{"instruction": ["a"], "output": "b"}\n',
        "auto",
        r"d\.jsonl:1: field 'instruction' must be a string, got list",
    ),
    (
        b'{"instruction": "a", "input": 7, "output": "b"}\n',
        "auto",
        r"d\.jsonl:1: field 'input' must be a string, got int",
    ),
    (
        b'{"instruction": "a", "context": "c", "response": {"t": 1}}\n',
        "auto",
        r"d\.jsonl:1: field 'response' must be a string or a list of strings, got dict",
    ),
    (
        b'{"instruction": "a", "context": "c"}\n',
        "dolly",
        r"d\.jsonl:1: missing required field 'response'",
    ),
    (
        b'{"question": "a", "answer": "b"}\n',
        "auto",
        r"d\.jsonl:1: cannot tell the data layout from fields \['answer', 'question'\]",
    ),
    (b'["a", "b"]\n', "auto", r"d\.jsonl:1: expected a JSON object, got list"),
    (
        b'{"instruction": "a", "output": "b", "difficulty": "hard"}\n',
        "auto",
        r"d\.jsonl:1: field 'difficulty' must be a positive integer",
    ),
    (
        b'{"instruction": "a", "output": ""}\n{"instruction": "b", "output": " "}\n',
        "auto",
        r"no usable samples: 2 record\(s\) read, skipped: 2 with empty response",
    ),
    (b"\n\n", "auto", r"no usable samples: 0 record\(s\) read"),
    (
        b'{"instruction": "a", "output": "b"}\n',
        "parquet-ish",
        r"data format 'parquet-ish' is unknown",
    ),
]


@pytest.mark.parametrize(("content", "data_format", "message"), BAD_INPUT_CASES)
def test_bad_input_names_file_line_and_field(tmp_path, content, data_format, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(PoclError, match=message):
        load_instructions(path, data_format=data_format)


def test_bad_paths(tmp_path):
    with pytest.raises(PoclError, match="no such file"):
        load_instructions(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(PoclError, match=r"unsupported file type '\.txt'"):
        load_instructions(tmp_path / "d.txt")
    path = write_jsonl(tmp_path / "d.jsonl", MINILLM)
    with pytest.raises(PoclError, match="a file has no splits"):
        load_instructions(path, split="test")


def test_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": }\n]')
    with pytest.raises(PoclError, match=r"d\.json:3: malformed JSON"):
        load_instructions(path)
    path.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 1}]')
    with pytest.raises(PoclError, match=r"d\.json item 2: field 'output' must be a string or"):
        load_instructions(path)
    path.write_bytes(b'[\n{"instruction": "a",\n "output": "caf\xe9"}]')
    with pytest.raises(PoclError, match=r"d\.json:3: byte 0xe9 at column 16 is not valid"):
        load_instructions(path)


# ----------------------------------------------------------------------------- real data

REAL_FILES = [
    ("dolly/train_1k.jsonl", 1000),
    ("dolly/test_500.jsonl", 500),
    ("selfinst/test_242.jsonl", 242),
    ("vicuna/test_80.jsonl", 80),
]


@pytest.mark.parametrize(("relative", "rows"), REAL_FILES)
def test_real_files_load(relative, rows):
    path = DATA_DIR / relative
    if not path.is_file():
        pytest.skip(f"real data {path} absent; set POCL_DATA_DIR to the shared data directory")
    samples = load_instructions(path)
    assert len(samples) == rows
    # Their 'prompt' fields were rendered with the SPEC template: our rendering must agree.
    assert all(s.prompt == render_prompt(s.instruction, s.input) for s in samples)
    assert all(s.references and s.references[0] for s in samples)


# ----------------------------------------------------------------------------- splits


def make_samples(count: int, distinct: int | None = None) -> list[InstructionSample]:
    """``count`` samples; with ``distinct``, sample i repeats task i mod ``distinct``."""
    return [
        InstructionSample(
            index=i,
            instruction=f"task {i % (distinct or count)}",
            input="",
            references=(f"answer {i % (distinct or count)}",),
            prompt=render_prompt(f"task {i % (distinct or count)}"),
        )
        for i in range(count)
    ]


def test_split_is_deterministic_disjoint_and_stable():
    samples = make_samples(100)
    train, validation, test = split_samples(samples, sizes=(60, 20, 10), seed=3)
    assert (len(train), len(validation), len(test)) == (60, 20, 10)
    ids = [s.index for part in (train, validation, test) for s in part]
    assert len(set(ids)) == 90
    assert split_samples(samples, sizes=(60, 20, 10), seed=3) == (train, validation, test)
    assert split_samples(samples, sizes=(60, 20, 10), seed=4)[2] != test
    # A smaller training set never moves a sample between validation and test.
    smaller = split_samples(samples, sizes=(30, 20, 10), seed=3)
    assert smaller[1:] == (validation, test)
    assert {s.index for s in smaller[0]} <= {s.index for s in train}


def test_split_holds_each_prompt_out_once_and_never_trains_on_it():
    """Generated data repeats prompts: a held-out prompt is in one evaluation split, once, and
    its repeats are left out of training (which is still filled from the rest)."""
    samples = make_samples(120, distinct=30)  # 30 prompts, 4 copies each
    train, validation, test = split_samples(samples, sizes=(40, 5, 5), seed=0)
    held_out = [s.prompt for s in validation + test]
    assert (len(validation), len(test)) == (5, 5)
    assert len(set(held_out)) == 10
    assert not {s.prompt for s in train} & set(held_out)
    assert len(train) == 40  # 20 prompts x 4 copies remain for training
    assert split_samples(samples, sizes=(40, 5, 5), seed=0) == (train, validation, test)
    # Fewer training candidates than asked: train takes what is left.
    assert len(split_samples(samples, sizes=(100, 5, 5), seed=0)[0]) == 80
    with pytest.raises(PoclError, match="only 30 test samples with prompts of their own"):
        split_samples(samples, sizes=(0, 0, 31), seed=0)


def test_split_default_uses_paper_proportions():
    train, validation, test = split_samples(make_samples(14_000), sizes=None, seed=0)
    assert (len(train), len(validation), len(test)) == (12_500, 1_000, 500)


def test_split_too_large_is_an_error():
    with pytest.raises(PoclError, match="need 11 samples but only 10"):
        split_samples(make_samples(10), sizes=(8, 2, 1), seed=0)


# ----------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [render_prompt(f"Repeat word {w}.", f"{w} {w}") + f"{w} {w}" for w in "abcdefgh"] * 4
    return train_bpe_tokenizer(texts, vocab_size=320, save_dir=tmp_path_factory.mktemp("tok"))


def test_tokenize_prompt_then_response_and_eos(tokenizer):
    samples = make_samples(3)
    tokenized = tokenize_samples(samples, tokenizer, max_length=256)
    for sample, tok in zip(samples, tokenized, strict=True):
        assert tok.index == sample.index
        assert tokenizer.decode(tok.prompt_ids) == sample.prompt
        assert tok.response_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(tok.response_ids[:-1]) == sample.references[0]


def test_over_length_dropped_or_prompt_truncated(tokenizer, caplog):
    samples = [
        InstructionSample(
            index=i,
            instruction="Repeat.",
            input="",
            references=("word " * (i + 1),),
            prompt=render_prompt("Repeat."),
        )
        for i in range(4)
    ]
    lengths = [
        len(t.prompt_ids) + len(t.response_ids)
        for t in tokenize_samples(samples, tokenizer, max_length=256)
    ]
    limit = max(lengths) - 1  # exactly the longest sample(s) overflow by one token
    overflowing = sum(length > limit for length in lengths)
    with caplog.at_level(logging.INFO):
        kept = tokenize_samples(samples, tokenizer, max_length=limit)
    assert len(kept) == 4 - overflowing
    assert f"over length (dropped): {overflowing}" in caplog.text
    truncated = tokenize_samples(samples, tokenizer, max_length=limit, overflow="truncate_prompt")
    assert len(truncated) == 4
    assert all(len(t.prompt_ids) + len(t.response_ids) <= limit for t in truncated)
    full = tokenize_samples(samples, tokenizer, max_length=256)
    for cut, whole in zip(truncated, full, strict=True):
        # Cut from the left: the prompt's end ("### Response:\n") survives.
        assert whole.prompt_ids[-len(cut.prompt_ids) :] == cut.prompt_ids
    prompt_cap = min(len(t.prompt_ids) for t in full) - 2
    capped = tokenize_samples(
        samples, tokenizer, max_length=256, max_prompt_length=prompt_cap, overflow="truncate_prompt"
    )
    assert all(len(t.prompt_ids) == prompt_cap for t in capped)


def test_nothing_fits_is_an_error(tokenizer):
    with pytest.raises(PoclError, match="no sample fits: 2 sample"):
        tokenize_samples(make_samples(2), tokenizer, max_length=5)
    with pytest.raises(PoclError, match="overflow='cut' is unknown"):
        tokenize_samples(make_samples(2), tokenizer, max_length=64, overflow="cut")


# ----------------------------------------------------------------------------- collation


def test_training_collation_masks_prompt_and_padding(tokenizer):
    batch = collate_for_training(
        tokenize_samples(make_samples(12)[9:], tokenizer, max_length=256)
        + tokenize_samples(make_samples(1), tokenizer, max_length=256),
        pad_id=tokenizer.pad_token_id,
    )
    tokenized = tokenize_samples(
        [*make_samples(12)[9:], *make_samples(1)], tokenizer, max_length=256
    )
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["sample_index"].tolist() == [9, 10, 11, 0]
    width = batch["input_ids"].shape[1]
    for row, sample in enumerate(tokenized):
        prompt_len, response_len = len(sample.prompt_ids), len(sample.response_ids)
        length = prompt_len + response_len
        assert batch["input_ids"][row, :length].tolist() == [
            *sample.prompt_ids,
            *sample.response_ids,
        ]
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
        labels = batch["labels"][row].tolist()
        assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert labels[prompt_len:length] == list(sample.response_ids)
        assert labels[length:] == [IGNORE_INDEX] * (width - length)
        assert batch["input_ids"][row, length:].eq(tokenizer.pad_token_id).all()


def test_pretraining_collation_targets_every_real_token(tokenizer):
    tokenized = tokenize_samples(make_samples(3), tokenizer, max_length=256)
    batch = collate_for_training(tokenized, pad_id=tokenizer.pad_token_id, loss_on_prompt=True)
    width = batch["input_ids"].shape[1]
    for row, sample in enumerate(tokenized):
        length = len(sample.prompt_ids) + len(sample.response_ids)
        labels = batch["labels"][row].tolist()
        assert labels[:length] == [*sample.prompt_ids, *sample.response_ids]
        assert labels[length:] == [IGNORE_INDEX] * (width - length)


def test_plain_text_layout_is_a_sample_without_prompt(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "one two three"}, {"text": "four"}])
    samples = load_instructions(path)
    assert [(s.prompt, s.instruction, s.references) for s in samples] == [
        ("", "", ("one two three",)),
        ("", "", ("four",)),
    ]
    assert load_instructions(path, data_format="text") == samples
    tokenized = tokenize_samples(samples, tokenizer, max_length=64)
    assert tokenized[0].prompt_ids == tuple(prompt_bos(tokenizer))
    assert tokenized[0].response_ids[-1] == tokenizer.eos_token_id
    with pytest.raises(PoclError, match="'text' \\(plain text\\)"):
        load_instructions(write_jsonl(tmp_path / "bad.jsonl", [{"words": "x"}]))


def test_generation_collation_is_left_padded():
    batch = collate_for_generation([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError):
        collate_for_generation([[1], []], pad_id=0)


def _bpe_with_post_processor(tmp_path: Path, *, bos: str, eos: str, prepend: bool):
    """A locally built fast tokenizer shaped like a real family's: OPT (BOS = EOS = ``</s>``,
    prepended by default), LLaMA (``<s>`` prepended, ``</s>`` ends) or GPT-2 (nothing added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from pocl_ds.models import load_tokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["Below is an instruction. Write a response."], trainer=trainer)
    if prepend:
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, bpe.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token="<pad>"
    )
    tokenizer.save_pretrained(str(tmp_path))
    return load_tokenizer(tmp_path)  # reloaded as a user's tokenizer directory is


@pytest.mark.parametrize(
    ("family", "bos", "eos", "prepend"),
    [
        ("opt", "</s>", "</s>", True),
        ("llama", "<s>", "</s>", True),
        ("gpt2", "</s>", "</s>", False),
    ],
)
def test_prompt_bos_follows_the_tokenizer_default(tmp_path, family, bos, eos, prepend):
    tokenizer = _bpe_with_post_processor(tmp_path, bos=bos, eos=eos, prepend=prepend)
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    expected = [bos_id] if prepend else []
    assert prompt_bos(tokenizer) == expected, family
    sample = InstructionSample(0, "Write a response.", "", ("Below.",), "Write a response.")
    (tokenized,) = tokenize_samples([sample], tokenizer, max_length=64)
    # the prompt starts exactly as the model saw text in pre-training: one BOS, or none
    assert list(tokenized.prompt_ids[: len(expected)]) == expected
    assert tokenized.prompt_ids[len(expected)] != bos_id
    assert tokenized.response_ids[-1] == tokenizer.eos_token_id
