import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

import bench_common  # noqa: E402
import bench_teacher_cache  # noqa: E402
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


def test_generation_verdict_compares_zero3_with_zero1_of_the_same_configuration():
    def gen_row(model: str, zero: str, rate: float, held: float | None = None) -> dict:
        return {**_row(model, "fused", 1.0, 1.0, 1.0), "zero": zero,
                "generate_tokens_per_s": str(rate),
                "generate_held_tokens_per_s": "" if held is None else str(held)}  # fmt: skip

    rows = [gen_row("tiny", "1", 1000.0), gen_row("tiny", "3", 600.0)]
    # after the one step line (no naive rows here); none for the held column these rows lack
    (line,) = bench_train.verdicts(rows)[1:]
    assert line.startswith("PASS ZeRO-3 generation >= 0.5x") and "worst 0.60x" in line
    assert "one gather per call" in line
    rows += [gen_row("small", "1", 400.0, 500.0), gen_row("small", "3", 100.0, 400.0)]
    rows += [gen_row("big", "3", 1.0, 1.0)]
    per_call, held = bench_train.verdicts(rows)[1:]
    assert per_call.startswith("FAIL") and "1/2 configurations" in per_call
    assert per_call.endswith("failing: small 1 rank(s) fused")
    assert held.startswith("PASS") and "calls in one gather" in held and "worst 0.80x" in held


def test_a_csv_gains_new_columns_without_shifting_its_history(tmp_path):
    bench_common.append_rows("t", [{"a": 1, "b": 2}], ["a", "b"], tmp_path)
    bench_common.append_rows("t", [{"a": 3, "c": 4, "b": 5}], ["a", "c", "b"], tmp_path)
    bench_common.append_rows("t", [{"a": 6, "c": 7}], ["a", "c"], tmp_path)  # b dropped: kept
    with (tmp_path / "t.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [
        {"a": "1", "c": "", "b": "2"},
        {"a": "3", "c": "4", "b": "5"},
        {"a": "6", "c": "7", "b": ""},
    ]


def test_case_runner_returns_the_tagged_result_or_why_there_is_none(tmp_path):
    script = tmp_path / "case.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, os, sys, time
            sys.path.insert(0, {str(REPO / "launch")!r})
            from bench_common import print_case_result

            spec = json.loads(sys.argv[sys.argv.index("--case") + 1])
            print("a line before the result")
            if spec["name"] == "broken":
                sys.exit("the case broke")
            if spec["name"] == "slow":
                time.sleep(30)
            print_case_result({{"name": spec["name"], "threads": os.environ["OMP_NUM_THREADS"],
                               "mmap": os.environ["MALLOC_MMAP_THRESHOLD_"]}})
            print("a line after it")
            """
        )
    )
    run = bench_common.run_case_in_subprocess
    assert run(script, {"name": "fine"}, timeout=60, threads=3) == {
        "name": "fine", "threads": "3", "mmap": str(1 << 20), "status": "ok",
    }  # fmt: skip
    assert run(script, {"name": "broken"}, timeout=60, threads=1) == {
        "status": "failed (exit 1): the case broke"
    }
    assert run(script, {"name": "slow"}, timeout=2, threads=1) == {"status": "timeout after 2s"}


@pytest.mark.slow
def test_both_modules_train_through_the_trainers_own_step():
    """The benchmark times ``Trainer.train_step`` itself: every step of either module is one
    call of it, on the sampler's shard of the random samples."""
    spec = dict(
        model="tiny", zero=2, ranks=1, batch=4, seq=128, threads=1, prompt_fraction=0.25,
        chunk_size=1024, warmup=1, steps=2, new_tokens=2,
    )  # fmt: skip
    driver = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(REPO / "launch")!r})
        import bench_train
        from pocl_ds.trainer import Trainer

        calls = []
        step = Trainer.train_step

        def counted(self, plan, micro_batches, **kwargs):
            calls.append([[sample.index for sample in mb] for mb in micro_batches])
            return step(self, plan, micro_batches, **kwargs)

        Trainer.train_step = counted
        out = {{}}
        for impl in ("fused", "naive"):
            calls.clear()
            result = bench_train.run_case({{**json.loads(sys.argv[1]), "impl": impl}})
            out[impl] = {{"calls": list(calls), "first_loss": result["first_loss"]}}
        print(json.dumps(out))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(spec)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for impl in ("fused", "naive"):
        calls = out[impl]["calls"]
        assert len(calls) == spec["warmup"] + spec["steps"], impl
        assert all(len(step) == 1 and len(step[0]) == spec["batch"] for step in calls), calls
        assert sorted(i for step in calls for i in step[0]) == list(range(12)), calls
    assert out["fused"]["calls"] == out["naive"]["calls"]
    assert out["fused"]["first_loss"] == pytest.approx(out["naive"]["first_loss"], rel=1e-4)


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
        assert float(row["generate_held_tokens_per_s"]) > 0
        # every phase is timed inside the trainer's step, and together they make up the step
        assert all(float(row[k]) > 0 for k in bench_train.PHASES), row
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
    # then the teacher-cache case: the live teacher and three caches, a verdict per fp32 cache
    with (tmp_path / "teacher_cache.csv").open(newline="") as handle:
        cached = list(csv.DictReader(handle))
    assert [r["case"] for r in cached] == list(bench_teacher_cache.CASES)
    assert all(r["status"] == "ok" for r in cached), [r["status"] for r in cached]
    live = cached[0]
    for row in cached[1:]:
        assert float(row["teacher_fwd_s"]) == 0.0  # the second epoch never runs the teacher
        gap = bench_teacher_cache._loss_gap(row, live)
        assert gap <= (1e-2 if row["teacher_cache_dtype"] == "bf16" else 1e-6), (row, gap)
    verdicts = [line for line in done.stdout.splitlines() if "teacher cache" in line]
    assert [v.split()[0] in ("PASS", "FAIL") for v in verdicts] == [True, True], verdicts
    assert (tmp_path / "train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
