"""Train a student by distillation from a YAML recipe.

    python launch/train.py --config launch/configs/tiny.yaml [section.key=value ...]
    deepspeed --num_gpus 4 launch/train.py --config RECIPE [--resume auto]
    torchrun --nproc_per_node 4 launch/train.py --config RECIPE
    mpirun -np 4 python launch/train.py --config RECIPE

Options and overrides come in any order. A bad recipe, override or data file stops with exit
code 2 and one line naming it; so does a new run into an output_dir that holds another run
(continue it with --resume auto, or set train.overwrite_output_dir=true). Ctrl-C or SIGTERM
checkpoints after the current step, prints the command that resumes, and exits (130 after
Ctrl-C, 0 after SIGTERM); a second Ctrl-C exits at once.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocl_ds.cli import EXIT_CODE_AFTER, ArgumentParser, resume_command, run_main
from pocl_ds.config import load_config


def main() -> int:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML recipe (launch/configs/*.yaml)")
    parser.add_argument(
        "--resume",
        default="none",
        help="auto: continue from the latest complete checkpoint; none; or a checkpoint tag",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    # Plain parse_args takes positionals only from before the first option, so an override
    # after ``--resume auto`` would be an "unrecognized argument".
    args = parser.parse_intermixed_args()
    config = load_config(args.config, args.overrides)  # before torch loads: fails in a blink

    from pocl_ds import distributed, telemetry
    from pocl_ds.trainer import train

    info = distributed.init_distributed()
    telemetry.setup_logging(info.rank)
    summary = train(config, resume=args.resume)
    if not summary.get("preempted"):
        return 0
    if info.rank == 0:
        print(f"to resume: {resume_command()}", file=sys.stderr, flush=True)
    return EXIT_CODE_AFTER[summary["signal"]]


if __name__ == "__main__":
    run_main(main)
