"""Generation throughput (new tokens/s) by batch size, with and without the KV cache.

    python launch/bench_generation.py [--num-prompts 64] [--batch-sizes 1 8 32] [--device cuda]
    python launch/bench.py generation [--quick] ...   (the same, through the dispatcher)

A tiny randomly initialised GPT-2 continues N random prompts (lengths spread over
[L/2, 3L/2]) by exactly ``--new-tokens`` tokens each (no EOS), sampling as evaluation does.
Each configuration is timed ``--repeats`` times after one warm-up; the median counts. Rows are
appended to benchmarks/generation.csv (machine, versions, commit, sizes, median) and the
table of this run is printed and written to benchmarks/generation.md.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import append_rows, provenance, write_table

from pocl_ds.cli import ArgumentParser, run_main
from pocl_ds.errors import PoclError

REPO = Path(__file__).resolve().parent.parent
FIELDS = [
    "timestamp", "commit", "machine", "device", "torch", "transformers", "model",
    "num_prompts", "mean_prompt_tokens", "new_tokens", "batch_size", "kv_cache", "decoding",
    "repeats", "median_s", "tokens_per_s",
]  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-length", type=int, default=32, help="mean prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--no-cache-compare", dest="compare", action="store_false",
                        help="skip the runs without KV cache")  # fmt: skip
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks"))
    parser.add_argument("--quick", action="store_true", help="16 prompts, 8 new tokens, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_prompts, args.new_tokens, args.repeats = 16, 8, 1
    if min(args.batch_sizes) < 1 or args.num_prompts < 1 or args.repeats < 1:
        raise PoclError("--batch-sizes, --num-prompts and --repeats must be >= 1")
    if args.prompt_length < 2 or args.new_tokens < 1:
        raise PoclError("--prompt-length must be >= 2 and --new-tokens >= 1")
    return args


def _markdown(rows: list[dict]) -> str:
    lines = [
        f"Generation throughput: {rows[0]['model']}, {rows[0]['num_prompts']} prompts of "
        f"~{rows[0]['mean_prompt_tokens']} tokens, {rows[0]['new_tokens']} new tokens each, "
        f"{rows[0]['decoding']}; {rows[0]['machine']} ({rows[0]['device']}), torch "
        f"{rows[0]['torch']}, commit {rows[0]['commit']}; median of {rows[0]['repeats']}.",
        "",
        "| batch size | KV cache | time (s) | tokens/s | × batch 1 (same cache setting) |",
        "|---:|:---:|---:|---:|---:|",
    ]
    base = {
        r["kv_cache"]: float(r["tokens_per_s"])
        for r in rows
        if int(r["batch_size"]) == min(int(x["batch_size"]) for x in rows)
    }
    for r in rows:
        speedup = float(r["tokens_per_s"]) / base[r["kv_cache"]]
        lines.append(
            f"| {r['batch_size']} | {'yes' if r['kv_cache'] else 'no'} | {float(r['median_s']):.3f} "
            f"| {float(r['tokens_per_s']):.0f} | {speedup:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from pocl_ds.generation import generate
    from pocl_ds.models import load_causal_lm

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    model = load_causal_lm(
        inline_config={
            "family": "gpt2",
            "hidden_size": args.hidden,
            "num_layers": args.layers,
            "num_heads": max(1, args.hidden // 32),
            "max_positions": 2 * args.prompt_length + args.new_tokens,
        },
        vocab_size=args.vocab,
    ).to(device)
    generator = torch.Generator().manual_seed(0)
    low, high = args.prompt_length // 2, args.prompt_length * 3 // 2
    lengths = torch.randint(low, high + 1, (args.num_prompts,), generator=generator).tolist()
    prompts = [torch.randint(1, args.vocab, (n,), generator=generator).tolist() for n in lengths]
    shared = {
        **provenance(args.device),
        "device": device.type,
        "model": f"gpt2 L{args.layers} H{args.hidden} V{args.vocab}",
        "num_prompts": args.num_prompts,
        "mean_prompt_tokens": round(sum(lengths) / len(lengths), 1),
        "new_tokens": args.new_tokens,
        "decoding": "greedy" if args.greedy else "sampling",
        "repeats": args.repeats,
    }
    rows = []
    for use_cache in (True, False) if args.compare else (True,):
        for batch_size in args.batch_sizes:

            def run(use_cache=use_cache, batch_size=batch_size) -> None:
                generate(
                    model,
                    prompts,
                    pad_id=0,
                    eos_id=None,
                    max_new_tokens=args.new_tokens,
                    batch_size=batch_size,
                    greedy=args.greedy,
                    seed=0,
                    use_cache=use_cache,
                    progress=False,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            run()  # warm-up: allocator, kernels, lazy imports
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            row = {
                **shared,
                "batch_size": batch_size,
                "kv_cache": use_cache,
                "median_s": round(median, 4),
                "tokens_per_s": round(args.num_prompts * args.new_tokens / median, 1),
            }
            rows.append(row)
            sys.stderr.write(
                f"batch {batch_size:>3} cache {use_cache!s:>5}: {row['tokens_per_s']} tokens/s\n"
            )
    append_rows("generation", rows, FIELDS, args.output_dir)
    table = _markdown(rows)
    write_table("generation", table, args.output_dir)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
