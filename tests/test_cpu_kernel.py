"""The native CPU rows of jsd (pocl_ds.cpu_kernel) against the eager blocks and float64.

Every other jsd test of tests/test_divergence.py on CPU in fp32 without labels runs on the
native rows where they build; these tests compare the two paths directly, check that the
native path is the one taken, and that a failed build falls back to the eager blocks.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from pocl_ds import cpu_kernel, divergence
from pocl_ds.divergence import distill_loss, fused_linear_distill_loss
from tests.test_divergence import (
    gpt2_like_logits,
    grads_of,
    make_case,
    naive_loss,
    scalar,
    two_intra_op_threads,  # noqa: F401 (a fixture, shared with the lane tests there)
)

AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = pytest.mark.skipif(not AVX2, reason="the native rows are built for AVX2 CPUs")


@pytest.fixture
def native_calls(monkeypatch):
    """The threads each native call ran on, in call order."""
    calls = []
    native = divergence._native_jsd_rows

    def recorded(*args):
        calls.append(threading.current_thread().name)
        return native(*args)

    monkeypatch.setattr(divergence, "_native_jsd_rows", recorded)
    return calls


def _both_paths(monkeypatch, run):
    """run() with the native rows, then with the eager blocks."""
    assert cpu_kernel.native_rows() is not None, "the native rows must build on an AVX2 CPU"
    native = run()
    monkeypatch.setattr(cpu_kernel, "ENABLED", False)
    eager = run()
    monkeypatch.setattr(cpu_kernel, "ENABLED", True)
    return native, eager


def test_the_native_rows_build_and_serve_jsd_without_labels_only(native_calls):
    case = make_case(12, 8, 3001)
    args = (case["h_s"], case["w_s"], case["h_t"], case["w_t"], case["mask"])
    fused_linear_distill_loss(*args, kind="jsd")
    assert native_calls, "jsd without labels in fp32 on CPU runs the native rows"
    served = len(native_calls)
    fused_linear_distill_loss(*args, kind="jsd", labels=torch.arange(12))
    fused_linear_distill_loss(*args, kind="skl")
    logits64 = torch.randn(12, 3001, dtype=torch.float64)
    distill_loss(logits64, logits64 + 1.0, case["mask"], kind="jsd")
    assert len(native_calls) == served, "labels, other kinds and fp64 keep the eager blocks"


@pytest.mark.parametrize("vocab", [5, 3001, 50257])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_native_rows_match_float64_as_closely_as_the_eager_blocks(vocab, temperature, monkeypatch):
    """Loss within 1e-5 of float64 (its exp is ATen's exp_u20: measured up to 3.4e-6 here,
    eager 1.4e-6); gradients as close to float64 as eager's. V = 5 has only the scalar tail,
    3001 a vector body and a tail."""
    gen = torch.Generator().manual_seed(vocab)
    student = (torch.randn(24, vocab, generator=gen) * 3).requires_grad_()
    teacher = student.detach() + 0.5 * torch.randn(24, vocab, generator=gen)
    mask = torch.ones(24)

    def run():
        loss = distill_loss(student, teacher, mask, kind="jsd", temperature=temperature)
        return loss, grads_of(loss, student)[0]

    (native, g_native), (eager, g_eager) = _both_paths(monkeypatch, run)
    reference = student.detach().double().requires_grad_()
    ref = naive_loss(reference, teacher.double(), mask, "jsd", temperature)
    for loss in (native, eager):
        assert abs(scalar(loss) - scalar(ref)) <= 1e-5 * abs(scalar(ref))
    want = grads_of(ref, reference)[0]

    def error(got):
        return float((got.double() - want).norm() / want.norm())

    assert error(g_native) <= max(1.5 * error(g_eager), 1e-6), (error(g_native), error(g_eager))


def test_native_rows_give_exactly_zero_at_p_equal_q_and_stay_finite(monkeypatch):
    """p = q: exactly 0 and a zero gradient. Logits of ±1e4 underflow the exponentials (the
    capped ratios of SPEC's jsd): finite, and equal to the eager blocks'."""
    logits = gpt2_like_logits(6)[0].requires_grad_()
    same = distill_loss(logits, logits.detach(), torch.ones(6), kind="jsd")
    assert scalar(same) == 0.0
    assert float(grads_of(same, logits)[0].abs().max()) == 0.0

    gen = torch.Generator().manual_seed(7)
    student = (torch.randn(6, 50, generator=gen) * 1e4).requires_grad_()
    teacher = torch.randn(6, 50, generator=gen) * 1e4
    teacher[:, 9] = -1e4

    def run():
        loss = distill_loss(student, teacher, torch.ones(6), kind="jsd", beta=0.1)
        return loss, grads_of(loss, student)[0]

    (native, g_native), (eager, g_eager) = _both_paths(monkeypatch, run)
    assert torch.isfinite(native) and torch.isfinite(g_native).all()
    assert abs(scalar(native) - scalar(eager)) <= 2e-5 * abs(scalar(eager))
    torch.testing.assert_close(g_native, g_eager, rtol=1e-4, atol=1e-4 * float(g_eager.abs().max()))


@pytest.mark.usefixtures("two_intra_op_threads")
def test_native_rows_run_on_the_lanes_and_give_the_gradients_of_one_lane(monkeypatch, native_calls):
    """Two lanes run their rows on the lane threads: the same gradients bitwise as one lane,
    the loss within the rounding of the lane sums. (Which lane thread takes which run is up
    to the pool: a run this small may finish before the other thread wakes.)"""
    monkeypatch.setattr(divergence, "_CPU_BLOCK_ELEMENTS", 20 * 3000)
    case = make_case(96, 16, 3000, seed=3)

    def run(lanes):
        monkeypatch.setattr(divergence, "CPU_ELEMENTWISE_THREADS", lanes)
        h, w = case["h_s"].detach().clone().requires_grad_(), case["w_s"].detach().clone()
        w.requires_grad_()
        loss = fused_linear_distill_loss(
            h, w, case["h_t"], case["w_t"], torch.ones(96), kind="jsd", chunk_size=48
        )
        return loss, grads_of(loss, h, w)

    one, grads_one = run(1)
    threads_one = set(native_calls)
    native_calls.clear()
    two, grads_two = run(2)
    assert threading.current_thread().name in threads_one
    assert len(native_calls) == 4, "two chunks, two runs each"
    assert all(name.startswith("pocl-ds-blocks") for name in native_calls)
    for a, b in zip(grads_one, grads_two, strict=True):
        assert torch.equal(a, b)
    assert abs(scalar(one) - scalar(two)) <= 1e-6 * abs(scalar(one))


def test_the_native_rows_release_the_gil():
    """While one thread runs native rows, Python on another keeps running: so the lanes run
    their rows at once, not in turn. Held, the GIL would stop the loop for the whole call; a
    loaded machine only slows it, so the test bounds the loop's longest pause, not its pace."""
    gen = torch.Generator().manual_seed(5)
    s, t = torch.randn(800, 50257, generator=gen), torch.randn(800, 50257, generator=gen)
    factor = torch.empty(800, 1)
    native = cpu_kernel.native_rows()
    span = {}

    def rows():
        span["start"] = time.perf_counter()
        native.jsd_rows_(s, t, factor, 0.5, 50.0, 1e20)
        span["end"] = time.perf_counter()

    worker = threading.Thread(target=rows)
    worker.start()
    ticks = [time.perf_counter()]
    while worker.is_alive():
        ticks.append(time.perf_counter())
    inside = [
        span["start"],
        *(tick for tick in ticks if span["start"] < tick < span["end"]),
        span["end"],
    ]
    longest_pause = max(b - a for a, b in itertools.pairwise(inside))
    duration = span["end"] - span["start"]
    assert longest_pause < 0.5 * duration, (longest_pause, duration)


@pytest.fixture
def fresh_build_root(monkeypatch, tmp_path):
    """An empty TORCH_EXTENSIONS_DIR, and no library loaded yet in this process."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_built", {})
    return tmp_path


def test_a_failed_build_falls_back_to_the_eager_blocks(
    monkeypatch, caplog, native_calls, fresh_build_root
):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(**_kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    student, teacher = gpt2_like_logits(4)
    with caplog.at_level(logging.WARNING, logger="pocl_ds.cpu_kernel"):
        loss = distill_loss(student, teacher, torch.ones(4), kind="jsd")
        distill_loss(student, teacher, torch.ones(4), kind="jsd")
    assert torch.isfinite(loss) and not native_calls
    warnings = [r.getMessage() for r in caplog.records if "could not be built" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler here" in warnings[0]
    assert str(cpu_kernel.build_directory()) in warnings[0]


def test_a_lock_left_by_a_killed_build_neither_blocks_nor_outlives_its_age(
    monkeypatch, fresh_build_root
):
    """A built library is imported without touching torch's build lock; a lock older than
    any build is removed before building."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    library = cpu_kernel.build_directory() / "pocl_ds_cpu_kernel.so"
    assert library.exists(), "built by the tests above, in the default directory"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(fresh_build_root))
    directory = cpu_kernel.build_directory()
    directory.mkdir(parents=True)
    shutil.copy(library, directory / library.name)
    (directory / "lock").touch()  # fresh: torch's own build would wait on it forever
    assert cpu_kernel.native_rows() is not None

    (directory / library.name).unlink()
    monkeypatch.setattr(cpu_kernel, "_built", {})
    old = time.time() - 2 * cpu_kernel._STALE_LOCK_S
    os.utime(directory / "lock", (old, old))
    seen = {}

    def record_lock(**kwargs):
        seen["lock"] = (Path(kwargs["build_directory"]) / "lock").exists()
        raise RuntimeError("stop before compiling")

    monkeypatch.setattr(cpp_extension, "load", record_lock)
    assert cpu_kernel.native_rows() is None
    assert seen == {"lock": False}
