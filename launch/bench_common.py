"""What every benchmark shares: provenance columns, appending CSV rows, the README tables.

Benchmarks are data: each run appends rows (machine, versions, commit, sizes, medians) to
``benchmarks/<name>.csv`` and writes the table of that run to ``benchmarks/<name>.md``;
``python launch/bench.py readme`` copies those tables into README.md between
``<!-- bench:<name> -->`` markers, so no number in the README is typed by hand.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"


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
    """Append ``rows`` to ``<directory>/<name>.csv`` (header written once)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / f"{name}.csv"
    new_file = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    return path


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


def refresh_readme(readme: Path = REPO / "README.md") -> list[str]:
    """Replace each ``<!-- bench:NAME -->…<!-- /bench:NAME -->`` block by benchmarks/NAME.md."""
    text = readme.read_text(encoding="utf-8")
    updated = []

    def fill(match: re.Match) -> str:
        name = match.group(1)
        source = BENCH_DIR / f"{name}.md"
        if not source.is_file():
            return match.group(0)
        updated.append(name)
        body = source.read_text(encoding="utf-8").strip()
        return f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->"

    text = re.sub(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->", fill, text, flags=re.S)
    readme.write_text(text, encoding="utf-8")
    return updated
