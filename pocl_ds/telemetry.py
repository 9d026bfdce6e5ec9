"""What a run tells its user: rank-0 logging, progress bars, metrics.jsonl (+ TensorBoard), plots.

Only rank 0 speaks at INFO and writes files; other ranks log warnings and errors (tagged with
their rank) and keep their progress bars silent. ``metrics.jsonl`` is the run's record of
truth: one JSON object per line, flushed as written, so a crash loses nothing and the plots
can be redrawn from it at any time. TensorBoard event files are an optional extra view.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from tqdm import tqdm

from pocl_ds.distributed import rank as current_rank
from pocl_ds.errors import PoclError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

T = TypeVar("T")

PACKAGE_LOGGER = "pocl_ds"
METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"
# A refresh every half second reads well on a terminal; in a CI log every refresh is a line.
TTY_REFRESH_S = 0.5
LOG_REFRESH_S = 30.0


# ----------------------------------------------------------------------------- logging


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` inside the ``pocl_ds`` hierarchy.

    Library modules pass ``__name__``; a launch script's name (``"__main__"``, ``"bench"``) is
    nested under ``pocl_ds`` so the script obeys the same rank rules as the library.
    """
    if name == PACKAGE_LOGGER or name.startswith(PACKAGE_LOGGER + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{PACKAGE_LOGGER}.{name}")


class _PoclHandler(logging.StreamHandler):
    """Marks the handler this module installed, so a second setup replaces it."""


def setup_logging(rank: int, level: int | str = logging.INFO) -> None:
    """Configure logging once per process (calling again replaces the previous setup).

    Rank 0 logs ``pocl_ds`` messages at ``level``; other ranks only at WARNING or above, each
    line prefixed with ``[rank N]``. The handler sits on the root logger, so third-party
    warnings share the format, while their INFO chatter stays off (the root level is untouched).
    """
    numeric_level = logging.getLevelName(level) if isinstance(level, str) else level
    if not isinstance(numeric_level, int):
        raise PoclError(f"logging level {level!r} is unknown; use DEBUG, INFO, WARNING or ERROR")
    rank_tag = "" if rank == 0 else f"[rank {rank}] "
    handler = _PoclHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s {rank_tag}%(levelname)s %(name)s: %(message)s", datefmt=LOG_DATEFMT
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _PoclHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    package_level = numeric_level if rank == 0 else max(numeric_level, logging.WARNING)
    logging.getLogger(PACKAGE_LOGGER).setLevel(package_level)


# ----------------------------------------------------------------------------- progress


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    rank: int | None = None,
) -> tqdm:
    """A tqdm bar (rate and ETA) on rank 0, a silent pass-through elsewhere.

    Iterate it like ``iterable`` or, with ``iterable=None``, call ``.update(n)`` yourself; close
    it (or use it as a context manager) when done. ``rank`` defaults to this process's rank.
    """
    rank = current_rank() if rank is None else rank
    # tqdm's own default disables bars whenever stderr is not a terminal; rank 0 keeps its bar
    # in CI logs too, refreshed rarely enough that the log stays short.
    refresh_s = TTY_REFRESH_S if sys.stderr.isatty() else LOG_REFRESH_S
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=rank != 0,
        file=sys.stderr,
        mininterval=refresh_s,
        dynamic_ncols=True,
    )


# ----------------------------------------------------------------------------- metrics


def _json_default(value: Any) -> Any:
    """Let records carry 0-d tensors and numpy scalars without the caller converting them."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metrics value {value!r} of type {type(value).__name__} is not JSON")


def _parse_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of ``path`` in order; a torn last line (a crash mid-write) is dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("%s:%d: dropping a partly written last line", path, number)
                break
            raise PoclError(
                f"{path}:{number}: not a JSON object ({err.msg}); fix or delete that line"
            ) from None
        if not isinstance(record, dict):
            raise PoclError(f"{path}:{number}: expected a JSON object, found {line[:40]!r}")
        records.append(record)
    return records


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (or of the run directory holding one), in order."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILENAME
    if not path.is_file():
        raise PoclError(f"{path}: no metrics file; pass a run directory or its {METRICS_FILENAME}")
    return _parse_metrics(path)


class MetricsWriter:
    """Appends one JSON object per :meth:`log` to ``<output_dir>/metrics.jsonl``.

    With ``tensorboard=True`` and the tensorboard package installed, numeric fields of records
    that carry a ``step`` also go to ``<output_dir>/tensorboard`` as scalars tagged by field
    name. ``enabled`` defaults to "this process is rank 0"; a disabled writer touches no file.
    On resume, call :meth:`truncate_after` with the checkpoint's step before logging again.
    """

    def __init__(
        self, output_dir: str | Path, *, enabled: bool | None = None, tensorboard: bool = True
    ) -> None:
        self.enabled = current_rank() == 0 if enabled is None else enabled
        self.path = Path(output_dir) / METRICS_FILENAME
        self.tensorboard_dir = Path(output_dir) / TENSORBOARD_DIRNAME
        self._use_tensorboard = tensorboard
        self._file: IO[str] | None = None
        self._tensorboard: Any = None
        self._purge_step: int | None = None

    def log(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (JSON-able values; tensors and numpy scalars are converted)."""
        if not self.enabled:
            return
        line = json.dumps(dict(record), default=_json_default)
        if self._file is None:
            self._file = self._open_for_append()
        self._file.write(line + "\n")
        # flush, not fsync: a crashed process loses nothing, and a step pays no disk sync.
        self._file.flush()
        if "step" in record and self._use_tensorboard:
            self._log_scalars(json.loads(line))

    def truncate_after(self, step: int) -> int:
        """Drop records whose ``step`` is greater than ``step``; return how many were dropped.

        A resumed run repeats the steps after its checkpoint, so their old records would
        otherwise appear twice. TensorBoard events past ``step`` are purged the same way.
        """
        if not self.enabled:
            return 0
        self.close()
        self._purge_step = step + 1
        if not self.path.is_file():
            return 0
        records = _parse_metrics(self.path)
        kept = [r for r in records if not (isinstance(r.get("step"), int) and r["step"] > step)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        dropped = len(records) - len(kept)
        if dropped:
            logger.info("%s: dropped %d records after step %d", self.path, dropped, step)
        return dropped

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open_for_append(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            # A crash mid-write leaves a line without its newline; appending after it would
            # glue the next record onto it, so cut the file back to its last whole line.
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with self.path.open("r+b") as raw:
                    raw.truncate(data.rfind(b"\n") + 1)
        return self.path.open("a", encoding="utf-8")

    def _log_scalars(self, record: dict[str, Any]) -> None:
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                logger.debug("tensorboard not installed, writing metrics.jsonl only (%s)", err)
                self._use_tensorboard = False
                return
            self._tensorboard = SummaryWriter(
                str(self.tensorboard_dir), purge_step=self._purge_step
            )
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self._tensorboard.add_scalar(key, value, global_step=step)


# ----------------------------------------------------------------------------- statistics


def _average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson correlation of average ranks (ties handled); NaN if undefined."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rank_x, rank_y = _average_ranks(x), _average_ranks(y)
    mean = (len(x) + 1) / 2  # the mean of average ranks is always (n + 1) / 2
    cov = sum((a - mean) * (b - mean) for a, b in zip(rank_x, rank_y, strict=True))
    var_x = sum((a - mean) ** 2 for a in rank_x)
    var_y = sum((b - mean) ** 2 for b in rank_y)
    if var_x == 0 or var_y == 0:
        return math.nan
    return cov / math.sqrt(var_x * var_y)


# ----------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Figure:
    """A figure bound to the Agg canvas directly: no pyplot, so no global backend or state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _group(keys: Sequence[Any], values: Sequence[float]) -> dict[Any, list[float]]:
    """``values`` grouped by ``keys``, groups in ascending key order."""
    groups: dict[Any, list[float]] = {}
    for key, value in zip(keys, values, strict=True):
        groups.setdefault(key, []).append(value)
    return dict(sorted(groups.items()))


def _boxplot(axis: Any, groups: Mapping[Any, Sequence[float]]) -> None:
    """One box (mean marked) per group, labelled by its key; nothing to draw for no groups."""
    if not groups:
        return
    positions = list(range(1, len(groups) + 1))
    axis.boxplot(list(groups.values()), positions=positions, showmeans=True)
    axis.set_xticks(positions, [str(key) for key in groups])


def plot_curriculum_timeline(
    metrics: Sequence[Mapping[str, Any]], stages: Sequence[Mapping[str, Any]], path: str | Path
) -> Path:
    """Training loss, validation ROUGE-L and τ/α per stage against optimizer step; write a PNG.

    ``metrics``: records of ``metrics.jsonl`` — training records carry ``step``, ``stage`` and
    ``loss``; validation records ``step`` and ``val_rouge_l`` (``val_loss`` is drawn too).
    ``stages``: one mapping per stage with ``stage``, ``temperature`` and ``sft_weight``, and
    optionally ``start_step`` (default: the first training step of that stage) and
    ``num_samples`` (shown in the stage label). Returns ``path``.
    """
    train = sorted((r for r in metrics if "loss" in r and "step" in r), key=lambda r: r["step"])
    val = sorted((r for r in metrics if "val_rouge_l" in r), key=lambda r: r["step"])
    first_step_of_stage: dict[Any, int] = {}
    for record in train:
        first_step_of_stage.setdefault(record.get("stage"), record["step"])
    starts = [s.get("start_step", first_step_of_stage.get(s["stage"])) for s in stages]
    steps = [r["step"] for r in metrics if "step" in r] + [s for s in starts if s is not None]
    last_step = max(steps, default=1)

    figure = _new_figure(9, 7)
    ax_loss, ax_rouge, ax_schedule = figure.subplots(3, 1, sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    val_loss = [r for r in metrics if "val_loss" in r]
    if val_loss:
        ax_loss.plot(
            [r["step"] for r in val_loss],
            [r["val_loss"] for r in val_loss],
            "o--",
            ms=4,
            label="validation loss",
        )
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right", fontsize="small")
    ax_rouge.plot([r["step"] for r in val], [r["val_rouge_l"] for r in val], "o-", color="C2")
    ax_rouge.set_ylabel("validation ROUGE-L")

    known = [(start, s) for start, s in zip(starts, stages, strict=True) if start is not None]
    edges = [start for start, _ in known] + [last_step]
    temperature = [s["temperature"] for _, s in known]
    sft_weight = [s["sft_weight"] for _, s in known]
    ax_schedule.stairs(temperature, edges, color="C3", lw=2, baseline=None, label="τ")
    ax_schedule.set_ylabel("τ (temperature)", color="C3")
    ax_alpha = ax_schedule.twinx()
    ax_alpha.stairs(sft_weight, edges, color="C4", lw=2, ls="--", baseline=None, label="α")
    ax_alpha.set_ylabel("α (SFT weight)", color="C4")
    ax_schedule.set_xlabel("optimizer step")

    for start, stage in known:
        for axis in (ax_loss, ax_rouge, ax_schedule):
            axis.axvline(start, color="grey", ls=":", lw=1)
        label = f"stage {stage['stage']}"
        if "num_samples" in stage:
            label += f"\n{stage['num_samples']} samples"
        ax_loss.text(
            start, 1.02, label, transform=ax_loss.get_xaxis_transform(), va="bottom", fontsize=8
        )
    figure.suptitle("Curriculum timeline")
    return _save(figure, path)


def plot_difficulty(
    records: Sequence[Mapping[str, Any]],
    path: str | Path,
    known_difficulty: Mapping[int, int] | None = None,
) -> Path:
    """Fused difficulty scores per subset and, if given, measured rank vs known difficulty.

    ``records``: one per scored sample with ``index`` (sample index), ``score`` (the value the
    samples were ranked by), ``rank`` (1 = easiest, the curriculum order) and ``subset``.
    ``known_difficulty``: sample index -> true difficulty level (synthetic tasks); the second
    panel's title gives Spearman's ρ between level and measured rank. Returns ``path``.
    """
    panels = 2 if known_difficulty else 1
    figure = _new_figure(5.5 * panels, 4.5)
    axes = figure.subplots(1, panels, squeeze=False)[0]

    by_subset = _group([r["subset"] for r in records], [r["score"] for r in records])
    _boxplot(axes[0], by_subset)
    axes[0].set_xlabel("subset (easiest first)")
    axes[0].set_ylabel("score")
    axes[0].set_title(f"Scores per subset (N = {len(records)})")

    if known_difficulty:
        scored = [r for r in records if r["index"] in known_difficulty]
        levels = [known_difficulty[r["index"]] for r in scored]
        ranks = [r["rank"] for r in scored]
        _boxplot(axes[1], _group(levels, ranks))
        axes[1].set_xlabel("known difficulty")
        axes[1].set_ylabel("measured rank (1 = easiest)")
        axes[1].set_title(f"Measured vs known: Spearman ρ = {spearman(levels, ranks):.3f}")
    return _save(figure, path)


def plot_method_scores(results: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Mean ROUGE-L per method with the standard deviation over seeds as error bars.

    ``results``: method name -> one ROUGE-L per seed (bars in the mapping's order; each seed
    is also drawn as a dot). The spread is the population std (0 for a single seed).
    """
    names = list(results)
    means = [sum(v) / len(v) for v in results.values()]
    stds = [
        math.sqrt(sum((x - m) ** 2 for x in v) / len(v))
        for v, m in zip(results.values(), means, strict=True)
    ]
    figure = _new_figure(max(4.0, 1.1 * len(names) + 1.5), 4.5)
    axis = figure.subplots()
    positions = list(range(len(names)))
    axis.bar(positions, means, yerr=stds, capsize=4, color="C0", alpha=0.8)
    for position, mean, std, values in zip(positions, means, stds, results.values(), strict=True):
        axis.plot([position] * len(values), values, "k.", ms=4)
        # above the error bar and the highest seed, where the label collides with neither
        axis.annotate(
            f"{mean:.2f}",
            (position, max(mean + std, *values)),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            fontsize="small",
        )
    axis.set_xticks(positions, names, rotation=30, ha="right")
    axis.set_ylabel("ROUGE-L")
    seeds = sorted({len(v) for v in results.values()})
    axis.set_title(f"ROUGE-L per method (mean ± std over {'/'.join(map(str, seeds))} seeds)")
    return _save(figure, path)


# ----------------------------------------------------------------------------- summary


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def run_summary(
    *,
    wall_time_s: float,
    tokens_per_s: float | None,
    best_val_rouge_l: float | None,
    best_step: int | None = None,
    outputs: Mapping[str, str | Path],
) -> str:
    """The one-screen end-of-run report the launcher logs (values printed as given)."""
    width = max([len(name) for name in outputs] + [16]) + 2
    rouge = "n/a" if best_val_rouge_l is None else f"{best_val_rouge_l:.4g}"
    if best_val_rouge_l is not None and best_step is not None:
        rouge += f" (step {best_step})"
    lines = [
        " pocl_ds run summary ".center(60, "="),
        f"{'wall time':<{width}}{_format_duration(wall_time_s)} ({wall_time_s:.1f} s)",
        f"{'tokens/s':<{width}}{'n/a' if tokens_per_s is None else f'{tokens_per_s:,.1f}'}",
        f"{'best val ROUGE-L':<{width}}{rouge}",
        "outputs:",
        *(f"  {name:<{width - 2}}{location}" for name, location in outputs.items()),
        "=" * 60,
    ]
    return "\n".join(lines)
