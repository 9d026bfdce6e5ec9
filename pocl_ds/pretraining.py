"""Pre-training corpora for the base models, disjoint from every task a run trains or is scored on.

The paper distils into pre-trained students; a base model here is a causal LM trained on every
token (``distill.method: pretrain``) of text no train, validation or test task contains:

- ``synthetic_corpus``: for the synthetic graded tasks, tasks of other generator seeds rendered
  as plain text (prompt and answer alike), plus plain-text statements of the same operations
  ("3 plus 4 makes 7."); any task whose prompt and answer appear among the excluded ones is
  dropped. Its validation file holds further such tasks as instructions, so a base run is
  scored, as every run is, by greedy ROUGE-L on prompts.
- ``python_docs_corpus``: for real instruction data, the docstrings of this Python's standard
  library (read with ``ast``, nothing imported), English prose with no tie to dolly, selfinst or
  vicuna; a docstring sharing any 8-word sequence with an excluded text is dropped, the rest
  are cut at paragraph ends into records of at most 100 words. Validation: continue a held-out
  docstring ("Continue the text.").

Both write ``train.jsonl`` (``{"text": ...}`` records) and ``valid.jsonl`` (instructions), and
return a description of what was used and how big it is (``corpus.json`` beside them).
"""

from __future__ import annotations

import ast
import json
import platform
import random
import re
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

from pocl_ds import atomic
from pocl_ds.data import InstructionSample
from pocl_ds.errors import PoclError
from pocl_ds.synthetic import FAMILIES, generate_tasks

NGRAM = 8  # words a docstring may share with an excluded text before it is dropped
MIN_DOC_WORDS = 20
CONTINUATION_PROMPT_WORDS = 24
CHUNK_WORDS = 100  # a training record: paragraphs of one docstring up to this many words
# Standard-library folders that are tests, demos or vendored code rather than documentation.
SKIPPED_STDLIB_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo"}
_WORD = re.compile(r"\w+")


def _write_jsonl(path: Path, records: Iterable[dict]) -> int:
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    atomic.write_text(path, "".join(lines))
    return len(lines)


def _describe(out: Path, description: dict) -> dict:
    text = [json.loads(line)["text"] for line in (out / "train.jsonl").open(encoding="utf-8")]
    description.update(
        train_records=len(text),
        train_words=sum(len(t.split()) for t in text),
        train_characters=sum(len(t) for t in text),
    )
    atomic.write_text(out / "corpus.json", json.dumps(description, indent=2) + "\n")
    return description


# ----------------------------------------------------------------------------- synthetic track


def _statement(task: dict) -> str:
    """The operation of a task said as a plain sentence (no instruction template)."""
    family, given, answer = task["category"], task["input"], task["output"]
    if family == "addition":
        left, right = given.split(" + ")
        return f"{left} plus {right} makes {answer}."
    if family == "reverse":
        return f"The list {given} read backwards is {answer}."
    if family == "sort":
        return f"In order, the numbers {given} are {answer}."
    return f"Given {given}, the value of {task['instruction'].split()[-1][:-1]} is {answer}."


def synthetic_corpus(
    out: str | Path,
    *,
    exclude: Sequence[InstructionSample],
    num_tasks: int,
    num_valid: int,
    seeds: Sequence[int],
    scale: str,
    families: Sequence[str] | None = None,
) -> dict:
    """Tasks of generator ``seeds`` (none of them the task data's seed) as text and statements.

    ``num_tasks`` tasks (half as templated text, half as statements) train, ``num_valid`` more
    validate; a task equal (prompt and answer) to one in ``exclude`` is never used.
    """
    out = Path(out)
    taken = {(s.prompt, s.references[0]) for s in exclude}
    fresh: list[dict] = []
    for seed in seeds:
        fresh += [
            t
            for t in generate_tasks(num_tasks + num_valid, seed, families=families, scale=scale)
            if (t["prompt"], t["output"]) not in taken
        ]
    # One task once: the generator repeats small tasks across seeds.
    unique = list({(t["prompt"], t["output"]): t for t in fresh}.values())
    if len(unique) < num_tasks + num_valid:
        raise PoclError(
            f"synthetic pre-training corpus: only {len(unique)} tasks differ from the task data; "
            f"{num_tasks + num_valid} were asked for: add generator seeds or ask for fewer"
        )
    random.Random(min(seeds)).shuffle(unique)
    train, valid = unique[:num_tasks], unique[num_tasks : num_tasks + num_valid]
    half = num_tasks // 2
    texts = [t["prompt"] + t["output"] for t in train[:half]]
    texts += [_statement(t) for t in train[half:]]
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", ({"text": text} for text in texts))
    _write_jsonl(out / "valid.jsonl", valid)
    return _describe(
        out,
        {
            "source": f"synthetic tasks of generator seeds {list(seeds)} (scale {scale}, families "
            f"{', '.join(families or FAMILIES)}) not in "
            "the task data: half as templated text, half as plain statements",
            "excluded_tasks": len(taken),
            "valid_records": len(valid),
        },
    )


# ----------------------------------------------------------------------------- real-data track


def _ngrams(text: str) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)}


def _paragraph_chunks(doc: str) -> list[str]:
    """Whole paragraphs gathered into chunks of at most ``CHUNK_WORDS`` words (a longer
    paragraph is a chunk of its own), so a sequence limit cuts few records."""
    chunks: list[list[str]] = [[]]
    for paragraph in (p.strip() for p in doc.split("\n\n")):
        if not paragraph:
            continue
        size = sum(len(p.split()) for p in chunks[-1])
        if chunks[-1] and size + len(paragraph.split()) > CHUNK_WORDS:
            chunks.append([])
        chunks[-1].append(paragraph)
    return ["\n\n".join(chunk) for chunk in chunks if chunk]


def stdlib_docstrings() -> list[str]:
    """Every docstring of ``MIN_DOC_WORDS`` words or more in this Python's standard library, in
    a fixed order (sorted files, then source order); read with ``ast``, nothing imported."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_STDLIB_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue  # a few files are deliberately broken or not UTF-8
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= MIN_DOC_WORDS:
                    docs.append(doc)
    return docs


def python_docs_corpus(
    out: str | Path, *, exclude_texts: Iterable[str], num_valid: int, seed: int = 0
) -> dict:
    """The standard library's docstrings minus any that shares an 8-word sequence with
    ``exclude_texts`` (every evaluation suite's prompts and references, the training data)."""
    out = Path(out)
    banned: set[tuple[str, ...]] = set()
    for text in exclude_texts:
        banned |= _ngrams(text)
    docs = list(dict.fromkeys(stdlib_docstrings()))  # repeated docstrings once
    kept = [d for d in docs if not _ngrams(d) & banned]
    random.Random(seed).shuffle(kept)
    # Held out for validation: docstrings long enough to leave text to continue after the prompt.
    long_enough = [d for d in kept if len(d.split()) >= 2 * CONTINUATION_PROMPT_WORDS]
    held_out = long_enough[:num_valid]
    train = [d for d in kept if d not in set(held_out)]
    valid = []
    for doc in held_out:
        words = doc.split()
        valid.append(
            {
                "instruction": "Continue the text.",
                "input": " ".join(words[:CONTINUATION_PROMPT_WORDS]),
                "output": " ".join(words[CONTINUATION_PROMPT_WORDS:]),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    chunks = [chunk for doc in train for chunk in _paragraph_chunks(doc)]
    _write_jsonl(out / "train.jsonl", ({"text": chunk} for chunk in chunks))
    _write_jsonl(out / "valid.jsonl", valid)
    return _describe(
        out,
        {
            "source": f"docstrings of the Python {platform.python_version()} standard library "
            f"(>= {MIN_DOC_WORDS} words, tests and demos left out)",
            "docstrings_found": len(docs),
            "dropped_for_overlap": len(docs) - len(kept),
            "overlap_rule": f"any shared {NGRAM}-word sequence with an evaluation or training text",
            "valid_records": len(valid),
        },
    )
