"""The teacher hidden-state cache: KD step throughput after the first epoch, with and without it.

    python launch/bench_teacher_cache.py [--pair paper] [--quick]
    python launch/bench.py train ...   (runs this after the step benchmark; --no-cache-case skips)

The paper distils GPT-2 XL (1.5B) into GPT-2 (124M): that pair, with random weights, is the
default (about 45 s a live step on the 2-core CPU machine at 4 × 128 tokens per rank, 16 GB
of RAM for the two ranks). By FLOPs the teacher's forward is about 76 % of a live step there;
the other pairs are for quicker looks:

    paper    teacher gpt2 H1600 L48, student gpt2 H768 L12  (default)
    paper/2  teacher gpt2 H800 L48,  student gpt2 H384 L12  (the same depths at half width)
    small    teacher gpt2 H256 L8,   student gpt2 H128 L2   (--quick)

Every case is ``Trainer.train_step`` on 2 ranks, ZeRO-2, fp32, the fused kernel, with the
``recipe.Run`` of ``launch/bench_train.py`` (random tokens, the first quarter of each sequence
a prompt, α = 0.5, τ = 2), in a fresh process. It trains two epochs over the same samples: the
first fills the cache, the second is timed (median step, slowest rank). The cases:

    live          distill.teacher_cache=none (the teacher runs every step)
    memory        distill.teacher_cache=memory
    disk          distill.teacher_cache=disk
    disk bf16     distill.teacher_cache=disk, teacher_cache_dtype=bf16

All start from the same weights and draw the same batches, so the second epoch's losses of a
cached run must equal the live run's to fp32 rounding: the largest relative difference is
reported (for bf16, the cache's own error). Target: each fp32 cache >= 3x the live step rate
after the first epoch. Rows go to benchmarks/teacher_cache.csv, the table to
benchmarks/teacher_cache.md.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

from bench_common import (  # noqa: E402
    add_driver_options,
    append_rows,
    markdown_table,
    provenance,
    run_benchmark,
    run_case_in_subprocess,
)

from pocl_ds.cli import ArgumentParser, run_main  # noqa: E402

PAIRS = {
    "paper": {
        "teacher": {"hidden_size": 1600, "num_layers": 48, "num_heads": 25},
        "student": {"hidden_size": 768, "num_layers": 12, "num_heads": 12},
    },
    "paper/2": {
        "teacher": {"hidden_size": 800, "num_layers": 48, "num_heads": 16},
        "student": {"hidden_size": 384, "num_layers": 12, "num_heads": 6},
    },
    "small": {
        "teacher": {"hidden_size": 256, "num_layers": 8, "num_heads": 4},
        "student": {"hidden_size": 128, "num_layers": 2, "num_heads": 2},
    },
}
CASES = {  # name: (distill.teacher_cache, distill.teacher_cache_dtype)
    "live": ("none", "teacher"),
    "memory": ("memory", "teacher"),
    "disk": ("disk", "teacher"),
    "disk bf16": ("disk", "bf16"),
}
TARGET = 3.0
RANKS = 2
FIELDS = [
    "timestamp", "commit", "machine", "device", "torch", "transformers", "pair", "teacher",
    "student", "vocab", "batch", "seq", "ranks", "zero", "case", "teacher_cache",
    "teacher_cache_dtype", "steps", "first_epoch_step_s", "step_s", "teacher_fwd_s",
    "student_fwd_s", "student_bwd_s", "optimizer_s", "tokens_per_s", "cache_mb", "losses",
    "status",
]  # fmt: skip


def run_case(spec: dict) -> dict | None:
    """Two epochs of the case on this rank; rank 0 returns the second epoch's medians."""
    import torch
    from bench_train import PHASES, PhaseTimer, _build_run, _max_over_ranks, _timed_steps

    from pocl_ds import distributed
    from pocl_ds.trainer import Trainer

    torch.set_num_threads(spec["threads"])
    info = distributed.init_distributed()
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as own_dir:
        # one output directory for both ranks, as a run has: the disk cache is shared
        output_dir = distributed.broadcast_object(own_dir)
        trainer = Trainer(_build_run(spec, output_dir))
        timer = PhaseTimer(PHASES[:-1])
        timer.instrument(trainer.run_parts.teacher.base_model, "forward", "teacher_fwd_s")
        timer.instrument(trainer.engine, "forward", "student_fwd_s")
        timer.instrument(trainer.engine, "backward", "student_bwd_s")
        timer.instrument(trainer.engine, "step", "optimizer_s")
        sampler = trainer.run_parts.samplers[0]
        first, _ = _timed_steps(trainer, timer)
        trainer.run_parts.teacher_cache.share()  # as the trainer does at an epoch's end
        sampler.set_epoch(1)
        second, losses = _timed_steps(trainer, timer)
        cache_bytes = sum(p.stat().st_size for p in Path(output_dir).rglob("*.pt"))
        distributed.barrier()  # rank 0's directory goes when it leaves the block
        cache = trainer.run_parts.teacher_cache
        if cache.mode == "memory":
            cache_bytes = cache.held_bytes()
        (cache_bytes,) = _max_over_ranks([float(cache_bytes)])
    if info.rank != 0:
        return None
    step = statistics.median(t[-1] for t in second)
    return {
        "first_epoch_step_s": round(statistics.median(t[-1] for t in first), 4),
        "step_s": round(step, 4),
        **{
            name: round(statistics.median(t[i] for t in second), 4)
            for i, name in enumerate(PHASES[:-1])
        },
        "tokens_per_s": round(info.world_size * spec["batch"] * spec["seq"] / step, 1),
        "cache_mb": round(cache_bytes / 2**20, 2),
        "losses": " ".join(f"{v:.9g}" for v in losses),
    }


def _loss_gap(row: dict, live: dict) -> float | None:
    """Largest relative difference of the second epoch's losses from the live run's."""
    if row.get("status") != "ok" or live.get("status") != "ok":
        return None
    got = [float(v) for v in row["losses"].split()]
    want = [float(v) for v in live["losses"].split()]
    return max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))


def verdicts(rows: list[dict]) -> list[str]:
    """PASS/FAIL of each fp32 cache against TARGET x the live step rate after epoch 1."""
    live = next((r for r in rows if r["case"] == "live" and r["status"] == "ok"), None)
    lines = []
    for row in rows:
        if row["case"] == "live" or row["teacher_cache_dtype"] != "teacher":
            continue
        if live is None or row["status"] != "ok":
            lines.append(f"FAIL teacher cache {row['case']}: no measurement ({row['status']})")
            continue
        ratio = float(live["step_s"]) / float(row["step_s"])
        verdict = "PASS" if ratio >= TARGET else "FAIL"
        lines.append(
            f"{verdict} teacher cache {row['case']} ({row['pair']}): {ratio:.2f}x the live "
            f"teacher's step rate after the first epoch (target >= {TARGET:g}x)"
        )
    return lines


def markdown(rows: list[dict]) -> str:
    live = next((r for r in rows if r["case"] == "live"), {})
    first = rows[0]
    header = ["cache", "epoch-1 step (s)", "epoch-2 step (s)", "teacher fwd (s)",
              "student fwd + loss (s)", "backward (s)", "optimizer (s)", "tokens/s", "× live",
              "cache size (MB)", "max loss rel. diff"]  # fmt: skip
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["case"], r["status"], *[""] * (len(header) - 2)])
            continue
        gap = _loss_gap(r, live)
        ratio = float(live["step_s"]) / float(r["step_s"]) if live.get("status") == "ok" else 0
        body.append([
            r["case"], r["first_epoch_step_s"], r["step_s"], r["teacher_fwd_s"],
            r.get("student_fwd_s", ""), r.get("student_bwd_s", ""), r.get("optimizer_s", ""),
            r["tokens_per_s"], f"{ratio:.2f}", r["cache_mb"],
            "—" if r["case"] == "live" else f"{gap:.1e}",
        ])  # fmt: skip
    return (
        f"Pair {first['pair']}: teacher {first['teacher']} / student {first['student']}, "
        f"vocab {first['vocab']}, {first['ranks']} ranks × {first['batch']} × {first['seq']} "
        f"tokens, ZeRO-{first['zero']}, fp32; second-epoch medians over {first['steps']} steps "
        f"({first['machine']}, torch {first['torch']}, commit {first['commit']}, "
        f"{first['timestamp']}).\n\n"
        + markdown_table(header, body)
        + "\n\n"
        + "\n".join(verdicts(rows))
        + "\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pair", default="paper", choices=list(PAIRS))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per epoch")
    parser.add_argument("--batch", type=int, default=4, help="micro batch per rank")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--quick", action="store_true", help="the small pair, 2 × 128 tokens, 2 steps an epoch"
    )
    add_driver_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.pair, args.steps, args.batch = "small", 2, 2
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(
        argv, name="teacher_cache", parse_args=parse_args, run_case=run_case, run_cases=_run_cases,
        markdown=markdown,
    )  # fmt: skip


def _run_cases(args: argparse.Namespace, output: Path) -> None:
    import torch
    from bench_train import KIND, SFT_WEIGHT, TEMPERATURE, VOCAB, _describe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pair = PAIRS[args.pair]
    shared = {
        **provenance(device), "device": device, "pair": args.pair, "vocab": VOCAB,
        "teacher": _describe(pair["teacher"]), "student": _describe(pair["student"]),
        "batch": args.batch, "seq": args.seq, "ranks": RANKS, "zero": 2, "steps": args.steps,
    }  # fmt: skip
    for name in args.cases:
        mode, dtype = CASES[name]
        spec = dict(
            model=args.pair, pair=pair, impl="fused", zero=2, ranks=RANKS, batch=args.batch,
            seq=args.seq, prompt_fraction=0.25, chunk_size=1024, warmup=0, steps=args.steps,
            threads=args.threads, teacher_cache=mode, teacher_cache_dtype=dtype,
            kind=KIND, temperature=TEMPERATURE, sft_weight=SFT_WEIGHT,
        )  # fmt: skip
        sys.stderr.write(f"teacher cache {name} ({args.pair}) ...\n")
        started = time.perf_counter()
        result = run_case_in_subprocess(
            __file__, spec, timeout=args.timeout, ranks=RANKS, threads=args.threads
        )
        sys.stderr.write(
            f"  {result['status']}: epoch-2 step {result.get('step_s', '-')} s "
            f"({time.perf_counter() - started:.0f}s)\n"
        )
        row = {**shared, "case": name, "teacher_cache": mode, "teacher_cache_dtype": dtype}
        append_rows("teacher_cache", [{**row, **result}], FIELDS, output)


if __name__ == "__main__":
    run_main(main)
