"""The fused divergence kernel against naive PyTorch, Liger-Kernel and the matmul floor.

    python launch/bench_kernel.py [--n 1024 4096] [--kinds jsd fkl] [--repeats 5] [--quick]
    python launch/bench.py kernel [--quick] ...   (the same, through the dispatcher)

For each N and kind, forward + backward of the KD loss over N tokens with hidden size H and
vocabulary V (student and teacher heads both [V, H]; every token valid):

    naive         logits of both models, the divergence on full [N × V] tensors, autograd
    distill_loss  logits of both models (autograd matmul), then the chunked `distill_loss`
    fused         `fused_linear_distill_loss` from hidden states and head weights
    fused_labels  the same with labels and sft_weight α = 0.3 (every off-policy KD stage of
                  POCL): the kernel's own α·CE + (1 − α)·KD, still four matmuls
    liger         Liger-Kernel's LigerFusedLinearJSDLoss, pure-PyTorch path, eager (jsd only)
    liger_compiled  the same with its torch.compile (jsd only)
    floor         the four N×H×V matmuls alone (two logits, two gradients), same chunking

Each case runs in a fresh subprocess. Peak memory is the rise of resident memory (VmHWM)
over what the inputs already use, with glibc told to map every block of 1 MiB or more
directly so that freed tensors leave RSS at once (on CUDA: max_memory_allocated). The time
is the median of --repeats runs (after one untimed run for compiled cases). Each case times
as many floor runs in its own process, alternating with its own (floor, case, floor, case,
...), and "× floor" is the median over repeats of case time / the floor time just before it:
load from other jobs on a shared machine, which drifts over seconds, then shifts both halves
of a pair alike (with the floor runs all first, the 2-core machine gave the same case
0.98× and 1.27× in two runs). Rows go to benchmarks/kernel.csv (machine, versions, commit,
sizes), one per case as it finishes; the table of this run, followed by a PASS or FAIL line
per target, is printed and written to benchmarks/kernel.md: fused ≤ 1.10× floor for jsd and
≤ 1.20× for every other kind, fused_labels ≤ 1.20×, and the fused peaks ≤ 1/8 of naive's.
--busy-cores K runs the cases beside K busy-looping processes (a machine shared with other
jobs), --elementwise-threads T sets the kernel's block-loop threads for every case, and
--eager-blocks keeps jsd on eager blocks instead of the native CPU rows (pocl_ds.cpu_kernel).
--op-costs prints what each elementwise op of a block costs instead.
"""

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

from bench_common import (  # noqa: E402
    append_rows,
    print_case_result,
    provenance,
    reset_peak_rss,
    rss_mb,
    run_case_in_subprocess,
    write_table,
)

from pocl_ds.cli import ArgumentParser, run_main  # noqa: E402
from pocl_ds.errors import PoclError  # noqa: E402

IMPLS = ("naive", "distill_loss", "fused", "fused_labels", "liger", "liger_compiled", "floor")
KIND_FREE = ("floor",)  # the same for every kind: measured once per N
JSD_ONLY = ("liger", "liger_compiled")
LABELS_SFT_WEIGHT = 0.3  # α of POCL's first stage (SPEC: α falls 0.3 → 0)
FLOOR_TARGETS = {"fused": {"jsd": 1.10}, "fused_labels": {}}  # × floor; other kinds: 1.20
DEFAULT_FLOOR_TARGET = 1.20
MEMORY_TARGET = 1 / 8  # of naive's peak
FIELDS = [
    "timestamp", "commit", "machine", "device", "torch", "liger", "dtype", "impl", "kind",
    "n", "hidden", "vocab", "chunk_size", "threads", "elementwise_threads", "busy_cores",
    "native_rows",
    "repeats", "median_s", "min_s",
    "floor_s", "x_floor", "peak_extra_mb", "status",
]  # fmt: skip


# ----------------------------------------------------------------------------- one case


def _naive_loss(student_logits, teacher_logits, kind: str, beta: float):
    import torch
    import torch.nn.functional as F

    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "fkl":
        per_token = (p * (log_p - log_q)).sum(-1)
    elif kind == "rkl":
        per_token = (q * (log_q - log_p)).sum(-1)
    elif kind == "tvd":
        per_token = 0.5 * (p - q).abs().sum(-1)
    elif kind == "srkl":
        log_m = torch.logaddexp(log_p + math.log(1 - beta), log_q + math.log(beta))
        per_token = (q * (log_q - log_m)).sum(-1)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        per_token = (p * (log_p - log_m)).sum(-1)
        if kind == "jsd":
            per_token = beta * per_token + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    return per_token.mean()


def _inputs(spec: dict) -> dict:
    """Hidden states [N, H] and heads [V, H] of student and teacher; labels [N]."""
    import torch

    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    n, hidden, vocab = spec["n"], spec["hidden"], spec["vocab"]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return {
        "h_s": rand(n, hidden).requires_grad_(),
        "w_s": rand(vocab, hidden, scale=hidden**-0.5).requires_grad_(),
        "h_t": rand(n, hidden),
        "w_t": rand(vocab, hidden, scale=hidden**-0.5),
        "mask": torch.ones(n, dtype=torch.bool, device=device),
        "labels": torch.randint(0, vocab, (n,), generator=gen).to(device),
    }


def _floor_runner(spec: dict, inputs: dict):
    """A `run()` doing the four chunked N×H×V matmuls alone: the kernel's compute floor."""
    import torch

    device = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    n, hidden, vocab, chunk = spec["n"], spec["hidden"], spec["vocab"], spec["chunk_size"]
    h_s, w_s, h_t, w_t = inputs["h_s"], inputs["w_s"], inputs["h_t"], inputs["w_t"]
    grad_weight = torch.zeros(vocab, hidden, device=device, dtype=torch.float32)
    grad_hidden = torch.empty(n, hidden, device=device, dtype=dtype)
    student = torch.empty(min(chunk, n), vocab, device=device, dtype=dtype)
    teacher = torch.empty_like(student)

    def run():
        grad_weight.zero_()
        with torch.no_grad():
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                s, t = student[: h_s[rows].shape[0]], teacher[: h_s[rows].shape[0]]
                torch.mm(h_s[rows], w_s.t(), out=s)
                torch.mm(h_t[rows], w_t.t(), out=t)
                torch.mm(s, w_s, out=grad_hidden[rows])
                if dtype == torch.float32:
                    grad_weight.addmm_(s.t(), h_s[rows])
                else:  # low-precision matmul, fp32 accumulation, as the kernel does
                    grad_weight.add_(s.t() @ h_s[rows])

    return run


def _case_runner(spec: dict, inputs: dict):
    """A `run()` doing one forward + backward of `spec["impl"]`, and the student tensors."""
    import torch

    from pocl_ds.divergence import DEFAULT_BETA, distill_loss, fused_linear_distill_loss

    chunk, kind, impl = spec["chunk_size"], spec["kind"], spec["impl"]
    beta = DEFAULT_BETA.get(kind, 0.5)
    h_s, w_s, h_t, w_t = inputs["h_s"], inputs["w_s"], inputs["h_t"], inputs["w_t"]
    mask, labels = inputs["mask"], inputs["labels"]

    if impl == "floor":
        return _floor_runner(spec, inputs), (h_s, w_s)
    if impl == "naive":

        def loss():
            with torch.no_grad():
                teacher_logits = h_t @ w_t.t()
            return _naive_loss(h_s @ w_s.t(), teacher_logits, kind, beta)

    elif impl == "distill_loss":

        def loss():
            with torch.no_grad():
                teacher_logits = h_t @ w_t.t()
            return distill_loss(h_s @ w_s.t(), teacher_logits, mask, kind=kind, chunk_size=chunk)

    elif impl == "fused":

        def loss():
            return fused_linear_distill_loss(h_s, w_s, h_t, w_t, mask, kind=kind, chunk_size=chunk)

    elif impl == "fused_labels":

        def loss():
            mixed, _, _ = fused_linear_distill_loss(
                h_s, w_s, h_t, w_t, mask, kind=kind, chunk_size=chunk, labels=labels,
                sft_weight=LABELS_SFT_WEIGHT,
            )  # fmt: skip
            return mixed

    else:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        module = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=beta,
            compiled=impl == "liger_compiled",
            chunk_size=chunk,
        )

        def loss():
            return module(h_s, w_s, h_t, w_t, labels)

    def run():
        h_s.grad = w_s.grad = None
        loss().backward()

    return run, (h_s, w_s)


def run_case(spec: dict) -> dict:
    """Time and measure one case in this (fresh) process."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from pocl_ds import cpu_kernel, divergence

    divergence.CPU_ELEMENTWISE_THREADS = spec["elementwise_threads"]
    cpu_kernel.ENABLED = spec["native_rows"]
    if spec["native_rows"] and spec["device"] == "cpu" and cpu_kernel.native_rows() is None:
        raise PoclError("the native CPU rows could not be built here: see the log, or pass "
                        "--eager-blocks")  # fmt: skip
    cuda = spec["device"].startswith("cuda")
    inputs = _inputs(spec)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(run) -> float:
        sync()
        start = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - start

    # The machine may be shared: each case run is paired with a floor run just before it in
    # this process, so load that drifts between and within cases shifts both alike. One warm
    # floor run first: the first touches its buffers and would flatter the ratio.
    floor_run, _ = _case_runner({**spec, "impl": "floor"}, inputs)
    floor_run()
    run, params = _case_runner(spec, inputs)

    if spec["impl"] == "liger_compiled":
        run()  # compile outside the timed and measured runs
    for p in params:
        p.grad = None
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = rss_mb("VmRSS")
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    floor_times, times = [], []
    for _ in range(spec["repeats"]):
        floor_times.append(timed(floor_run))  # its buffers predate the baseline: no new peak
        for p in params:
            p.grad = None
        times.append(timed(run))
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    else:
        peak = rss_mb("VmHWM") - baseline
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "floor_s": statistics.median(floor_times),
        "x_floor": statistics.median(t / f for t, f in zip(times, floor_times, strict=True)),
        "peak_extra_mb": peak,
    }


def op_costs(vocab: int, repeats: int = 400) -> str:
    """ns/element of the ops a CPU block is made of, on one block of the kernel's size and one
    intra-op thread (as each lane runs them): what a kind's elementwise work is bound by."""
    import torch

    from pocl_ds import divergence

    torch.set_num_threads(1)
    rows = divergence._block_rows(vocab, torch.device("cpu"), divergence.DEFAULT_CHUNK_SIZE)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, vocab, generator=gen), torch.rand(rows, vocab, generator=gen)
    row, out = torch.rand(rows, 1, generator=gen), torch.empty(rows, vocab)
    ops = {
        "exp": lambda: torch.exp(x, out=out),
        "expm1": lambda: torch.expm1(x, out=out),
        "log1p": lambda: torch.log1p(y, out=out),
        "div": lambda: torch.div(x, y, out=out),
        "mul": lambda: torch.mul(x, y, out=out),
        "mul_ by a row factor": lambda: out.mul_(row),
        "sum over a row": lambda: x.sum(dim=1, keepdim=True),
    }
    lines = [f"One [{rows} x {vocab}] block, one intra-op thread, median of 5 x {repeats // 5}:"]
    for name, op in ops.items():
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats // 5):
                op()
            rounds.append((time.perf_counter() - start) / (repeats // 5))
        lines.append(f"  {name:22s} {1e9 * statistics.median(rounds) / x.numel():6.2f} ns/element")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver


def _liger_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        import liger_kernel.chunked_loss  # noqa: F401

        return version("liger-kernel")
    except (ImportError, PackageNotFoundError):
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from pocl_ds.divergence import CPU_ELEMENTWISE_THREADS, DEFAULT_CHUNK_SIZE, KINDS

    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096], help="token counts")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, help="default: all")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per case, each paired with a floor run"
    )
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--elementwise-threads",
        type=int,
        default=CPU_ELEMENTWISE_THREADS,
        help="threads that share out the kernel's elementwise blocks on CPU, each on one "
        "intra-op thread (default: the library's divergence.CPU_ELEMENTWISE_THREADS, "
        "%(default)s; 0: one loop whose ops use all of --threads)",
    )
    parser.add_argument(
        "--busy-cores",
        type=int,
        default=0,
        help="keep this many busy-looping processes running through the cases, to measure "
        "the kernel on a machine shared with other jobs (default 0)",
    )
    parser.add_argument(
        "--eager-blocks",
        action="store_true",
        help="jsd without labels on CPU on the eager blocks instead of the native rows "
        "(pocl_ds.cpu_kernel), to compare the two",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--output-dir", default=str(REPO / "benchmarks"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="N=256, H=128, V=4096, jsd only, 1 repeat, no torch.compile (under a minute)",
    )
    parser.add_argument(
        "--op-costs",
        action="store_true",
        help="print instead what each elementwise op of a block costs (ns/element, one thread)",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, JSON
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.hidden, args.vocab, args.repeats = [256], 128, 4096, 1
        args.kinds = ["jsd"]
        args.chunk_size = min(args.chunk_size, 128)
        if args.impls is None:  # compiling takes longer than the rest of the quick run
            args.impls = [impl for impl in IMPLS if impl != "liger_compiled"]
    args.impls = args.impls or list(IMPLS)
    if min(args.n) < 1 or args.hidden < 1 or args.vocab < 2 or args.repeats < 1:
        raise PoclError("--n, --hidden, --repeats must be >= 1 and --vocab >= 2")
    return args


def _cases(args: argparse.Namespace, liger: str | None) -> list[dict]:
    """Per N: the floor, then kind by kind (jsd first), so an interrupted run still has the
    complete rows of the cases it finished."""
    kinds = sorted(args.kinds, key=lambda kind: kind != "jsd")
    cases = []
    for n in args.n:
        for kind in ["-", *kinds]:
            for impl in args.impls:
                if (kind == "-") != (impl in KIND_FREE) or (impl in JSD_ONLY and kind != "jsd"):
                    continue
                cases.append(
                    {
                        "impl": impl, "kind": kind, "n": n, "hidden": args.hidden,
                        "vocab": args.vocab, "chunk_size": args.chunk_size, "dtype": args.dtype,
                        "device": args.device, "threads": args.threads, "repeats": args.repeats,
                        "elementwise_threads": args.elementwise_threads,
                        "busy_cores": args.busy_cores,
                        "native_rows": not args.eager_blocks,
                        "liger": liger,
                    }
                )  # fmt: skip
    return cases


def _markdown(rows: list[dict]) -> str:
    first = rows[0]
    lines = [
        f"Kernel forward+backward, H={first['hidden']}, V={first['vocab']}, {first['dtype']}, "
        f"chunk {first['chunk_size']}; {first['machine']} ({first['device']}), torch "
        f"{first['torch']}, liger-kernel {first['liger'] or 'not installed'}, commit "
        f"{first['commit']}; median of {first['repeats']}; elementwise threads "
        f"{first['elementwise_threads']} (0: all per op); busy-looping processes beside it "
        f"{first.get('busy_cores') or 0}; native CPU rows for jsd "
        f"{'off' if first.get('native_rows') in (False, 'False') else 'on'}. Peak = extra "
        "resident memory over "
        "the inputs. × floor: the median over the case's runs of its time / that of the four "
        "chunked matmuls alone, run in the same process just before it (floor: its own "
        "median); × naive memory: peak / naive's of the same kind.",
        "",
        "| N | kind | impl | time (s) | floor (s) | × floor | peak extra (MB) | × naive memory |",
        "|---:|:---|:---|---:|---:|---:|---:|---:|",
    ]
    ok = [r for r in rows if r["status"] == "ok"]
    naive_mb = {(r["n"], r["kind"]): float(r["peak_extra_mb"]) for r in ok if r["impl"] == "naive"}
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['n']} | {r['kind']} | {r['impl']} | {r['status']} | | | | |")
            continue
        time_s, peak = float(r["median_s"]), float(r["peak_extra_mb"])
        floor = float(r["floor_s"]) if r["impl"] != "floor" else time_s
        naive = naive_mb.get((r["n"], r["kind"]))
        x_floor = f"{_times_floor(r):.2f}" if floor else ""
        x_naive = f"{peak / naive:.3f}" if naive and r["impl"] != "floor" else ""
        lines.append(
            f"| {r['n']} | {r['kind']} | {r['impl']} | {time_s:.2f} | {floor:.2f} | {x_floor} "
            f"| {peak:.0f} "
            f"| {x_naive} |"
        )
    return "\n".join(lines) + "\n"


def _times_floor(row: dict) -> float:
    """The case's time over the floor's: the median of paired ratios (for the floor row, floor
    runs against floor runs: how far two alike runs differ here), or for rows written before
    the pairing the ratio of the two medians."""
    if row.get("x_floor"):
        return float(row["x_floor"])
    if row["impl"] == "floor":
        return 1.0
    return float(row["median_s"]) / float(row["floor_s"])


def verdicts(rows: list[dict]) -> list[str]:
    """PASS/FAIL per target and measured case: time against the floor, peak against naive."""
    ok = [r for r in rows if r["status"] == "ok"]
    naive_mb = {(r["n"], r["kind"]): float(r["peak_extra_mb"]) for r in ok if r["impl"] == "naive"}
    lines = []
    for r in ok:
        if r["impl"] not in FLOOR_TARGETS:
            continue
        target = FLOOR_TARGETS[r["impl"]].get(r["kind"], DEFAULT_FLOOR_TARGET)
        ratio = _times_floor(r)
        where = f"N={r['n']} {r['kind']} {r['impl']}"
        lines.append(
            f"{'PASS' if ratio <= target else 'FAIL'} {where}: {ratio:.2f}x floor (target <= {target:.2f}x)"
        )
        naive = naive_mb.get((r["n"], r["kind"]))
        if naive:
            share = float(r["peak_extra_mb"]) / naive
            lines.append(
                f"{'PASS' if share <= MEMORY_TARGET else 'FAIL'} {where}: peak {share:.3f} of naive "
                f"(target <= {MEMORY_TARGET:.3f})"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case:
        print_case_result(run_case(json.loads(args.case)))
        return 0
    if args.op_costs:
        print(op_costs(args.vocab))
        return 0
    import torch

    liger = _liger_version()
    impls = [i for i in args.impls if i not in JSD_ONLY or liger]
    if len(impls) < len(args.impls):
        sys.stderr.write("liger-kernel not importable: skipping the Liger rows "
                         "(pip install --no-deps liger-kernel)\n")  # fmt: skip
    args.impls = impls
    shared = {**provenance(args.device), "threads": args.threads or torch.get_num_threads()}
    rows = []
    with busy_processes(args.busy_cores):
        for spec in _cases(args, liger):
            _run_and_record(spec, shared, args, rows)
    print(_report(rows))
    return 0


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """Keep `count` processes spinning on the CPU while the block runs: a shared machine."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def _run_and_record(spec: dict, shared: dict, args: argparse.Namespace, rows: list[dict]) -> None:
    """One case in a fresh process; its row joins `rows` and the CSV at once, so an interrupted
    run keeps what it measured, and the table so far is rewritten."""
    sys.stderr.write(f"N={spec['n']} {spec['kind']} {spec['impl']} ...\n")
    sys.stderr.flush()
    result = run_case_in_subprocess(__file__, spec, timeout=args.timeout)
    row = {**shared, **spec, "median_s": "", "min_s": "", "floor_s": "", "x_floor": ""}
    row["peak_extra_mb"] = ""
    row.update(result)
    row["device"] = args.device
    rows.append({k: row[k] for k in FIELDS})
    append_rows("kernel", rows[-1:], FIELDS, args.output_dir)
    write_table("kernel", _report(rows), args.output_dir)


def _report(rows: list[dict]) -> str:
    """The table and, below it, the PASS/FAIL line of every target measured."""
    return _markdown(rows) + "\n" + "".join(f"{line}\n" for line in verdicts(rows))


if __name__ == "__main__":
    run_main(main)
