"""Real-size teacher–student pairs on 2 ranks, and the memory planner checked against them.

    python launch/bench.py scale [--cases NAME ...] [--steps N] [--ranks N] [--report]

Every case starts ``deepspeed --num_gpus 2`` (CPU ranks, gloo) on this script. Models are
built from the real models' config.json values (``launch/model_shapes/*.json``) with random
weights, no download, dropout off. A partitioned teacher is built under ZeRO-3's
``zero.Init`` (Hugging Face's DeepSpeed integration), so no rank ever holds it whole; the
student is built in its training dtype and handed to a DeepSpeed engine (client AdamW,
``ds_configs/zeroN.json``). Batches are random token ids, the first quarter of each sequence a
prompt (label −100). One optimizer step is the trainer's: teacher final hidden states under
no_grad (``objective.teacher_inputs``), the student's ``DistillationObjective`` (the fused
chunked KD + CE loss) inside the engine (α = 0.5, τ = 2, forward KL), ``engine.backward``,
``engine.step``; the ``naive`` cases use the full-logits reference of ``bench_train.py``.

Per case: the slowest rank's time of each phase (teacher forward; student forward with the
loss and backward; optimizer), median over the steps after the first; tokens/s over both
ranks; and the peak resident memory of each rank during step 1 (VmHWM reset through
/proc/self/clear_refs once everything is built; glibc maps blocks of 1 MiB or more directly,
so freed tensors leave RSS at once) and over the later steps. The prediction of
``launch/plan.py`` for the same settings is written beside it.

Rows go to benchmarks/scale.csv; benchmarks/scale.md is the table of the latest row of each
case; benchmarks/plan_validation.csv holds prediction against measurement per case.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

from bench_common import (  # noqa: E402
    RESULT_TAG,
    append_rows,
    existing_csv,
    markdown_table,
    provenance,
    reset_peak_rss,
    rss_mb,
    run_requested_case,
    write_table,
)
from plan import DEFAULT_ARGS, setup_from_args  # noqa: E402

from pocl_ds.cli import ArgumentParser, run_main  # noqa: E402
from pocl_ds.errors import PoclError  # noqa: E402

SHAPES_DIR = REPO / "launch" / "model_shapes"
KIND = "fkl"
TEMPERATURE = 2.0
SFT_WEIGHT = 0.5
PROMPT_FRACTION = 0.25

# The settings every case shares unless it says otherwise: launch/plan.py's defaults, so
# `plan.py --teacher gpt2-xl --student gpt2 --world-size 2 --zero 2 --teacher-partition`
# plans the paper case below.
DEFAULTS = {
    "precision": DEFAULT_ARGS["precision"], "teacher_dtype": DEFAULT_ARGS["precision"],
    "micro_batch": DEFAULT_ARGS["micro_batch"], "seq_len": DEFAULT_ARGS["seq_len"],
}  # fmt: skip


def _case(name: str, teacher: str, student: str, zero: int, **settings) -> dict:
    spec = {"name": name, "teacher": teacher, "student": student, "zero": zero,
            "offload": False, "teacher_partition": True, "loss": "fused", **DEFAULTS}  # fmt: skip
    spec.update(settings)
    return spec


# fp32 GPT-2-medium cases first (they widen the planner's validation), then the real sizes.
CASES = [
    _case("small-fp32-z1", "gpt2-medium", "gpt2", 1, precision="fp32", teacher_dtype="fp32",
          teacher_partition=False, micro_batch=1, seq_len=128),
    _case("small-fp32-z3", "gpt2-medium", "gpt2", 3, precision="fp32", teacher_dtype="fp32",
          micro_batch=1, seq_len=128),
    _case("paper-gpt2-z2", "gpt2-xl", "gpt2", 2),
    _case("paper-gpt2-z3", "gpt2-xl", "gpt2", 3),
    _case("paper-gpt2-z3-offload", "gpt2-xl", "gpt2", 3, offload=True),
    _case("paper-gpt2-z2-naive", "gpt2-xl", "gpt2", 2, loss="naive"),
    _case("llama3-1b-z2", "llama-3.2-1b", "llama-3-student-149m", 2),
    _case("llama3-1b-z2-naive", "llama-3.2-1b", "llama-3-student-149m", 2, loss="naive"),
    _case("largest-opt-2.7b-z3", "opt-2.7b", "opt-125m", 3),
]  # fmt: skip
FIELDS = [
    "timestamp", "commit", "machine", "device", "torch", "deepspeed", "transformers", "case",
    "teacher",
    "student", "teacher_params", "student_params", "vocab", "zero", "offload",
    "teacher_partition", "precision", "teacher_dtype", "seq_len", "micro_batch", "ranks",
    "loss", "steps", "teacher_fwd_s", "student_fwd_bwd_s", "optimizer_s", "step_s",
    "tokens_per_s", "step1_peak_rank0_mb", "step1_peak_rank1_mb", "later_peak_mb",
    "built_rss_mb", "runtime_rss_mb", "predicted_mb", "prediction_error", "first_loss",
    "status",
]  # fmt: skip
VALIDATION_FIELDS = [
    "timestamp", "commit", "device", "case", "measured_step1_peak_mb", "measured_later_peak_mb",
    "predicted_mb", "error_vs_step1", "error_vs_later", "peak_phase", "plan_command",
]  # fmt: skip


# ----------------------------------------------------------------------------- one rank


def _reset_peak() -> None:
    """Start a new peak: CUDA's allocator statistics, or the resident set's high-water mark."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    elif not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")


def _memory_mb(peak: bool) -> float:
    """Resident memory (or its peak) of this rank; on CUDA the device memory the process
    holds: what the allocator reserved plus the context (measured once at start)."""
    import torch

    if not torch.cuda.is_available():
        return rss_mb("VmHWM" if peak else "VmRSS")
    reserved = torch.cuda.max_memory_reserved() if peak else torch.cuda.memory_reserved()
    return (reserved + _CUDA_CONTEXT_BYTES[0]) / 2**20


_CUDA_CONTEXT_BYTES = [0]


def _hf_config(name: str):
    from transformers import AutoConfig

    from pocl_ds.memory_plan import read_config

    values, _ = read_config(name, SHAPES_DIR)
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    family = values.pop("model_type")
    # Dropout off: timings and memory then do not depend on the dropout masks.
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout"):
        values[key] = 0.0
    values.update(activation_dropout=0.0) if family == "opt" else None
    return AutoConfig.for_model(family, **values)


def _build_teacher(spec: dict, world: int, device):
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from pocl_ds.engine import build_ds_config, create_teacher
    from pocl_ds.models import DTYPES

    dtype = DTYPES[spec["teacher_dtype"]]
    config = _hf_config(spec["teacher"])
    if spec["teacher_partition"]:
        ds_config = build_ds_config(
            "ds_configs/teacher_zero3.json", micro_batch_size=spec["micro_batch"],
            gradient_accumulation_steps=1, world_size=world, precision=spec["teacher_dtype"],
        )  # fmt: skip
        # While this object lives, from_config builds under zero.Init: each rank allocates
        # only its partition, and the weights are initialised layer by layer, gathered.
        zero3 = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        del zero3
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return create_teacher(
        model.eval(), partition=spec["teacher_partition"], dtype=dtype,
        micro_batch_size=spec["micro_batch"], world_size=world, device=device,
    )  # fmt: skip


def _batches(spec: dict, vocab: int, rank: int, count: int) -> list[dict]:
    import torch

    from pocl_ds.data import IGNORE_INDEX

    gen = torch.Generator().manual_seed(1000 + rank)
    batch, seq = spec["micro_batch"], spec["seq_len"]
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        labels = ids.clone()
        labels[:, : int(seq * PROMPT_FRACTION)] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _max_over_ranks(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    tensor = tensor.cuda() if torch.cuda.is_available() else tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def _gather_ranks(value: float) -> list[float]:
    import torch
    import torch.distributed as dist

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
    return [float(t) for t in out]


def _train_step(spec: dict, engine, teacher, batch: dict, world: int) -> tuple[list[float], float]:
    """One optimizer step; returns (teacher fwd, student fwd+bwd, optimizer, step) seconds,
    each the slowest rank's, and the loss summed over ranks."""
    import torch

    from pocl_ds import distributed
    from pocl_ds.data import IGNORE_INDEX
    from pocl_ds.objective import teacher_inputs

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    distributed.barrier()
    sync()
    start = time.perf_counter()
    global_tokens = distributed.all_reduce_sum(int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()))
    divisor = max(global_tokens, 1.0) / world
    inputs = (batch["input_ids"], batch["attention_mask"])
    common = dict(temperature=TEMPERATURE, sft_weight=SFT_WEIGHT, num_valid_tokens=divisor)
    with torch.no_grad():
        if spec["loss"] == "fused":
            hidden, head = teacher_inputs(teacher, *inputs)
            teacher_side = {"teacher_hidden": hidden, "teacher_head": head}
        else:
            logits = teacher(input_ids=inputs[0], attention_mask=inputs[1], use_cache=False)
            teacher_side = {"teacher_logits": logits.logits}
    sync()
    teacher_done = time.perf_counter()
    terms = engine(*inputs, batch["labels"], **teacher_side, **common)
    loss = float(terms.loss)
    engine.backward(terms.loss)
    del terms, teacher_side
    sync()
    backward_done = time.perf_counter()
    engine.step()
    sync()
    end = time.perf_counter()
    phases = [teacher_done - start, backward_done - teacher_done, end - backward_done, end - start]
    return _max_over_ranks(phases), distributed.all_reduce_sum(loss)


def run_case(spec: dict) -> dict | None:
    """Build and run one case on this rank; rank 0 returns the results."""
    import deepspeed  # noqa: F401  (imported before the runtime's memory is read)
    import torch
    from transformers import AutoModelForCausalLM

    from pocl_ds import distributed
    from pocl_ds.engine import build_ds_config, create_student_engine
    from pocl_ds.models import DTYPES

    torch.set_num_threads(1)
    info = distributed.init_distributed()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", info.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        free, total = torch.cuda.mem_get_info()
        _CUDA_CONTEXT_BYTES[0] = total - free - torch.cuda.memory_reserved()
    gc.collect()
    runtime_mb = _memory_mb(peak=False)
    if spec["name"] == "runtime":
        values = _gather_ranks(runtime_mb)
        return {"runtime_rss_mb": max(values)} if info.rank == 0 else None
    teacher = _build_teacher(spec, info.world_size, device)
    gc.collect()
    student = AutoModelForCausalLM.from_config(
        _hf_config(spec["student"]), dtype=DTYPES[spec["precision"]]
    )
    vocab = min(student.config.vocab_size, teacher.config.vocab_size)
    config_name = f"zero{spec['zero']}" + ("_offload" if spec["offload"] else "")
    ds_config = build_ds_config(
        f"ds_configs/{config_name}.json", micro_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=1, world_size=info.world_size,
        precision=spec["precision"], max_grad_norm=1.0,
    )  # fmt: skip
    if spec["loss"] == "fused":
        from pocl_ds.objective import DistillationObjective

        module = DistillationObjective(student, kind=KIND, vocab_size=vocab)
    else:
        from bench_train import _naive_objective_class

        module = _naive_objective_class()(student)
    engine = create_student_engine(module, ds_config, lr=1e-4, weight_decay=0.0)
    engine.module.train()
    del student, module
    batches = [
        {key: value.to(device) for key, value in batch.items()}
        for batch in _batches(spec, vocab, info.rank, spec["steps"])
    ]

    gc.collect()
    built_mb = _memory_mb(peak=False)
    _reset_peak()
    timed, losses, step1_peak = [], [], 0.0
    for index, batch in enumerate(batches):
        phases, loss = _train_step(spec, engine, teacher, batch, info.world_size)
        losses.append(loss)
        if index == 0:
            step1_peak = _memory_mb(peak=True)
            _reset_peak()
        else:
            timed.append(phases)
    later_peak = _memory_mb(peak=True) if timed else 0.0
    if not all(map(torch.isfinite, torch.tensor(losses))):
        raise RuntimeError(f"non-finite loss: {losses}")
    step1 = _gather_ranks(step1_peak)
    (later, built, runtime) = _max_over_ranks([later_peak, built_mb, runtime_mb])
    if info.rank != 0:
        return None
    timed = timed or [phases]
    names = ("teacher_fwd_s", "student_fwd_bwd_s", "optimizer_s", "step_s")
    medians = {n: statistics.median(t[i] for t in timed) for i, n in enumerate(names)}
    tokens = info.world_size * spec["micro_batch"] * spec["seq_len"]
    return {
        **{n: round(v, 3) for n, v in medians.items()},
        "tokens_per_s": round(tokens / medians["step_s"], 1),
        "step1_peak_rank0_mb": round(step1[0], 1),
        "step1_peak_rank1_mb": round(step1[1], 1) if len(step1) > 1 else "",
        "later_peak_mb": round(later, 1),
        "built_rss_mb": round(built, 1),
        "runtime_rss_mb": round(runtime, 1),
        "first_loss": round(losses[0] / info.world_size, 4),
    }


# ----------------------------------------------------------------------------- driver


def _spec_of(row: dict) -> dict:
    """A CSV row's case settings, typed as in CASES."""
    spec = {key: row[key] for key in ("teacher", "student", "precision", "teacher_dtype", "loss")}
    spec.update(
        zero=int(row["zero"]), ranks=int(row["ranks"]), micro_batch=int(row["micro_batch"]),
        seq_len=int(row["seq_len"]), device=row.get("device") or "cpu", offload=row["offload"] == "True",
        teacher_partition=row["teacher_partition"] == "True",
    )  # fmt: skip
    return spec


def validation_rows(rows: list[dict]) -> list[dict]:
    """Prediction of the current planner against each measured case."""
    from pocl_ds.memory_plan import peak_phase

    out = []
    for row in rows:
        if row["case"] == "runtime" or row["status"] != "ok":
            continue
        spec = _spec_of(row)
        measured = max(float(row["step1_peak_rank0_mb"]), float(row["step1_peak_rank1_mb"] or 0))
        predicted = predicted_mb(spec)
        setup, _ = setup_from_args(plan_arguments(spec))
        out.append({
            "timestamp": row["timestamp"], "commit": row["commit"], "device": spec["device"],
            "case": row["case"], "measured_step1_peak_mb": measured,
            "measured_later_peak_mb": row["later_peak_mb"], "predicted_mb": round(predicted, 1),
            "error_vs_step1": round(predicted / measured - 1, 4),
            "error_vs_later": round(predicted / float(row["later_peak_mb"]) - 1, 4),
            "peak_phase": peak_phase(setup),
            "plan_command": "python launch/plan.py " + " ".join(plan_arguments(spec)),
        })  # fmt: skip
    return out


def validation_table(validation: list[dict]) -> str:
    """Prediction against measurement, with the command that gives each prediction."""
    header = ["case", "step-1 peak (MB)", "later steps (MB)", "plan (MB)", "vs step 1",
              "vs later", "peak phase", "command"]  # fmt: skip
    rows = [
        [v["case"], f"{v['measured_step1_peak_mb']:.0f}",
         f"{float(v['measured_later_peak_mb']):.0f}", f"{v['predicted_mb']:.0f}",
         f"{v['error_vs_step1']:+.1%}", f"{v['error_vs_later']:+.1%}", v["peak_phase"],
         f"`{v['plan_command']}`"]
        for v in validation
    ]  # fmt: skip
    return (
        "Planner against measurement (larger rank; `benchmarks/plan_validation.csv`):\n\n"
        + markdown_table(header, rows)
    )


def write_reports(output: Path) -> str:
    """scale.md and plan_validation.csv from the latest row of each case in scale.csv."""
    rows = latest_rows(output / "scale.csv")
    validation = validation_rows(rows)
    path = output / "plan_validation.csv"
    path.unlink(missing_ok=True)
    if validation:
        append_rows("plan_validation", validation, VALIDATION_FIELDS, output)
    table = markdown(rows, validation) + "\n" + validation_table(validation) + "\n" + fits_table()
    return write_table("scale", table, output).read_text(encoding="utf-8")


def plan_arguments(spec: dict) -> list[str]:
    """The launch/plan.py flags that describe a case (its defaults left out)."""
    args = ["--teacher", spec["teacher"], "--student", spec["student"],
            "--world-size", str(spec["ranks"]), "--zero", str(spec["zero"])]  # fmt: skip
    if spec["teacher_partition"]:
        args.append("--teacher-partition")
    if spec["offload"]:
        args.append("--offload")
    for key, flag in (("precision", "--precision"), ("teacher_dtype", "--teacher-dtype"),
                      ("micro_batch", "--micro-batch"), ("seq_len", "--seq-len"),
                      ("loss", "--loss"), ("device", "--device")):  # fmt: skip
        # plan.py's teacher dtype defaults to --precision
        default = spec["precision"] if key == "teacher_dtype" else DEFAULT_ARGS[key]
        if str(spec[key]) != str(default):
            args += [flag, str(spec[key])]
    return args


def predicted_mb(spec: dict) -> float:
    from pocl_ds.memory_plan import plan

    setup, _ = setup_from_args(plan_arguments(spec))
    return sum(plan(setup).values()) / 2**20


def _deepspeed_command(spec: dict) -> list[str]:
    """``nice deepspeed --num_gpus 2`` on this script, on a free port (other jobs may hold
    DeepSpeed's default one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return ["nice", "-n", "19", deepspeed, f"--num_gpus={spec['ranks']}", f"--master_port={port}",
            str(Path(__file__).resolve()), "--case", json.dumps(spec)]  # fmt: skip


def _launch(spec: dict, timeout: float) -> dict:
    """Run one case; the result line of rank 0, or a status saying why there is none."""
    env = dict(os.environ)
    env.update(
        # Every block of >= 1 MiB is mmap'ed and unmapped on free, so RSS follows live tensors.
        MALLOC_MMAP_THRESHOLD_=str(1 << 20),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pocl_ds" / "torch_extensions")
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    try:
        done = subprocess.run(
            _deepspeed_command(spec), cwd=REPO, env=env, capture_output=True, text=True,
            timeout=timeout, start_new_session=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f}s"}
    results = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode != 0 or not results:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line] or lines
        return {"status": f"failed (exit {done.returncode}): {(errors or ['?'])[-1][:200]}"}
    return {**json.loads(results[-1][len(RESULT_TAG) :]), "status": "ok"}


def latest_rows(csv_path: Path) -> list[dict]:
    """The latest row of each case, in CASES order (then any other case names)."""
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    latest = {row["case"]: row for row in rows}
    order = [c["name"] for c in CASES if c["name"] in latest]
    return [latest[name] for name in order + sorted(set(latest) - set(order))]


def _gb(mb: str) -> str:
    return f"{float(mb) / 1024:.2f}" if mb not in ("", None) else ""


def markdown(rows: list[dict], validation: list[dict]) -> str:
    runtime = [r for r in rows if r["case"] == "runtime" and r["status"] == "ok"]
    lines = [
        "KD step on 2 CPU ranks (`deepspeed --num_gpus 2`, gloo, 1 thread per rank), models "
        "built from the real configs with random weights, dropout off; fused = pocl_ds's "
        "chunked loss, naive = full [tokens × vocab] logits. Teacher ZeRO-3-partitioned "
        "(zero.Init) unless marked \"repl\". Times: slowest rank, median over steps 2–N. "
        "Peak: resident memory per rank during step 1 (rank 0 / rank 1), GiB; plan: "
        "`launch/plan.py` for the same settings (its steady-state peak, from step 2 on) and "
        "its error against the larger rank's step-1 peak and against the peak of the later "
        "steps."
        + (f" Runtime alone (torch + transformers + DeepSpeed, gloo initialised): "
           f"{float(runtime[-1]['runtime_rss_mb']):.0f} MB per rank." if runtime else ""),
        "",
    ]  # fmt: skip
    header = ["case", "teacher → student (params)", "ZeRO", "dtype", "T × B", "loss",
              "tokens/s", "s/step", "teacher fwd", "student fwd+bwd", "optimizer",
              "peak/rank (GiB)", "later steps (GiB)", "plan (GiB)", "plan error"]  # fmt: skip
    predictions = {v["case"]: v for v in validation}
    table = []
    for r in rows:
        if r["case"] == "runtime":
            continue
        pair = (f"{r['teacher']} ({float(r['teacher_params']) / 1e9:.2f}B) → {r['student']} "
                f"({float(r['student_params']) / 1e6:.0f}M)")  # fmt: skip
        zero = f"T:{'3' if r['teacher_partition'] == 'True' else 'repl'} S:{r['zero']}"
        zero += "+offload" if r["offload"] == "True" else ""
        dtype = f"T {r['teacher_dtype']} / S {r['precision']}"
        shape = f"{r['seq_len']} × {r['micro_batch']}"
        if r["status"] != "ok":
            table.append([r["case"], pair, zero, dtype, shape, r["loss"], r["status"],
                          "", "", "", "", "", "", _gb(r["predicted_mb"]), ""])  # fmt: skip
            continue
        check = predictions[r["case"]]
        plan = _gb(check["predicted_mb"])
        error = f"{check['error_vs_step1']:+.0%} / {check['error_vs_later']:+.0%}"
        table.append([
            r["case"], pair, zero, dtype, shape, r["loss"], f"{float(r['tokens_per_s']):.0f}",
            f"{float(r['step_s']):.2f}", f"{float(r['teacher_fwd_s']):.2f}",
            f"{float(r['student_fwd_bwd_s']):.2f}", f"{float(r['optimizer_s']):.2f}",
            f"{_gb(r['step1_peak_rank0_mb'])} / {_gb(r['step1_peak_rank1_mb'])}",
            _gb(r["later_peak_mb"]), plan, error,
        ])  # fmt: skip
    return "\n".join(lines) + markdown_table(header, table)


# What fits on 8 x 80 GB GPUs, from the planner: the paper pairs at the paper recipes' batch
# (micro batch 4 x 512 tokens), the modern pairs at 4 x 2048; bf16 throughout.
FIT_PAIRS = [
    ("gpt2-xl", "gpt2", 512), ("opt-2.7b", "opt-350m", 512),
    ("llama-3.1-8b", "llama-3.2-1b", 2048), ("qwen2.5-7b", "qwen2.5-0.5b", 2048),
    ("llama-3.1-70b", "llama-3.1-8b", 2048),
]  # fmt: skip
FIT_LAYOUTS = [
    ("T repl, S ZeRO-2", ["--zero", "2"]),
    ("T ZeRO-3, S ZeRO-2", ["--zero", "2", "--teacher-partition"]),
    ("T ZeRO-3, S ZeRO-3", ["--zero", "3", "--teacher-partition"]),
    ("T ZeRO-3, S ZeRO-3 + offload", ["--zero", "3", "--teacher-partition", "--offload"]),
    ("T ZeRO-3, S ZeRO-3 + offload, ckpt", ["--zero", "3", "--teacher-partition", "--offload",
                                             "--gradient-checkpointing"]),
]  # fmt: skip


def fits_table() -> str:
    """Per-rank GiB on 8 x 80 GB for each pair and layout, from launch/plan.py."""
    from pocl_ds.memory_plan import GIB, fits, plan

    header = ["teacher → student", "B × T", *(name for name, _ in FIT_LAYOUTS)]
    rows = []
    for teacher, student, seq in FIT_PAIRS:
        cells = [f"{teacher} → {student}", f"4 × {seq}"]
        for _, flags in FIT_LAYOUTS:
            setup, _ = setup_from_args(
                ["--teacher", teacher, "--student", student, "--world-size", "8", *flags,
                 "--micro-batch", "4", "--seq-len", str(seq), "--device", "cuda"]
            )  # fmt: skip
            total = sum(plan(setup).values())
            cells.append(f"{total / GIB:.0f} {'✓' if fits(total, 80) else '✗'}")
        rows.append(cells)
    command = (
        "python launch/plan.py --teacher llama-3.1-70b --student llama-3.1-8b --world-size 8 "
        "--zero 3 --teacher-partition --offload --micro-batch 4 --seq-len 2048 --device cuda "
        "--device-gib 80"
    )
    return (
        "Planned GiB per GPU on 8 × 80 GB (✓ fits, ✗ does not), bf16 student and teacher, "
        f"fused loss, CUDA context included; one cell: `{command}`.\n\n"
        + markdown_table(header, rows)
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = ["runtime", *(c["name"] for c in CASES)]
    parser.add_argument("--cases", nargs="+", choices=names, default=names)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case (>= 2)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks (1 on a single GPU)")
    parser.add_argument("--micro-batch", type=int, help="override every case's micro batch")
    parser.add_argument("--seq-len", type=int, help="override every case's sequence length")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks"))
    parser.add_argument("--report", action="store_true", help="only rewrite scale.md")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, JSON
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ranks < 1 or min(args.micro_batch or 1, args.seq_len or 2) < 1:
        raise PoclError("--ranks and --micro-batch must be >= 1")
    if args.steps < 2:
        raise PoclError("--steps must be >= 2 (step 1 is measured, the later ones timed)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case:
        return run_requested_case(args.case, run_case)
    from importlib.metadata import version

    from pocl_ds.memory_plan import load_shape

    output = Path(args.output_dir)
    csv_path = output / "scale.csv"
    if args.report:
        existing_csv(csv_path)
        print(write_reports(output))
        return 0
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shared = {**provenance(device), "deepspeed": version("deepspeed"), "device": device}
    overrides = {"steps": args.steps, "ranks": args.ranks, "device": device}
    for key in ("micro_batch", "seq_len"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    by_name = {c["name"]: c for c in CASES}
    by_name["runtime"] = _case("runtime", "gpt2", "gpt2", 0)
    for name in args.cases:
        spec = {**by_name[name], **overrides}
        sys.stderr.write(f"{name} ...\n")
        sys.stderr.flush()
        started = time.perf_counter()
        result = _launch(spec, args.timeout)
        teacher, student = (
            load_shape(spec["teacher"], SHAPES_DIR),
            load_shape(spec["student"], SHAPES_DIR),
        )
        row = {**shared, **spec, "case": name, **result,
               "teacher_params": teacher.num_parameters,
               "student_params": student.num_parameters,
               "vocab": min(teacher.vocab_size, student.vocab_size)}  # fmt: skip
        if name != "runtime":
            row["predicted_mb"] = round(predicted_mb(spec), 1)
        if result["status"] == "ok" and name != "runtime":
            measured = max(result["step1_peak_rank0_mb"], result["step1_peak_rank1_mb"])
            row["prediction_error"] = round(row["predicted_mb"] / measured - 1, 4)
        append_rows("scale", [row], FIELDS, output)
        sys.stderr.write(
            f"  {result['status']}: {result.get('tokens_per_s', '-')} tokens/s, step-1 peak "
            f"{result.get('step1_peak_rank0_mb', '-')} / {result.get('step1_peak_rank1_mb', '-')}"
            f" MB, plan {row.get('predicted_mb', '-')} MB "
            f"({time.perf_counter() - started:.0f}s)\n"
        )
        report = write_reports(output)
    print(report)
    return 0


if __name__ == "__main__":
    run_main(main)
