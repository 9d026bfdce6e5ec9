"""launch/bench_peers.py: its verdicts, and (with the bench extra installed) a quick run where
TRL's and Liger's losses must equal pocl_ds's on the same weights and batches."""

import csv
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "launch"))

import bench_peers  # noqa: E402


def row(impl: str, tokens: float, peak: float, kind: str = "fkl", status: str = "ok") -> dict:
    return {"vocab": "50257", "kind": kind, "impl": impl, "tokens_per_s": str(tokens),
            "peak_extra_mb": str(peak), "status": status}  # fmt: skip


def test_verdicts_compare_with_the_fastest_and_the_lightest_peer():
    rows = [row("pocl_ds", 100, 50), row("trl", 40, 400), row("liger", 120, 60)]
    speed, memory = bench_peers.verdicts(rows)
    assert speed.startswith("FAIL") and "0.83x" in speed and "(liger;" in speed
    assert memory.startswith("PASS") and "0.83x" in memory and "(liger;" in memory
    # a peer that did not run is no comparison; pocl_ds missing is a FAIL, not a pass
    rows = [row("pocl_ds", 100, 50), row("trl", 400, 10, status="failed (exit 1)")]
    assert all(v.startswith("FAIL") for v in bench_peers.verdicts(rows))
    assert bench_peers.verdicts([row("trl", 1, 1)])[0].startswith("FAIL")


@pytest.mark.slow
@pytest.mark.skipif(
    not all(find_spec(m) for m in ("trl", "liger_kernel", "torchtune")),
    reason="the peers are the optional bench extra: pip install -e .[bench]",
)
def test_quick_run_puts_every_peer_on_the_same_step(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "bench.py"), "peers", "--quick",
         "--output-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "peers.csv").open(newline="") as handle:
        rows = {r["impl"]: r for r in csv.DictReader(handle)}
    assert list(rows) == list(bench_peers.IMPLS)
    assert all(r["status"] == "ok" for r in rows.values()), rows
    ours = float(rows["pocl_ds"]["first_loss"])
    # forward KL in TRL's and Liger's generalized JSD (β = 0): the same number as pocl_ds's fkl
    for impl in ("trl", "liger", "liger_compiled"):
        assert float(rows[impl]["first_loss"]) == pytest.approx(ours, rel=1e-4), impl
    # torchtune's "forward KL" is the cross-entropy −Σ p log q: the KL plus the teacher's entropy
    assert float(rows["torchtune"]["first_loss"]) > ours
    assert sum(line.startswith(("PASS", "FAIL")) for line in done.stdout.splitlines()) == 2
