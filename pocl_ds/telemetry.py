"""What a run tells its user while it runs: rank-0 logging, progress bars, metrics.jsonl
(+ TensorBoard) and the end-of-run summary; figures are drawn by ``plots``.

Only rank 0 speaks at INFO and writes files; other ranks log warnings and errors (tagged with
their rank) and keep their progress bars silent. ``metrics.jsonl`` is the run's record of
truth: one JSON object per line, flushed as written, so a crash loses nothing and the plots
can be redrawn from it at any time. TensorBoard event files are an optional extra view.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from tqdm import tqdm

from pocl_ds import atomic
from pocl_ds.distributed import rank as current_rank
from pocl_ds.errors import PoclError

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
    disable: bool = False,
) -> tqdm:
    """A tqdm bar (rate and ETA) on rank 0, a silent pass-through elsewhere (and everywhere
    with ``disable``).

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
        disable=disable or rank != 0,
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
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
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
