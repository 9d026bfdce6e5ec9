"""How many evaluation records also appear, verbatim, in the training data?

    python launch/split_overlap.py --train runs/demo/data/train.jsonl \\
        runs/demo/data/valid.jsonl runs/demo/data/test.jsonl [--json OUT.json]

A record counts as seen when its prompt and its first reference both equal those of a training
record (the pair a model is trained on). Prints, per evaluated file, the count and share of
seen records, and per (category, level) where the records carry them (``pocl_ds.synthetic``
writes both): a test score over seen records measures recall of training tasks, not skill.
Exits 0 whatever the overlap; it reports, it does not judge.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocl_ds.cli import ArgumentParser, run_main


def overlap_report(train, evaluated) -> dict:
    """``train``, ``evaluated``: ``InstructionSample`` lists; the seen count, total and the
    seen records per (category, level)."""
    trained = {(s.prompt, s.references[0]) for s in train}
    seen = [s for s in evaluated if (s.prompt, s.references[0]) in trained]
    cells = Counter(f"{s.category or '-'} {s.difficulty or '-'}" for s in seen)
    return {
        "records": len(evaluated),
        "seen": len(seen),
        "seen_by_cell": dict(sorted(cells.items())),
    }


def main() -> int:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", required=True, help="the training file")
    parser.add_argument("evaluated", nargs="+", help="validation or test files")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()

    from pocl_ds.data import load_instructions

    train = load_instructions(args.train)
    report = {}
    for path in args.evaluated:
        part = overlap_report(train, load_instructions(path))
        report[path] = part
        cells = ", ".join(f"{cell}: {n}" for cell, n in part["seen_by_cell"].items())
        print(
            f"{path}: {part['seen']} of {part['records']} records "
            f"({100 * part['seen'] / max(part['records'], 1):.0f} %) are in {args.train}"
            + (f" ({cells})" if cells else "")
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    run_main(main)
