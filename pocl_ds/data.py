"""Instruction data: loading, the prompt template, tokenization, splits and collation.

Everything between a file on disk and a batch of token ids. Loaders accept the MiniLLM
jsonl layout (``instruction``, ``input``, ``output`` as a string or a list of references,
optional ``prompt``) and the Hugging Face dolly layout (``instruction``, ``context``,
``response``, ``category``), from local json/jsonl/parquet files, saved ``datasets``
directories or a hub name. A record a user got wrong stops the run with a
:class:`~pocl_ds.errors.PoclError` naming the file, the line and the field; records that are
merely unusable (empty response or instruction) are skipped and counted in the log.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pocl_ds import distributed
from pocl_ds.errors import PoclError

logger = logging.getLogger(__name__)

# The MiniLLM / Alpaca template of SPEC.md, character for character.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Response:\n"
)
PROMPT_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n"
    "### Response:\n"
)

DATA_FORMATS = ("auto", "minillm", "dolly", "text", "hf")
OVERFLOW_POLICIES = ("drop", "truncate_prompt")
# The paper's dolly-15k split: train / validation / test.
PAPER_SPLIT_SIZES = (12_500, 1_000, 500)
IGNORE_INDEX = -100

_JSON_SUFFIXES = (".jsonl", ".json")
_DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def render_prompt(instruction: str, input_text: str = "") -> str:
    """The SPEC prompt for one instruction; the input block appears only when input is non-empty."""
    if input_text:
        return PROMPT_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_TEMPLATE.format(instruction=instruction)


@dataclass(frozen=True)
class InstructionSample:
    """One instruction with its reference responses.

    ``index`` is the sample's position among the kept samples of its source (0..N-1); the
    curriculum, caches and tie-breaking refer to samples by it. ``references[0]`` is the
    training target; all references count for ROUGE-L.
    """

    index: int
    instruction: str
    input: str
    references: tuple[str, ...]
    prompt: str
    difficulty: int | None = None
    category: str | None = None


@dataclass(frozen=True)
class TokenizedSample:
    """Token ids of one sample: ``response_ids`` end with EOS; ``index`` is the sample's."""

    index: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    references: tuple[str, ...]


# ----------------------------------------------------------------------------- loading


def load_instructions(
    path_or_name: str | Path, *, data_format: str = "auto", split: str | None = None
) -> list[InstructionSample]:
    """Load instruction samples from a file, a saved dataset directory or a hub dataset.

    Args:
        path_or_name: a ``.jsonl``/``.json`` file (read line by line so errors name the line),
            a ``.parquet``/``.csv``/``.arrow`` file or a dataset directory (read through
            ``datasets``), or a hub dataset name (``datasets.load_dataset``).
        data_format: ``"auto"`` detects the layout from the fields of the first record;
            ``"minillm"`` or ``"dolly"`` force a layout; ``"hf"`` forces a hub/``datasets``
            load and detects the layout.
        split: the split to take from a dataset directory or a hub dataset (default
            ``"train"``); files have a single split and must leave it ``None``.

    Returns:
        The kept samples, ``index`` 0..N-1 in file order.
    """
    if data_format not in DATA_FORMATS:
        raise PoclError(
            f"data format {data_format!r} is unknown: use one of {', '.join(DATA_FORMATS)}"
        )
    source = str(path_or_name)
    path = Path(source)
    if data_format != "hf" and path.is_file() and path.suffix in _JSON_SUFFIXES:
        if split is not None:
            raise PoclError(f"{source}: split={split!r} is given but a file has no splits")
        records = _read_json_records(path)
    elif data_format != "hf" and path.is_file() and path.suffix in _DATASETS_SUFFIXES:
        if split is not None:
            raise PoclError(f"{source}: split={split!r} is given but a file has no splits")
        records = _read_with_datasets(source, builder=_DATASETS_SUFFIXES[path.suffix])
    elif path.is_file():
        raise PoclError(
            f"{source}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet, "
            ".csv or .arrow"
        )
    elif path.is_dir() or data_format == "hf" or _looks_like_hub_name(source):
        records = _read_with_datasets(source, split=split or "train")
    else:
        raise PoclError(f"{source}: no such file; check data.train_path (or the eval path)")
    layout = data_format if data_format in ("minillm", "dolly", "text") else None
    return _parse_records(source, records, layout)


def _looks_like_hub_name(source: str) -> bool:
    """``owner/name`` with no file suffix: a hub id rather than a mistyped local path."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not Path(source).suffix


def _read_json_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    """Yield ("line", line number, JSON value); a ``.json`` array yields ("item", n, item)."""
    raw = path.read_bytes()
    if path.suffix == ".json" and raw.lstrip()[:1] == b"[":
        text = _decode_utf8(path, raw, first_line=1)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise PoclError(
                f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno}); "
                "fix the file or write it as one JSON object per line"
            ) from None
        yield from (("item", number, item) for number, item in enumerate(items, start=1))
        return
    for number, line in enumerate(raw.split(b"\n"), start=1):
        text = _decode_utf8(path, line, first_line=number)
        if not text.strip():
            continue
        try:
            yield "line", number, json.loads(text)
        except json.JSONDecodeError as err:
            raise PoclError(
                f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}); "
                "each line must be one complete JSON object"
            ) from None


def _decode_utf8(path: Path, raw: bytes, *, first_line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        column = err.start - raw.rfind(b"\n", 0, err.start)
        raise PoclError(
            f"{path}:{line}: byte 0x{raw[err.start]:02x} at column {column} is not valid "
            "UTF-8; re-encode the file as UTF-8"
        ) from None


def _read_with_datasets(
    source: str, *, builder: str | None = None, split: str = "train"
) -> Iterator[tuple[str, int, Any]]:
    """("row", n, record) for a parquet/csv/arrow file, a saved dataset dir or a hub dataset."""
    import datasets  # deferred: importing datasets costs seconds and most runs read jsonl

    try:
        if builder is not None:
            dataset = datasets.load_dataset(builder, data_files=source, split="train")
        elif _is_saved_dataset(Path(source)):
            loaded = datasets.load_from_disk(source)
            dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(source, split=split)
    except KeyError:
        raise PoclError(f"{source}: dataset has no split {split!r}; name an existing one") from None
    except (
        OSError,
        ValueError,
        FileNotFoundError,
        datasets.exceptions.DatasetNotFoundError,
    ) as err:
        raise PoclError(
            f"{source}: cannot load the dataset ({type(err).__name__}: {err}); check the path "
            "or hub name and the split"
        ) from None
    return (("row", number, record) for number, record in enumerate(dataset, start=1))


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _detect_layout(where: str, record: Mapping[str, Any]) -> str:
    if "response" in record:
        return "dolly"
    if "output" in record:
        return "minillm"
    if "text" in record:
        return "text"
    raise PoclError(
        f"{where}: cannot tell the data layout from fields {sorted(record)}; a record "
        "needs 'output' (MiniLLM layout), 'response' (dolly layout) or 'text' (plain text)"
    )


def _layout_fields(
    where: str, record: Mapping[str, Any], layout: str
) -> tuple[str, str, tuple[str, ...], str | None]:
    """(instruction, input, references, prompt or None to render) of one record."""
    if layout == "dolly":
        instruction = _string_field(where, record, "instruction")
        input_text = _string_field(where, record, "context", required=False)
        return instruction, input_text, _references(where, record, "response"), None
    if layout == "text":  # pre-training text: no prompt, the whole text is the target
        return "", "", _references(where, record, "text"), ""
    instruction = _string_field(where, record, "instruction", required="prompt" not in record)
    input_text = _string_field(where, record, "input", required=False)
    prompt = _string_field(where, record, "prompt", required=False) or None
    return instruction, input_text, _references(where, record, "output"), prompt


def _parse_records(
    source: str, records: Iterator[tuple[str, int, Any]], layout: str | None
) -> list[InstructionSample]:
    samples: list[InstructionSample] = []
    skipped: dict[str, list[str]] = {"empty response": [], "empty instruction": []}
    prompts_off_template = 0
    total = 0
    for kind, number, record in records:
        total += 1
        # Lines read compiler-style (file:line); items of a JSON array and dataset rows by name.
        where = f"{source}:{number}" if kind == "line" else f"{source} {kind} {number}"
        if not isinstance(record, Mapping):
            raise PoclError(f"{where}: expected a JSON object, got {type(record).__name__}")
        layout = layout or _detect_layout(where, record)
        instruction, input_text, references, prompt = _layout_fields(where, record, layout)
        category = _string_field(where, record, "category", required=False) or (
            _string_field(where, record, "topic", required=False) or None
        )
        difficulty = _difficulty(where, record)
        if not references:
            skipped["empty response"].append(f"{kind} {number}")
            continue
        if not instruction.strip() and prompt is None:
            skipped["empty instruction"].append(f"{kind} {number}")
            continue
        rendered = render_prompt(instruction, input_text) if layout != "text" else ""
        if prompt is None:
            prompt = rendered
        elif instruction and prompt != rendered:
            prompts_off_template += 1
        samples.append(
            InstructionSample(
                index=len(samples),
                instruction=instruction,
                input=input_text,
                references=references,
                prompt=prompt,
                difficulty=difficulty,
                category=category,
            )
        )
    for reason, numbers in skipped.items():
        if numbers and distributed.is_main_process():
            logger.warning(
                "%s: skipped %d record(s) with %s (%s%s)",
                source,
                len(numbers),
                reason,
                ", ".join(numbers[:10]),
                ", ..." if len(numbers) > 10 else "",
            )
    if prompts_off_template and distributed.is_main_process():
        # The file's own rendering is kept (MiniLLM trains on it), but the user should know.
        logger.warning(
            "%s: %d record(s) carry a 'prompt' that differs from the SPEC template; using theirs",
            source,
            prompts_off_template,
        )
    if not samples:
        reasons = ", ".join(f"{len(v)} with {k}" for k, v in skipped.items() if v) or "none"
        raise PoclError(
            f"{source}: no usable samples: {total} record(s) read, skipped: {reasons}; "
            "the dataset is empty after filtering"
        )
    if distributed.is_main_process():
        logger.info("%s: loaded %d sample(s) (%s layout)", source, len(samples), layout)
    return samples


def _string_field(
    where: str, record: Mapping[str, Any], field: str, *, required: bool = True
) -> str:
    """A string field; absent or null optional fields read as ''."""
    if field not in record or record[field] is None:
        if required:
            raise PoclError(
                f"{where}: missing required field '{field}' (fields present: {sorted(record)})"
            )
        return ""
    value = record[field]
    if not isinstance(value, str):
        raise PoclError(
            f"{where}: field '{field}' must be a string, got {type(value).__name__} ({value!r:.40})"
        )
    return value


def _references(where: str, record: Mapping[str, Any], field: str) -> tuple[str, ...]:
    """Non-empty references of a response field (a string or a list of strings)."""
    if field not in record or record[field] is None:
        raise PoclError(
            f"{where}: missing required field '{field}' (fields present: {sorted(record)})"
        )
    value = record[field]
    if isinstance(value, str):
        values: Sequence[Any] = [value]
    elif isinstance(value, list):
        values = value
    else:
        raise PoclError(
            f"{where}: field '{field}' must be a string or a list of strings, "
            f"got {type(value).__name__} ({value!r:.40})"
        )
    for position, item in enumerate(values):
        if not isinstance(item, str):
            raise PoclError(
                f"{where}: field '{field}[{position}]' must be a string, "
                f"got {type(item).__name__} ({item!r:.40})"
            )
    return tuple(item for item in values if item.strip())


def _difficulty(where: str, record: Mapping[str, Any]) -> int | None:
    value = record.get("difficulty")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PoclError(f"{where}: field 'difficulty' must be a positive integer, got {value!r}")
    return value


# ----------------------------------------------------------------------------- splits


def split_samples(
    samples: Sequence[InstructionSample],
    *,
    sizes: tuple[int, int, int] | None,
    seed: int,
) -> tuple[list[InstructionSample], list[InstructionSample], list[InstructionSample]]:
    """Deterministic train/validation/test split with no prompt in two splits.

    The test set is drawn first, then validation, then train, from one seeded permutation,
    so changing the training size never moves a sample between validation and test. A prompt
    is held out once: a later sample with the prompt of a test or validation sample is never
    drawn again, so an evaluation split holds no training task and no repeat (generated data
    repeats small tasks; a held-out repeat in training would score recall, not skill). Test
    and validation are filled to their sizes or the split fails; train takes up to its size
    from what is left, and the log says how many repeats of held-out prompts it left out.
    ``sizes=None`` scales the paper's 12.5K/1K/0.5K proportions to ``len(samples)``.
    Each split is returned in index order; samples keep their original ``index``.
    """
    total = len(samples)
    if sizes is None:
        whole = sum(PAPER_SPLIT_SIZES)
        test = total * PAPER_SPLIT_SIZES[2] // whole
        validation = total * PAPER_SPLIT_SIZES[1] // whole
        sizes = (total - validation - test, validation, test)
    if len(sizes) != 3 or any(size < 0 for size in sizes):
        raise PoclError(f"split sizes {sizes} must be three non-negative integers")
    if sum(sizes) > total:
        raise PoclError(
            f"split sizes {sizes} need {sum(sizes)} samples but only {total} are available; "
            "lower the sizes"
        )
    order = list(range(total))
    random.Random(seed).shuffle(order)
    train_size, validation_size, test_size = sizes
    held_out: set[str] = set()
    position = 0
    picked: list[list[int]] = []
    for name, size in (("test", test_size), ("validation", validation_size)):
        ids: list[int] = []
        while len(ids) < size and position < total:
            index = order[position]
            position += 1
            if samples[index].prompt not in held_out:
                held_out.add(samples[index].prompt)
                ids.append(index)
        if len(ids) < size:
            raise PoclError(
                f"split: only {len(ids)} {name} samples with prompts of their own could be drawn, "
                f"{size} were asked for: the data repeats its prompts too often for these sizes"
            )
        picked.append(ids)
    test_ids, validation_ids = picked
    rest = [i for i in order[position:] if samples[i].prompt not in held_out]
    train_ids = rest[:train_size]
    unused = total - len(train_ids) - len(test_ids) - len(validation_ids)
    if unused:
        logger.info(
            "split: %d of %d samples in no split (%d of them repeat a held-out prompt)",
            unused,
            total,
            total - len(rest) - len(test_ids) - len(validation_ids),
        )
    return tuple(  # type: ignore[return-value]
        [samples[i] for i in sorted(ids)] for ids in (train_ids, validation_ids, test_ids)
    )


# ----------------------------------------------------------------------------- tokenization


def tokenize_samples(
    samples: Sequence[InstructionSample],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    overflow: str = "drop",
) -> list[TokenizedSample]:
    """Prompt ids, then ids of ``references[0]`` followed by EOS.

    The prompt and the response are tokenized separately (as MiniLLM does) so the response
    boundary is exact. A BOS token is prepended to the prompt when the tokenizer adds one by
    default (LLaMA-style). A sample longer than ``max_length`` in total (or whose prompt is
    longer than ``max_prompt_length``) is dropped with ``overflow="drop"`` (the paper's
    choice) or has its prompt cut from the left with ``overflow="truncate_prompt"``; a
    response that alone does not fit is always dropped. The log gives each count.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise PoclError(
            f"overflow={overflow!r} is unknown: use one of {', '.join(OVERFLOW_POLICIES)}"
        )
    if max_length < 2:
        raise PoclError(f"max_length={max_length} must be at least 2 (a prompt token and EOS)")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise PoclError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; set eos_token")
    prompt_limit = max_length - 1 if max_prompt_length is None else max_prompt_length
    bos = prompt_bos(tokenizer)
    counts = {"over length (dropped)": 0, "prompt truncated": 0, "empty response": 0}
    tokenized: list[TokenizedSample] = []
    for sample in samples:
        prompt_ids = bos + tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(sample.references[0], add_special_tokens=False)["input_ids"]
        if not response_ids:
            counts["empty response"] += 1
            continue
        response_ids = [*response_ids, eos_id]
        room = min(prompt_limit, max_length - len(response_ids))
        if len(prompt_ids) > room:
            if overflow == "drop" or room <= len(bos):
                counts["over length (dropped)"] += 1
                continue
            prompt_ids = bos + prompt_ids[len(prompt_ids) - (room - len(bos)) :]
            counts["prompt truncated"] += 1
        tokenized.append(
            TokenizedSample(
                index=sample.index,
                prompt_ids=tuple(prompt_ids),
                response_ids=tuple(response_ids),
                references=sample.references,
            )
        )
    summary = ", ".join(f"{name}: {count}" for name, count in counts.items())
    if distributed.is_main_process():
        logger.info(
            "tokenized %d of %d sample(s) (max_length %d, max_prompt_length %s; %s)",
            len(tokenized),
            len(samples),
            max_length,
            max_prompt_length,
            summary,
        )
    if not tokenized:
        raise PoclError(
            f"no sample fits: {len(samples)} sample(s) in, {summary}; raise data.max_length "
            "(or max_prompt_length) or use overflow='truncate_prompt'"
        )
    return tokenized


def prompt_bos(tokenizer: Any) -> list[int]:
    """[bos_id] when the tokenizer's default encoding starts with BOS, else [].

    The default encoding decides, not whether BOS and EOS share a token: GPT-2's
    ``<|endoftext|>`` is both and is never added, while OPT's ``</s>`` is both and is
    prepended to every text the model was trained on.
    """
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return []
    probe = tokenizer("a")["input_ids"]
    return [bos_id] if probe[:1] == [bos_id] else []


# ----------------------------------------------------------------------------- collation


def collate_for_training(
    samples: Sequence[TokenizedSample], pad_id: int, *, loss_on_prompt: bool = False
) -> dict[str, torch.Tensor]:
    """Right-padded training batch.

    Returns:
        ``input_ids`` [B, T] long, ``attention_mask`` [B, T] long (1 on real tokens),
        ``labels`` [B, T] long (the token at t on response positions — on every real position
        with ``loss_on_prompt``, as pre-training does — and -100 elsewhere; the loss does the
        shift), ``sample_index`` [B] long.
    """
    if not samples:
        raise ValueError("collate_for_training needs at least one sample")
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        prompt_len = len(sample.prompt_ids)
        length = prompt_len + len(sample.response_ids)
        input_ids[row, :length] = torch.tensor(sample.prompt_ids + sample.response_ids)
        attention_mask[row, :length] = 1
        first = 0 if loss_on_prompt else prompt_len
        labels[row, first:length] = input_ids[row, first:length]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "sample_index": torch.tensor([s.index for s in samples], dtype=torch.long),
    }


def target_count(sample: TokenizedSample, *, loss_on_prompt: bool = False) -> int:
    """The sample's target tokens in ``collate_for_training``'s labels after the next-token
    shift: its response (every token after the first with ``loss_on_prompt``)."""
    length = len(sample.prompt_ids) + len(sample.response_ids)
    first = 0 if loss_on_prompt else len(sample.prompt_ids)
    return length - max(first, 1)


def collate_for_generation(
    prompt_ids: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Left-padded prompts so every row's next token is generated at the same position.

    Returns:
        ``input_ids`` [B, T] long and ``attention_mask`` [B, T] long (0 on left padding).
    """
    if not prompt_ids or any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("collate_for_generation needs at least one prompt, none of them empty")
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
