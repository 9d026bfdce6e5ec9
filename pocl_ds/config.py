"""Recipes: one frozen ``ExperimentConfig`` from a YAML file plus ``section.key=value`` overrides.

Every field is declared once, here, with its default, its range and what it means. Loading
checks each value against its declaration and stops with a ``PoclError`` naming the dotted path,
the bad value and what is allowed, so a typo never reaches a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pocl_ds.errors import PoclError
from pocl_ds.methods import method_spec

Precision = Literal["fp32", "bf16", "fp16"]


def _field(
    default: Any,
    doc: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A dataclass field with its documentation and numeric range kept beside the default."""
    meta = {"doc": doc, "low": low, "high": high, "low_open": low_open, "high_open": high_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    teacher: str | None = _field(
        None, "teacher: Hugging Face name or local path (or a run dir's final/)"
    )
    teacher_config: dict | None = _field(
        None, "inline tiny teacher: {family, hidden_size, num_layers, num_heads, ...}"
    )
    student: str | None = _field(None, "student: Hugging Face name or local path")
    student_config: dict | None = _field(None, "inline tiny student, as teacher_config")
    tokenizer: str | None = _field(
        None,
        "tokenizer name/path; unset: the teacher's, or a BPE trained on the data for inline models",
    )
    tokenizer_vocab_size: int = _field(
        512, "vocabulary of the BPE trained for inline models", low=64
    )
    teacher_dtype: Precision = _field("fp32", "dtype of the frozen teacher")
    teacher_partition: bool = _field(
        False,
        "partition the teacher across ranks with ZeRO-3 inference (ds_configs/teacher_zero3.json)",
    )
    gradient_checkpointing: bool = _field(
        False, "recompute student activations in backward to save memory"
    )


@dataclass(frozen=True)
class DataConfig:
    train_path: str | None = _field(
        None, "training data: jsonl/json/parquet path, a directory, or a hub dataset name"
    )
    valid_path: str | None = _field(None, "validation data; unset: split from train_path")
    test_path: str | None = _field(None, "test data; unset: split from train_path")
    format: Literal["auto", "minillm", "dolly", "text", "hf"] = _field(
        "auto", "input layout; auto detects it"
    )
    split_sizes: list[int] | None = _field(
        None,
        "[valid, test] sizes taken from train_path when no separate files (paper: [1000, 500])",
    )
    split_seed: int = _field(1, "seed of the deterministic train/valid/test split")
    max_length: int = _field(512, "longest prompt + response in tokens", low=8)
    max_prompt_length: int | None = _field(
        None, "longest prompt in tokens (truncate_prompt keeps its end)", low=1
    )
    overflow: Literal["drop", "truncate_prompt"] = _field(
        "drop", "what to do with samples over max_length"
    )
    max_train_samples: int | None = _field(None, "use only the first N training samples", low=1)
    max_valid_samples: int | None = _field(None, "use only the first N validation samples", low=1)


@dataclass(frozen=True)
class DistillConfig:
    method: Literal["sft", "pretrain", "kd", "seqkd", "gkd"] = _field(
        "kd",
        "sft: ground truth, alpha=1; pretrain: causal LM on every token (a base model); "
        "kd: white-box divergence; seqkd: SFT on teacher outputs; gkd: on-policy JSD",
    )
    divergence: Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl"] = _field(
        "fkl", "per-token divergence D(p, q) of SPEC.md"
    )
    beta: float | None = _field(
        None,
        "mixture weight of jsd/skl/srkl; unset: 0.5 for jsd, 0.1 for skl/srkl",
        low=0.0,
        high=1.0,
    )
    temperature: float = _field(
        1.0, "distillation temperature tau without a curriculum", low=0.0, low_open=True
    )
    sft_weight: float | None = _field(
        None,
        "alpha, the weight of the CE without a curriculum; unset: 0 (kd, gkd); sft/seqkd are 1",
        low=0.0,
        high=1.0,
    )
    scale_by_temperature_squared: bool = _field(True, "multiply every divergence by tau^2 (SPEC)")
    on_policy_prob: float = _field(
        0.5, "gkd: probability lambda that a batch uses fresh student samples", low=0.0, high=1.0
    )
    chunk_size: int = _field(1024, "tokens per chunk of the fused divergence kernel", low=1)
    generation_max_new_tokens: int = _field(64, "seqkd/gkd: longest generated response", low=1)
    teacher_cache: Literal["none", "memory", "disk"] = _field(
        "none",
        "kd: keep each sample's teacher hidden states after its first forward (exact offline "
        "KD); memory: on the host of every rank; disk: <output_dir>/teacher_cache/",
    )
    teacher_cache_dtype: Literal["teacher", "fp32", "bf16", "fp16"] = _field(
        "teacher", "dtype of cached hidden states: the teacher's own (exact), or half of fp32"
    )


@dataclass(frozen=True)
class CurriculumConfig:
    strategy: Literal["none", "pocl"] = _field(
        "none", "none: plain training; pocl: difficulty measurer + Baby Step"
    )
    num_stages: int = _field(4, "n, the number of difficulty subsets and stages", low=1)
    rank_by: Literal["fusion", "rouge", "ce"] = _field(
        "fusion", "difficulty signal: RRF of CE and ROUGE-L, or one of them"
    )
    order: Literal["easy_to_hard", "hard_to_easy", "random"] = _field(
        "easy_to_hard", "order in which subsets are added"
    )
    rrf_k: int = _field(60, "k of reciprocal rank fusion", low=1)
    temperature_start: float = _field(1.0, "tau_0 at the first stage", low=0.0, low_open=True)
    temperature_end: float = _field(
        2.0,
        "tau_n at the last stage (below tau_0 for a falling temperature)",
        low=0.0,
        low_open=True,
    )
    sft_weight_start: float | None = _field(
        None,
        "alpha_0 at the first stage; unset: the method's default (0.3 off-policy, 0 for gkd)",
        low=0.0,
        high=1.0,
    )
    sft_weight_end: float | None = _field(
        None, "alpha_n at the last stage; unset: the method's default (0)", low=0.0, high=1.0
    )
    epochs_per_stage: int | None = _field(
        None, "p; unset: equal budget with train.epochs, p = 2E/(n+1)", low=1
    )
    patience: int | None = _field(
        None,
        "advance a stage early after this many epochs without a better validation ROUGE-L",
        low=1,
    )
    restart_schedule: bool = _field(
        True, "restart optimizer state and LR schedule at each stage (the paper's runs)"
    )
    difficulty_batch_size: int = _field(16, "batch size of difficulty scoring", low=1)
    difficulty_max_new_tokens: int = _field(64, "longest greedy output scored by ROUGE-L", low=1)


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = _field(
        "runs/tiny", "the run directory: config, metrics, checkpoints, final model"
    )
    ds_config: str = _field(
        "ds_configs/zero2.json", "DeepSpeed JSON for the student (ZeRO stage, precision, batch)"
    )
    precision: Precision = _field(
        "fp32", "student compute dtype; fills the DeepSpeed config's bf16/fp16 'auto'"
    )
    micro_batch_size: int = _field(4, "samples per rank per forward", low=1)
    gradient_accumulation_steps: int = _field(1, "micro-batches per optimizer step", low=1)
    epochs: int = _field(
        2, "E, epochs of a run without curriculum (and the budget POCL matches)", low=1
    )
    max_steps: int | None = _field(
        None, "stop after this many optimizer steps (smoke tests)", low=1
    )
    lr: float = _field(5e-4, "peak learning rate of AdamW", low=0.0, low_open=True, high=1.0)
    weight_decay: float = _field(0.0, "AdamW weight decay", low=0.0)
    warmup_ratio: float = _field(
        0.0, "fraction of the schedule spent in linear warm-up", low=0.0, high=1.0
    )
    lr_schedule: Literal["cosine", "constant"] = _field("cosine", "decay after warm-up")
    max_grad_norm: float = _field(1.0, "gradient clipping (0: off)", low=0.0)
    seed: int = _field(42, "seed of weights, shuffling and sampling")
    on_nonfinite: Literal["skip", "stop"] = _field(
        "stop", "a non-finite loss: skip the step with a warning, or stop naming the batch"
    )
    checkpoint_every_epoch: bool = _field(True, "write a checkpoint at each epoch's end")
    keep_checkpoints: int = _field(2, "complete checkpoints kept besides the best", low=1)
    log_every: int = _field(1, "optimizer steps between metrics lines", low=1)
    overwrite_output_dir: bool = _field(
        False, "a new run into an output_dir holding a run moves that run to <dir>.old-<time>"
    )


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = _field(16, "prompts per generation batch", low=1)
    max_total_length: int = _field(
        512, "prompt + generation length cap in tokens (SPEC: 512)", low=2
    )
    max_new_tokens: int = _field(64, "longest generated response in validation", low=1)
    valid_rouge_samples: int | None = _field(
        200, "validation prompts scored by ROUGE-L each epoch (unset: all)", low=1
    )
    seeds: list[int] = _field([10, 20, 30, 40, 50], "sampling seeds of the final evaluation")
    greedy: bool = _field(False, "greedy decoding instead of sampling at temperature 1")
    suites: dict | None = _field(
        None, "final evaluation suites {name: path}; unset: the test split"
    )
    evaluate_at_end: bool = _field(
        True, "evaluate the exported model on the suites at the end of training"
    )


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: str) -> ExperimentConfig:
        """A copy with ``{"section.key": value}`` applied and validated."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            _set_dotted(data, dotted, value)
        return from_dict(data)


SECTIONS = {f.name: f.type for f in dataclasses.fields(ExperimentConfig)}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(ExperimentConfig)
    return {name: hints[name] for name in SECTIONS}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    bad = PoclError(f"{path}: got {value!r}, expected {_describe(tp)}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except PoclError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise bad
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
            if math.isfinite(number):
                return number
        raise bad
    if tp is str:
        if isinstance(value, str) and value:
            return value
        raise bad
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise bad
    raise TypeError(f"unsupported config type {tp} at {path}")


def _check_range(value: Any, meta: typing.Mapping[str, Any], path: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high = meta.get("low"), meta.get("high")
    too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
    too_high = high is not None and (value >= high if meta.get("high_open") else value > high)
    if too_low or too_high:
        left = "(" if meta.get("low_open") else "["
        right = ")" if meta.get("high_open") else "]"
        allowed = (
            f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        )
        raise PoclError(f"{path}: got {value!r}, allowed range {allowed}")


def _build_section(cls: type, values: Any, section: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise PoclError(f"{section}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{section}.{key}"
        if key not in fields:
            raise PoclError(f"{path}: unknown key; allowed keys of {section}: {', '.join(fields)}")
        coerced = _coerce(value, hints[key], path)
        if isinstance(coerced, list):
            for i, item in enumerate(coerced):
                _check_range(item, fields[key].metadata, f"{path}[{i}]")
        else:
            _check_range(coerced, fields[key].metadata, path)
        kwargs[key] = coerced
    return cls(**kwargs)


def from_dict(data: Any) -> ExperimentConfig:
    """Validate a nested mapping into an ``ExperimentConfig``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PoclError(f"recipe: expected a mapping of sections, got {type(data).__name__}")
    classes = _section_classes()
    for name in data:
        if name not in classes:
            raise PoclError(f"{name}: unknown section; allowed sections: {', '.join(classes)}")
    config = ExperimentConfig(
        **{name: _build_section(cls, data.get(name), name) for name, cls in classes.items()}
    )
    _check_consistency(config)
    return config


def _check_consistency(config: ExperimentConfig) -> None:
    """Rules that span fields."""
    m = config.model
    if m.teacher and m.teacher_config:
        raise PoclError(
            "model.teacher_config: give model.teacher or model.teacher_config, not both"
        )
    if m.student and m.student_config:
        raise PoclError(
            "model.student_config: give model.student or model.student_config, not both"
        )
    if not (m.student or m.student_config):
        raise PoclError("model.student: missing; name a model/path or give model.student_config")
    if method_spec(config.distill.method).teacher != "none" and not (m.teacher or m.teacher_config):
        raise PoclError(
            f"model.teacher: missing; distill.method={config.distill.method} needs a teacher"
        )
    _check_sft_weights(config)
    spec = method_spec(config.distill.method)
    if config.distill.teacher_cache != "none" and (spec.teacher != "train" or spec.on_policy):
        raise PoclError(
            f"distill.teacher_cache: {config.distill.teacher_cache} keeps the teacher's states of "
            f"dataset samples, but distill.method={spec.name} "
            + (
                "trains on fresh student samples"
                if spec.on_policy
                else "runs no teacher in its loss"
            )
            + "; set it to none or use method kd"
        )
    if spec.loss_on_prompt and config.curriculum.strategy != "none":
        raise PoclError(
            f"curriculum.strategy: {config.curriculum.strategy} needs prompts to rank, but "
            f"distill.method={config.distill.method} trains a base model on plain text; use none"
        )
    if not config.data.train_path:
        raise PoclError("data.train_path: missing; name the training data file")
    split = config.data.split_sizes
    if split is not None and (len(split) != 2 or min(split) < 0):
        raise PoclError(f"data.split_sizes: got {split!r}, expected [valid_size, test_size] >= 0")
    if not config.eval.seeds:
        raise PoclError("eval.seeds: empty; give at least one seed")


def _check_sft_weights(config: ExperimentConfig) -> None:
    """A method whose α is fixed (SFT and SeqKD are CE alone) refuses another α rather than
    ignoring it; every other method honours what the recipe sets."""
    spec = method_spec(config.distill.method)
    if spec.sft_weight is None:
        return
    for path, value in (
        ("distill.sft_weight", config.distill.sft_weight),
        ("curriculum.sft_weight_start", config.curriculum.sft_weight_start),
        ("curriculum.sft_weight_end", config.curriculum.sft_weight_end),
    ):
        if value is not None and value != spec.sft_weight:
            raise PoclError(
                f"{path}: got {value}, but distill.method={spec.name} trains on the CE alone "
                f"(alpha = {spec.sft_weight:g}); remove the setting or choose another method"
            )


def changed_fields(
    old: typing.Mapping[str, Any], new: typing.Mapping[str, Any], *, prefix: str = ""
) -> list[str]:
    """``path: old -> new`` for every leaf that differs between two nested mappings (dotted
    paths, sorted): why a cache or a run directory written under ``old`` does not serve ``new``.
    Long values (fingerprints, model configs) are shortened to keep each entry one line."""
    changes = []
    for name in sorted(set(old) | set(new), key=str):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        path = f"{prefix}{name}"
        if isinstance(before, typing.Mapping) and isinstance(after, typing.Mapping):
            changes += changed_fields(before, after, prefix=f"{path}.")
        else:
            changes.append(f"{path}: {_shortened(before)} -> {_shortened(after)}")
    return changes


def _shortened(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _set_dotted(data: dict[str, Any], dotted: str, raw: Any) -> None:
    section, _, key = dotted.partition(".")
    if not key or "." in key:
        raise PoclError(f"{dotted}: overrides look like section.key=value")
    if section not in SECTIONS:
        raise PoclError(f"{dotted}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
    data.setdefault(section, {})
    if data[section] is None:
        data[section] = {}
    data[section][key] = yaml.safe_load(raw) if isinstance(raw, str) else raw


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["train.lr=1e-4", ...]`` → ``{"train.lr": "1e-4", ...}``."""
    out = {}
    for item in items:
        dotted, sep, value = item.partition("=")
        if not sep or not dotted:
            raise PoclError(f"{item}: overrides look like section.key=value")
        out[dotted.strip()] = value
    return out


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key in SECTIONS:
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _read_recipe(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's sections, with those of its ``base:`` recipe (a path relative to it) below."""
    if not path.is_file():
        raise PoclError(f"--config {path}: no such recipe file")
    if path.resolve() in chain:
        raise PoclError(f"{path}: base recipes form a cycle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise PoclError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PoclError(f"{path}: expected a mapping of sections at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise PoclError(f"{path}: base: expected the path of a recipe, got {base!r}")
    return _merge(_read_recipe(path.parent / base, (*chain, path.resolve())), data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML recipe (and its ``base:`` chain), apply ``section.key=value`` overrides,
    validate."""
    data = _read_recipe(Path(path))
    for dotted, value in parse_overrides(overrides or []).items():
        _set_dotted(data, dotted, value)
    return from_dict(data)


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def field_docs() -> dict[str, str]:
    """``{"section.key": "doc"}`` for every field (the README's recipe reference)."""
    out = {}
    for name, cls in _section_classes().items():
        for f in dataclasses.fields(cls):
            out[f"{name}.{f.name}"] = f.metadata.get("doc", "")
    return out
