"""What every benchmark shares: provenance columns, appending CSV rows, the README tables.

Benchmarks are data: each run appends rows (machine, versions, commit, sizes, medians) to
``benchmarks/<name>.csv`` and writes the table of that run to ``benchmarks/<name>.md``;
``python launch/bench.py readme`` copies those tables into README.md between
``<!-- bench:<name> -->`` markers, so no number in the README is typed by hand.

Each case of a benchmark runs in a fresh process (``run_case_in_subprocess``; ``torchrun`` for
more than one rank), so one case's allocations, compiled kernels and process group never
leak into the next; the case reports its numbers as one tagged JSON line on stdout
(``print_case_result``). Peak memory on CPU is the rise of the resident set's high-water mark
(``reset_peak_rss`` and ``rss_mb``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pocl_ds.errors import PoclError

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
# Prefixes the one stdout line that carries a case's results, among whatever else it prints.
RESULT_TAG = "BENCH_CASE_RESULT "


def commit() -> str:
    """The short commit of the checkout, ``-dirty`` when tracked files changed."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO, capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO, capture_output=True, text=True, timeout=10,
    ).stdout.strip()  # fmt: skip
    return out.stdout.strip() + ("-dirty" if dirty else "")


def machine(device: str = "cpu") -> str:
    """The CPU model and core count, or the GPU's name."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cpus"


def provenance(device: str = "cpu") -> dict[str, str]:
    """Columns every row carries so runs on different machines and commits stay apart."""
    import torch
    import transformers

    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def append_rows(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    fields: Sequence[str],
    directory: str | Path = BENCH_DIR,
) -> Path:
    """Append ``rows`` to ``<directory>/<name>.csv`` (header written once).

    A benchmark that gained columns since the file was started rewrites it once with the
    wider header (earlier rows get those columns empty; a column it dropped is kept), so the
    history stays readable rather than shifting under a header that no longer matches."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / f"{name}.csv"
    fields = list(fields)
    if path.exists():
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header, earlier = list(reader.fieldnames or []), list(reader)
        if header and header != fields:
            fields += [f for f in header if f not in fields]
            with path.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(earlier)
        elif header:
            fields = header
    new_file = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    return path


def latest_run(csv_path: Path) -> list[dict]:
    """The rows of the CSV's most recent run (they share its timestamp)."""
    with Path(csv_path).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise PoclError(f"{csv_path} has no rows; run the benchmark first")
    return [r for r in rows if r["timestamp"] == rows[-1]["timestamp"]]


def publish_latest(name: str, directory: str | Path, markdown: Callable[[list[dict]], str]) -> str:
    """The table of the latest run in ``<directory>/<name>.csv``: written to ``<name>.md``,
    printed and returned."""
    table = markdown(latest_run(existing_csv(Path(directory) / f"{name}.csv")))
    write_table(name, table, directory)
    print(table, flush=True)
    return table


def add_driver_options(parser: Any, *, timeout: float = 900) -> None:
    """The options ``run_benchmark`` reads: seconds per case, where the CSV and table go,
    table only, and the internal one-case switch."""
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per case")
    parser.add_argument("--output-dir", default=str(BENCH_DIR))
    parser.add_argument("--report", action="store_true", help="only rewrite the table")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, as JSON


def run_benchmark(
    argv: list[str] | None,
    *,
    name: str,
    parse_args: Callable[[list[str] | None], Any],
    run_case: Callable[[dict], Mapping[str, Any] | None],
    run_cases: Callable[[Any, Path], None],
    markdown: Callable[[list[dict]], str],
) -> int:
    """The driver of a benchmark whose cases each run in a fresh process: ``--case`` runs one
    case (in that process); otherwise the cases run (unless ``--report``) and the latest run's
    table of ``<output_dir>/<name>.csv`` is published."""
    args = parse_args(argv)
    if args.case:
        return run_requested_case(args.case, run_case)
    if not args.report:
        run_cases(args, Path(args.output_dir))
    publish_latest(name, args.output_dir, markdown)
    return 0


def write_table(name: str, table: str, directory: str | Path = BENCH_DIR) -> Path:
    """Write this run's Markdown table to ``<directory>/<name>.md``."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / f"{name}.md"
    path.write_text(table.rstrip() + "\n", encoding="utf-8")
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def refresh_readme(
    readme: Path = REPO / "README.md", names: Iterable[str] | None = None
) -> list[str]:
    """Replace each ``<!-- bench:NAME -->…<!-- /bench:NAME -->`` block by benchmarks/NAME.md
    (only the blocks of ``names`` when given, so one benchmark's rerun leaves the others)."""
    text = readme.read_text(encoding="utf-8")
    updated = []

    def fill(match: re.Match) -> str:
        name = match.group(1)
        source = BENCH_DIR / f"{name}.md"
        if (names is not None and name not in names) or not source.is_file():
            return match.group(0)
        updated.append(name)
        body = source.read_text(encoding="utf-8").strip()
        return f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->"

    text = re.sub(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->", fill, text, flags=re.S)
    readme.write_text(text, encoding="utf-8")
    return updated


# ----------------------------------------------------------------------------- one case


def rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last ``reset_peak_rss``) of this process."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak_rss() -> bool:
    """Linux resets VmHWM to the current RSS on `5` in clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def print_case_result(result: Mapping[str, Any]) -> None:
    """Hand a case's results to ``run_case_in_subprocess`` (call once, from one rank)."""
    print(RESULT_TAG + json.dumps(dict(result)), flush=True)


def run_requested_case(case: str, run_case: Callable[[dict], Mapping[str, Any] | None]) -> int:
    """The worker side of ``run_case_in_subprocess``: run the JSON ``case`` on this rank and
    hand back the result of the rank that returns one."""
    result = run_case(json.loads(case))
    if result is not None:
        print_case_result(result)
    return 0


def existing_csv(csv_path: Path) -> Path:
    """``--report`` redraws from the CSV alone, so it must be there."""
    if not csv_path.is_file():
        raise PoclError(f"--report: {csv_path} does not exist; run the benchmark first")
    return csv_path


def run_case_in_subprocess(
    script: str | Path,
    spec: Mapping[str, Any],
    *,
    timeout: float,
    ranks: int = 1,
    threads: int = 0,
) -> dict[str, Any]:
    """Run ``script --case JSON(spec)`` in a fresh process (``torchrun --standalone`` with
    ``ranks`` ranks when more than one) and return its ``print_case_result`` numbers with
    ``status`` "ok", or only a ``status`` saying why there are none.

    ``threads``: OpenMP threads per rank (0: the library's default).
    """
    env = dict(os.environ)
    # Every block of >= 1 MiB is mmap'ed and unmapped on free, so RSS follows live tensors.
    env.update(
        MALLOC_MMAP_THRESHOLD_=str(1 << 20),
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        TOKENIZERS_PARALLELISM="false",
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # DeepSpeed's CPU communication op compiles once per machine into this cache (launch/env.sh).
    env.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "pocl_ds" / "torch_extensions")
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [str(Path(script).resolve()), "--case", json.dumps(dict(spec))]
    if ranks > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   *command]  # fmt: skip
    try:
        done = subprocess.run(
            [sys.executable, *command],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f}s"}
    results = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode != 0 or not results:
        tail = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        return {"status": f"failed (exit {done.returncode}): {(tail or ['?'])[-1][:200]}"}
    return {**json.loads(results[-1][len(RESULT_TAG) :]), "status": "ok"}
