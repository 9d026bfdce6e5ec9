"""Run an experiment grid — cells × training seeds — and report each cell against a baseline.

    python launch/experiment.py GRID.yaml [--output DIR] [--quick]      (re-launches itself on
    deepspeed --num_gpus 2 launch/experiment.py GRID.yaml ...            2 ranks under DeepSpeed)

A grid file (``launch/configs/experiments/*.yaml``) names a base recipe, the overrides every
cell shares, the cells (a name plus ``section.key=value`` overrides), the baseline cell, the
training seeds, the evaluation suites and sampling seeds, and its purpose:

- ``purpose: select`` — a grid for choosing settings: it is scored on the validation split
  only (``split: valid``), and the runner refuses test suites for it;
- ``purpose: report`` — the settings are fixed; it is scored on test suites (``split: test``).

Every run (cell × training seed) is ``pocl_ds.trainer.train()`` with ``train.seed=<seed>``
into ``<output>/<cell>/seed<seed>``, then ``pocl_ds.evaluate.evaluate_model`` on the exported
best student, all in one process group. A finished run has ``result.json`` (written
atomically) and is skipped when the grid is run again; an unfinished one continues from its
last checkpoint (``resume="auto"``; a run without one starts over, its old directory moved
aside by the trainer). A run whose recorded config differs from what the grid now asks for
stops the grid rather than mixing two runs. ``<output>/results.{json,md,png}`` are rewritten
after every finished run: every run's numbers, per cell the mean ± sample std over training
seeds (each seed's score: its mean over sampling seeds, and over suites for Avg.), and per
cell the paired difference to the baseline over training seeds with a paired t 95 % interval.
An optional ``comparisons`` list of ``[cell, other]`` pairs adds their paired differences too
(for example a variant against plain KD where the cells' baseline is the default POCL).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import socket
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.evaluate import DEFAULT_DATA_DIR, resolve_suite
from pocl_ds import atomic
from pocl_ds.cli import EXIT_CODE_AFTER, ArgumentParser, run_main
from pocl_ds.config import ExperimentConfig, changed_fields, load_config, parse_overrides
from pocl_ds.errors import PoclError

RANKS = 2  # the ranks a plain `python launch/experiment.py` re-launches itself on
OWN_SPLITS = ("valid", "test")  # suite sources meaning the run's own split
PURPOSE_SPLIT = {"select": "valid", "report": "test"}
GRID_KEYS = {
    "description",
    "purpose",
    "split",
    "recipe",
    "overrides",
    "quick",
    "baseline",
    "training_seeds",
    "sampling_seeds",
    "suites",
    "cells",
    "comparisons",
}
REQUIRED_KEYS = ("purpose", "recipe", "baseline", "training_seeds", "sampling_seeds", "suites")
CELL_KEYS = {"name", "overrides", "baseline"}
RUNNER_OWNED = ("train.seed", "train.output_dir", "eval.evaluate_at_end")
CELL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
QUICK_SEEDS = (2, 1)  # --quick: the first 2 training seeds and the first sampling seed
RESULT_JSON = "result.json"
METRIC = "rouge_l"
AVG = "avg"


@dataclass(frozen=True)
class Cell:
    name: str
    overrides: tuple[str, ...]
    baseline: str


@dataclass(frozen=True)
class Grid:
    path: Path
    purpose: str
    split: str
    recipe: Path
    overrides: tuple[str, ...]
    quick_overrides: tuple[str, ...]
    baseline: str
    training_seeds: tuple[int, ...]
    sampling_seeds: tuple[int, ...]
    suites: dict[str, str]
    cells: tuple[Cell, ...]
    # Pairs (cell, other) also reported as paired differences, beside each cell's baseline:
    # a question such as "does the best variant beat plain KD?" that no baseline column asks.
    comparisons: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return self.path.stem

    def quick(self) -> Grid:
        """The same grid at a smoke-test size: fewer seeds, plus the file's ``quick`` overrides."""
        train_n, sample_n = QUICK_SEEDS
        return dataclasses.replace(
            self,
            training_seeds=self.training_seeds[:train_n],
            sampling_seeds=self.sampling_seeds[:sample_n],
            overrides=(*self.overrides, *self.quick_overrides),
        )


@dataclass(frozen=True)
class PlannedRun:
    cell: Cell
    seed: int
    directory: Path
    config: ExperimentConfig

    @property
    def label(self) -> str:
        return f"{self.cell.name} seed {self.seed}"


# ----------------------------------------------------------------------------- the grid file


def expand_environment(value: str, where: str) -> str:
    """``${VAR}`` from the environment; ``POCL_DATA_DIR`` defaults as in launch/evaluate.py, so
    a grid names the shared data without a path to it."""
    known = {"POCL_DATA_DIR": str(DEFAULT_DATA_DIR), **os.environ}
    try:
        return string.Template(value).substitute(known)
    except (KeyError, ValueError) as err:
        raise PoclError(f"{where}: {value!r} names an unset variable {err}; export it") from None


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PoclError(f"{where}: expected a list of section.key=value strings, got {value!r}")
    parse_overrides(value)  # the shape section.key=value, checked here with the file's name
    return tuple(expand_environment(v, where) for v in value)


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    ok = isinstance(value, list) and value and all(type(v) is int for v in value)
    if not ok or len(set(value)) != len(value):
        raise PoclError(f"{where}: expected a non-empty list of distinct integers, got {value!r}")
    return tuple(value)


def _cells(value: Any, where: str, default_baseline: str) -> tuple[Cell, ...]:
    if not isinstance(value, list) or not value:
        raise PoclError(f"{where}: expected a list of {{name, overrides}} mappings")
    cells = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or set(item) - CELL_KEYS or "name" not in item:
            raise PoclError(f"{at}: expected a mapping with name, overrides and optional baseline")
        name = item["name"]
        if not isinstance(name, str) or not CELL_NAME.match(name):
            raise PoclError(f"{at}.name: {name!r} must be letters, digits, _ . - (a directory)")
        overrides = _strings(item.get("overrides"), f"{at}.overrides")
        owned = [o for o in overrides if o.partition("=")[0].strip() in RUNNER_OWNED]
        if owned:
            raise PoclError(f"{at}.overrides: {owned[0]!r} is set by the runner; remove it")
        cells.append(Cell(name, overrides, item.get("baseline", default_baseline)))
    names = [c.name for c in cells]
    for cell in cells:
        if names.count(cell.name) > 1:
            raise PoclError(f"{where}: two cells are named {cell.name!r}")
        if cell.baseline not in names:
            raise PoclError(
                f"{where}: baseline {cell.baseline!r} of cell {cell.name!r} is not a cell; "
                f"cells: {', '.join(names)}"
            )
    return tuple(cells)


def _comparisons(value: Any, where: str, cells: tuple[Cell, ...]) -> tuple[tuple[str, str], ...]:
    names = [c.name for c in cells]
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PoclError(f"{where}: expected a list of [cell, other cell] pairs")
    pairs = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and pair[0] != pair[1]):
            raise PoclError(f"{where}[{i}]: expected [cell, other cell], got {pair!r}")
        unknown = [name for name in pair if name not in names]
        if unknown:
            raise PoclError(
                f"{where}[{i}]: {unknown[0]!r} is not a cell; cells: {', '.join(names)}"
            )
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _suites(value: Any, where: str, split: str) -> dict[str, str]:
    """Suite name -> ``valid``/``test`` (the run's own split) or a file / known suite name
    (a held-out test set). Every suite must be of the grid's ``split``."""
    if not isinstance(value, dict) or not value:
        raise PoclError(f"{where}: expected a mapping of suite name -> valid, test or a file")
    suites = {}
    for name, source in value.items():
        if not isinstance(source, str) or not source:
            raise PoclError(f"{where}.{name}: expected valid, test or a file, got {source!r}")
        suite_split = source if source in OWN_SPLITS else "test"
        if suite_split != split:
            raise PoclError(
                f"{where}.{name}: {source!r} is {suite_split} data but the grid reports the "
                f"{split} split; a grid for choosing settings (purpose: select) is scored on "
                "validation only (suite source: valid)"
            )
        suites[str(name)] = expand_environment(source, f"{where}.{name}")
    return suites


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file, then build every cell's config (a bad override stops here,
    naming the cell, before any model is trained)."""
    path = Path(path)
    if not path.is_file():
        raise PoclError(f"{path}: no such grid file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise PoclError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise PoclError(f"{path}: expected a mapping of grid keys at the top level")
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown:
        raise PoclError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(GRID_KEYS)}")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing or "cells" not in data:
        raise PoclError(f"{path}: missing key {(missing or ['cells'])[0]!r}")
    purpose = data["purpose"]
    if purpose not in PURPOSE_SPLIT:
        raise PoclError(f"{path}: purpose: got {purpose!r}, expected select or report")
    split = data.get("split", PURPOSE_SPLIT[purpose])
    if split not in OWN_SPLITS:
        raise PoclError(f"{path}: split: got {split!r}, expected valid or test")
    if purpose == "select" and split != "valid":
        raise PoclError(
            f"{path}: split: test with purpose: select — settings are chosen on validation, "
            "never on test; use split: valid, or purpose: report once the settings are fixed"
        )
    recipe = path.parent / expand_environment(str(data["recipe"]), f"{path}: recipe")
    if not recipe.is_file():
        raise PoclError(f"{path}: recipe: {recipe} does not exist (paths are relative to the grid)")
    baseline = data["baseline"]
    cells = _cells(data["cells"], f"{path}: cells", baseline)
    grid = Grid(
        path=path,
        purpose=purpose,
        split=split,
        recipe=recipe,
        overrides=_strings(data.get("overrides"), f"{path}: overrides"),
        quick_overrides=_strings(data.get("quick"), f"{path}: quick"),
        baseline=baseline,
        training_seeds=_seeds(data["training_seeds"], f"{path}: training_seeds"),
        sampling_seeds=_seeds(data["sampling_seeds"], f"{path}: sampling_seeds"),
        suites=_suites(data["suites"], f"{path}: suites", split),
        cells=cells,
        comparisons=_comparisons(data.get("comparisons"), f"{path}: comparisons", cells),
    )
    for owned in RUNNER_OWNED:
        if any(o.partition("=")[0].strip() == owned for o in grid.overrides):
            raise PoclError(f"{path}: overrides: {owned} is set by the runner; remove it")
    for quick in (False, True):  # both sizes must build
        plan_runs(grid.quick() if quick else grid, Path("runs/experiments/check"))
    return grid


def plan_runs(grid: Grid, output: Path) -> list[PlannedRun]:
    """Every cell × training seed with its validated config, cell by cell."""
    runs = []
    for cell in grid.cells:
        for seed in grid.training_seeds:
            directory = output / cell.name / f"seed{seed}"
            overrides = [
                *grid.overrides,
                *cell.overrides,
                f"train.seed={seed}",
                f"train.output_dir={directory}",
                "eval.evaluate_at_end=false",  # the runner evaluates on the grid's suites
            ]
            try:
                config = load_config(grid.recipe, overrides)
            except PoclError as err:
                raise PoclError(f"{grid.path}: cell {cell.name!r}: {err}") from None
            runs.append(PlannedRun(cell, seed, directory, config))
    return runs


# ----------------------------------------------------------------------------- one run


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(yaml.safe_dump(config, sort_keys=True))


def config_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``section.key: recorded -> wanted`` for every field that differs."""
    return changed_fields(_normalised(recorded), _normalised(wanted))


def _refuse_mixing(run: PlannedRun, recorded: dict[str, Any] | None, what: str) -> None:
    if recorded is None:
        return
    changed = config_differences(recorded, run.config.to_dict())
    if changed:
        raise PoclError(
            f"{run.directory / what} was made with other settings ({'; '.join(changed[:3])}); "
            "the grid changed since: use another --output, or remove that run directory"
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _recorded_config(run: PlannedRun) -> dict[str, Any] | None:
    path = run.directory / "config.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def finished_result(grid: Grid, run: PlannedRun) -> dict[str, Any] | None:
    """Rank 0: the run's result.json if it is finished with this grid's settings."""
    result = _read_json(run.directory / RESULT_JSON)
    if result is None:
        return None
    _refuse_mixing(run, result["config"], RESULT_JSON)
    settings = {"split": grid.split, "suites": grid.suites, "sampling_seeds": grid.sampling_seeds}
    if {k: result[k] for k in settings} != json.loads(json.dumps(settings)):
        raise PoclError(
            f"{run.directory / RESULT_JSON} was evaluated on other suites, seeds or split; "
            "use another --output, or remove that run directory"
        )
    return result


def on_rank0(function: Any, *args: Any) -> Any:
    """``function(*args)`` on rank 0, its value shared with every rank; a ``PoclError`` there
    is raised on every rank, so no rank is left waiting in a collective."""
    from pocl_ds import distributed

    outcome = None
    if distributed.is_main_process():
        try:
            outcome = (function(*args), None)
        except PoclError as err:
            outcome = (None, str(err))
    value, error = distributed.broadcast_object(outcome)
    if error is not None:
        raise PoclError(error)
    return value


def trained_summary(run: PlannedRun) -> dict[str, Any] | None:
    """Rank 0: the summary of a run trained but not yet evaluated; None when it is still to
    train (or continue). Refuses a directory that holds a run of other settings."""
    _refuse_mixing(run, _recorded_config(run), "config.yaml")
    return _read_json(run.directory / "summary.json")


def run_suites(grid: Grid, run: PlannedRun) -> dict[str, list]:
    """The grid's suites for this run: its own validation/test split, or files."""
    from pocl_ds.data import load_instructions
    from pocl_ds.recipe import load_splits

    _, valid, test = load_splits(run.config, run.directory)
    own = {"valid": valid, "test": test}
    suites = {}
    for name, source in grid.suites.items():
        if source in own:
            if not own[source]:
                raise PoclError(
                    f"{grid.path}: suite {name}: the run's {source} split is empty; set "
                    f"data.split_sizes or data.{source}_path"
                )
            suites[name] = own[source]
        else:
            suites[name] = load_instructions(resolve_suite(source)[1])
    return suites


def evaluate_run(grid: Grid, run: PlannedRun) -> dict[str, Any]:
    """``evaluate_model`` on the run's exported best student, with the settings of a run's own
    final evaluation (``eval.*``) and the grid's suites and sampling seeds."""
    import torch

    from pocl_ds.evaluate import evaluate_model, report_to_json, write_report
    from pocl_ds.models import load_causal_lm, load_tokenizer

    final = run.directory / "final"
    tokenizer = load_tokenizer(final)
    model = load_causal_lm(final, vocab_size=len(tokenizer))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = run.config.eval
    report = evaluate_model(
        model.to(device),
        tokenizer,
        run_suites(grid, run),
        name=run.cell.name,
        seeds=grid.sampling_seeds,
        greedy=cfg.greedy,
        batch_size=cfg.batch_size,
        max_total_length=cfg.max_total_length,
    )
    write_report(report, run.directory / "eval")
    del model  # one model at a time
    gc.collect()
    return report_to_json(report)["models"][run.cell.name]


def seed_scores(evaluation: dict[str, Any], metric: str = METRIC) -> dict[str, float]:
    """A run's score per suite and Avg.: the mean over sampling seeds (Avg.: over suites too)."""
    scores = {suite: s[metric]["mean"] for suite, s in evaluation["suites"].items()}
    scores[AVG] = evaluation[AVG][metric]["mean"]
    return scores


def execute_run(grid: Grid, run: PlannedRun) -> dict[str, Any]:
    """Train (or continue) and evaluate one run; its result (rank 0 writes result.json).
    A ``{"preempted": ...}`` summary comes back unchanged when the run was stopped."""
    from pocl_ds import distributed
    from pocl_ds.trainer import train

    started = time.perf_counter()
    summary = on_rank0(trained_summary, run)
    if summary is None:
        summary = train(run.config, resume="auto")
        if summary.get("preempted"):
            return summary
    evaluation = evaluate_run(grid, run)
    result = {
        "cell": run.cell.name,
        "training_seed": run.seed,
        "run_dir": str(run.directory),
        "split": grid.split,
        "suites": grid.suites,
        "sampling_seeds": list(grid.sampling_seeds),
        "score": seed_scores(evaluation),
        "eval": evaluation,
        "train": {
            key: summary.get(key)
            for key in ("method", "steps", "best_val_rouge_l", "wall_s", "difficulty_spearman")
        },
        "run_s": time.perf_counter() - started,
        "config": run.config.to_dict(),
    }
    if distributed.is_main_process():
        atomic.write_text(run.directory / RESULT_JSON, json.dumps(result, indent=2) + "\n")
    distributed.barrier()
    return result


# ----------------------------------------------------------------------------- the results


def _column_label(column: str) -> str:
    return "Avg." if column == AVG else column


def summarize(grid: Grid, results: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """The results.json document: settings, every run, then per cell the mean ± std over
    training seeds and the paired difference to its baseline, per suite and Avg."""
    from pocl_ds.stats import PAIRED_INTERVAL, mean_std, paired_difference

    columns = [*grid.suites, AVG]
    per_seed = {
        cell.name: {
            column: {
                seed: results[cell.name, seed]["score"][column]
                for seed in grid.training_seeds
                if (cell.name, seed) in results
            }
            for column in columns
        }
        for cell in grid.cells
    }
    cells = {}
    for cell in grid.cells:
        scores = {}
        for column in columns:
            values = per_seed[cell.name][column]
            mean, std = mean_std(list(values.values())) if values else (None, None)
            scores[column] = {"per_seed": values, "mean": mean, "std": std}
        vs = None  # the grid's baseline cell is not compared with itself
        if cell.baseline != cell.name:
            vs = {
                column: paired_difference(
                    per_seed[cell.name][column], per_seed[cell.baseline][column]
                )
                for column in columns
            }
        cells[cell.name] = {
            "n": len(per_seed[cell.name][AVG]),
            "baseline": cell.baseline,
            METRIC: scores,
            "vs_baseline": vs,
        }
    comparisons = [
        {
            "cell": cell,
            "versus": other,
            "difference": {
                column: paired_difference(per_seed[cell][column], per_seed[other][column])
                for column in columns
            },
        }
        for cell, other in grid.comparisons
    ]
    total = len(grid.cells) * len(grid.training_seeds)
    return {
        "grid": str(grid.path),
        "purpose": grid.purpose,
        "split": grid.split,
        "metric": "ROUGE-L F x 100",
        "suites": grid.suites,
        "training_seeds": list(grid.training_seeds),
        "sampling_seeds": list(grid.sampling_seeds),
        "baseline": grid.baseline,
        "finished_runs": len(results),
        "total_runs": total,
        "how": {
            "seed_score": "per training seed: the mean over sampling seeds (avg: and over suites)",
            "std": "sample standard deviation (ddof = 1) over training seeds; null for one seed",
            "interval": f"{PAIRED_INTERVAL}: Student t on the per-seed differences cell - "
            "baseline over the training seeds both have; null with fewer than 2 (see why)",
        },
        "runs": [
            {k: v for k, v in results[key].items() if k != "config"}
            for key in sorted(results, key=lambda k: (_cell_index(grid, k[0]), k[1]))
        ],
        "cells": cells,
        "comparisons": comparisons,
    }


def _cell_index(grid: Grid, name: str) -> int:
    return [c.name for c in grid.cells].index(name)


def _mean_std_text(score: dict[str, Any]) -> str:
    if score["mean"] is None:
        return "–"
    std = "n/a" if score["std"] is None else f"{score['std']:.2f}"
    return f"{score['mean']:.2f} ± {std}"


def _difference_text(diff: dict[str, Any], versus: str) -> str:
    if diff["mean"] is None:
        return f"– ({diff['why']})"
    if diff["low"] is None:
        return f"{diff['mean']:+.2f} [n/a: {diff['why']}] vs {versus}"
    return f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}] vs {versus}"


def results_markdown(document: dict[str, Any]) -> str:
    split = {
        "valid": "the validation split (purpose: select — for choosing settings, not a test "
        "result)",
        "test": "test data (purpose: report — settings fixed beforehand)",
    }[document["split"]]
    suites = [s for s in document["suites"]]
    columns = [*suites, AVG] if len(suites) > 1 else [AVG]
    header = [_column_label(c) if len(suites) > 1 else "ROUGE-L" for c in columns]
    lines = [
        f"# {Path(document['grid']).stem}: ROUGE-L (×100) on {split}",
        "",
        f"Grid `{document['grid']}`; suites: "
        + ", ".join(f"{name} ({source})" for name, source in document["suites"].items())
        + f". Training seeds {' '.join(map(str, document['training_seeds']))}; each seed's "
        f"score is its mean over sampling seeds {' '.join(map(str, document['sampling_seeds']))}"
        + (" and over the suites (Avg.)" if len(suites) > 1 else "")
        + ". ± is the sample std (ddof = 1) over training seeds; Δ is the mean paired "
        "difference to the baseline over training seeds with its paired t 95 % interval. "
        f"{document['finished_runs']} of {document['total_runs']} runs finished.",
        "",
        "| cell | n seeds | " + " | ".join(header) + " | Δ vs baseline [95 % CI] |",
        "|---|---:|" + "---:|" * len(columns) + "---|",
    ]
    for name, cell in document["cells"].items():
        values = " | ".join(_mean_std_text(cell[METRIC][c]) for c in columns)
        versus = (
            "baseline"
            if cell["baseline"] == name
            else _difference_text(cell["vs_baseline"][AVG], cell["baseline"])
        )
        lines.append(f"| {name} | {cell['n']} | {values} | {versus} |")
    if document.get("comparisons"):
        lines += [
            "",
            "Other paired differences (the grid's `comparisons`), same interval:",
            "",
            "| cell | Δ [95 % CI] |",
            "|---|---|",
            *(
                f"| {c['cell']} | {_difference_text(c['difference'][AVG], c['versus'])} |"
                for c in document["comparisons"]
            ),
        ]
    return "\n".join(lines) + "\n"


def write_results(grid: Grid, output: Path, results: dict[tuple[str, int], dict]) -> None:
    """Rank 0: results.json, results.md and results.png from the finished runs so far."""
    from pocl_ds.plots import plot_cell_scores

    document = summarize(grid, results)
    atomic.write_text(output / "results.json", json.dumps(document, indent=2) + "\n")
    atomic.write_text(output / "results.md", results_markdown(document))
    scores = {
        name: list(cell[METRIC][AVG]["per_seed"].values())
        for name, cell in document["cells"].items()
        if cell[METRIC][AVG]["per_seed"]
    }
    if scores:
        split = "validation" if grid.split == "valid" else "test"
        plot_cell_scores(
            scores,
            output / "results.png",
            baseline=grid.baseline,
            ylabel=f"{split} ROUGE-L, mean ± sample std over training seeds",
            title=f"{grid.name} ({grid.purpose}: {split})",
        )


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grid", help="a grid file, e.g. launch/configs/experiments/main.yaml")
    parser.add_argument(
        "--output", default=None, help="default: runs/experiments/<grid> (quick: <grid>-quick)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test size: the first 2 training seeds, the first sampling seed and the "
        "grid's quick overrides",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def relaunch_under_deepspeed(argv: list[str]) -> None:
    """Replace this plain-python process by the DeepSpeed launcher running this script on
    ``RANKS`` ranks (same pid, so a kill of this process group still reaches every rank)."""
    with socket.socket() as sock:  # a free port: other jobs on the machine may hold 29500
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        f"--num_gpus={RANKS}",
        f"--master_port={port}",
        str(Path(__file__).resolve()),
        *argv,
    ]
    sys.stderr.write(f"experiment: re-launching on {RANKS} ranks: {' '.join(command)}\n")
    sys.stderr.flush()
    os.execv(sys.executable, command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    grid = load_grid(args.grid)  # before torch and the launcher: a bad grid fails at once
    if args.quick:
        grid = grid.quick()
    output = Path(args.output or f"runs/experiments/{grid.name}{'-quick' if args.quick else ''}")

    from pocl_ds import distributed

    if distributed.detect_launcher() == "none":
        relaunch_under_deepspeed([a for a in argv if not a.startswith("--local")])

    from pocl_ds import telemetry

    distributed.share_cores()
    info = distributed.init_distributed()
    telemetry.setup_logging(info.rank)
    logger = telemetry.get_logger("experiment")
    runs = plan_runs(grid, output)
    if distributed.is_main_process():
        for name, source in grid.suites.items():
            if source not in OWN_SPLITS:  # a missing suite file fails before any training
                try:
                    resolve_suite(source)
                except PoclError as err:
                    raise PoclError(f"{grid.path}: suites.{name}: {err}") from None
    logger.info(
        "experiment %s: %d cells x %d training seeds = %d runs into %s (purpose: %s, %s split)",
        grid.name,
        len(grid.cells),
        len(grid.training_seeds),
        len(runs),
        output,
        grid.purpose,
        grid.split,
    )
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for number, run in enumerate(runs, start=1):
        where = f"run {number}/{len(runs)} {run.label}"
        result = on_rank0(finished_result, grid, run)
        if result is not None:
            logger.info("%s: skipped (finished before): ROUGE-L %.2f", where, result["score"][AVG])
        else:
            logger.info("%s: started (%s)", where, run.directory)
            result = execute_run(grid, run)
            if result.get("preempted"):
                logger.warning("%s: stopped; run the same command again to continue", where)
                return EXIT_CODE_AFTER[result["signal"]]
            logger.info(
                "%s: finished: ROUGE-L %.2f (mean over sampling seeds%s) in %.1f s",
                where,
                result["score"][AVG],
                " and suites" if len(grid.suites) > 1 else "",
                result["run_s"],
            )
        results[run.cell.name, run.seed] = result
        if distributed.is_main_process():
            write_results(grid, output, results)
        distributed.barrier()
    if distributed.is_main_process():
        print(results_markdown(summarize(grid, results)), flush=True)
        logger.info("experiment %s: results in %s/results.{json,md,png}", grid.name, output)
    return 0


if __name__ == "__main__":
    run_main(main)
