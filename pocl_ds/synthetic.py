"""Generated instruction tasks whose difficulty is known by construction.

The embedded default dataset: it needs no download, a tiny model learns its easy levels in
minutes on a CPU and fails its hard ones, so a demo can show what a curriculum does and the
difficulty measurer can be checked against the truth. Each family grows one size with the
level (operand range, list length, number of pairs) while answers stay under 24 tokens, so
training and generation stay cheap. Every level holds at least 100 distinct tasks: a
pre-training corpus, a training set and held-out tasks must be disjoint, and a level of a few
dozen tasks would be used up by the task data and never reach the corpus (a base model would
then never see it). The ``easy`` scale keeps numbers small for the demo's tiny models;
``standard`` is the default.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pocl_ds.data import render_prompt
from pocl_ds.errors import PoclError

NUM_LEVELS = 4


@dataclass(frozen=True)
class _Sizes:
    """The size each family grows with, per level 1..NUM_LEVELS."""

    add_ranges: tuple[tuple[int, int], ...]  # inclusive operand range
    reverse_lengths: tuple[int, ...]
    # Sorting grows both the list and its numbers: a longer sorted list alone is easier per
    # token (its elements crowd together), which would invert the per-token difficulty.
    sort_sizes: tuple[tuple[int, int], ...]  # (list length, largest number)
    lookup_pairs: tuple[int, ...]


SCALES = {
    "standard": _Sizes(
        add_ranges=((0, 9), (10, 99), (100, 999), (1000, 9999)),
        reverse_lengths=(2, 3, 5, 8),
        sort_sizes=((2, 9), (3, 9), (3, 99), (4, 999)),
        lookup_pairs=(1, 2, 4, 8),
    ),
    # The demo's tiny Llama student base must find level 1 easiest in every family: two-letter
    # reversals were harder for it than three-letter ones, and sorts of numbers up to 19 were
    # as hard at 8 numbers as at 2, so reversal starts at 3 letters and sorting grows its
    # numbers with its lists (README, "Demo").
    "easy": _Sizes(
        add_ranges=((0, 9), (0, 19), (0, 49), (0, 99)),
        reverse_lengths=(3, 5, 8, 12),
        sort_sizes=((2, 19), (3, 29), (5, 49), (8, 99)),
        lookup_pairs=(1, 2, 4, 8),
    ),
}

_Task = tuple[str, str, str]  # instruction, input, output


def _addition(rng: random.Random, level: int, sizes: _Sizes) -> _Task:
    low, high = sizes.add_ranges[level - 1]
    left, right = rng.randint(low, high), rng.randint(low, high)
    return "Add the two numbers.", f"{left} + {right}", str(left + right)


def _reverse(rng: random.Random, level: int, sizes: _Sizes) -> _Task:
    letters = rng.choices(string.ascii_lowercase, k=sizes.reverse_lengths[level - 1])
    return "Reverse the list.", " ".join(letters), " ".join(reversed(letters))


def _sort(rng: random.Random, level: int, sizes: _Sizes) -> _Task:
    length, largest = sizes.sort_sizes[level - 1]
    numbers = rng.choices(range(largest + 1), k=length)
    return (
        "Sort the numbers from smallest to largest.",
        " ".join(map(str, numbers)),
        " ".join(map(str, sorted(numbers))),
    )


def _lookup(rng: random.Random, level: int, sizes: _Sizes) -> _Task:
    keys = rng.sample(string.ascii_lowercase, k=sizes.lookup_pairs[level - 1])
    values = rng.choices(range(10), k=len(keys))
    asked = rng.choice(keys)
    context = ", ".join(f"{key}={value}" for key, value in zip(keys, values, strict=True))
    return f"What is the value of {asked}?", context, str(values[keys.index(asked)])


FAMILIES: dict[str, Callable[[random.Random, int, _Sizes], _Task]] = {
    "addition": _addition,
    "reverse": _reverse,
    "sort": _sort,
    "lookup": _lookup,
}


def generate_tasks(
    num_samples: int,
    seed: int,
    *,
    families: Sequence[str] | None = None,
    scale: str = "standard",
) -> list[dict[str, object]]:
    """``num_samples`` tasks in the MiniLLM layout plus ``difficulty`` (1..NUM_LEVELS).

    Families and levels are balanced (sample i gets family i mod F and level (i div F)
    mod NUM_LEVELS + 1 before a seeded shuffle); the same (num_samples, seed, families,
    scale) always gives the same list. ``scale`` picks the sizes of ``SCALES`` ("easy" for
    the demo's tiny models). Each record has ``instruction``, ``input``, ``output``,
    ``prompt`` (the SPEC template), ``difficulty`` and ``category`` (the family).
    """
    if scale not in SCALES:
        raise PoclError(f"synthetic scale {scale!r} is not known: choose from {', '.join(SCALES)}")
    sizes = SCALES[scale]
    chosen = list(FAMILIES) if families is None else list(families)
    unknown = [name for name in chosen if name not in FAMILIES]
    if unknown or not chosen:
        raise PoclError(
            f"synthetic families {unknown or chosen} are not known: choose from {', '.join(FAMILIES)}"
        )
    if num_samples < 1:
        raise PoclError(f"synthetic num_samples={num_samples} must be at least 1")
    rng = random.Random(seed)
    tasks: list[dict[str, object]] = []
    for position in range(num_samples):
        family = chosen[position % len(chosen)]
        level = (position // len(chosen)) % NUM_LEVELS + 1
        instruction, input_text, output = FAMILIES[family](rng, level, sizes)
        tasks.append(
            {
                "instruction": instruction,
                "input": input_text,
                "output": output,
                "prompt": render_prompt(instruction, input_text),
                "difficulty": level,
                "category": family,
            }
        )
    rng.shuffle(tasks)
    return tasks


def write_synthetic_tasks(
    path: str | Path,
    *,
    num_samples: int,
    seed: int,
    families: Sequence[str] | None = None,
    scale: str = "standard",
) -> Path:
    """Write :func:`generate_tasks` as jsonl (one object per line, UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (
        json.dumps(task, ensure_ascii=False) + "\n"
        for task in generate_tasks(num_samples, seed, families=families, scale=scale)
    )
    path.write_text("".join(lines), encoding="utf-8")
    return path
