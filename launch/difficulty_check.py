"""Does a model's measured difficulty follow the known level of graded tasks?

    python launch/difficulty_check.py --model runs/demo/student_base/final \\
        --data runs/demo/data/train.jsonl [--json OUT.json]

Scores every sample exactly as POCL's difficulty measurer does before training
(``pocl_ds.difficulty.score_samples``: the model's CE on the reference, averaged over
response tokens, and ROUGE-L of its greedy output), in one process, then prints Spearman's ρ
of each signal's rank (CE, ROUGE-L and their RRF fusion; rank 1 = easiest) against the
records' known ``difficulty`` level, and the mean CE and ROUGE-L per (category, level). Use it
on a base model before a POCL run: a ρ near 0 or below means "easy first" is not easy first by
the known level. The data needs a ``difficulty`` field (``pocl_ds.synthetic`` writes one).
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocl_ds.cli import ArgumentParser, run_main
from pocl_ds.errors import PoclError

SIGNALS = ("ce", "rouge", "fusion")


def level_report(samples, ce, rouge) -> dict:
    """ρ of each signal's rank against the known level, and mean CE / ROUGE-L per (category,
    level); ``samples`` are ``InstructionSample``s aligned with ``ce`` and ``rouge``."""
    from pocl_ds.difficulty import order_samples
    from pocl_ds.stats import spearman

    levels = [s.difficulty for s in samples]
    rho = {}
    for signal in SIGNALS:
        ranking = order_samples(ce, rouge, rank_by=signal, order="easy_to_hard", seed=0)
        rank = {position: r for r, position in enumerate(ranking.order, start=1)}
        rho[signal] = spearman(levels, [rank[i] for i in range(len(samples))])
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        groups[(sample.category or "-", sample.difficulty)].append(i)
    cells = [
        {
            "category": category,
            "level": level,
            "samples": len(members),
            "ce": sum(ce[i] for i in members) / len(members),
            "rouge_l": 100 * sum(rouge[i] for i in members) / len(members),
        }
        for (category, level), members in sorted(groups.items())
    ]
    return {"spearman": rho, "by_level": cells}


def main() -> int:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="an exported model directory")
    parser.add_argument("--data", required=True, help="graded tasks with a difficulty field")
    parser.add_argument("--max-length", type=int, default=128, help="as data.max_length")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--max-new-tokens", type=int, default=24, help="greedy output length (the demo's)"
    )
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()

    import torch

    from pocl_ds.data import load_instructions, tokenize_samples
    from pocl_ds.difficulty import score_samples
    from pocl_ds.models import load_causal_lm, load_tokenizer

    samples = load_instructions(args.data)
    unknown = sum(s.difficulty is None for s in samples)
    if unknown:
        raise PoclError(f"--data {args.data}: {unknown} sample(s) have no difficulty field")
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    tokenized = tokenize_samples(samples, tokenizer, max_length=args.max_length)
    if len(tokenized) != len(samples):
        raise PoclError(
            f"--data {args.data}: {len(samples) - len(tokenized)} sample(s) exceed "
            f"--max-length {args.max_length}; raise it"
        )
    with torch.no_grad():
        ce, rouge = score_samples(
            model,
            tokenized,
            tokenizer=tokenizer,
            pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            max_total_length=args.max_length,
        )
    report = {"model": args.model, "data": args.data, **level_report(samples, ce, rouge)}
    rho = report["spearman"]
    print(
        f"{args.model} on {args.data} ({len(samples)} samples): Spearman ρ of measured rank "
        f"against known level: CE {rho['ce']:+.3f}, ROUGE-L {rho['rouge']:+.3f}, "
        f"fusion {rho['fusion']:+.3f}"
    )
    print("| category | level | samples | CE | greedy ROUGE-L |\n|---|---:|---:|---:|---:|")
    for cell in report["by_level"]:
        print(
            f"| {cell['category']} | {cell['level']} | {cell['samples']} | {cell['ce']:.2f} "
            f"| {cell['rouge_l']:.1f} |"
        )
    if args.json:
        from pocl_ds import atomic

        atomic.write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
