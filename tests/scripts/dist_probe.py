"""A 2-rank probe: broadcast and gather objects, or fail on one rank (see test_distributed)."""

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


if __name__ == "__main__":
    run_main(main)
