import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

import bench_kernel  # noqa: E402

from pocl_ds.divergence import CPU_ELEMENTWISE_THREADS  # noqa: E402


def _row(kind: str, impl: str, median_s: float, floor_s: float, x_floor: str, peak: float):
    return {
        "n": "4096", "kind": kind, "impl": impl, "status": "ok", "median_s": str(median_s),
        "floor_s": str(floor_s), "x_floor": x_floor, "peak_extra_mb": str(peak),
    }  # fmt: skip


def test_verdicts_take_the_paired_ratio_and_each_kinds_target():
    rows = [
        _row("jsd", "naive", 30.0, 8.0, "3.7", 8000.0),
        # medians 9.6 / 8.0 = 1.20 would fail jsd's 1.10; the paired median passes it
        _row("jsd", "fused", 9.6, 8.0, "1.05", 600.0),
        _row("fkl", "fused_labels", 9.0, 8.0, "", 400.0),  # an older row: 1.125 of the medians
        _row("fkl", "naive", 25.0, 8.0, "", 4000.0),
        _row("fkl", "fused", 10.0, 8.0, "1.25", 900.0),
    ]
    assert bench_kernel.verdicts(rows) == [
        "PASS N=4096 jsd fused: 1.05x floor (target <= 1.10x)",
        "PASS N=4096 jsd fused: peak 0.075 of naive (target <= 0.125)",
        "PASS N=4096 fkl fused_labels: 1.12x floor (target <= 1.20x)",
        "PASS N=4096 fkl fused_labels: peak 0.100 of naive (target <= 0.125)",
        "FAIL N=4096 fkl fused: 1.25x floor (target <= 1.20x)",
        "FAIL N=4096 fkl fused: peak 0.225 of naive (target <= 0.125)",
    ]


def test_eager_blocks_is_recorded_with_every_case():
    for flags, native in (([], True), (["--eager-blocks"], False)):
        cases = bench_kernel._cases(bench_kernel.parse_args(["--quick", *flags]), None)
        assert cases and all(case["native_rows"] is native for case in cases)


@pytest.mark.slow
def test_quick_run_writes_rows_and_a_table_with_its_verdicts(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "bench.py"), "kernel", "--quick", "--repeats", "2",
         "--impls", "floor", "naive", "fused", "fused_labels", "--output-dir", str(tmp_path),
         "--busy-cores", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "kernel.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["kind"], r["impl"]) for r in rows] == [
        ("-", "floor"), ("jsd", "naive"), ("jsd", "fused"), ("jsd", "fused_labels"),
    ]  # fmt: skip
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    for row in rows:
        assert float(row["median_s"]) > 0 and float(row["floor_s"]) > 0
        assert float(row["x_floor"]) > 0 and float(row["min_s"]) <= float(row["median_s"])
        # the library's setting, recorded with the row it timed
        assert row["elementwise_threads"] == str(CPU_ELEMENTWISE_THREADS)
        assert row["busy_cores"] == "1"
        assert row["native_rows"] == "True"  # built here: an AVX2 CPU with a compiler
    assert not _spinners(), "the busy-looping processes outlive the run"
    table = (tmp_path / "kernel.md").read_text()
    assert "native CPU rows for jsd on" in table
    lines = bench_kernel.verdicts(rows)
    assert len(lines) == 4  # time and memory, for fused and for fused_labels
    assert all(line in table and line in done.stdout for line in lines)


def _spinners() -> list[str]:
    """Processes running the benchmark's busy loop."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"while True: pass" in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:  # gone meanwhile
            continue
    return found


def test_op_costs_prints_each_op_per_element():
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "bench.py"), "kernel", "--op-costs", "--vocab", "512"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    costs = {
        line.rsplit(None, 2)[0].strip(): float(line.split()[-2])
        for line in done.stdout.splitlines()
        if line.endswith("ns/element")
    }
    assert set(costs) >= {"exp", "expm1", "log1p", "div", "mul"}
    assert all(cost > 0 for cost in costs.values())
