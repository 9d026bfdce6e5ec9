"""The KD training step: the trainer's own step, fused objective against a naive one.

    python launch/bench_train.py [--models tiny small] [--zero 1 2 3] [--ranks 1 2] [--quick]
    python launch/bench.py train [--quick] ...   (the same, through the dispatcher)

Two GPT-2-shaped teacher/student pairs with the GPT-2 vocabulary (50257 ids, random tokens):

    tiny   teacher H128 L4, student H64 L2, micro batch 4 x 128 tokens per rank
    small  teacher H256 L4, student H128 L2, micro batch 4 x 256 tokens per rank

Every step is ``Trainer.train_step``, the code a training run executes, on a ``recipe.Run``
put together here from the library's own constructors (the benchmark's settings in an
``ExperimentConfig``; one stage of random-token samples, its ``StageSampler`` and
``CurriculumController``; off-policy ``CurationPolicy``). The two cases differ only in the
module the DeepSpeed engine wraps (client AdamW, ``ds_configs/zeroN.json`` filled by
``pocl_ds.engine.build_ds_config``):

    fused  pocl_ds's ``DistillationObjective`` (the chunked fused-linear kernel)
    naive  the reference, written here with the same call signature: full [B, T, V] logits
           of student and of teacher (from its hidden states and head), fp32 log-softmax,
           forward KL, α·CE, autograd

Loss: α·CE + (1 − α)·τ²·KL(p_τ ‖ q_τ), α = 0.5, τ = 2, the first quarter of every sequence a
prompt (no target). Dropout is off, so both modules see the same numbers and the first step's
loss (the mean over the global batch's targets, as the trainer reports it) must agree
(checked). Each case (pair × module × ZeRO stage × ranks) runs in a fresh process (2 ranks:
``torchrun --standalone``) with one torch thread per rank (``--threads``), so 2 ranks use twice
the cores of 1. It times ``--warmup`` untimed and ``--steps`` timed optimizer steps. The phases
are timed by wrapping the objects the step calls (the teacher's forward, the engine's forward
with the loss, ``engine.backward``, ``engine.step``); per step the slowest rank's time of each
phase counts, and the median over steps is reported. Generation is a batched
``pocl_ds.generation.generate`` of the trained student (one 16-token prompt per micro-batch row,
``--new-tokens`` new tokens), the median of 5 calls (slowest rank), the same for both. Under
ZeRO-3 each call gathers the student whole once when it fits, as on-policy training's
generation does (new weights every step); a second column times 5 calls inside one gather, as
evaluation and difficulty scoring run them. Where ZeRO-1 and ZeRO-3 both ran, a PASS/FAIL line
per column compares their generate rates (target: ZeRO-3 >= 0.5x ZeRO-1).

Then the teacher-cache case runs (``launch/bench_teacher_cache.py``: the step after the first
epoch with and without ``distill.teacher_cache``, its own table; ``--no-cache-case`` skips it).

Peak memory per rank: the rise of resident memory (VmHWM, reset through
/proc/self/clear_refs) over the resident memory once models, engine, teacher, trainer and
samples are built, across the training steps (not the generation); glibc is told to map every
block of 1 MiB or more directly, so freed tensors leave RSS at once. The largest rank counts.
On CUDA: ``max_memory_allocated`` over ``memory_allocated`` at the same point.

Rows are appended to benchmarks/train.csv case by case (machine, versions, commit, sizes,
timings); the table of the CSV's latest run is printed with the targets' PASS/FAIL lines and
written to benchmarks/train.md, and benchmarks/train.png is drawn from the same rows
(``--report`` redraws both from the CSV alone, e.g. after an interrupted run).
"""

import argparse
import functools
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

from bench_common import (  # noqa: E402
    append_rows,
    existing_csv,
    latest_run,
    provenance,
    reset_peak_rss,
    rss_mb,
    run_case_in_subprocess,
    run_requested_case,
    write_table,
)

from pocl_ds.cli import ArgumentParser, run_main  # noqa: E402
from pocl_ds.errors import PoclError  # noqa: E402

VOCAB = 50257
PAIRS = {
    "tiny": {
        "teacher": {"hidden_size": 128, "num_layers": 4, "num_heads": 4},
        "student": {"hidden_size": 64, "num_layers": 2, "num_heads": 2},
        "batch": 4,
        "seq": 128,
    },
    "small": {
        "teacher": {"hidden_size": 256, "num_layers": 4, "num_heads": 4},
        "student": {"hidden_size": 128, "num_layers": 2, "num_heads": 2},
        "batch": 4,
        "seq": 256,
    },
}
IMPLS = ("fused", "naive")
KIND = "fkl"
TEMPERATURE = 2.0
SFT_WEIGHT = 0.5
PROMPT_TOKENS = 16
# Generation is timed this many times (each call gathers a ZeRO-3 student anew); the median
# counts, so one descheduled call on a shared CPU does not decide the ZeRO-3 verdict. Then as
# many calls run inside one gather, as an evaluation's seeds and suites and difficulty scoring's
# batches do; on-policy training (new weights every step) is the gather-per-call column.
GENERATE_REPEATS = 5
# (CSV field prefix, what the column measures) for the two generation columns
GENERATION_COLUMNS = {
    "generate": "one gather per call (on-policy training)",
    "generate_held": f"{GENERATE_REPEATS} calls in one gather (evaluation, difficulty scoring)",
}
PHASES = ("teacher_fwd_s", "student_fwd_s", "student_bwd_s", "optimizer_s", "step_s")
FIELDS = [
    "timestamp", "commit", "machine", "device", "torch", "deepspeed", "transformers", "model",
    "teacher", "student", "vocab", "batch", "seq", "prompt_fraction", "impl", "zero", "ranks",
    "threads", "chunk_size", "kind", "temperature", "sft_weight", "warmup", "steps", "new_tokens",
    *PHASES, "steps_per_s", "tokens_per_s", "generate_s", "generate_tokens_per_s",
    "generate_held_s", "generate_held_tokens_per_s", "peak_extra_mb", "baseline_mb", "first_loss", "status",
]  # fmt: skip


def _describe(shape: dict) -> str:
    return f"gpt2 H{shape['hidden_size']} L{shape['num_layers']}"


# ----------------------------------------------------------------------------- one case


# impl name -> a function returning the objective class (same call signature as
# DistillationObjective) that wraps the student; "fused" is pocl_ds's own, "naive" the default.
OBJECTIVES = {}


def _naive_objective_class():
    """The reference module, built on first use so the driver never imports torch."""
    import torch
    import torch.nn.functional as F

    from pocl_ds.data import IGNORE_INDEX
    from pocl_ds.objective import LossTerms

    class NaiveDistillation(torch.nn.Module):
        """Reference KD loss from full logits: [B, T, V] of student and teacher in memory.

        Called exactly as ``DistillationObjective`` is, so the trainer's step runs it as is.
        """

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            labels: torch.Tensor,
            *,
            teacher_hidden: torch.Tensor,
            teacher_head: tuple[torch.Tensor, torch.Tensor | None],
            temperature: float,
            sft_weight: float,
            num_valid_tokens: float,
        ) -> LossTerms:
            """input_ids, attention_mask, labels: [B, T]; teacher_hidden: [B, T, H_t];
            teacher_head: (weight [V, H_t], bias or None)."""
            logits = self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
            with torch.no_grad():
                teacher_logits = F.linear(teacher_hidden, *teacher_head)
            logits = logits[:, :-1].float()
            targets = labels[:, 1:]
            mask = targets.ne(IGNORE_INDEX).float()
            log_q = F.log_softmax(logits / temperature, dim=-1)
            log_p = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            kd = (kl * mask).sum() * temperature**2 / num_valid_tokens
            ce = (
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                / num_valid_tokens
            )
            loss = sft_weight * ce + (1.0 - sft_weight) * kd
            return LossTerms(loss=loss, kd=kd.detach(), ce=ce.detach())

    return NaiveDistillation


class PhaseTimer:
    """Seconds spent inside the instrumented methods, per phase, since the last ``reset``.

    ``instrument`` replaces a bound method on the object itself, so the trainer's unchanged
    code runs through the timing; on CUDA each call is bracketed by synchronisations.
    """

    def __init__(self, phases: tuple[str, ...]) -> None:
        import torch

        self.seconds = dict.fromkeys(phases, 0.0)
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def instrument(self, owner, method: str, phase: str) -> None:
        inner = getattr(owner, method)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            self._sync()
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[phase] += time.perf_counter() - started

        setattr(owner, method, timed)


def _config(spec: dict, output_dir: str):
    """The benchmark's settings as the recipe a training run would read them from."""
    from pocl_ds.config import from_dict

    pair = spec.get("pair") or PAIRS[spec["model"]]  # a case may bring its own (cache bench)
    # Dropout off: the two modules then compute the same loss on the same weights.
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    inline = {"family": "gpt2", "max_positions": spec["seq"] + 64, **no_dropout}
    return from_dict(
        {
            "model": {
                "teacher_config": {**inline, **pair["teacher"]},
                "student_config": {**inline, **pair["student"]},
                "teacher_partition": False,
            },
            "data": {
                "train_path": "random tokens (launch/bench_train.py)",
                "max_length": spec["seq"],
            },
            "distill": {
                "method": "kd",
                "divergence": spec.get("kind", KIND),
                "temperature": spec.get("temperature", TEMPERATURE),
                "sft_weight": spec.get("sft_weight", SFT_WEIGHT),
                "chunk_size": spec["chunk_size"],
                "teacher_cache": spec.get("teacher_cache", "none"),
                "teacher_cache_dtype": spec.get("teacher_cache_dtype", "teacher"),
            },
            "train": {
                "output_dir": output_dir,
                "ds_config": f"ds_configs/zero{spec['zero']}.json",
                "precision": "fp32",
                "micro_batch_size": spec["batch"],
                "gradient_accumulation_steps": 1,
                "epochs": 1,
                "lr": 1e-4,
                "weight_decay": 0.0,
                "warmup_ratio": 0.0,
                "lr_schedule": "constant",
                "max_grad_norm": 1.0,
                "on_nonfinite": "stop",
            },
            "eval": {"evaluate_at_end": False},
        }
    )


def _random_samples(spec: dict, count: int, seed: int) -> list:
    """``count`` samples of ``spec["seq"]`` random tokens, the leading prompt share without
    targets; the same on every rank (the sampler shards them)."""
    import torch

    from pocl_ds.data import TokenizedSample

    gen = torch.Generator().manual_seed(seed)
    prompt = int(spec["seq"] * spec["prompt_fraction"])
    rows = torch.randint(0, spec.get("vocab", VOCAB), (count, spec["seq"]), generator=gen).tolist()
    return [
        TokenizedSample(
            index=i, prompt_ids=tuple(row[:prompt]), response_ids=tuple(row[prompt:]), references=()
        )
        for i, row in enumerate(rows)
    ]


def _student_engine(spec: dict, config, method, world: int) -> tuple:
    """The student inside the case's module (fused objective or naive reference) inside its
    DeepSpeed engine, as ``recipe.build_run`` wraps it; and whether the engine is ZeRO-3."""
    from pocl_ds.engine import build_ds_config, create_student_engine, zero_stage
    from pocl_ds.models import load_causal_lm
    from pocl_ds.objective import DistillationObjective

    m, d, t = config.model, config.distill, config.train
    student = load_causal_lm(
        inline_config=m.student_config, vocab_size=spec.get("vocab", VOCAB), seed=t.seed
    )
    ds_config = build_ds_config(
        t.ds_config,
        micro_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        world_size=world,
        precision=t.precision,
        max_grad_norm=t.max_grad_norm,
    )
    if spec["impl"] == "fused":
        module = DistillationObjective(
            student,
            kind=method.trained_divergence(d.divergence),
            beta=d.beta,
            scale_by_temperature_squared=d.scale_by_temperature_squared,
            chunk_size=d.chunk_size,
            vocab_size=spec.get("vocab", VOCAB),
        )
    else:  # the naive reference, or a module another benchmark registered (bench_peers)
        module = OBJECTIVES.get(spec["impl"], _naive_objective_class)()(student)
    engine = create_student_engine(module, ds_config, lr=t.lr, weight_decay=t.weight_decay)
    engine.module.train()
    return engine, zero_stage(ds_config) == 3


def _build_run(spec: dict, output_dir: str):
    """The ``recipe.Run`` of one case, built as ``recipe.build_run`` builds one, but on random
    tokens and with the case's module inside the engine."""
    import types

    import torch

    from pocl_ds import distributed
    from pocl_ds.curation import CurationPolicy
    from pocl_ds.curriculum import CurriculumController, single_stage_plan
    from pocl_ds.engine import create_teacher
    from pocl_ds.methods import method_spec
    from pocl_ds.models import load_causal_lm
    from pocl_ds.recipe import DTYPES, PreparedData, Run, teacher_cache_for
    from pocl_ds.sampler import StageSampler

    config = _config(spec, output_dir)
    m, d, t = config.model, config.distill, config.train
    method = method_spec(d.method)
    world, vocab = distributed.world_size(), spec.get("vocab", VOCAB)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as build_run's
    engine, zero3 = _student_engine(spec, config, method, world)
    teacher = create_teacher(
        load_causal_lm(inline_config=m.teacher_config, vocab_size=vocab, seed=t.seed + 1),
        partition=m.teacher_partition,
        dtype=DTYPES[m.teacher_dtype],
        micro_batch_size=t.micro_batch_size,
        world_size=world,
        device=device,
    )
    steps = spec["warmup"] + spec["steps"]
    samples = _random_samples(spec, world * t.micro_batch_size * steps, seed=t.seed)
    plans = single_stage_plan(
        [s.index for s in samples],
        temperature=d.temperature,
        sft_weight=method.alpha(d.sft_weight),
        epochs=t.epochs,
    )
    sampler = StageSampler(
        plans[0].sample_indices,
        stage=plans[0].stage,
        rank=distributed.rank(),
        world_size=world,
        seed=t.seed,
        micro_batch_size=t.micro_batch_size,
        accumulation_steps=t.gradient_accumulation_steps,
    )
    # GPT-2's ids: eos 50256; no sample is padded (all have the same length).
    tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=vocab - 1)
    return Run(
        config=config,
        method=method,
        output_dir=Path(t.output_dir),
        data=PreparedData(tokenizer, samples, [], [], [], []),
        samples_by_index={s.index: s for s in samples},
        engine=engine,
        teacher=teacher,
        teacher_cache=teacher_cache_for(config, teacher, f"random ids ({vocab})"),
        curation=CurationPolicy(
            on_policy=method.on_policy,
            on_policy_prob=d.on_policy_prob,
            seed=t.seed,
            max_length=config.data.max_length,
            max_new_tokens=d.generation_max_new_tokens,
            pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id,
            vocab_size=vocab,
        ),
        controller=CurriculumController(plans, steps_per_epoch=[len(sampler)]),
        samplers=[sampler],
        difficulty=None,
        zero3=zero3,
        device=device,
        vocab_size=vocab,
        seqkd_truncated=0,
        eval_suites={},
        timings={},
    )


def _max_over_ranks(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    from pocl_ds import distributed

    if distributed.world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    if torch.cuda.is_available():
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def _timed_steps(trainer, timer: PhaseTimer) -> tuple[list[list[float]], list[float]]:
    """Every step of the stage through ``trainer.train_step``: per step the slowest rank's
    phase times (PHASES order) and the step's loss."""
    import torch

    from pocl_ds import distributed

    run = trainer.run_parts
    plan, sampler = run.controller.current_plan(), run.samplers[0]
    times, losses = [], []
    for micro_batch_indices in sampler:
        micro_batches = [[run.samples_by_index[i] for i in mb] for mb in micro_batch_indices]
        timer.reset()
        distributed.barrier()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        # as the run loop does: the global batch's target count from every rank's share
        targets = run.target_tokens(sampler.global_batch(sampler.steps_done - 1))
        result = trainer.train_step(plan, micro_batches, global_targets=targets)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        step_s = time.perf_counter() - started
        times.append(_max_over_ranks([*(timer.seconds[p] for p in PHASES[:-1]), step_s]))
        losses.append(result["loss"])
    return times, losses


def _timed_generation(trainer, spec: dict, info) -> tuple[float, float]:
    """Seconds per generate call of the trained student, slowest rank: the median of
    ``GENERATE_REPEATS`` calls that each gather a ZeRO-3 student for themselves, then the
    mean of as many calls inside one gather (the gather included)."""
    import torch

    from pocl_ds import distributed
    from pocl_ds.engine import gathered_for_generation
    from pocl_ds.generation import generate

    model = trainer.engine.module.model
    gen = torch.Generator().manual_seed(2000 + info.rank)
    prompts = torch.randint(
        0, spec.get("vocab", VOCAB), (spec["batch"], PROMPT_TOKENS), generator=gen
    ).tolist()
    generate_call = functools.partial(
        generate,
        model,
        prompts,
        pad_id=trainer.run_parts.pad_id,
        eos_id=None,  # every row generates all --new-tokens: the same work for both
        max_new_tokens=spec["new_tokens"],
        batch_size=spec["batch"],
        synced_gpus=trainer.run_parts.zero3 and info.world_size > 1,
        progress=False,
    )
    per_call = []
    for _ in range(GENERATE_REPEATS):
        distributed.barrier()
        start = time.perf_counter()
        generate_call()
        per_call += _max_over_ranks([time.perf_counter() - start])
    distributed.barrier()
    start = time.perf_counter()
    with torch.no_grad(), gathered_for_generation(model):
        for _ in range(GENERATE_REPEATS):
            generate_call()
    (held,) = _max_over_ranks([(time.perf_counter() - start) / GENERATE_REPEATS])
    return statistics.median(per_call), held


def run_case(spec: dict) -> dict | None:
    """Build and time one case on this rank; rank 0 returns the results, the others None."""
    import torch

    from pocl_ds import distributed
    from pocl_ds.trainer import Trainer

    torch.set_num_threads(spec["threads"])
    info = distributed.init_distributed()
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as output_dir:
        trainer = Trainer(_build_run(spec, output_dir))
        engine, teacher = trainer.engine, trainer.run_parts.teacher
        timer = PhaseTimer(PHASES[:-1])
        timer.instrument(teacher.base_model, "forward", "teacher_fwd_s")
        timer.instrument(engine, "forward", "student_fwd_s")
        timer.instrument(engine, "backward", "student_bwd_s")
        timer.instrument(engine, "step", "optimizer_s")

        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated() / 2**20
        else:
            baseline = rss_mb("VmRSS")
            if not reset_peak_rss():
                raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
        times, losses = _timed_steps(trainer, timer)
        if cuda:
            peak = torch.cuda.max_memory_allocated() / 2**20 - baseline
        else:
            peak = rss_mb("VmHWM") - baseline
        peak, baseline = _max_over_ranks([peak, baseline])

        generate_s, generate_held_s = _timed_generation(trainer, spec, info)
    if info.rank != 0:
        return None
    timed = times[spec["warmup"] :]
    medians = {name: statistics.median(t[i] for t in timed) for i, name in enumerate(PHASES)}
    tokens = info.world_size * spec["batch"] * spec["seq"]
    new_tokens = info.world_size * spec["batch"] * spec["new_tokens"]
    return {
        **{name: round(value, 4) for name, value in medians.items()},
        "steps_per_s": round(1.0 / medians["step_s"], 4),
        "tokens_per_s": round(tokens / medians["step_s"], 1),
        "generate_s": round(generate_s, 4),
        "generate_tokens_per_s": round(new_tokens / generate_s, 1),
        "generate_held_s": round(generate_held_s, 4),
        "generate_held_tokens_per_s": round(new_tokens / generate_held_s, 1),
        "peak_extra_mb": round(peak, 1),
        "baseline_mb": round(baseline, 1),
        "first_loss": losses[0],
    }


# ----------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pocl_ds.divergence import DEFAULT_CHUNK_SIZE

    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--zero", type=int, nargs="+", default=[1, 2, 3], choices=(1, 2, 3))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], choices=(1, 2))
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt")
    parser.add_argument("--prompt-fraction", type=float, default=0.25,
                        help="leading share of each sequence that is prompt (no target)")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per rank (1: on a shared CPU every multi-threaded op waits for "
        "descheduled threads, which made 2-thread timings up to 10x slower and erratic)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per case")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks"))
    parser.add_argument(
        "--quick", action="store_true", help="tiny only, ZeRO-2, 1 rank, 1 warm-up + 1 step"
    )
    parser.add_argument(
        "--report", action="store_true", help="only redraw train.md and train.png from the CSV"
    )
    parser.add_argument(
        "--no-cache-case",
        action="store_true",
        help="skip the teacher-cache case (launch/bench_teacher_cache.py) run after the table",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, JSON
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.zero, args.ranks = ["tiny"], [2], [1]
        args.warmup, args.steps, args.new_tokens = 1, 1, 4
    if min(args.steps, args.new_tokens, args.chunk_size, args.threads) < 1 or args.warmup < 0:
        raise PoclError(
            "--steps, --new-tokens, --chunk-size and --threads must be >= 1, --warmup >= 0"
        )
    if not 0.0 <= args.prompt_fraction < 1.0:
        raise PoclError(f"--prompt-fraction={args.prompt_fraction}: must lie in [0, 1)")
    return args


def _cases(args: argparse.Namespace) -> list[dict]:
    """Fused next to naive for every pair, rank count and stage, so an interrupted run still
    holds complete comparisons."""
    shared = dict(
        threads=args.threads, prompt_fraction=args.prompt_fraction, chunk_size=args.chunk_size,
        warmup=args.warmup, steps=args.steps, new_tokens=args.new_tokens,
    )  # fmt: skip
    cases = []
    for model in args.models:
        sizes = dict(batch=PAIRS[model]["batch"], seq=PAIRS[model]["seq"])
        for ranks in args.ranks:
            for zero in args.zero:
                for impl in args.impls:
                    case = dict(model=model, impl=impl, zero=zero, ranks=ranks)
                    cases.append({**case, **sizes, **shared})
    return cases


def _config_key(row: dict) -> tuple[str, str, str]:
    return row["model"], row["zero"], row["ranks"]


def _pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(fused, naive) rows of each configuration where both ran."""
    ok = [r for r in rows if r["status"] == "ok"]
    naive = {_config_key(r): r for r in ok if r["impl"] == "naive"}
    return [
        (r, naive[_config_key(r)]) for r in ok if r["impl"] == "fused" and _config_key(r) in naive
    ]


GENERATION_TARGET = 0.5  # ZeRO-3 generation's new tokens/s over ZeRO-1's, same pair and ranks


def verdicts(rows: list[dict]) -> list[str]:
    """PASS/FAIL lines for the step's two targets and the loss agreement over every
    configuration, then for ZeRO-3 generation where ZeRO-1 ran beside it."""
    return _step_verdicts(rows) + _generation_verdicts(rows)


def _generation_verdicts(rows: list[dict]) -> list[str]:
    """Per generation column, ZeRO-3's rate against ZeRO-1's for the same pair, ranks and
    module; no line for a column no run has under both stages (older rows lack the held one)."""
    lines = []
    for field, what in GENERATION_COLUMNS.items():
        lines += _generation_verdict(rows, f"{field}_tokens_per_s", what)
    return lines


def _generation_verdict(rows: list[dict], field: str, what: str) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok" and r.get(field)]
    zero1 = {(r["model"], r["ranks"], r["impl"]): r for r in ok if r["zero"] == "1"}
    ratios = [
        (float(r[field]) / float(zero1[key][field]), r)
        for r in ok
        if r["zero"] == "3" and (key := (r["model"], r["ranks"], r["impl"])) in zero1
    ]
    if not ratios:
        return []
    worst_ratio, worst = min(ratios, key=lambda x: x[0])
    failed = [r for ratio, r in ratios if ratio < GENERATION_TARGET]

    def name(row: dict) -> str:
        return f"{row['model']} {row['ranks']} rank(s) {row['impl']}"

    return [
        f"{'FAIL' if failed else 'PASS'} ZeRO-3 generation >= {GENERATION_TARGET}x the ZeRO-1 "
        f"rate, {what}: {len(ratios) - len(failed)}/{len(ratios)} configurations (worst "
        f"{worst_ratio:.2f}x, {name(worst)})"
        + (f"; failing: {', '.join(name(r) for r in failed)}" if failed else "")
    ]


def _step_verdicts(rows: list[dict]) -> list[str]:
    pairs = _pairs(rows)
    if not pairs:
        return ["FAIL no configuration has both a fused and a naive row (see status column)"]

    def name(row: dict) -> str:
        return f"{row['model']} ZeRO-{row['zero']} {row['ranks']} rank(s)"

    lines = []
    checks = [
        ("throughput", ">= 1.0x naive", 1.0, True, "steps_per_s"),
        ("peak memory per rank", "<= 0.5x naive", 0.5, False, "peak_extra_mb"),
    ]
    for label, target, bound, higher, field in checks:
        ratios = [(float(f[field]) / float(n[field]), f) for f, n in pairs]
        worst_ratio, worst = min(ratios, key=lambda x: x[0]) if higher else max(ratios)
        failed = [f for ratio, f in ratios if (ratio < bound if higher else ratio > bound)]
        verdict = "FAIL" if failed else "PASS"
        lines.append(
            f"{verdict} fused {label} {target}: {len(ratios) - len(failed)}/{len(ratios)} "
            f"configurations (worst {worst_ratio:.2f}x, {name(worst)})"
            + (f"; failing: {', '.join(name(f) for f in failed)}" if failed else "")
        )
    gaps = [
        abs(float(f["first_loss"]) - float(n["first_loss"])) / abs(float(n["first_loss"]))
        for f, n in pairs
    ]
    verdict = "PASS" if max(gaps) <= 1e-4 else "FAIL"
    lines.append(
        f"{verdict} first-step loss of fused equals naive: largest relative gap {max(gaps):.1e} "
        "(bound 1e-4)"
    )
    return lines


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    pairs = ", ".join(
        f"{m} = teacher {_describe(p['teacher'])} / student {_describe(p['student'])}, "
        f"B={p['batch']} T={p['seq']} per rank"
        for m, p in PAIRS.items()
        if any(r["model"] == m for r in rows)
    )
    lines = [
        f"KD training step, V={first['vocab']}, {first['kind']} τ={first['temperature']} "
        f"α={first['sft_weight']}, prompt share {first['prompt_fraction']}, chunk "
        f"{first['chunk_size']}; {pairs}. {first['machine']} ({first['device']}), torch "
        f"{first['torch']}, deepspeed {first['deepspeed']}, transformers "
        f"{first['transformers']}, commit {first['commit']}, {first['timestamp']}. Median of "
        f"{first['steps']} steps after {first['warmup']} warm-up; per step the slowest rank's "
        "phase times. Both run the trainer's own step (Trainer.train_step); fused = pocl_ds's "
        "DistillationObjective, naive = the reference (full-logits KD written in the "
        "benchmark). Peak = rise of resident memory per rank over the built run, largest rank. "
        "× naive: fused / naive of the same configuration (throughput: higher is better; "
        "memory: lower). Generate: the student continues one 16-token prompt per batch "
        f"row by {first['new_tokens']} tokens on every rank, median of {GENERATE_REPEATS} "
        "calls, slowest rank; new tokens/s over all ranks; "
        "under ZeRO-3 the student is gathered whole once per call when it fits "
        "(pocl_ds.engine.gathered_for_generation). Generate, one gather: the mean of "
        f"{GENERATE_REPEATS} such calls inside one gather, as evaluation and difficulty "
        "scoring run them.",
        "",
        "| model | ZeRO | ranks | impl | steps/s | tokens/s | × naive steps/s | teacher fwd (s) "
        "| student fwd (s) | backward (s) | optimizer (s) | peak/rank (MB) | × naive memory "
        "| generate | generate, one gather |",
        "|:---|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    naive = {_config_key(r): r for r in rows if r["impl"] == "naive" and r["status"] == "ok"}
    for r in rows:
        head = f"| {r['model']} | {r['zero']} | {r['ranks']} | {r['impl']} "
        if r["status"] != "ok":
            lines.append(head + f"| {r['status']} |" + " |" * 12)
            continue
        ref = naive.get(_config_key(r))
        x_speed = x_memory = ""
        if ref and r["impl"] != "naive":
            x_speed = f"{float(r['steps_per_s']) / float(ref['steps_per_s']):.2f}"
            x_memory = f"{float(r['peak_extra_mb']) / float(ref['peak_extra_mb']):.2f}"
        lines.append(
            head + f"| {float(r['steps_per_s']):.3f} | {float(r['tokens_per_s']):.0f} | {x_speed} "
            f"| {float(r['teacher_fwd_s']):.3f} | {float(r['student_fwd_s']):.3f} "
            f"| {float(r['student_bwd_s']):.3f} | {float(r['optimizer_s']):.3f} "
            f"| {float(r['peak_extra_mb']):.0f} | {x_memory} "
            + "".join(f"| {_generation_cell(r, field)} " for field in GENERATION_COLUMNS)
            + "|"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(verdicts(rows)) + "\n"


def _generation_cell(row: dict, field: str) -> str:
    if not row.get(f"{field}_s"):
        return ""  # a row from before the column existed
    return f"{float(row[f'{field}_s']):.2f} s, {float(row[f'{field}_tokens_per_s']):.0f} tok/s"


def plot(rows: list[dict], path: Path) -> None:
    """Steps/s, peak memory per rank and the step's time split, fused next to naive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    configs = list(dict.fromkeys(_config_key(r) for r in ok))
    labels = [f"{m}\nZ{z} {n}r" for m, z, n in configs]
    by_key = {(_config_key(r), r["impl"]): r for r in ok}
    impls = [i for i in IMPLS if any(r["impl"] == i for r in ok)]
    width = 0.8 / max(len(impls), 1)
    fig, axes = plt.subplots(3, 1, figsize=(max(8, 0.9 * len(configs) + 3), 11))
    split = ("teacher_fwd_s", "student_fwd_s", "student_bwd_s", "optimizer_s")
    colors = ("tab:gray", "tab:blue", "tab:orange", "tab:green")
    for offset, impl in enumerate(impls):
        xs = [i + (offset - (len(impls) - 1) / 2) * width for i in range(len(configs))]
        rows_of = [by_key.get((key, impl)) for key in configs]

        def values(field: str, rows_of=rows_of) -> list[float]:
            return [float(r[field]) if r else 0.0 for r in rows_of]

        hatch = "//" if impl == "naive" else None
        axes[0].bar(xs, values("steps_per_s"), width, label=impl, hatch=hatch)
        axes[1].bar(xs, values("peak_extra_mb"), width, label=impl, hatch=hatch)
        bottom = [0.0] * len(configs)
        for field, color in zip(split, colors, strict=True):
            heights = values(field)
            axes[2].bar(
                xs, heights, width, bottom=bottom, color=color, hatch=hatch, edgecolor="black",
                linewidth=0.3, label=f"{field.removesuffix('_s')} ({impl})",
            )  # fmt: skip
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    titles = (
        "optimizer steps/s (higher is better)",
        "peak memory per rank, MB over the built models (lower is better)",
        "time per step, s: teacher fwd / student fwd+loss / backward / optimizer",
    )
    for axis, title in zip(axes, titles, strict=True):
        axis.set_title(title, fontsize=10)
        axis.set_xticks(range(len(configs)))
        axis.set_xticklabels(labels, fontsize=8)
        axis.legend(fontsize=7, ncol=2)
    fig.suptitle(f"KD step, fused (pocl_ds) vs naive reference — {rows[0]['timestamp']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(csv_path: Path) -> str:
    """Write train.md and train.png next to the CSV from its latest run; return the table."""
    rows = latest_run(csv_path)
    table = markdown(rows)
    write_table("train", table, csv_path.parent)
    plot(rows, csv_path.parent / "train.png")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case:
        return run_requested_case(args.case, run_case)
    output = Path(args.output_dir)
    csv_path = output / "train.csv"
    if args.report:
        print(_report(existing_csv(csv_path)), flush=True)
        return 0
    from importlib.metadata import version

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shared = {
        **provenance(device),
        "device": device,
        "deepspeed": version("deepspeed"),
        "vocab": VOCAB,
        "kind": KIND,
        "temperature": TEMPERATURE,
        "sft_weight": SFT_WEIGHT,
    }
    run_started = time.perf_counter()
    cases = _cases(args)
    for spec in cases:
        sys.stderr.write(
            f"{spec['model']} ZeRO-{spec['zero']} {spec['ranks']} rank(s) {spec['impl']} ...\n"
        )
        sys.stderr.flush()
        started = time.perf_counter()
        result = run_case_in_subprocess(
            __file__, spec, timeout=args.timeout, ranks=spec["ranks"], threads=spec["threads"]
        )
        pair = PAIRS[spec["model"]]
        row = {
            **shared, **spec, "teacher": _describe(pair["teacher"]),
            "student": _describe(pair["student"]), **result,
        }  # fmt: skip
        sys.stderr.write(
            f"  {result['status']}: {result.get('steps_per_s', '-')} steps/s, peak "
            f"{result.get('peak_extra_mb', '-')} MB ({time.perf_counter() - started:.0f}s)\n"
        )
        # written case by case, so an interrupted run keeps what it measured
        append_rows("train", [row], FIELDS, output)
        write_table("train", markdown(latest_run(csv_path)), output)
    print(_report(csv_path), flush=True)
    sys.stderr.write(f"{len(cases)} cases in {time.perf_counter() - run_started:.0f}s\n")
    if not args.no_cache_case:  # the step with and without the teacher cache, its own table
        import bench_teacher_cache

        quick = ["--quick"] if args.quick else []
        return bench_teacher_cache.main([*quick, "--output-dir", str(output)])
    return 0


if __name__ == "__main__":
    run_main(main)
