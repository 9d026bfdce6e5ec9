"""Difficulty-scoring rate (samples/s) on 1 and k ranks: does the wall time fall like 1/k?

    python launch/bench_difficulty.py [--num-samples 512] [--world-sizes 1 2] [--repeats 3]
    python launch/bench.py difficulty ...   (the same, through the benchmark dispatcher)

A tiny randomly initialised GPT-2 scores N synthetic graded tasks (teacher-forced CE plus a
greedy output of up to ``--max-new-tokens`` tokens scored by ROUGE-L), exactly as POCL does
before training. For each world size this script starts ``torchrun --standalone`` with that
many CPU ranks (gloo, one thread each, so k ranks use k cores); rank 0 times
``measure_difficulty`` between barriers, ``--repeats`` times after one warm-up, and the median
counts. With more than one rank it runs twice: ranks claiming batches as they free up
(``balanced``, the default everywhere) and the static round-robin share (``round robin``), so
the gain of balancing is measured side by side. Target: balanced 2 ranks >= 1.8x one rank. Rows are appended to benchmarks/difficulty.csv; the table of this run is printed and
written to benchmarks/difficulty.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import append_rows, provenance, write_table

from pocl_ds.cli import ArgumentParser, run_main
from pocl_ds.errors import PoclError

REPO = Path(__file__).resolve().parent.parent
FIELDS = [
    "timestamp",
    "commit",
    "machine",
    "torch",
    "transformers",
    "model",
    "num_samples",
    "mean_tokens",
    "batch_size",
    "max_new_tokens",
    "world_size",
    "schedule",
    "threads_per_rank",
    "repeats",
    "median_s",
    "samples_per_s",
    "speedup",
    "efficiency",
]
SCHEDULES = ("balanced", "round robin")  # score_and_gather(balance=True / False)
TARGET = 1.8  # 2 ranks' speed-up over 1 with the balanced schedule


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--schedule", default="balanced", choices=SCHEDULES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.world_sizes) < 1 or args.num_samples < 1 or args.repeats < 1:
        raise PoclError("--world-sizes, --num-samples and --repeats must be >= 1")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise PoclError("--batch-size and --max-new-tokens must be >= 1")
    return args


def _prepare(args: argparse.Namespace, work: Path) -> dict:
    """Tokenizer, model and tokenized samples on disk, shared by every world size."""
    from pocl_ds.data import InstructionSample, tokenize_samples
    from pocl_ds.models import load_causal_lm, train_bpe_tokenizer
    from pocl_ds.synthetic import generate_tasks

    tasks = generate_tasks(args.num_samples, seed=0)
    raw = [
        InstructionSample(
            index=i,
            instruction=t["instruction"],
            input=t["input"],
            references=(t["output"],),
            prompt=t["prompt"],
        )
        for i, t in enumerate(tasks)
    ]
    tokenizer = train_bpe_tokenizer(
        [s.prompt + s.references[0] for s in raw], vocab_size=512, save_dir=work / "tok"
    )
    samples = tokenize_samples(raw, tokenizer, max_length=256)
    model = load_causal_lm(
        inline_config={
            "family": "gpt2",
            "hidden_size": args.hidden,
            "num_layers": args.layers,
            "num_heads": max(1, args.hidden // 32),
            "max_positions": 256 + args.max_new_tokens,
        },
        vocab_size=len(tokenizer),
    )
    model.save_pretrained(work / "model")
    (work / "samples.json").write_text(
        json.dumps([[s.index, s.prompt_ids, s.response_ids, s.references] for s in samples])
    )
    return {
        "num_samples": len(samples),
        "mean_tokens": round(
            sum(len(s.prompt_ids) + len(s.response_ids) for s in samples) / len(samples), 1
        ),
    }


def _worker(args: argparse.Namespace) -> int:
    """One rank of a timed run: score everything ``repeats`` + 1 times, rank 0 reports."""
    import torch
    import torch.distributed as dist

    from pocl_ds.data import TokenizedSample
    from pocl_ds.difficulty import measure_difficulty
    from pocl_ds.models import load_causal_lm, load_tokenizer

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    work = Path(args.worker)
    tokenizer = load_tokenizer(work / "tok")
    model = load_causal_lm(str(work / "model")).eval()
    samples = [
        TokenizedSample(index=i, prompt_ids=tuple(p), response_ids=tuple(r), references=tuple(x))
        for i, p, r, x in json.loads((work / "samples.json").read_text())
    ]
    times = []
    for _ in range(args.repeats + 1):  # the first run is a warm-up
        dist.barrier()
        start = time.perf_counter()
        measure_difficulty(
            model,
            samples,
            tokenizer=tokenizer,
            pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            balance=args.schedule == "balanced",
        )
        dist.barrier()
        times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        (work / f"times_{dist.get_world_size()}.json").write_text(json.dumps(times[1:]))
    dist.destroy_process_group()
    return 0


def _markdown(rows: list[dict]) -> str:
    first = rows[0]
    lines = [
        f"Difficulty scoring: {first['model']}, {first['num_samples']} samples of "
        f"~{first['mean_tokens']} tokens, batch {first['batch_size']}, greedy outputs of up to "
        f"{first['max_new_tokens']} tokens; {first['machine']}, {first['threads_per_rank']} "
        f"thread per rank, torch {first['torch']}, commit {first['commit']}; median of "
        f"{first['repeats']}.",
        "",
        "| ranks | schedule | time (s) | samples/s | speedup | efficiency (speedup / ranks) |",
        "|---:|:---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world_size']} | {r['schedule']} | {r['median_s']:.3f} "
            f"| {r['samples_per_s']:.1f} | {r['speedup']:.2f} | {r['efficiency']:.2f} |"
        )
    return "\n".join(["", *lines, "", *verdicts(rows)]).lstrip() + "\n"


def verdicts(rows: list[dict]) -> list[str]:
    """PASS/FAIL: the balanced schedule on 2 ranks >= TARGET x one rank."""
    two = [r for r in rows if r["world_size"] == 2 and r["schedule"] == "balanced"]
    if not two:
        return []
    speedup = float(two[0]["speedup"])
    return [
        f"{'PASS' if speedup >= TARGET else 'FAIL'} difficulty scoring on 2 ranks: "
        f"{speedup:.2f}x one rank (balanced schedule; target >= {TARGET:g}x)"
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return _worker(args)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_difficulty_") as tmp:
        work = Path(tmp)
        sizes = _prepare(args, work)
        shared = {
            **provenance(),
            "model": f"gpt2 L{args.layers} H{args.hidden}",
            **sizes,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "threads_per_rank": 1,
            "repeats": args.repeats,
        }
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        runs = [(w, s) for w in args.world_sizes for s in (SCHEDULES if w > 1 else SCHEDULES[:1])]
        for world, schedule in runs:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(world),
                __file__,
                "--worker",
                str(work),
                "--repeats",
                str(args.repeats),
                "--batch-size",
                str(args.batch_size),
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--schedule",
                schedule,
            ]
            done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{world} rank(s) failed:\n{done.stderr[-3000:]}")
            median = statistics.median(json.loads((work / f"times_{world}.json").read_text()))
            rows.append(
                {
                    **shared,
                    "world_size": world,
                    "schedule": schedule,
                    "median_s": round(median, 4),
                    "samples_per_s": round(sizes["num_samples"] / median, 2),
                }
            )
            sys.stderr.write(
                f"{world} rank(s), {schedule}: {rows[-1]['samples_per_s']} samples/s\n"
            )
    base = next((r for r in rows if r["world_size"] == 1), rows[0])
    for r in rows:
        r["speedup"] = round(base["median_s"] / r["median_s"], 3)
        r["efficiency"] = round(r["speedup"] * base["world_size"] / r["world_size"], 3)
    append_rows("difficulty", rows, FIELDS, args.output_dir)
    table = _markdown(rows)
    write_table("difficulty", table, args.output_dir)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
