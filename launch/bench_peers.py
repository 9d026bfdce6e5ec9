"""The same KD training step with the distillation loss of TRL, Liger-Kernel, torchtune or pocl_ds.

    python launch/bench_peers.py [--vocabs 50257 128256] [--kinds jsd fkl] [--quick]
    python launch/bench.py peers ...   (the same, through the dispatcher)

Every case is ``Trainer.train_step`` on 2 ranks (ZeRO-2, fp32, client AdamW) with the
``recipe.Run`` of ``launch/bench_train.py``: the same student and teacher (the tiny pair:
teacher gpt2 H128 L4, student gpt2 H64 L2, random tokens, 4 × 128 tokens per rank, the first
quarter of each sequence a prompt), the same batches and the same optimizer. Only the module the
DeepSpeed engine wraps differs, each called as ``DistillationObjective`` is:

    pocl_ds         pocl_ds's fused kernel (final hidden states and heads, chunked, no logits)
    trl             TRL's ``GKDTrainer.generalized_jsd_loss`` on the full [B, T, V] logits
    liger           Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunked, pure PyTorch), eager
    liger_compiled  the same with its ``torch.compile``
    torchtune       torchtune's ``ForwardKLWithChunkedOutputLoss`` on logits computed in
                    8 chunks (its models' chunked output); forward KL only

The loss is the distillation term alone (α = 0, τ = 1: torchtune has no temperature), jsd at
β = 0.5 and fkl (β = 0 in TRL's and Liger's generalized JSD), the mean over the global batch's
target tokens. Each case runs in a fresh process; ``--warmup`` untimed and ``--steps`` timed
steps, the median step of the slowest rank; peak = the rise of resident memory per rank over
the built run (as in bench_train). The first step's loss of every peer must equal pocl_ds's
(checked: the same weights and batches). Targets: pocl_ds at least as fast as the fastest peer
and lighter in memory than every peer, per vocabulary and divergence (PASS/FAIL lines). Rows go
to benchmarks/peers.csv, the table to benchmarks/peers.md.
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

from bench_common import (  # noqa: E402
    add_driver_options,
    append_rows,
    markdown_table,
    provenance,
    run_benchmark,
    run_case_in_subprocess,
)

from pocl_ds.cli import ArgumentParser, run_main  # noqa: E402

IMPLS = ("pocl_ds", "trl", "liger", "liger_compiled", "torchtune")
FKL_ONLY = ("torchtune",)
PACKAGES = {"trl": "trl", "liger": "liger-kernel", "liger_compiled": "liger-kernel",
            "torchtune": "torchtune"}  # fmt: skip
BETA = {"jsd": 0.5, "fkl": 0.0}  # generalized-JSD β of TRL and Liger for each divergence
TORCHTUNE_CHUNKS = 8
RANKS = 2
FIELDS = [
    "timestamp", "commit", "machine", "device", "torch", "versions", "model", "vocab", "kind",
    "impl", "batch", "seq", "ranks", "zero", "warmup", "steps", "step_s", "tokens_per_s",
    "peak_extra_mb", "first_loss", "status",
]  # fmt: skip


# ----------------------------------------------------------------------------- the peers' losses


def _peer_class(impl: str, kind: str):
    """The objective module of ``impl``: called as DistillationObjective, returns LossTerms."""
    import torch
    import torch.nn.functional as F

    from pocl_ds.data import IGNORE_INDEX
    from pocl_ds.models import final_hidden_states, output_head
    from pocl_ds.objective import LossTerms

    beta = BETA[kind]

    class PeerDistillation(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model
            if impl.startswith("liger"):
                from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

                self.liger = LigerFusedLinearJSDLoss(
                    weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                    ignore_index=IGNORE_INDEX, temperature=1.0,
                    compiled=impl == "liger_compiled",
                )  # fmt: skip
            if impl == "torchtune":
                from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

                self.torchtune = ForwardKLWithChunkedOutputLoss(
                    num_output_chunks=TORCHTUNE_CHUNKS, ignore_index=IGNORE_INDEX
                )

        def forward(self, input_ids, attention_mask, labels, *, teacher_hidden, teacher_head,
                    temperature, sft_weight, num_valid_tokens):  # fmt: skip
            targets = labels[:, 1:]
            local = targets.ne(IGNORE_INDEX).sum()
            # every peer returns the mean over this micro-batch's targets; the trainer's
            # convention is the sum over them divided by the global divisor
            rescale = local / num_valid_tokens
            hidden = final_hidden_states(self.model, input_ids, attention_mask)
            weight, _ = output_head(self.model)
            teacher_weight, _ = teacher_head
            if impl == "trl":
                loss = self._trl(hidden, weight, teacher_hidden, teacher_weight, targets)
            elif impl.startswith("liger"):
                loss = self.liger(
                    hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight,
                    teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1]),
                    teacher_weight, targets.reshape(-1),
                )  # fmt: skip
            else:
                loss = self._torchtune(hidden, weight, teacher_hidden, teacher_weight, labels)
            loss = loss * rescale
            zero = loss.detach() * 0
            return LossTerms(loss=loss, kd=loss.detach(), ce=zero)

        @staticmethod
        def _trl(hidden, weight, teacher_hidden, teacher_weight, targets):
            from trl.experimental.gkd import GKDTrainer

            logits = F.linear(hidden[:, :-1], weight)  # [B, T-1, V]
            with torch.no_grad():
                teacher_logits = F.linear(teacher_hidden[:, :-1], teacher_weight)
            return GKDTrainer.generalized_jsd_loss(
                logits, teacher_logits, labels=targets, beta=beta, temperature=1.0,
                reduction="batchmean",
            )  # fmt: skip

        def _torchtune(self, hidden, weight, teacher_hidden, teacher_weight, labels):
            # torchtune's models emit logits in chunks along the sequence; labels are shifted
            # left with an ignored last position, the logits are not
            chunks = [F.linear(h, weight) for h in hidden.chunk(TORCHTUNE_CHUNKS, dim=1)]
            with torch.no_grad():
                teacher_chunks = [
                    F.linear(h, teacher_weight)
                    for h in teacher_hidden.chunk(TORCHTUNE_CHUNKS, dim=1)
                ]
            shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
            return self.torchtune(chunks, teacher_chunks, shifted)

    return PeerDistillation


def run_case(spec: dict) -> dict | None:
    import bench_train

    if spec["impl"] != "pocl_ds":
        cls = _peer_class(spec["impl"], spec["kind"])
        bench_train.OBJECTIVES[spec["impl"]] = lambda: cls
    return bench_train.run_case(
        {**spec, "impl": "fused" if spec["impl"] == "pocl_ds" else spec["impl"]}
    )


# ----------------------------------------------------------------------------- driver


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in sorted(set(PACKAGES.values())):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def _installed(impl: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    if impl == "pocl_ds":
        return True
    try:
        version(PACKAGES[impl])
    except PackageNotFoundError:
        return False
    return True


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["vocab"], row["kind"]), []).append(row)
    return groups


def verdicts(rows: list[dict]) -> list[str]:
    """Per (vocabulary, divergence): pocl_ds vs the fastest peer, and vs the lightest."""
    lines = []
    for (vocab, kind), group in _groups(rows).items():
        ours = next((r for r in group if r["impl"] == "pocl_ds" and r["status"] == "ok"), None)
        peers = [r for r in group if r["impl"] != "pocl_ds" and r["status"] == "ok"]
        where = f"V={vocab} {kind}"
        if ours is None or not peers:
            lines.append(f"FAIL peers {where}: no pocl_ds row or no peer measured")
            continue
        fastest = max(peers, key=lambda r: float(r["tokens_per_s"]))
        speed = float(ours["tokens_per_s"]) / float(fastest["tokens_per_s"])
        lines.append(
            f"{'PASS' if speed >= 1.0 else 'FAIL'} peers {where}: pocl_ds {speed:.2f}x the "
            f"tokens/s of the fastest peer ({fastest['impl']}; target >= 1.0x)"
        )
        lightest = min(peers, key=lambda r: float(r["peak_extra_mb"]))
        memory = float(ours["peak_extra_mb"]) / float(lightest["peak_extra_mb"])
        lines.append(
            f"{'PASS' if memory < 1.0 else 'FAIL'} peers {where}: pocl_ds peak {memory:.2f}x "
            f"the lightest peer's ({lightest['impl']}; target < 1.0x)"
        )
    return lines


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    header = ["V", "divergence", "loss from", "tokens/s", "peak/rank (MB)",
              "× pocl_ds tokens/s", "× pocl_ds peak", "first loss"]  # fmt: skip
    body = []
    for (vocab, kind), group in _groups(rows).items():
        ours = next((r for r in group if r["impl"] == "pocl_ds" and r["status"] == "ok"), None)
        for r in group:
            if r["status"] != "ok":
                body.append([vocab, kind, r["impl"], r["status"], "", "", "", ""])
                continue
            ratio = ours is not None
            body.append([
                vocab, kind, r["impl"], r["tokens_per_s"], r["peak_extra_mb"],
                f"{float(r['tokens_per_s']) / float(ours['tokens_per_s']):.2f}" if ratio else "",
                f"{float(r['peak_extra_mb']) / float(ours['peak_extra_mb']):.2f}" if ratio else "",
                f"{float(r['first_loss']):.6f}",
            ])  # fmt: skip
    return (
        f"KD step on {first['ranks']} ranks, ZeRO-{first['zero']}, fp32, {first['model']} pair, "
        f"{first['batch']} × {first['seq']} tokens per rank, α = 0, τ = 1; median of "
        f"{first['steps']} steps after {first['warmup']} warm-up, slowest rank; peak = rise of "
        f"resident memory per rank, largest rank. {first['machine']}, torch {first['torch']}, "
        f"{first['versions']}, commit {first['commit']}, {first['timestamp']}.\n\n"
        + markdown_table(header, body)
        + "\n\n"
        + "\n".join(verdicts(rows))
        + "\n"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocabs", type=int, nargs="+", default=[50257, 128256])
    parser.add_argument("--kinds", nargs="+", default=["jsd", "fkl"], choices=list(BETA))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--model", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--quick", action="store_true", help="V=50257 fkl, 1 warm-up + 1 step")
    add_driver_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.vocabs, args.kinds, args.warmup, args.steps = [50257], ["fkl"], 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(
        argv, name="peers", parse_args=parse_args, run_case=run_case, run_cases=_run_cases,
        markdown=markdown,
    )  # fmt: skip


def _run_cases(args: argparse.Namespace, output: Path) -> None:
    import torch
    from bench_train import PAIRS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pair = PAIRS[args.model]
    shared = {
        **provenance(device), "device": device, "versions": _versions(), "model": args.model,
        "batch": pair["batch"], "seq": pair["seq"], "ranks": RANKS, "zero": 2,
        "warmup": args.warmup, "steps": args.steps,
    }  # fmt: skip
    for vocab in args.vocabs:
        for kind in args.kinds:
            for impl in args.impls:
                if impl in FKL_ONLY and kind != "fkl":
                    continue
                row = {**shared, "vocab": vocab, "kind": kind, "impl": impl}
                if not _installed(impl):
                    result = {"status": f"{PACKAGES[impl]} not installed (pip install -e .[bench])"}
                else:
                    sys.stderr.write(f"peers V={vocab} {kind} {impl} ...\n")
                    started = time.perf_counter()
                    spec = dict(
                        model=args.model, impl=impl, kind=kind, vocab=vocab, zero=2, ranks=RANKS,
                        batch=pair["batch"], seq=pair["seq"], prompt_fraction=0.25,
                        chunk_size=1024, warmup=args.warmup, steps=args.steps, new_tokens=1,
                        threads=1, temperature=1.0, sft_weight=0.0,
                    )  # fmt: skip
                    result = run_case_in_subprocess(
                        __file__, spec, timeout=args.timeout, ranks=RANKS, threads=1
                    )
                    sys.stderr.write(
                        f"  {result['status']}: {result.get('tokens_per_s', '-')} tokens/s "
                        f"({time.perf_counter() - started:.0f}s)\n"
                    )
                append_rows("peers", [{**row, **result}], FIELDS, output)


if __name__ == "__main__":
    run_main(main)
