"""Run several trainings in one process group (saves the launcher start-up per run).

    torchrun --nproc_per_node 2 tests/scripts/train_runs.py SPEC.json

SPEC.json: {"runs": [{"name": str, "recipe": path, "overrides": [...], "resume": "none"}],
"results": path}. Rank 0 writes {name: summary} to ``results``.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pocl_ds.cli import run_main


def main() -> int:
    import torch

    from pocl_ds import distributed, telemetry
    from pocl_ds.config import load_config
    from pocl_ds.trainer import train

    torch.set_num_threads(1)
    spec_path = next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))
    spec = json.loads(Path(spec_path).read_text())
    info = distributed.init_distributed()
    telemetry.setup_logging(info.rank)
    results = {}
    for run in spec["runs"]:
        config = load_config(run["recipe"], run.get("overrides", []))
        summary = train(config, resume=run.get("resume", "none"))
        results[run["name"]] = {k: v for k, v in summary.items() if k != "timings"}
    if info.rank == 0:
        Path(spec["results"]).write_text(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    run_main(main)
