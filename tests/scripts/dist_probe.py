"""A 2-rank probe: broadcast and gather objects, share work, or fail on one rank (see
test_distributed)."""

import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pocl_ds.cli import run_main


def main() -> int:
    from pocl_ds import distributed

    mode, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out = Path(out)
    info = distributed.init_distributed()
    if mode == "raise":
        if info.rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        distributed.barrier()  # rank 0 would wait here forever if the failure did not end the job
        time.sleep(300)
        return 0
    if mode == "balance":
        return _balance(info, out)
    payload = {"from": info.rank, "nonce": random.Random(os.getpid()).random(), "list": [1, 2, 3]}
    received = distributed.broadcast_object(payload if info.rank == 0 else None)
    gathered = distributed.all_gather_objects({"rank": info.rank, "received": received})
    if info.rank == 0:
        out.write_text(
            json.dumps(
                {"world_size": info.world_size, "launcher": info.launcher, "gathered": gathered}
            )
        )
    return 0


def _balance(info, out: Path) -> int:
    """Score 40 items with and without ``balance``, rank 0 four times slower per item."""
    from pocl_ds import distributed

    claimed = []

    def score(share):
        results = []
        for item in share:
            time.sleep(0.04 if info.rank == 0 else 0.01)
            claimed.append(item)
            results.append(item * item)
        return results

    items = list(range(40))
    balanced = distributed.score_and_gather(items, score, balance=True)
    counts = distributed.all_gather_objects(len(claimed))
    claimed.clear()
    static = distributed.score_and_gather(items, score)
    if info.rank == 0:
        out.write_text(json.dumps({"balanced": balanced, "static": static, "claimed": counts}))
    return 0


if __name__ == "__main__":
    run_main(main)
