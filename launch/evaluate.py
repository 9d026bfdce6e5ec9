"""Evaluate models on instruction suites: ROUGE-L × 100 and exact match, mean ± std over seeds.

    python launch/evaluate.py --model runs/kd_pocl --model gpt2-student=exports/sft \\
        --data dolly --data ../shared/data/selfinst/test_242.jsonl --output runs/eval
    torchrun --nproc_per_node 2 launch/evaluate.py ...   (prompts shared out across ranks)

A model is an exported Hugging Face directory (config.json, weights, tokenizer) or a training
run directory, whose exported ``final/`` is used. ``NAME=DIR`` names its table row (default:
the directory's name). A suite is a jsonl/json file or one of the names in ``KNOWN_SUITES``,
found under ``$POCL_DATA_DIR``; ``NAME=PATH`` names its column. Writes eval.json,
generations.jsonl and table.md into ``--output`` and prints the table.
"""

import argparse
import gc
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocl_ds.cli import ArgumentParser, run_main
from pocl_ds.errors import PoclError

# The paper's evaluation sets, as laid out in the shared data folder (see its README).
KNOWN_SUITES = {
    "dolly": "dolly/test_500.jsonl",
    "selfinst": "selfinst/test_242.jsonl",
    "vicuna": "vicuna/test_80.jsonl",
}
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _split_name(value: str) -> tuple[str | None, str]:
    """``NAME=VALUE`` -> (NAME, VALUE); a bare value (or a path containing '/') -> (None, VALUE)."""
    name, sep, rest = value.partition("=")
    if sep and name and "/" not in name:
        return name, rest
    return None, value


def resolve_model_dir(path: str) -> Path:
    """The Hugging Face directory of an export (config.json) or a run directory's ``final/``."""
    directory = Path(path)
    for candidate in (directory, directory / "final"):
        if (candidate / "config.json").is_file():
            return candidate
    raise PoclError(
        f"--model {path}: neither {directory / 'config.json'} nor "
        f"{directory / 'final' / 'config.json'} exists; pass an exported Hugging Face directory "
        "or a finished run directory (its final/ export)"
    )


def resolve_suite(value: str) -> tuple[str, Path]:
    """(suite name, file) of a ``--data`` value: a file, or a known suite under POCL_DATA_DIR."""
    name, spec = _split_name(value)
    if spec in KNOWN_SUITES and not Path(spec).exists():
        data_dir = Path(os.environ.get("POCL_DATA_DIR", DEFAULT_DATA_DIR))
        path = data_dir / KNOWN_SUITES[spec]
        if not path.is_file():
            raise PoclError(
                f"--data {value}: suite {spec!r} is {path}, which does not exist; set "
                "POCL_DATA_DIR to the folder holding dolly/, selfinst/ and vicuna/"
            )
        return name or spec, path
    path = Path(spec)
    if not path.is_file():
        raise PoclError(
            f"--data {value}: no such file; give a jsonl file or one of {', '.join(KNOWN_SUITES)}"
        )
    # data/dolly/test_500.jsonl reads better as "dolly" than as "test_500".
    default = path.parent.name if path.stem.startswith("test") and path.parent.name else path.stem
    return name or default, path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", required=True, help="[NAME=]DIR, repeatable")
    parser.add_argument(
        "--data", action="append", required=True, help="[NAME=]JSONL or a known suite name"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="default: 10 20 30 40 50 (SPEC)"
    )
    parser.add_argument("--output", required=True, help="directory for eval.json, table.md, ...")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (one pass)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-length", type=int, default=512, help="prompt + response tokens (SPEC: 512)"
    )
    parser.add_argument(
        "--max-prompt-length",
        type=int,
        default=256,
        help="prompts are cut from the left to this, and further where a model's positions "
        "would leave no room to answer (the log and eval.json count the cut prompts)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="response tokens at most (default: what --max-length leaves); prompts are cut to "
        "leave this room in a model's positions (at most half of them)",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each suite")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (
        args.batch_size < 1
        or args.max_length < 2
        or (args.limit is not None and args.limit < 1)
        or (args.max_new_tokens is not None and args.max_new_tokens < 1)
        or args.max_prompt_length < 1
    ):
        raise PoclError(
            "--batch-size, --limit, --max-new-tokens and --max-prompt-length must be >= 1 and "
            "--max-length >= 2"
        )
    # Resolve every path before torch loads and the process group starts: a typo fails at once.
    suite_files = {}
    for value in args.data:
        name, path = resolve_suite(value)
        if name in suite_files:
            raise PoclError(f"--data {value}: a second suite named {name!r}; use NAME=PATH")
        suite_files[name] = path
    models = []
    for value in args.model:
        name, path = _split_name(value)
        directory = resolve_model_dir(path)
        name = name or (directory.parent.name if directory.name == "final" else directory.name)
        if name in dict(models):
            raise PoclError(f"--model {value}: a second model named {name!r}; use NAME=DIR")
        models.append((name, directory))

    import torch

    from pocl_ds.data import load_instructions
    from pocl_ds.distributed import init_distributed, is_main_process
    from pocl_ds.evaluate import (
        DEFAULT_SEEDS,
        evaluate_model,
        format_table,
        merge_reports,
        write_report,
    )
    from pocl_ds.models import load_causal_lm, load_tokenizer
    from pocl_ds.telemetry import get_logger, setup_logging

    logger = get_logger(__name__)
    info = init_distributed()
    setup_logging(info.rank)
    suites = {name: load_instructions(path)[: args.limit] for name, path in suite_files.items()}
    device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    reports = []
    for name, directory in models:
        tokenizer = load_tokenizer(directory)
        model = load_causal_lm(directory, dtype=args.dtype, vocab_size=len(tokenizer))
        logger.info("evaluating %s (%s) on %s", name, directory, ", ".join(suites))
        reports.append(
            evaluate_model(
                model.to(device),
                tokenizer,
                suites,
                name=name,
                seeds=args.seeds or DEFAULT_SEEDS,
                greedy=args.greedy,
                batch_size=args.batch_size,
                max_total_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                max_new_tokens=args.max_new_tokens,
            )
        )
        del model  # hold one model at a time
        gc.collect()
    report = merge_reports(reports)
    write_report(report, args.output)
    if is_main_process():
        print(format_table(report), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
