"""Benchmarks; each appends rows to benchmarks/<name>.csv and rewrites benchmarks/<name>.md.

    python launch/bench.py kernel      [--quick] ...   fused divergence kernel vs naive, Liger, matmul floor
    python launch/bench.py train       [--quick] ...   KD step: fused vs naive full-logits, ZeRO 1/2/3, 1-2 ranks;
                                                      then the step with and without the teacher cache
    python launch/bench.py peers       [--quick] ...   the KD step with TRL's, Liger's, torchtune's or pocl_ds's loss
    python launch/bench.py generation  [--quick] ...   generation tokens/s vs batch size, KV cache on/off
    python launch/bench.py difficulty  [--quick] ...   difficulty scoring samples/s on 1 and 2 ranks
    python launch/bench.py scale       [--cases ...]   real-size pairs on 2 ranks, plan vs measured

    python launch/bench.py readme                      copy benchmarks/*.md tables into README.md

Run ``python launch/bench.py NAME --help`` for a benchmark's own options.
"""

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from pocl_ds.cli import run_main  # noqa: E402

BENCHMARKS = ("kernel", "train", "peers", "generation", "difficulty", "scale")


def main() -> int:
    if len(sys.argv) == 2 and sys.argv[1] == "readme":
        from bench_common import refresh_readme

        print("README tables refreshed:", ", ".join(refresh_readme()) or "none")
        return 0
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        sys.stderr.write(__doc__)
        return 2
    module = importlib.import_module(f"bench_{sys.argv[1]}")
    return module.main(sys.argv[2:]) or 0


if __name__ == "__main__":
    run_main(main)
