"""Tests of pocl_ds.synthetic: determinism, correctness, balance, and that levels differ."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from pocl_ds.data import (
    collate_for_training,
    load_instructions,
    render_prompt,
    split_samples,
    tokenize_samples,
)
from pocl_ds.errors import PoclError
from pocl_ds.models import load_causal_lm, train_bpe_tokenizer
from pocl_ds.synthetic import FAMILIES, NUM_LEVELS, SCALES, generate_tasks, write_synthetic_tasks


def test_deterministic_by_seed():
    assert generate_tasks(64, seed=7) == generate_tasks(64, seed=7)
    assert generate_tasks(64, seed=7) != generate_tasks(64, seed=8)


def test_families_and_levels_are_balanced():
    tasks = generate_tasks(160, seed=0)
    counts = collections.Counter((t["category"], t["difficulty"]) for t in tasks)
    assert set(counts) == {(f, lv) for f in FAMILIES for lv in range(1, NUM_LEVELS + 1)}
    assert set(counts.values()) == {10}
    only = generate_tasks(8, seed=0, families=["lookup"])
    assert {t["category"] for t in only} == {"lookup"}


def _solve(task: dict) -> str:
    """An independent solver for every family, from the rendered text alone."""
    family, text = task["category"], task["input"]
    if family == "addition":
        left, right = text.split(" + ")
        return str(int(left) + int(right))
    if family == "reverse":
        return " ".join(reversed(text.split()))
    if family == "sort":
        return " ".join(map(str, sorted(map(int, text.split()))))
    key = task["instruction"].removeprefix("What is the value of ").removesuffix("?")
    return dict(pair.split("=") for pair in text.split(", "))[key]


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_answers_are_correct_and_sizes_grow_with_level(scale):
    tasks = generate_tasks(400, seed=1, scale=scale)
    for task in tasks:
        assert task["output"] == _solve(task)
        assert task["prompt"] == render_prompt(task["instruction"], task["input"])
    mean_input = collections.defaultdict(list)
    for task in tasks:
        mean_input[(task["category"], task["difficulty"])].append(len(task["input"]))
    for family in FAMILIES:
        sizes = [
            sum(mean_input[(family, lv)]) / len(mean_input[(family, lv)]) for lv in (1, 2, 3, 4)
        ]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1], (family, sizes)


def test_easy_scale_keeps_numbers_small():
    def largest_number(scale: str, family: str) -> int:
        tasks = generate_tasks(400, seed=3, scale=scale, families=[family])
        return max(int(n) for t in tasks for n in t["input"].replace("+", " ").split())

    for family in ("addition", "sort"):
        assert largest_number("easy", family) < largest_number("standard", family) / 10, family
    assert generate_tasks(32, seed=0, scale="easy") != generate_tasks(32, seed=0)


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_level_has_room_for_a_disjoint_corpus(scale):
    """The old easy scale had 26, 10 and 25 possible level-1 reversals, sorts and sums: the
    demo's task data held all of them, so its disjoint pre-training corpus had none."""
    tasks = generate_tasks(500 * len(FAMILIES) * NUM_LEVELS, seed=0, scale=scale)
    distinct = collections.defaultdict(set)
    for task in tasks:
        distinct[(task["category"], task["difficulty"])].add(task["prompt"])
    assert len(distinct) == len(FAMILIES) * NUM_LEVELS
    for cell, prompts in distinct.items():
        assert len(prompts) >= 90, (cell, len(prompts))


def test_written_jsonl_loads_with_difficulty(tmp_path):
    path = write_synthetic_tasks(tmp_path / "sub" / "tasks.jsonl", num_samples=20, seed=2)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records == generate_tasks(20, seed=2)
    samples = load_instructions(path)
    assert [s.difficulty for s in samples] == [r["difficulty"] for r in records]
    assert [s.category for s in samples] == [r["category"] for r in records]


def test_bad_arguments():
    with pytest.raises(PoclError, match="'division'"):
        generate_tasks(4, seed=0, families=["division"])
    with pytest.raises(PoclError, match="num_samples=0"):
        generate_tasks(0, seed=0)
    with pytest.raises(PoclError, match=r"'tiny'.*easy"):
        generate_tasks(4, seed=0, scale="tiny")


@pytest.mark.slow
def test_tiny_model_loss_rises_with_difficulty(tmp_path):
    """A tiny gpt2 trained briefly: per-token response loss on held-out tasks grows with level."""
    torch.set_num_threads(1)
    path = write_synthetic_tasks(tmp_path / "tasks.jsonl", num_samples=1600, seed=0)
    train, _, test = split_samples(load_instructions(path), sizes=(1200, 0, 400), seed=0)
    tokenizer = train_bpe_tokenizer(
        [s.prompt + s.references[0] for s in train], vocab_size=512, save_dir=tmp_path / "tok"
    )
    train_ids = tokenize_samples(train, tokenizer, max_length=128)
    test_ids = tokenize_samples(test, tokenizer, max_length=128)
    model = load_causal_lm(inline_config={"family": "gpt2"}, vocab_size=len(tokenizer), seed=0)
    model.train()
    steps = 120
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, len(train_ids), (32,), generator=generator).tolist()
        batch = collate_for_training([train_ids[r] for r in rows], tokenizer.pad_token_id)
        loss = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()

    model.eval()
    level_of = {s.index: s.difficulty for s in test}
    per_level = collections.defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(test_ids), 100):
            chunk = test_ids[start : start + 100]
            batch = collate_for_training(chunk, tokenizer.pad_token_id)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            labels = batch["labels"][:, 1:]
            token_loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels, reduction="none"
            )
            mask = labels.ne(-100)
            sample_loss = (token_loss * mask).sum(1) / mask.sum(1)
            for sample, value in zip(chunk, sample_loss.tolist(), strict=True):
                per_level[level_of[sample.index]].append(value)
    means = [sum(per_level[lv]) / len(per_level[lv]) for lv in range(1, NUM_LEVELS + 1)]
    assert means[0] + 0.5 < means[-1], means
    assert means[0] < means[1] < means[3] and means[2] < means[3], means
