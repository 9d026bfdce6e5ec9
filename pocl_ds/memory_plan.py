"""Per-rank memory of a distillation run, computed from model configs alone.

No model is built and neither torch nor DeepSpeed is imported: a plan for a 70B teacher takes
milliseconds. The parts follow what one optimizer step of ``pocl_ds`` holds on a rank (the
DeepSpeed ZeRO stage's weights, gradients and Adam states of the student; the frozen teacher,
replicated or ZeRO-3-partitioned; activations; the fused loss's working set; ZeRO-3's
temporary gathers; the process itself). Where DeepSpeed's behaviour depends on the device the
device is named: on CPU an allocated but untouched page costs no resident memory, on CUDA the
caching allocator holds what was asked for.

A step's peak is the largest of its phases (teacher forward, student forward, backward,
optimizer step), each the persistent parts plus what that phase holds; the plan is that of a
steady-state step (from step 2 on, when Adam's moments exist and ZeRO-3 prefetches), which
peaks at least as high as step 1. The runtime baseline is measured; everything else is
counted from DeepSpeed's and the kernel's buffers, at its upper bound. The validation against
measured peaks is ``python launch/bench.py scale`` (``benchmarks/plan_validation.csv``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocl_ds.errors import PoclError

GIB = 1 << 30
FAMILIES = ("gpt2", "opt", "llama", "qwen2")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEVICES = ("cpu", "cuda")

# The process itself: torch, transformers and DeepSpeed imported, gloo/NCCL initialised. CPU:
# measured: 276 MB of resident memory per rank after the imports and gloo (`launch/bench.py
# scale`'s runtime case), and about 170 MB more once the models' code, DeepSpeed's engines
# and the allocator's arenas are in (a built rank's RSS less its tensors), rounded up. CUDA:
# the context, cuBLAS workspace and NCCL buffers, a safe round figure.
RUNTIME_BYTES = {"cpu": 450 << 20, "cuda": 1 * GIB}
# DeepSpeed's defaults where a config leaves them out (deepspeed/runtime/zero/config.py).
DEFAULT_REDUCE_BUCKET = 500_000_000
DEFAULT_PREFETCH_BUCKET = 50_000_000
DEFAULT_MAX_REUSE_DISTANCE = 1_000_000_000
# Saved activations of one decoder layer in training, in units of (tokens × hidden × element
# bytes), with SDPA attention (no [T × T] score matrix is kept) and dropout off: a count of
# the block's saved tensors (the MLP's counted at their width), not fitted — activations are
# under 0.2 GiB in every validated case, so this is the least checked coefficient.
ACTIVATION_TENSORS_PER_LAYER = {"gpt2": 22.0, "opt": 20.0, "llama": 20.0, "qwen2": 20.0}
# [tokens × vocab] fp32 tensors the naive loss holds at the backward's peak besides the model's
# logits and their gradient. Fitted to the step-1 peaks of the two naive cases of
# `launch/bench.py scale` (its later steps peak higher: see the README); the naive loss is the
# reference, not a way to train.
NAIVE_LOGIT_COPIES = 2
# Rows of the fused kernel's CPU blocks: about this many elements (divergence.py).
CPU_BLOCK_ELEMENTS = 1 << 19


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a causal LM of one of FAMILIES (a config.json's numbers)."""

    name: str
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    tied_embeddings: bool
    embed_dim: int  # width of the token embeddings and lm_head (OPT's word_embed_proj_dim)

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.embed_dim

    @property
    def layer_parameters(self) -> int:
        """One decoder block."""
        h, ffn = self.hidden_size, self.intermediate_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.family == "gpt2":
            return 4 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * ffn + ffn) + (ffn * h + h)
        if self.family == "opt":
            return 4 * (h * h + h) + 4 * h + (h * ffn + ffn) + (ffn * h + h)
        attention = h * q_width + 2 * h * kv_width + q_width * h
        if self.family == "qwen2":
            attention += q_width + 2 * kv_width  # q, k, v biases
        return attention + 3 * h * ffn + 2 * h

    @property
    def num_parameters(self) -> int:
        """Parameters as Hugging Face counts them (a tied head counted once)."""
        h = self.hidden_size
        total = self.embedding_parameters + self.num_layers * self.layer_parameters
        if not self.tied_embeddings:
            total += self.vocab_size * self.embed_dim
        if self.family == "gpt2":
            total += self.max_positions * h + 2 * h  # wpe, ln_f
        elif self.family == "opt":
            total += (self.max_positions + 2) * h  # learned positions carry an offset of 2
            if self.embed_dim != h:
                total += 2 * self.embed_dim * h  # project_in, project_out
            else:
                total += 2 * h  # final_layer_norm
        else:
            total += h  # final norm
        return total

    @property
    def largest_module_parameters(self) -> int:
        """The largest module ZeRO-3 gathers whole: a decoder block or the embedding."""
        return max(self.layer_parameters, self.embedding_parameters)


def _config_value(config: Mapping[str, Any], source: str, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is not None:
        return default
    raise PoclError(f"{source}: config has no {' / '.join(keys)}; is it a causal LM's config?")


def shape_from_config(config: Mapping[str, Any], source: str) -> ModelShape:
    """A ModelShape from a Hugging Face config.json's values (``source`` names it in errors)."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise PoclError(
            f"{source}: model_type {family!r} is not one the planner knows ({', '.join(FAMILIES)})"
        )

    def value(*keys: str, default: Any = None) -> Any:
        return _config_value(config, source, *keys, default=default)

    hidden = int(value("n_embd", "hidden_size"))
    heads = int(value("n_head", "num_attention_heads"))
    if family == "gpt2":
        ffn = int(value("n_inner", default=4 * hidden))
    elif family == "opt":
        ffn = int(value("ffn_dim"))
    else:
        ffn = int(value("intermediate_size"))
    shape = ModelShape(
        name=source,
        family=family,
        hidden_size=hidden,
        num_layers=int(value("n_layer", "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(value("num_key_value_heads", default=heads)),
        head_dim=int(value("head_dim", default=hidden // heads)),
        intermediate_size=ffn,
        vocab_size=int(value("vocab_size")),
        max_positions=int(value("n_positions", "max_position_embeddings")),
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        embed_dim=int(value("word_embed_proj_dim", default=hidden)),
    )
    if min(shape.hidden_size, shape.num_layers, shape.num_heads, shape.vocab_size) < 1:
        raise PoclError(f"{source}: sizes must be positive")
    return shape


def known_shapes(shapes_dir: str | Path) -> list[str]:
    return sorted(path.stem for path in Path(shapes_dir).glob("*.json"))


def read_config(name_or_path: str | Path, shapes_dir: str | Path) -> tuple[dict[str, Any], str]:
    """A config.json's values: a known shape name (``shapes_dir/NAME.json``), a model directory
    holding config.json, or a JSON file. Returns (values, where they came from)."""
    path = Path(name_or_path)
    candidates = [path / "config.json", path, Path(shapes_dir) / f"{name_or_path}.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8")), str(candidate)
            except json.JSONDecodeError as err:
                raise PoclError(f"{candidate}: not valid JSON ({err})") from None
    raise PoclError(
        f"model {str(name_or_path)!r}: neither a directory with config.json, a JSON file, nor a "
        f"known shape ({', '.join(known_shapes(shapes_dir))})"
    )


def load_shape(name_or_path: str | Path, shapes_dir: str | Path) -> ModelShape:
    config, source = read_config(name_or_path, shapes_dir)
    return shape_from_config(
        config, str(name_or_path) if source.startswith(str(shapes_dir)) else source
    )


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ZeroSettings:
    """The parts of a DeepSpeed config that change memory."""

    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_size: int = DEFAULT_REDUCE_BUCKET
    prefetch_bucket_size: int = DEFAULT_PREFETCH_BUCKET
    max_reuse_distance: int = DEFAULT_MAX_REUSE_DISTANCE

    @classmethod
    def from_ds_config(cls, ds_config: Mapping[str, Any]) -> ZeroSettings:
        zero = ds_config.get("zero_optimization", {})

        def offloaded(key: str) -> bool:
            return zero.get(key, {}).get("device", "none") not in ("none", None)

        return cls(
            stage=int(zero.get("stage", 0)),
            offload_optimizer=offloaded("offload_optimizer"),
            offload_param=offloaded("offload_param"),
            reduce_bucket_size=int(zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET)),
            prefetch_bucket_size=int(
                zero.get("stage3_prefetch_bucket_size", DEFAULT_PREFETCH_BUCKET)
            ),
            max_reuse_distance=int(
                zero.get("stage3_max_reuse_distance", DEFAULT_MAX_REUSE_DISTANCE)
            ),
        )


@dataclass(frozen=True)
class RunSetup:
    """One rank's share of a run: models, parallelism, precision and batch shape."""

    student: ModelShape
    teacher: ModelShape | None  # None: SFT, no teacher at train time
    world_size: int
    zero: ZeroSettings
    teacher_partition: bool
    precision: str  # the student's: fp32 or bf16 (fp16 counts as bf16)
    teacher_dtype: str
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool = False
    device: str = "cpu"
    chunk_size: int = 1024
    loss: str = "fused"  # fused: the chunked kernel; naive: full [tokens × vocab] logits

    def check(self) -> None:
        """Refuse values the arithmetic cannot mean, naming the setting."""
        if self.world_size < 1:
            raise PoclError(f"world size {self.world_size}: must be >= 1")
        if self.zero.stage not in (0, 1, 2, 3):
            raise PoclError(f"ZeRO stage {self.zero.stage}: must be 0, 1, 2 or 3")
        if self.zero.offload_param and self.zero.stage != 3:
            raise PoclError("parameter offload needs ZeRO stage 3")
        if self.zero.offload_optimizer and self.zero.stage == 0:
            raise PoclError("optimizer offload needs ZeRO stage 1, 2 or 3")
        for label, dtype in (("precision", self.precision), ("teacher dtype", self.teacher_dtype)):
            if dtype not in DTYPE_BYTES:
                raise PoclError(f"{label} {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
        if self.micro_batch < 1 or self.seq_len < 2 or self.chunk_size < 1:
            raise PoclError("micro batch and chunk size must be >= 1 and sequence length >= 2")
        if self.device not in DEVICES:
            raise PoclError(f"device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.loss not in ("fused", "naive"):
            raise PoclError(f"loss {self.loss!r}: use fused or naive")
        for shape in (self.student, self.teacher):
            if shape is not None and self.seq_len > shape.max_positions:
                raise PoclError(
                    f"sequence length {self.seq_len} exceeds {shape.name}'s "
                    f"{shape.max_positions} positions"
                )
        if self.teacher is not None and self.teacher.vocab_size < 2:
            raise PoclError(f"{self.teacher.name}: vocabulary too small")


PARTS = ("student_weights", "gradients", "optimizer_states", "teacher_weights", "activations",
         "loss_working_set", "zero3_gathers", "runtime")  # fmt: skip
PHASES = ("teacher_forward", "student_forward", "backward", "optimizer_step")


def _persistent(setup: RunSetup) -> dict[str, int]:
    """What a rank holds across steps once the first optimizer step created Adam's moments."""
    params, world, zero = setup.student.num_parameters, setup.world_size, setup.zero
    elem = DTYPE_BYTES[setup.precision]
    on_device = setup.device == "cuda"
    weights = elem * params if zero.stage < 3 else math.ceil(elem * params / world)
    if zero.offload_param and on_device:
        weights = 0
    share = math.ceil(params / world)
    if zero.stage == 0 and setup.precision == "fp32":
        optimizer = 8 * params  # torch AdamW's moments on the weights themselves
    else:
        optimizer = 12 * share  # ZeRO's fp32 master partition (a copy even in fp32) + moments
    if zero.offload_optimizer and on_device:
        optimizer = 0
    teacher = 0
    if setup.teacher is not None:
        teacher = DTYPE_BYTES[setup.teacher_dtype] * setup.teacher.num_parameters
        if setup.teacher_partition:
            teacher = math.ceil(teacher / world)
    # ZeRO-3 keeps a flat fp32 buffer of the rank's gradient partition from the start.
    gradients = 4 * share if zero.stage == 3 and not (zero.offload_optimizer and on_device) else 0
    return {
        "student_weights": weights, "gradients": gradients, "optimizer_states": optimizer,
        "teacher_weights": teacher, "runtime": RUNTIME_BYTES[setup.device],
    }  # fmt: skip


def _student_activations(setup: RunSetup) -> int:
    """Saved activations of the student's forward (all of them live when backward starts)."""
    student, tokens = setup.student, setup.micro_batch * setup.seq_len
    elem = DTYPE_BYTES[setup.precision]
    per_layer = ACTIVATION_TENSORS_PER_LAYER[student.family] * tokens * student.hidden_size * elem
    if setup.gradient_checkpointing:
        # Each layer keeps its input; one layer at a time is recomputed whole.
        return student.num_layers * tokens * student.hidden_size * elem + per_layer
    return int(student.num_layers * per_layer)


def _loss_sets(setup: RunSetup) -> tuple[int, int]:
    """The loss's bytes live at the end of the forward and during the backward.

    Fused: the chunk buffers (student, teacher, CE gradient: [chunk × V] fp32) and CPU block
    workspace in the forward; the KD and CE head gradients [V × H] fp32 that the forward saves
    for the backward; the backward's sum of them and its cast to the weight's dtype. Naive:
    the full [tokens × vocab] tensors (NAIVE_LOGIT_COPIES fp32 copies, the model's logits)."""
    student, teacher = setup.student, setup.teacher
    rows = setup.micro_batch * (setup.seq_len - 1)
    vocab = student.vocab_size if teacher is None else min(student.vocab_size, teacher.vocab_size)
    elem = DTYPE_BYTES[setup.precision]
    if setup.loss == "naive":
        full = NAIVE_LOGIT_COPIES * rows * vocab * 4 + rows * vocab * elem
        return full, full + rows * vocab * 4  # the logits' gradient
    chunk = min(setup.chunk_size, rows)
    block = chunk if setup.device == "cuda" else max(1, min(chunk, CPU_BLOCK_ELEMENTS // vocab))
    buffers = (3 if teacher is not None else 2) * chunk * vocab * 4 + 3 * block * vocab * 4
    head = vocab * student.embed_dim
    saved = 2 * 4 * head + 2 * 4 * rows * student.embed_dim
    backward = 4 * head + (elem * head if elem != 4 else 0) + 4 * rows * student.embed_dim
    return buffers + saved, saved + backward


def _teacher_side(setup: RunSetup) -> tuple[int, int, int]:
    """(teacher forward's live activations, the hidden states handed to the loss, the head
    copied out whole from a partitioned teacher), bytes."""
    teacher = setup.teacher
    if teacher is None:
        return 0, 0, 0
    elem, tokens = DTYPE_BYTES[setup.teacher_dtype], setup.micro_batch * setup.seq_len
    if setup.loss == "naive":
        logits = tokens * teacher.vocab_size * elem  # the naive step keeps the teacher's logits
        return tokens * (4 * teacher.hidden_size + teacher.intermediate_size) * elem, logits, 0
    live = tokens * (4 * teacher.hidden_size + teacher.intermediate_size) * elem
    hidden = tokens * teacher.hidden_size * elem
    head = teacher.vocab_size * teacher.embed_dim * elem if setup.teacher_partition else 0
    return live, hidden, head


def _zero3_gather(shape: ModelShape, elem: int, prefetch: int) -> int:
    """The largest module made whole, plus DeepSpeed's prefetch bucket (from step 2 on)."""
    return elem * (shape.largest_module_parameters + min(prefetch, shape.num_parameters))


def plan_phases(setup: RunSetup) -> dict[str, dict[str, int]]:
    """Bytes per rank, part by part, in each phase of a steady-state optimizer step."""
    setup.check()
    student, zero, world = setup.student, setup.zero, setup.world_size
    elem = DTYPE_BYTES[setup.precision]
    params, share = student.num_parameters, math.ceil(student.num_parameters / world)
    base = _persistent(setup)
    activations = _student_activations(setup)
    loss_forward, loss_backward = _loss_sets(setup)
    teacher_live, teacher_hidden, teacher_head = _teacher_side(setup)
    teacher_gather = 0
    if setup.teacher is not None and setup.teacher_partition:
        teacher_gather = _zero3_gather(
            setup.teacher, DTYPE_BYTES[setup.teacher_dtype], zero.prefetch_bucket_size
        )
    student_gather = 0
    if zero.stage == 3:
        # From step 2 on DeepSpeed keeps a parameter whole when it is used again within
        # max_reuse_distance parameters: a student smaller than that stays whole from its
        # forward to its backward.
        student_gather = _zero3_gather(student, elem, zero.prefetch_bucket_size)
        if params <= zero.max_reuse_distance:
            student_gather = max(student_gather, elem * params)
    # Backward: autograd hands each parameter a whole gradient before ZeRO's hook moves it
    # into the reduce bucket (a tied embedding gets two, summed); ZeRO-0/1 keep them all.
    on_device = setup.device == "cuda"
    if zero.stage < 2:
        backward_grads = 2 * elem * params  # and their flat copy for the all-reduce
    else:
        # The contiguous reduce bucket: on CUDA allocated whole, on CPU only the pages written.
        bucket = zero.reduce_bucket_size if on_device else min(zero.reduce_bucket_size, params)
        ties = 2 if student.tied_embeddings else 1
        backward_grads = elem * bucket + ties * elem * student.embedding_parameters
        if zero.stage == 2:
            backward_grads += elem * share  # the averaged partition
    # The step: the partition's gradient in fp32 and the update's temporary of its size.
    step_grads = 4 * share + (elem * share if zero.stage == 2 else 0)
    if zero.stage == 0 and setup.precision == "fp32":
        step_grads = 4 * params
    transients = {
        "teacher_forward": {"activations": teacher_live, "zero3_gathers": teacher_gather},
        "student_forward": {
            "activations": activations + teacher_hidden,
            "loss_working_set": loss_forward,
            "zero3_gathers": teacher_head + student_gather,
        },
        "backward": {
            "gradients": backward_grads,
            "activations": activations + teacher_hidden,
            "loss_working_set": loss_backward,
            "zero3_gathers": teacher_head + student_gather,
        },
        "optimizer_step": {"gradients": step_grads + (4 * params if zero.stage == 0 else 0)},
    }
    phases = {}
    for phase, extra in transients.items():
        parts = {name: base.get(name, 0) + extra.get(name, 0) for name in PARTS}
        phases[phase] = {name: int(value) for name, value in parts.items()}
    return phases


def peak_phase(setup: RunSetup) -> str:
    phases = plan_phases(setup)
    return max(PHASES, key=lambda phase: sum(phases[phase].values()))


def plan(setup: RunSetup) -> dict[str, int]:
    """Bytes per rank, part by part, at the peak of a steady-state optimizer step (from step 2
    on, when Adam's moments exist; step 1 peaks no higher)."""
    return plan_phases(setup)[peak_phase(setup)]


def fits(total_bytes: int, device_gib: float | None) -> bool | None:
    return None if device_gib is None else total_bytes <= device_gib * GIB
