"""The end-to-end POCL demo: graded tasks → teacher (SFT) → students (SFT, KD, KD + POCL) →
evaluation over seeds → a Table-1-shaped results table and plots.

    bash launch/demo.sh [--data PATH] [--output DIR] [--quick]        (sets up .venv first)
    deepspeed --num_gpus 2 launch/demo.py [--data PATH] [--output DIR] [--quick] [--seeds ...]

Every rank runs the whole pipeline in one process group, so the launcher and the imports are
paid once: each training stage is the ``train()`` that ``launch/train.py`` runs, on a recipe
from ``launch/configs/demo/``; the evaluation is ``launch/evaluate.py``'s ``main``. The students
are distilled from the teacher run's export (``<output>/teacher/final``, its tokenizer too); the
POCL student measures difficulty with its own untrained weights and trains at the budget of the
plain KD student. Writes ``<output>/{data,teacher,sft,kd,kd_pocl}`` (the runs, with their
curriculum and difficulty plots) and ``<output>/results`` (table.md, summary.json, eval/, the
plots side by side); rank 0 prints the table, the wall times and POCL's own overhead.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pocl_ds.cli import EXIT_CODE_AFTER, ArgumentParser, run_main
from pocl_ds.config import load_config
from pocl_ds.errors import PoclError

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "launch" / "configs" / "demo"
# (run directory, table row, recipe): the teacher first, the students distil from its export.
TEACHER = ("teacher", "Teacher (SFT)", "teacher.yaml")
STUDENTS = (
    ("sft", "SFT", "sft.yaml"),
    ("kd", "KD (fkl)", "kd.yaml"),
    ("kd_pocl", "KD (fkl) + POCL", "kd_pocl.yaml"),
)
# Synthetic sizes (train, valid, test) and the generator's seed; --quick shrinks everything.
SYNTHETIC_SIZES = {"full": (1600, 64, 100), "quick": (256, 32, 32)}
SYNTHETIC_SEED = 0
SPLIT_SEED = 1
# Real instruction data: longer texts need a wider vocabulary, longer sequences and positions.
REAL_DATA_SIZES = {"full": (50, 100), "quick": (16, 16)}  # (valid, test); the rest trains
MIN_REAL_TRAIN = 32
QUICK_REAL_TRAIN = 128
REAL_MAX_LENGTH = 256
REAL_OVERRIDES = [
    f"data.max_length={REAL_MAX_LENGTH}",
    "data.max_prompt_length=192",
    "data.overflow=truncate_prompt",
    "model.tokenizer_vocab_size=2048",
    f"eval.max_total_length={REAL_MAX_LENGTH}",
    "eval.max_new_tokens=48",
    "eval.batch_size=16",
    "eval.valid_rouge_samples=32",
]
QUICK_OVERRIDES = {
    "teacher": ["train.epochs=4", "eval.valid_rouge_samples=16"],
    "student": ["train.epochs=2", "eval.valid_rouge_samples=16"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        default=None,
        help="a jsonl/json instruction file (e.g. ../shared/data/dolly/train_1k.jsonl); "
        "default: the generated synthetic graded tasks",
    )
    parser.add_argument("--output", default="runs/demo", help="directory of runs and results")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="default: 10 20 30 40 50 (quick: 10 20)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a reduced size (fewer tasks, epochs and seeds)"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data is not None and not Path(args.data).is_file():
        raise PoclError(f"--data {args.data}: no such file; give a jsonl/json instruction file")
    return args


def write_split(samples: list, path: Path) -> None:
    """MiniLLM-layout jsonl (difficulty and category kept, so plots can use them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for s in samples:
            record = {
                "instruction": s.instruction,
                "input": s.input,
                "output": list(s.references),
                "prompt": s.prompt,
            }
            if s.category is not None:
                record["category"] = s.category
            if s.difficulty is not None:
                record["difficulty"] = s.difficulty
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def prepare_data(args: argparse.Namespace, data_dir: Path) -> dict[str, Path]:
    """Rank 0: the train/valid/test files (generated tasks or a seeded split of --data)."""
    from pocl_ds.data import load_instructions, split_samples
    from pocl_ds.synthetic import write_synthetic_tasks

    size = "quick" if args.quick else "full"
    if args.data is None:
        sizes = SYNTHETIC_SIZES[size]
        source = write_synthetic_tasks(
            data_dir / "synthetic.jsonl", num_samples=sum(sizes), seed=SYNTHETIC_SEED, scale="easy"
        )
        samples = load_instructions(source)
    else:
        samples = load_instructions(args.data)
        valid, test = REAL_DATA_SIZES[size]
        train = len(samples) - valid - test
        if train < MIN_REAL_TRAIN:
            raise PoclError(
                f"--data {args.data}: {len(samples)} samples; the demo needs at least "
                f"{valid + test + MIN_REAL_TRAIN}"
            )
        sizes = (min(train, QUICK_REAL_TRAIN) if args.quick else train, valid, test)
    splits = split_samples(samples[: sum(sizes)], sizes=sizes, seed=SPLIT_SEED)
    paths = {name: data_dir / f"{name}.jsonl" for name in ("train", "valid", "test")}
    for name, split in zip(paths, splits, strict=True):
        write_split(split, paths[name])
    return paths


def run_overrides(
    args: argparse.Namespace, data: dict[str, Path], out: Path, run: str, recipe: str
) -> list[str]:
    overrides = [
        f"train.output_dir={out / run}",
        f"data.train_path={data['train']}",
        f"data.valid_path={data['valid']}",
        f"data.test_path={data['test']}",
    ]
    if args.data is not None:
        # The recipe's model with room for the longer real sequences.
        model = dict(load_config(RECIPES / recipe).model.student_config)
        model["max_positions"] = REAL_MAX_LENGTH
        overrides += [*REAL_OVERRIDES, f"model.student_config={json.dumps(model)}"]
    if run != "teacher":
        overrides.append(f"model.teacher={out / 'teacher' / 'final'}")
    if args.quick:
        overrides += QUICK_OVERRIDES["teacher" if run == "teacher" else "student"]
    return overrides


def load_evaluate_cli():
    """launch/evaluate.py as a module (its file name would clash with other ``evaluate``s)."""
    spec = importlib.util.spec_from_file_location("pocl_evaluate_cli", ROOT / "launch/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def untrained_greedy_rouge(run_dir: Path) -> float | None:
    """The step-0 validation (greedy ROUGE-L of the freshly initialised student)."""
    from pocl_ds.telemetry import read_metrics

    for record in read_metrics(run_dir / "metrics.jsonl"):
        if record.get("step") == 0 and "val_rouge_l" in record:
            return record["val_rouge_l"]
    return None


def write_results(
    out: Path, results: Path, summaries: dict, stage_s: dict, names: dict, started: float
) -> str:
    """Rank 0: the method plot, the runs' plots side by side, table.md and summary.json."""
    from pocl_ds.plots import plot_method_scores

    report = json.loads((results / "eval" / "eval.json").read_text(encoding="utf-8"))
    per_seed = {
        names[run]: list(report["models"][names[run]]["avg"]["rouge_l"]["per_seed"].values())
        for run in names
    }
    plot_method_scores(per_seed, results / "rouge_l_by_method.png")
    for run in names:
        for plot in ("curriculum_timeline.png", "difficulty.png"):
            if (out / run / plot).is_file():
                shutil.copyfile(out / run / plot, results / f"{run}_{plot}")

    pocl = summaries["kd_pocl"]
    timings = pocl["timings"]
    overhead = timings["difficulty"] + timings.get("curriculum", 0.0)
    table = (results / "eval" / "table.md").read_text(encoding="utf-8")
    first_table = table.split("\n\nExact match")[0].strip()
    teacher_val = summaries["teacher"]["best_val_rouge_l"]
    untrained = untrained_greedy_rouge(out / "sft")
    lines = [
        first_table,
        "",
        f"Greedy validation ROUGE-L: teacher {teacher_val:.2f}, untrained student "
        + ("n/a" if untrained is None else f"{untrained:.2f}")
        + ", best of each student: "
        + ", ".join(f"{names[r]} {summaries[r]['best_val_rouge_l']:.2f}" for r, _, _ in STUDENTS)
        + ".",
        "",
        "| stage | wall time (s) |",
        "|---|---:|",
        *(f"| {stage} | {seconds:.1f} |" for stage, seconds in stage_s.items()),
        f"| total (this script) | {time.perf_counter() - started:.1f} |",
        "",
        f"POCL's own overhead in the KD (fkl) + POCL run: difficulty measurement "
        f"{timings['difficulty']:.1f} s + curriculum controller "
        f"{timings.get('curriculum', 0.0):.2f} s = {overhead:.1f} s, "
        f"{100 * overhead / pocl['wall_s']:.1f}% of its {pocl['wall_s']:.1f} s training wall time "
        f"(KD (fkl) without POCL: {summaries['kd']['wall_s']:.1f} s).",
    ]
    text = "\n".join(lines) + "\n"
    (results / "table.md").write_text(text, encoding="utf-8")
    (results / "summary.json").write_text(
        json.dumps(
            {
                "runs": summaries,
                "stage_wall_s": stage_s,
                "pocl_overhead_s": overhead,
                "pocl_overhead_fraction": overhead / pocl["wall_s"],
                "untrained_student_greedy_val_rouge_l": untrained,
                "rouge_l_per_seed": per_seed,
            },
            indent=2,
            default=str,
        )
        + "\n",
        encoding="utf-8",
    )
    return text


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    seeds = args.seeds or ([10, 20] if args.quick else [10, 20, 30, 40, 50])

    for _, _, recipe in (TEACHER, *STUDENTS):  # before torch: a bad recipe fails at once
        load_config(RECIPES / recipe)

    from pocl_ds import distributed, telemetry
    from pocl_ds.trainer import train

    distributed.share_cores()
    info = distributed.init_distributed()
    telemetry.setup_logging(info.rank)
    logger = telemetry.get_logger("demo")
    out = Path(args.output)
    runs = [TEACHER, *STUDENTS]
    results = out / "results"
    if distributed.is_main_process():
        # A fresh start: a reused difficulty cache or checkpoint would hide the real cost.
        for path in [out / "data", results, *(out / run for run, _, _ in runs)]:
            shutil.rmtree(path, ignore_errors=True)
    distributed.barrier()

    stage_s: dict[str, float] = {}
    mark = time.perf_counter()
    data = prepare_data(args, out / "data") if distributed.is_main_process() else None
    data = distributed.broadcast_object(data)
    stage_s["data"] = time.perf_counter() - mark

    summaries = {}
    for run, name, recipe in runs:
        logger.info("demo: training %s (%s)", name, RECIPES / recipe)
        mark = time.perf_counter()
        config = load_config(RECIPES / recipe, run_overrides(args, data, out, run, recipe))
        summaries[run] = train(config)
        if summaries[run].get("preempted"):  # Ctrl-C or SIGTERM: the demo always starts over
            logger.warning("demo: stopped during %s; run it again to start over", name)
            return EXIT_CODE_AFTER[summaries[run]["signal"]]
        stage_s[f"train {name}"] = time.perf_counter() - mark

    mark = time.perf_counter()
    evaluate_cli = load_evaluate_cli()
    max_length = config.data.max_length  # the students' (and teacher's) sequence limit
    evaluate_argv = [
        *(f"--model={name}={out / run / 'final'}" for run, name, _ in runs),
        f"--data=test={data['test']}",
        "--seeds",
        *map(str, seeds),
        f"--output={results / 'eval'}",
        f"--max-length={max_length}",
        f"--max-prompt-length={max_length - 16}",
        "--batch-size=50",
    ]
    # launch/evaluate.py prints its table; the demo prints it once, inside its own results.
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate_cli.main(evaluate_argv)
    stage_s["evaluate"] = time.perf_counter() - mark

    if distributed.is_main_process():
        names = {run: name for run, name, _ in runs}
        text = write_results(out, results, summaries, stage_s, names, started)
        print(
            "\n" + " pocl_ds demo results ".center(72, "=") + "\n"
            f"ROUGE-L (x100) on the held-out test set, mean ± std over seeds "
            f"{' '.join(map(str, seeds))} (sampling at temperature 1):\n\n{text}\n"
            f"Everything is in {results}/ (table.md, summary.json, eval/, *.png)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    run_main(main)
