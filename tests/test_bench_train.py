import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

import bench_train  # noqa: E402


def _row(model: str, impl: str, steps_per_s: float, peak_mb: float, loss: float) -> dict:
    return {
        "model": model, "zero": "2", "ranks": "1", "impl": impl, "status": "ok",
        "steps_per_s": str(steps_per_s), "peak_extra_mb": str(peak_mb), "first_loss": str(loss),
    }  # fmt: skip


def test_verdicts_name_the_configuration_that_misses_a_target():
    rows = [
        _row("tiny", "fused", 2.0, 100.0, 5.0),
        _row("tiny", "naive", 1.0, 400.0, 5.0),
        _row("small", "fused", 0.5, 300.0, 6.0),
        _row("small", "naive", 1.0, 400.0, 6.1),
    ]
    throughput, memory, loss = bench_train.verdicts(rows)
    assert throughput.startswith("FAIL") and "failing: small ZeRO-2" in throughput
    assert "1/2 configurations" in throughput and "worst 0.50x" in throughput
    assert memory.startswith("FAIL") and "worst 0.75x, small" in memory
    assert loss.startswith("FAIL")
    assert all(line.startswith("PASS") for line in bench_train.verdicts(rows[:2]))


@pytest.mark.slow
def test_quick_run_writes_rows_table_and_plot(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "bench.py"), "train", "--quick",
         "--output-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "train.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["model"], r["impl"], r["zero"], r["ranks"]) for r in rows] == [
        ("tiny", "fused", "2", "1"),
        ("tiny", "naive", "2", "1"),
    ]
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    fused, naive = rows
    for row in rows:
        assert float(row["steps_per_s"]) > 0 and float(row["generate_tokens_per_s"]) > 0
        parts = sum(float(row[k]) for k in bench_train.PHASES[:-1])
        assert parts == pytest.approx(float(row["step_s"]), rel=0.05)
    # The same weights and batches: the fused kernel must reproduce the reference loss, and
    # holding no [tokens x vocab] logits must show in the peak.
    assert float(fused["first_loss"]) == pytest.approx(float(naive["first_loss"]), rel=1e-4)
    assert 0 < float(fused["peak_extra_mb"]) < float(naive["peak_extra_mb"])
    table = (tmp_path / "train.md").read_text()
    assert "| tiny | 2 | 1 | fused |" in table and "| tiny | 2 | 1 | naive |" in table
    assert "first-step loss of fused equals naive" in done.stdout
    assert "fused throughput >= 1.0x naive" in done.stdout
    assert "fused peak memory per rank <= 0.5x naive" in done.stdout
    assert (tmp_path / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
