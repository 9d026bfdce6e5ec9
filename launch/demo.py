"""The end-to-end POCL demo: graded tasks and a disjoint pre-training corpus → teacher and
student bases (pre-trained on every token) → teacher (SFT from its base) → students (SFT, KD,
KD + POCL from the student base, each over several training seeds) → evaluation over sampling
seeds → a results table (mean ± std over training seeds, POCL's paired difference to KD with
its 95 % interval) and plots.

    bash launch/demo.sh [--data PATH] [--output DIR] [--quick]        (sets up .venv first)
    deepspeed --num_gpus 2 launch/demo.py [--data PATH] [--output DIR] [--quick] [--seeds ...]
        [--training-seeds ...] [--stop-after {bases,teacher}]

Every rank runs the whole pipeline in one process group, so the launcher and the imports are
paid once: each training stage is the ``train()`` that ``launch/train.py`` runs, on a recipe
from ``launch/configs/demo/``; the evaluation is ``launch/evaluate.py``'s ``main``. The POCL
student measures difficulty with its own pre-trained weights (Spearman ρ of that measure
against the tasks' known level goes into summary.json and ``kd_pocl_difficulty.png``) and
trains at the budget of the plain KD student. Writes ``<output>/data`` (tasks and the
pre-training corpus), ``<output>/{teacher_base,student_base,teacher}``,
``<output>/{sft,kd,kd_pocl}/seed<N>`` (the runs, with their curriculum and difficulty plots)
and ``<output>/results`` (table.md, summary.json, eval/, the plots side by side); rank 0 prints
the table, the wall times and POCL's own overhead.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
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
# (run directory, table row, recipe), in training order: the bases, then the teacher from its
# base; the students start from the student base and distil from the teacher's export.
BASES = (
    ("teacher_base", "Teacher base (pre-trained)", "base_teacher.yaml"),
    ("student_base", "Student base (pre-trained)", "base_student.yaml"),
)
TEACHER = ("teacher", "Teacher (SFT)", "teacher.yaml")
STUDENTS = (
    ("sft", "SFT", "sft.yaml"),
    ("kd", "KD (fkl)", "kd.yaml"),
    ("kd_pocl", "KD (fkl) + POCL", "kd_pocl.yaml"),
)
BASELINE = "kd"  # the student every other student is compared with, seed by seed
EVALUATED = ("student_base", "teacher")  # single runs evaluated beside the students
# Synthetic sizes (train, valid, test) and the generator's seed; --quick shrinks everything.
SYNTHETIC_SIZES = {"full": (1600, 64, 100), "quick": (256, 32, 32)}
# Tasks generated beyond the sizes: the split leaves out repeats of held-out prompts, and the
# training split is still filled from the rest.
SYNTHETIC_SURPLUS = 0.25
SYNTHETIC_SEED = 0
# The families a model of the demo's size learns from text that holds none of the tasks:
# reversing, sorting and looking up are rules that carry over to unseen lists. Sums of small
# numbers are recalled, not computed, at this size, and the corpus cannot hold the sums the
# tasks ask, so addition would rank by noise (README, "Does POCL help here?").
SYNTHETIC_FAMILIES = ("reverse", "sort", "lookup")
SPLIT_SEED = 1
# The synthetic pre-training corpus: tasks of other generator seeds (train, valid). 3,200
# records let the student base take 16 epochs (what it needs to learn look-up and the longest
# reversals) in about the time 12 epochs of 4,000 took.
CORPUS_SIZES = {"full": (3200, 64), "quick": (512, 32)}
CORPUS_SEEDS = (1001, 1002, 1003)
# Real instruction data: longer texts need a wider vocabulary, longer sequences and positions.
REAL_DATA_SIZES = {"full": (50, 100), "quick": (16, 16)}  # (valid, test); the rest trains
REAL_CORPUS_VALID = {"full": 50, "quick": 16}
REAL_SUITES = ("dolly/test_500.jsonl", "selfinst/test_242.jsonl", "vicuna/test_80.jsonl")
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
    "base": ["train.epochs=1", "eval.valid_rouge_samples=16"],
    "teacher": ["train.epochs=4", "eval.valid_rouge_samples=16"],
    "student": ["train.epochs=2", "eval.valid_rouge_samples=16"],
}
DEFAULT_TRAINING_SEEDS = {"full": [1, 2, 3], "quick": [1]}
DEFAULT_SAMPLING_SEEDS = {"full": [10, 20, 30, 40, 50], "quick": [10, 20]}


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
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="sampling seeds of the evaluation; default: 10 20 30 40 50 (quick: 10 20)",
    )
    parser.add_argument(
        "--training-seeds",
        type=int,
        nargs="+",
        default=None,
        help="training seeds of every student; default: 1 2 3 (quick: 1)",
    )
    parser.add_argument(
        "--stop-after",
        choices=("bases", "teacher"),
        default=None,
        help="stop after the pre-trained bases, or after the teacher (what experiment grids need)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a reduced size (fewer tasks, epochs and seeds)"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data is not None and not Path(args.data).is_file():
        raise PoclError(f"--data {args.data}: no such file; give a jsonl/json instruction file")
    size = "quick" if args.quick else "full"
    args.seeds = args.seeds or DEFAULT_SAMPLING_SEEDS[size]
    args.training_seeds = args.training_seeds or DEFAULT_TRAINING_SEEDS[size]
    if len(set(args.training_seeds)) != len(args.training_seeds):
        raise PoclError(f"--training-seeds {args.training_seeds}: each seed once")
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


def real_suite_texts() -> list[str]:
    """Prompts and references of the evaluation suites under $POCL_DATA_DIR (those present)."""
    from pocl_ds.data import load_instructions

    root = Path(os.environ.get("POCL_DATA_DIR", ROOT.parent / "shared" / "data"))
    texts: list[str] = []
    for suite in REAL_SUITES:
        if (root / suite).is_file():
            texts += [t for s in load_instructions(root / suite) for t in (s.prompt, *s.references)]
    return texts


def prepare_data(args: argparse.Namespace, data_dir: Path) -> dict[str, Path]:
    """Rank 0: the train/valid/test files (generated tasks or a seeded split of --data) and the
    pre-training corpus (``pretrain_train``/``pretrain_valid``), disjoint from all of them."""
    from pocl_ds.data import load_instructions, split_samples
    from pocl_ds.pretraining import python_docs_corpus, synthetic_corpus
    from pocl_ds.synthetic import write_synthetic_tasks

    size = "quick" if args.quick else "full"
    if args.data is None:
        sizes = SYNTHETIC_SIZES[size]
        source = write_synthetic_tasks(
            data_dir / "synthetic.jsonl",
            num_samples=round(sum(sizes) * (1 + SYNTHETIC_SURPLUS)),
            seed=SYNTHETIC_SEED,
            families=SYNTHETIC_FAMILIES,
            scale="easy",
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
    pool = samples if args.data is None else samples[: sum(sizes)]
    splits = split_samples(pool, sizes=sizes, seed=SPLIT_SEED)
    if len(splits[0]) < sizes[0] and args.data is None:
        raise PoclError(f"demo data: {len(splits[0])} training tasks, {sizes[0]} were asked for")
    paths = {name: data_dir / f"{name}.jsonl" for name in ("train", "valid", "test")}
    for name, split in zip(paths, splits, strict=True):
        write_split(split, paths[name])
    corpus = data_dir / "pretrain"
    if args.data is None:
        num_tasks, num_valid = CORPUS_SIZES[size]
        synthetic_corpus(
            corpus,
            exclude=samples,
            num_tasks=num_tasks,
            num_valid=num_valid,
            seeds=CORPUS_SEEDS,
            scale="easy",
            families=SYNTHETIC_FAMILIES,
        )
    else:
        own = [t for s in samples for t in (s.prompt, *s.references)]
        python_docs_corpus(
            corpus, exclude_texts=own + real_suite_texts(), num_valid=REAL_CORPUS_VALID[size]
        )
    paths.update(pretrain_train=corpus / "train.jsonl", pretrain_valid=corpus / "valid.jsonl")
    return paths


def run_overrides(
    args: argparse.Namespace, data: dict[str, Path], out: Path, run: str, recipe: str
) -> list[str]:
    """The recipe's input paths pointed into ``out`` (the caller names the run's own directory);
    real data's longer sequences; --quick sizes."""
    base = run in dict((b, r) for b, _, r in BASES)
    overrides = []
    if base:
        overrides += [
            f"data.train_path={data['pretrain_train']}",
            f"data.valid_path={data['pretrain_valid']}",
        ]
        if run == "student_base":
            overrides.append(f"model.tokenizer={out / 'teacher_base' / 'final'}")
    else:
        overrides += [
            f"data.train_path={data['train']}",
            f"data.valid_path={data['valid']}",
            f"data.test_path={data['test']}",
            f"model.student={out / ('teacher_base' if run == 'teacher' else 'student_base') / 'final'}",
        ]
        if run != "teacher":
            overrides.append(f"model.teacher={out / 'teacher' / 'final'}")
    if args.data is not None:
        overrides += REAL_OVERRIDES
        if base:  # the bases fix the positions every later model inherits
            model = dict(load_config(RECIPES / recipe).model.student_config)
            model["max_positions"] = REAL_MAX_LENGTH
            overrides.append(f"model.student_config={json.dumps(model)}")
    if args.quick:
        kind = "base" if base else "teacher" if run == "teacher" else "student"
        overrides += QUICK_OVERRIDES[kind]
    return overrides


def load_evaluate_cli():
    """launch/evaluate.py as a module (its file name would clash with other ``evaluate``s)."""
    spec = importlib.util.spec_from_file_location("pocl_evaluate_cli", ROOT / "launch/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seed_label(name: str, seed: int) -> str:
    return f"{name} · seed {seed}"


def student_scores(report: dict, training_seeds: list[int]) -> dict[str, dict[int, float]]:
    """Per student method: its test ROUGE-L per training seed (the mean over sampling seeds)."""
    models = report["models"]
    return {
        name: {
            seed: models[seed_label(name, seed)]["avg"]["rouge_l"]["mean"]
            for seed in training_seeds
        }
        for _, name, _ in STUDENTS
    }


def results_table(report: dict, scores: dict[str, dict[int, float]], names: dict) -> list[str]:
    """Markdown rows: single runs ± over sampling seeds; students ± over training seeds, with
    the paired difference to KD (fkl) and its t interval."""
    from pocl_ds.stats import mean_std, paired_difference

    lines = [
        "| Model | training runs | test ROUGE-L | vs KD (fkl): paired difference [95 % CI] |",
        "|---|---:|---:|---|",
    ]
    for run in ("teacher", "student_base"):
        test = report["models"][names[run]]["avg"]["rouge_l"]
        lines.append(f"| {names[run]} | 1 | {test['mean']:.2f} ± {test['std']:.2f} ¹ | |")
    for run, name, _ in STUDENTS:
        mean, std = mean_std(list(scores[name].values()))
        spread = "n/a" if std is None else f"{std:.2f}"
        if run == BASELINE:
            versus = "baseline"
        else:
            diff = paired_difference(scores[name], scores[names[BASELINE]])
            versus = (
                f"{diff['mean']:+.2f} [n/a: {diff['why']}]"
                if diff["low"] is None
                else f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]"
            )
        lines.append(f"| {name} | {len(scores[name])} | {mean:.2f} ± {spread} | {versus} |")
    return lines


def copy_run_plots(out: Path, results: Path, seed: int) -> None:
    """The teacher's and the first training seed's students' plots, side by side in results/."""
    for run in ("teacher", *(s for s, _, _ in STUDENTS)):
        directory = out / run if run == "teacher" else out / run / f"seed{seed}"
        for plot in ("curriculum_timeline.png", "difficulty.png"):
            if (directory / plot).is_file():
                shutil.copyfile(directory / plot, results / f"{run}_{plot}")


def spearman_text(rho: dict) -> str:
    """ρ per training seed as the table's line says it (mean first)."""
    from pocl_ds.stats import mean_std

    known = [r for r in rho.values() if r is not None]
    if not known:
        return "n/a (the data has no known levels)"
    per_seed = ", ".join(f"seed {k}: {v:.2f}" for k, v in rho.items() if v is not None)
    return f"{mean_std(known)[0]:.2f} ({per_seed})"


def greedy_validation_line(summaries: dict, names: dict, seeds: list[int]) -> str:
    """Best-epoch greedy validation ROUGE-L of the single runs and, per student, its mean."""
    from pocl_ds.stats import mean_std

    single = ", ".join(
        f"{names[run]} {summaries[run]['best_val_rouge_l']:.2f}"
        for run in ("teacher_base", "student_base", "teacher")
    )
    students = ", ".join(
        f"{name} "
        f"{mean_std([summaries[f'{run}/seed{s}']['best_val_rouge_l'] for s in seeds])[0]:.2f}"
        for run, name, _ in STUDENTS
    )
    return (
        f"Greedy validation ROUGE-L (best epoch): {single}; students (mean over training "
        f"seeds) {students}."
    )


def write_results(
    args: argparse.Namespace,
    out: Path,
    results: Path,
    summaries: dict,
    stage_s: dict,
    started: float,
) -> str:
    """Rank 0: the method plot, the runs' plots side by side, table.md and summary.json."""
    from pocl_ds.plots import plot_method_scores
    from pocl_ds.stats import PAIRED_INTERVAL

    names = {run: name for run, name, _ in (*BASES, TEACHER, *STUDENTS)}
    report = json.loads((results / "eval" / "eval.json").read_text(encoding="utf-8"))
    scores = student_scores(report, args.training_seeds)
    plot_method_scores(
        {name: list(per_seed.values()) for name, per_seed in scores.items()},
        results / "rouge_l_by_method.png",
    )
    copy_run_plots(out, results, args.training_seeds[0])

    pocl = [summaries[f"kd_pocl/seed{seed}"] for seed in args.training_seeds]
    kd = [summaries[f"kd/seed{seed}"] for seed in args.training_seeds]
    overhead = [s["timings"]["difficulty"] + s["timings"].get("curriculum", 0.0) for s in pocl]
    fraction = sum(overhead) / sum(s["wall_s"] for s in pocl)
    rho = {
        seed: s.get("difficulty_spearman")
        for seed, s in zip(args.training_seeds, pocl, strict=True)
    }
    lines = [
        *results_table(report, scores, names),
        "",
        f"¹ a single run: ± is the std over the sampling seeds. Students: ± is the sample std "
        f"over training seeds {' '.join(map(str, args.training_seeds))}, each seed's score its mean "
        f"over the sampling seeds; interval: {PAIRED_INTERVAL} over training seeds.",
        "",
        greedy_validation_line(summaries, names, args.training_seeds),
        "",
        f"Difficulty measured by the pre-trained student against the tasks' known level: "
        f"Spearman ρ = {spearman_text(rho)} (`kd_pocl_difficulty.png`).",
        "",
        "| stage | wall time (s) |",
        "|---|---:|",
        *(f"| {stage} | {seconds:.1f} |" for stage, seconds in stage_s.items()),
        f"| total (this script) | {time.perf_counter() - started:.1f} |",
        "",
        f"POCL's own overhead in the KD (fkl) + POCL runs: difficulty measurement and curriculum "
        f"controller {sum(overhead) / len(overhead):.1f} s a run, {100 * fraction:.1f}% of their "
        f"training wall time ({sum(s['wall_s'] for s in pocl) / len(pocl):.1f} s a run; KD (fkl) "
        f"without POCL: {sum(s['wall_s'] for s in kd) / len(kd):.1f} s).",
    ]
    text = "\n".join(lines) + "\n"
    (results / "table.md").write_text(text, encoding="utf-8")
    corpus = json.loads((out / "data" / "pretrain" / "corpus.json").read_text(encoding="utf-8"))
    (results / "summary.json").write_text(
        json.dumps(
            {
                "runs": summaries,
                "stage_wall_s": stage_s,
                "training_seeds": args.training_seeds,
                "sampling_seeds": args.seeds,
                "rouge_l_per_training_seed": scores,
                "difficulty_spearman": rho,
                "pocl_overhead_s": overhead,
                "pocl_overhead_fraction": fraction,
                "pretraining_corpus": corpus,
            },
            indent=2,
            default=str,
        )
        + "\n",
        encoding="utf-8",
    )
    return text


def train_runs(args: argparse.Namespace, data: dict, out: Path, stage_s: dict) -> dict | int:
    """Every training run in order; its summaries by run key, or the exit code of a stop."""
    from pocl_ds import telemetry
    from pocl_ds.trainer import train

    logger = telemetry.get_logger("demo")
    plan = [(run, name, recipe, []) for run, name, recipe in BASES]
    if args.stop_after != "bases":
        plan.append((*TEACHER, []))
    if args.stop_after is None:
        plan += [
            (f"{run}/seed{seed}", seed_label(name, seed), recipe, [f"train.seed={seed}"])
            for run, name, recipe in STUDENTS
            for seed in args.training_seeds
        ]
    summaries = {}
    for key, name, recipe, extra in plan:
        logger.info("demo: training %s (%s)", name, RECIPES / recipe)
        mark = time.perf_counter()
        run = key.split("/")[0]
        overrides = [*run_overrides(args, data, out, run, recipe), *extra]
        overrides.append(f"train.output_dir={out / key}")
        summaries[key] = train(load_config(RECIPES / recipe, overrides))
        if summaries[key].get("preempted"):  # Ctrl-C or SIGTERM: the demo always starts over
            logger.warning("demo: stopped during %s; run it again to start over", name)
            return EXIT_CODE_AFTER[summaries[key]["signal"]]
        stage_s[f"train {name}"] = time.perf_counter() - mark
    return summaries


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    for _, _, recipe in (*BASES, TEACHER, *STUDENTS):  # before torch: a bad recipe fails at once
        load_config(RECIPES / recipe)

    from pocl_ds import distributed, telemetry

    distributed.share_cores()
    info = distributed.init_distributed()
    telemetry.setup_logging(info.rank)
    out = Path(args.output)
    results = out / "results"
    if distributed.is_main_process():
        # A fresh start: a reused difficulty cache or checkpoint would hide the real cost.
        runs = [run for run, _, _ in (*BASES, TEACHER, *STUDENTS)]
        for path in [out / "data", results, *(out / run for run in runs)]:
            shutil.rmtree(path, ignore_errors=True)
    distributed.barrier()

    stage_s: dict[str, float] = {}
    mark = time.perf_counter()
    data = prepare_data(args, out / "data") if distributed.is_main_process() else None
    data = distributed.broadcast_object(data)
    stage_s["data and pre-training corpus"] = time.perf_counter() - mark

    summaries = train_runs(args, data, out, stage_s)
    if isinstance(summaries, int):
        return summaries
    if args.stop_after is not None:
        return 0

    mark = time.perf_counter()
    evaluate_cli = load_evaluate_cli()
    # the students' (and teacher's) sequence limit
    max_length = REAL_MAX_LENGTH if args.data else load_config(RECIPES / TEACHER[2]).data.max_length
    names = {run: name for run, name, _ in (*BASES, TEACHER)}
    models = [f"--model={names[run]}={out / run / 'final'}" for run in ("teacher", "student_base")]
    models += [
        f"--model={seed_label(name, seed)}={out / run / f'seed{seed}' / 'final'}"
        for run, name, _ in STUDENTS
        for seed in args.training_seeds
    ]
    evaluate_argv = [
        *models,
        f"--data=test={data['test']}",
        "--seeds",
        *map(str, args.seeds),
        f"--output={results / 'eval'}",
        f"--max-length={max_length}",
        f"--max-prompt-length={max_length - 16}",
        "--batch-size=50",
    ]
    # launch/evaluate.py prints its table; the demo prints its own, inside its results.
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate_cli.main(evaluate_argv)
    stage_s["evaluate"] = time.perf_counter() - mark

    if distributed.is_main_process():
        text = write_results(args, out, results, summaries, stage_s, started)
        print(
            "\n" + " pocl_ds demo results ".center(72, "=") + "\n"
            f"ROUGE-L (x100) on the held-out test set, sampling at temperature 1 with seeds "
            f"{' '.join(map(str, args.seeds))}:\n\n{text}\n"
            f"Everything is in {results}/ (table.md, summary.json, eval/, *.png)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    run_main(main)
