"""Every figure pocl_ds draws: the curriculum timeline, the difficulty ranking, method scores.

Figures are bound to the Agg canvas directly (no pyplot), so drawing needs no display and keeps
no global state; each function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pocl_ds.stats import spearman

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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


def difficulty_records(result: Any) -> list[dict[str, Any]]:
    """A ``DifficultyResult``'s samples as plot records: index, fused score, rank, subset."""
    position = {index: rank for rank, index in enumerate(result.order, start=1)}
    return [
        {"index": r.index, "score": r.fused, "rank": position[r.index], "subset": r.subset}
        for r in result.records
    ]


def plot_difficulty_result(
    result: Any, known_difficulty: Mapping[int, int], path: str | Path
) -> tuple[Path, float | None]:
    """``plot_difficulty`` of a ``DifficultyResult``; also returns Spearman's ρ of measured
    rank against the known level (None when no sample has one)."""
    records = difficulty_records(result)
    drawn = plot_difficulty(records, path, dict(known_difficulty) or None)
    return drawn, difficulty_spearman(records, known_difficulty)


def difficulty_spearman(
    records: Sequence[Mapping[str, Any]], known_difficulty: Mapping[int, int]
) -> float | None:
    """Spearman's ρ of measured rank (1 = easiest) against the known level; None if unknown."""
    scored = [r for r in records if r["index"] in known_difficulty]
    if not scored:
        return None
    return spearman([known_difficulty[r["index"]] for r in scored], [r["rank"] for r in scored])


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


def plot_cell_scores(
    scores: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    baseline: str | None = None,
    ylabel: str = "ROUGE-L",
    title: str = "",
) -> Path:
    """An experiment grid's cells: the mean over training seeds with the *sample* std
    (ddof = 1, none for a single seed) as error bars, each seed's score as a dot, and the
    baseline cell's mean as a dashed line. ``scores``: cell -> one score per training seed."""
    from pocl_ds.stats import mean_std

    names = list(scores)
    summaries = [mean_std(list(v)) for v in scores.values()]
    means = [mean for mean, _ in summaries]
    stds = [0.0 if std is None else std for _, std in summaries]
    figure = _new_figure(max(5.0, 1.0 * len(names) + 1.5), 4.5)
    axis = figure.subplots()
    positions = list(range(len(names)))
    colors = ["C1" if name == baseline else "C0" for name in names]
    axis.bar(positions, means, yerr=stds, capsize=4, color=colors, alpha=0.8)
    for position, values in zip(positions, scores.values(), strict=True):
        axis.plot([position] * len(values), list(values), "k.", ms=4)
    if baseline in scores:
        axis.axhline(means[names.index(baseline)], color="C1", ls="--", lw=1)
    axis.set_xticks(positions, names, rotation=30, ha="right")
    axis.set_ylabel(ylabel)
    axis.set_title(title or f"{ylabel} per cell (mean ± sample std over training seeds)")
    return _save(figure, path)
