"""pocl_ds.divergence against a naive full-softmax reference, analytic cases, and ZeRO-3.

The reference below is SPEC.md's table written the obvious way (whole [N × V] tensors,
autograd for gradients) in float64; the kernel must match it in values and gradients.
Tolerances: fp32 inputs, rtol 1e-5 on losses and 1e-4 on gradients (atol scaled to the
gradient size); bf16 inputs (bf16 matmuls, fp32 softmax math), rtol 2e-2 on losses and a
relative gradient error (‖Δ‖/‖ref‖) below 3e-2, both against the reference on the same
bf16-rounded inputs. At a real vocabulary (V = 50257): p = q gives exactly 0 in fp32 and bf16,
and fp32 values are within 1 % of float64, in both block layouts (CPU and accelerator).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pocl_ds import divergence
from pocl_ds.data import IGNORE_INDEX
from pocl_ds.divergence import (
    DEFAULT_BETA,
    KINDS,
    distill_loss,
    fused_linear_distill_loss,
    resolve_divergence,
)
from pocl_ds.engine import gathered_parameters
from pocl_ds.errors import PoclError

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- reference


def naive_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    temperature: float = 1.0,
    beta: float | None = None,
) -> torch.Tensor:
    """Per-token D(p, q) of SPEC.md over the shared vocabulary prefix, float64, [...]."""
    beta = DEFAULT_BETA.get(kind, 0.0) if beta is None else beta
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = F.log_softmax(student_logits[..., :vocab].double() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits[..., :vocab].double() / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    b = torch.tensor(beta, dtype=torch.float64)
    if kind == "fkl":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "rkl":
        return (q * (log_q - log_p)).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind in ("jsd", "skl"):
        log_m = torch.logaddexp(b.log() + log_p, (1 - b).log() + log_q)
        kl_p = torch.where(p > 0, p * (log_p - log_m), 0.0).sum(-1)
        if kind == "skl":
            return kl_p
        kl_q = torch.where(q > 0, q * (log_q - log_m), 0.0).sum(-1)
        return b * kl_p + (1 - b) * kl_q
    log_m = torch.logaddexp((1 - b).log() + log_p, b.log() + log_q)
    return (q * (log_q - log_m)).sum(-1)


def naive_loss(
    student_logits, teacher_logits, mask, kind, temperature=1.0, beta=None, scale=True, divisor=None
):
    per_token = naive_divergence(student_logits, teacher_logits, kind, temperature, beta)
    mask = mask.reshape(per_token.shape).double()
    divisor = mask.sum().clamp_min(1) if divisor is None else divisor
    return (per_token * mask).sum() / divisor * (temperature**2 if scale else 1.0)


def naive_ce(student_logits, labels, mask, vocab, divisor=None):
    logits = student_logits[..., :vocab].double().reshape(-1, vocab)
    targets = torch.where(mask.reshape(-1).bool(), labels.reshape(-1), IGNORE_INDEX)
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    divisor = mask.sum().clamp_min(1) if divisor is None else divisor
    return total / divisor


def make_case(n, h, vocab_s, vocab_t=None, *, dtype=torch.float32, seed=0, spread=1.0):
    """Student/teacher hidden states and heads, a mask with ~30% of tokens off."""
    gen = torch.Generator().manual_seed(seed)
    vocab_t = vocab_s if vocab_t is None else vocab_t

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    case = {
        "h_s": rand(n, h).requires_grad_(),
        "w_s": rand(vocab_s, h, scale=spread).requires_grad_(),
        "h_t": rand(n, h + 3),
        "w_t": rand(vocab_t, h + 3, scale=spread),
        "mask": torch.rand(n, generator=gen) > 0.3,
    }
    case["mask"][0] = True
    return case


def scalar(tensor: torch.Tensor) -> float:
    return float(tensor.detach())


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def assert_close(actual, expected, rtol, what):
    actual, expected = actual.detach(), expected.detach().to(actual.dtype)
    atol = rtol * max(float(expected.abs().max()), 1e-3)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


KIND_BETAS = [(kind, None) for kind in KINDS] + [
    ("jsd", 0.1),
    ("jsd", 0.9),
    ("skl", 0.5),
    ("srkl", 0.5),
    ("skl", 0.9),
    ("srkl", 0.9),
]


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS)
def test_fused_matches_naive_reference(kind, beta, temperature):
    c = make_case(37, 16, 123)
    logits_s = c["h_s"] @ c["w_s"].t()
    ref = naive_loss(logits_s, c["h_t"] @ c["w_t"].t(), c["mask"], kind, temperature, beta)
    ref_grads = grads_of(ref, c["h_s"], c["w_s"])
    out = fused_linear_distill_loss(
        c["h_s"],
        c["w_s"],
        c["h_t"],
        c["w_t"],
        c["mask"],
        kind=kind,
        temperature=temperature,
        beta=beta,
        chunk_size=8,
    )
    assert out.dtype == torch.float32 and out.dim() == 0
    assert_close(out, ref, 1e-5, "loss")
    for got, want, name in zip(
        grads_of(out, c["h_s"], c["w_s"]), ref_grads, ("hidden", "weight"), strict=True
    ):
        assert_close(got, want, 1e-4, name)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS)
def test_distill_loss_matches_naive_reference(kind, beta, temperature):
    gen = torch.Generator().manual_seed(1)
    student = (torch.randn(3, 11, 123, generator=gen) * 3).requires_grad_()
    teacher = torch.randn(3, 11, 123, generator=gen) * 3
    mask = torch.rand(3, 11, generator=gen) > 0.3
    ref = naive_loss(student, teacher, mask, kind, temperature, beta)
    out = distill_loss(
        student, teacher, mask, kind=kind, temperature=temperature, beta=beta, chunk_size=5
    )
    assert_close(out, ref, 1e-5, "loss")
    assert_close(grads_of(out, student)[0], grads_of(ref, student)[0], 1e-4, "logits grad")


@pytest.mark.parametrize("n", [1, 2, 9])
@pytest.mark.parametrize("kind", ["fkl", "jsd", "srkl"])
def test_odd_shapes_and_batched_inputs(kind, n):
    """N = 1, N not a multiple of the chunk, [B, T, H] inputs, hidden widths that differ."""
    c = make_case(2 * n, 5, 123, seed=n)
    for key in ("h_s", "h_t"):
        c[key] = c[key].detach().reshape(2, n, -1).requires_grad_(key == "h_s")
    c["mask"] = c["mask"].reshape(2, n)
    ref = naive_loss(c["h_s"] @ c["w_s"].t(), c["h_t"] @ c["w_t"].t(), c["mask"], kind)
    out = fused_linear_distill_loss(
        c["h_s"], c["w_s"], c["h_t"], c["w_t"], c["mask"], kind=kind, chunk_size=4
    )
    assert_close(out, ref, 1e-5, "loss")
    for got, want in zip(
        grads_of(out, c["h_s"], c["w_s"]), grads_of(ref, c["h_s"], c["w_s"]), strict=True
    ):
        assert got.shape == want.shape
        assert_close(got, want, 1e-4, "grad")


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_within_documented_tolerance(kind):
    c = make_case(40, 32, 301, dtype=torch.bfloat16, seed=3)
    # the reference sees the same bf16-rounded values, in float64
    h_s = c["h_s"].detach().double().requires_grad_()
    w_s = c["w_s"].detach().double().requires_grad_()
    ref = naive_loss(h_s @ w_s.t(), c["h_t"].double() @ c["w_t"].double().t(), c["mask"], kind, 2.0)
    out = fused_linear_distill_loss(
        c["h_s"], c["w_s"], c["h_t"], c["w_t"], c["mask"], kind=kind, temperature=2.0, chunk_size=16
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=1e-4)
    got = grads_of(out, c["h_s"], c["w_s"])
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    for g, want in zip(got, grads_of(ref, h_s, w_s), strict=True):
        assert float((g.double() - want).norm() / want.norm()) < 3e-2


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_biases_and_vocab_mismatch(kind):
    """Padded tables: student wider, then teacher wider; both heads with biases."""
    for vocab_s, vocab_t in ((130, 123), (123, 130)):
        c = make_case(21, 8, vocab_s, vocab_t, seed=vocab_s)
        b_s = torch.randn(vocab_s).requires_grad_()
        b_t = torch.randn(vocab_t)
        ref = naive_loss(
            torch.addmm(b_s, c["h_s"], c["w_s"].t()),
            torch.addmm(b_t, c["h_t"], c["w_t"].t()),
            c["mask"],
            kind,
            2.0,
        )
        out = fused_linear_distill_loss(
            c["h_s"],
            c["w_s"],
            c["h_t"],
            c["w_t"],
            c["mask"],
            kind=kind,
            temperature=2.0,
            chunk_size=8,
            student_head_bias=b_s,
            teacher_head_bias=b_t,
        )
        assert_close(out, ref, 1e-5, "loss")
        got = grads_of(out, c["h_s"], c["w_s"], b_s)
        for g, want in zip(got, grads_of(ref, c["h_s"], c["w_s"], b_s), strict=True):
            assert_close(g, want, 1e-4, "grad")
        # the student's padded columns get zero probability, hence no gradient
        assert not got[1][123:].any() and not got[2][123:].any()
        logits = distill_loss(
            torch.addmm(b_s, c["h_s"], c["w_s"].t()),
            torch.addmm(b_t, c["h_t"], c["w_t"].t()),
            c["mask"],
            kind=kind,
            temperature=2.0,
        )
        assert_close(logits, ref, 1e-5, "distill_loss with mismatched widths")


@pytest.mark.parametrize("kind", ["fkl", "tvd", "jsd", "srkl"])
def test_vocab_size_leaves_out_padded_rows(kind):
    """A 50-id tokenizer with heads padded to 56 and 60 rows that hold large logits: the same
    loss and gradients as heads cut to 50 rows, and no gradient on the padded rows."""
    tokens = 50
    c = make_case(19, 8, 56, 60, seed=12)
    with torch.no_grad():
        c["w_s"][tokens:] = 5.0  # padded rows that would otherwise dominate both softmaxes
        c["w_t"][tokens:] = -5.0
    b_s = torch.zeros(56).requires_grad_()
    b_t = torch.zeros(60)
    with torch.no_grad():
        b_s[tokens:], b_t[tokens:] = 20.0, 20.0
    labels = torch.randint(0, tokens, (19,), generator=torch.Generator().manual_seed(3))
    common = {"kind": kind, "temperature": 2.0, "labels": labels, "chunk_size": 8}
    padded = fused_linear_distill_loss(
        c["h_s"],
        c["w_s"],
        c["h_t"],
        c["w_t"],
        c["mask"],
        student_head_bias=b_s,
        teacher_head_bias=b_t,
        vocab_size=tokens,
        **common,
    )
    w_cut = c["w_s"].detach()[:tokens].clone().requires_grad_()
    b_cut = b_s.detach()[:tokens].clone().requires_grad_()
    h_cut = c["h_s"].detach().clone().requires_grad_()
    cut = fused_linear_distill_loss(
        h_cut,
        w_cut,
        c["h_t"],
        c["w_t"][:tokens],
        c["mask"],
        student_head_bias=b_cut,
        teacher_head_bias=b_t[:tokens],
        **common,
    )
    for a, b in zip(padded, cut, strict=True):
        assert scalar(a) == pytest.approx(scalar(b), rel=1e-6)
    g_h, g_w, g_b = grads_of(padded[0] + padded[1], c["h_s"], c["w_s"], b_s)
    want_h, want_w, want_b = grads_of(cut[0] + cut[1], h_cut, w_cut, b_cut)
    assert_close(g_h, want_h, 1e-5, "hidden grad")
    assert_close(g_w[:tokens], want_w, 1e-5, "weight grad")
    assert_close(g_b[:tokens], want_b, 1e-5, "bias grad")
    assert not g_w[tokens:].any() and not g_b[tokens:].any()
    # the same on logits
    logits_s = torch.addmm(b_s, c["h_s"], c["w_s"].t()).detach().requires_grad_()
    logits_t = torch.addmm(b_t, c["h_t"], c["w_t"].t())
    on_logits = distill_loss(
        logits_s, logits_t, c["mask"], kind=kind, temperature=2.0, vocab_size=tokens
    )
    cut_logits = logits_s.detach()[:, :tokens].clone().requires_grad_()
    reference = distill_loss(
        cut_logits, logits_t[:, :tokens], c["mask"], kind=kind, temperature=2.0
    )
    assert scalar(on_logits) == pytest.approx(scalar(reference), rel=1e-6)
    assert scalar(on_logits) == pytest.approx(scalar(padded[0]), rel=1e-5)
    grad = grads_of(on_logits, logits_s)[0]
    assert_close(grad[:, :tokens], grads_of(reference, cut_logits)[0], 1e-5, "logits grad")
    assert not grad[:, tokens:].any()
    # a label past the tokenizer is refused, and so is a vocab_size wider than a head
    bad = labels.clone()
    bad[0] = tokens
    c["mask"][0] = True
    with pytest.raises(PoclError, match="labels"):
        fused_linear_distill_loss(
            c["h_s"],
            c["w_s"],
            c["h_t"],
            c["w_t"],
            c["mask"],
            **{**common, "labels": bad},
            vocab_size=tokens,
        )
    with pytest.raises(PoclError, match="vocab_size"):
        distill_loss(logits_s, logits_t, c["mask"], kind=kind, vocab_size=57)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["fkl", "tvd", "skl"])
def test_labels_give_ce_from_the_same_logits(kind, temperature):
    c = make_case(29, 8, 97, seed=5)
    gen = torch.Generator().manual_seed(9)
    labels = torch.randint(0, 97, (29,), generator=gen)
    labels[3] = IGNORE_INDEX  # an ignored label inside the mask: no CE, still KD
    c["mask"][3] = True
    logits_s = c["h_s"] @ c["w_s"].t()
    ref_kd = naive_loss(logits_s, c["h_t"] @ c["w_t"].t(), c["mask"], kind, temperature)
    ref_ce = naive_ce(logits_s, labels, c["mask"], 97)
    kd, ce = fused_linear_distill_loss(
        c["h_s"],
        c["w_s"],
        c["h_t"],
        c["w_t"],
        c["mask"],
        kind=kind,
        temperature=temperature,
        labels=labels,
        chunk_size=7,
    )
    assert_close(kd, ref_kd, 1e-5, "kd")
    assert_close(ce, ref_ce, 1e-5, "ce")
    # α·CE + (1 − α)·KD: the two terms' gradients are kept apart until the weights are known
    alpha = 0.3
    got = grads_of(alpha * ce + (1 - alpha) * kd, c["h_s"], c["w_s"])
    want = grads_of(alpha * ref_ce + (1 - alpha) * ref_kd, c["h_s"], c["w_s"])
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, 1e-4, "grad")


def _mixed_case(kind, dtype, *, bias, temperature=2.0):
    c = make_case(29, 8, 97, dtype=dtype, seed=6)
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 97, (29,), generator=gen)
    labels[3] = IGNORE_INDEX
    b_s = (torch.randn(97, generator=gen) * 0.1).to(dtype).requires_grad_() if bias else None
    args = (c["h_s"], c["w_s"], c["h_t"], c["w_t"], c["mask"])
    kwargs = dict(
        kind=kind, temperature=temperature, labels=labels, chunk_size=7, student_head_bias=b_s
    )
    params = [t for t in (c["h_s"], c["w_s"], b_s) if t is not None]
    return args, kwargs, params


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kind", KINDS)
def test_sft_weight_mixes_in_the_kernel_exactly(kind, alpha, temperature):
    """The kernel's own α·CE + (1 − α)·KD (one gradient, four matmuls) equals the same mix
    formed by the caller from the separate terms (six matmuls), to float64 rounding. At τ = 1
    the CE gradient is formed from the student's exponentials in place (no block of its own)."""
    bias = kind in ("fkl", "jsd")
    args, kwargs, params = _mixed_case(kind, torch.float64, bias=bias, temperature=temperature)
    kd, ce = fused_linear_distill_loss(*args, **kwargs)
    loss, kd_mixed, ce_mixed = fused_linear_distill_loss(*args, **kwargs, sft_weight=alpha)
    assert scalar(kd_mixed) == scalar(kd) and scalar(ce_mixed) == scalar(ce)
    assert not kd_mixed.requires_grad and not ce_mixed.requires_grad and loss.requires_grad
    want = alpha * ce + (1 - alpha) * kd
    assert scalar(loss) == pytest.approx(scalar(want), rel=1e-12, abs=1e-15)
    for g, w in zip(grads_of(loss, *params), grads_of(want, *params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_sft_weight_mix_in_bf16_matches_the_separate_terms():
    args, kwargs, params = _mixed_case("jsd", torch.bfloat16, bias=False)
    kd, ce = fused_linear_distill_loss(*args, **kwargs)
    loss, _, _ = fused_linear_distill_loss(*args, **kwargs, sft_weight=0.3)
    want = 0.3 * ce + 0.7 * kd
    assert scalar(loss) == pytest.approx(scalar(want), rel=1e-6)
    for g, w in zip(grads_of(loss, *params), grads_of(want, *params), strict=True):
        assert g.dtype == torch.bfloat16
        assert float((g.double() - w.double()).norm() / w.double().norm()) < 1e-2


def _matmuls(fn) -> int:
    """How many N×H×V-shaped matrix products (mm / addmm) `fn` runs, forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (aten.mm, aten.addmm, aten.addmm_, aten.matmul):
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


def test_sft_weight_takes_four_matmuls_per_chunk_not_six():
    args, kwargs, params = _mixed_case("fkl", torch.float32, bias=False)
    chunks = math.ceil(int(args[4].sum()) / kwargs["chunk_size"])

    def separate():
        kd, ce = fused_linear_distill_loss(*args, **kwargs)
        grads_of(0.3 * ce + 0.7 * kd, *params)

    def mixed():
        grads_of(fused_linear_distill_loss(*args, **kwargs, sft_weight=0.3)[0], *params)

    assert _matmuls(separate) == 6 * chunks
    assert _matmuls(mixed) == 4 * chunks


def test_sft_weight_needs_labels_a_teacher_and_a_weight_in_0_1():
    args, kwargs, _ = _mixed_case("fkl", torch.float32, bias=False)
    with pytest.raises(PoclError, match=r"sft_weight=1.5 must be in \[0, 1\]"):
        fused_linear_distill_loss(*args, **kwargs, sft_weight=1.5)
    with pytest.raises(PoclError, match="pass labels and a teacher"):
        fused_linear_distill_loss(*args, **{**kwargs, "labels": None}, sft_weight=0.3)
    h_s, w_s, _, _, mask = args
    with pytest.raises(PoclError, match="pass labels and a teacher"):
        fused_linear_distill_loss(h_s, w_s, None, None, mask, **kwargs, sft_weight=0.3)


def test_ce_only_without_teacher():
    c = make_case(13, 8, 50)
    labels = torch.randint(0, 50, (13,))
    kd, ce = fused_linear_distill_loss(
        c["h_s"], c["w_s"], None, None, c["mask"], kind="fkl", labels=labels
    )
    ref = naive_ce(c["h_s"] @ c["w_s"].t(), labels, c["mask"], 50)
    assert scalar(kd) == 0.0
    assert_close(ce, ref, 1e-5, "ce")
    for g, w in zip(
        grads_of(ce, c["h_s"], c["w_s"]), grads_of(ref, c["h_s"], c["w_s"]), strict=True
    ):
        assert_close(g, w, 1e-4, "grad")


# ----------------------------------------------------------------------------- analytic


GPT2_VOCAB = 50257  # a real vocabulary width: fp32 sums over it are where bias shows


def gpt2_like_logits(rows: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits ~ 3·N(0, 1) at V = 50257 and a teacher = student + 0.05·noise."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, GPT2_VOCAB, generator=gen) * 3
    return student, student + 0.05 * torch.randn(rows, GPT2_VOCAB, generator=gen)


@pytest.fixture(params=["cpu_blocks", "whole_chunk_blocks"])
def block_layout(request, monkeypatch):
    """The kernel's two block layouts: CPU row blocks of ~2 MB, and on accelerators a block
    that is the whole chunk (emulated here), where each row sum spans far more elements."""
    if request.param == "whole_chunk_blocks":
        monkeypatch.setattr(divergence, "_CPU_BLOCK_ELEMENTS", 1 << 40)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS)
def test_identical_distributions_give_exactly_zero(kind, beta, dtype, block_layout):
    logits = gpt2_like_logits(8)[0].to(dtype)
    student = logits.clone().requires_grad_()
    mask = torch.ones(8)
    for temperature in (1.0, 2.0):
        loss = distill_loss(student, logits, mask, kind=kind, beta=beta, temperature=temperature)
        assert scalar(loss) == 0.0, f"p = q at tau={temperature}"
    if kind != "tvd":  # |p − q| has no gradient at p = q; its subgradient here is arbitrary
        assert grads_of(loss, student)[0].abs().max() < 1e-6
    # the fused entry point, with the same hidden states and head for student and teacher
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(GPT2_VOCAB, 16, generator=gen) * 0.75).to(dtype).requires_grad_()
    h = torch.randn(8, 16, generator=gen).to(dtype)
    b = torch.randn(GPT2_VOCAB, generator=gen).to(dtype)
    kd, ce = fused_linear_distill_loss(
        h,
        w,
        h,
        w.detach(),
        mask,
        kind=kind,
        beta=beta,
        temperature=2.0,
        labels=torch.arange(8),
        student_head_bias=b,
        teacher_head_bias=b,
    )
    assert scalar(kd) == 0.0 and scalar(ce) > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_values_match_float64_at_full_vocabulary(kind, temperature, block_layout):
    """fp32 within 1 % of float64 at V = 50257 with a teacher close to the student (the loss
    is small, so a bias of the sums shows), values and gradients, in both block layouts."""
    student, teacher = gpt2_like_logits(32)
    mask = torch.ones(32)
    reference = student.double().requires_grad_()
    ref = naive_loss(reference, teacher.double(), mask, kind, temperature)
    student.requires_grad_()
    out = distill_loss(student, teacher, mask, kind=kind, temperature=temperature)
    assert abs(scalar(out) - scalar(ref)) <= 1e-2 * abs(scalar(ref))
    got, want = grads_of(out, student)[0].double(), grads_of(ref, reference)[0]
    # tvd's gradient jumps where p = q, which fp32 rounding moves: a looser bound there
    assert float((got - want).norm() / want.norm()) < (3e-3 if kind == "tvd" else 1e-4)


def test_beta_endpoints():
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(9, 40, generator=gen).requires_grad_()
    teacher = torch.randn(9, 40, generator=gen)
    mask = torch.ones(9)

    def loss(kind, beta):
        return distill_loss(student, teacher, mask, kind=kind, beta=beta)

    for beta in (0.0, 1.0):
        out = loss("jsd", beta)
        assert scalar(out) == 0.0 and not grads_of(out, student)[0].any()
    for kind in ("skl", "srkl"):
        out = loss(kind, 1.0)
        assert scalar(out) == 0.0 and not grads_of(out, student)[0].any()
    assert scalar(loss("skl", 0.0)) == scalar(loss("fkl", None))
    assert scalar(loss("srkl", 0.0)) == scalar(loss("rkl", None))
    # and the limits are continuous: β → 0 approaches fkl / rkl, β → 1 approaches 0
    assert math.isclose(scalar(loss("skl", 1e-6)), scalar(loss("fkl", None)), rel_tol=1e-4)
    assert math.isclose(scalar(loss("srkl", 1e-6)), scalar(loss("rkl", None)), rel_tol=1e-4)
    assert scalar(loss("jsd", 1e-6)) < 1e-4 and scalar(loss("skl", 1 - 1e-6)) < 1e-4
    assert resolve_divergence("fkl", 0.7).kind == "fkl"  # β ignored where unused


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    gen = torch.Generator().manual_seed(4)
    h_s = torch.randn(6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w_s = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b_s = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    h_t = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    w_t = torch.randn(7, 4, dtype=torch.float64, generator=gen)
    mask = torch.tensor([1, 1, 0, 1, 1, 1])
    labels = torch.randint(0, 7, (6,), generator=gen)

    def fused(h, w, b):
        return fused_linear_distill_loss(
            h,
            w,
            h_t,
            w_t,
            mask,
            kind=kind,
            temperature=1.5,
            labels=labels,
            chunk_size=4,
            student_head_bias=b,
        )

    assert torch.autograd.gradcheck(fused, (h_s, w_s, b_s))
    logits = torch.randn(2, 3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 3, 7, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(
        lambda x: distill_loss(x, teacher, mask.reshape(2, 3), kind=kind, chunk_size=2), (logits,)
    )


@pytest.mark.parametrize("kind", ["rkl", "tvd", "skl"])
def test_result_does_not_depend_on_chunk_size(kind):
    c = make_case(50, 8, 77, seed=6)
    labels = torch.randint(0, 77, (50,))
    results = []
    for chunk_size in (1, 3, 16, 50, 4096):
        kd, ce = fused_linear_distill_loss(
            c["h_s"],
            c["w_s"],
            c["h_t"],
            c["w_t"],
            c["mask"],
            kind=kind,
            labels=labels,
            chunk_size=chunk_size,
        )
        results.append((kd, ce, *grads_of(kd + ce, c["h_s"], c["w_s"])))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_all_tokens_masked_give_zero_and_zero_grads(kind):
    c = make_case(8, 4, 30)
    mask = torch.zeros(8, dtype=torch.bool)
    kd, ce = fused_linear_distill_loss(
        c["h_s"], c["w_s"], c["h_t"], c["w_t"], mask, kind=kind, labels=torch.zeros(8).long()
    )
    assert scalar(kd) == 0.0 and scalar(ce) == 0.0
    g_h, g_w = grads_of(kd + ce, c["h_s"], c["w_s"])
    assert g_h.shape == c["h_s"].shape and not g_h.any() and not g_w.any()
    logits = torch.randn(8, 30, requires_grad=True)
    out = distill_loss(logits, torch.randn(8, 30), mask, kind=kind)
    assert scalar(out) == 0.0 and not grads_of(out, logits)[0].any()


@pytest.mark.parametrize(("kind", "beta"), KIND_BETAS)
def test_extreme_logits_stay_finite(kind, beta):
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(6, 50, generator=gen) * 1e4
    teacher = torch.randn(6, 50, generator=gen) * 1e4
    # a token both models find (almost) impossible, and one where only one of them does
    student[:, 7], teacher[:, 7] = -1e4, -1e4
    student[:, 9], teacher[:, 9] = 1e4, -1e4
    student.requires_grad_()
    for temperature in (1.0, 2.0):
        out = distill_loss(
            student, teacher, torch.ones(6), kind=kind, beta=beta, temperature=temperature
        )
        ref = naive_loss(student, teacher, torch.ones(6), kind, temperature, beta)
        grad = grads_of(out, student)[0]
        assert torch.isfinite(out) and torch.isfinite(grad).all()
        assert_close(out, ref, 1e-5, "loss")
        assert_close(grad, grads_of(ref, student)[0], 1e-4, "grad")


def test_global_normalisation_by_valid_tokens():
    """Long and short sequences in one batch, and the batch split into two micro-batches."""
    gen = torch.Generator().manual_seed(8)
    lengths = torch.tensor([2, 7, 10, 1])
    mask = torch.arange(10)[None, :] < lengths[:, None]
    h_s = torch.randn(4, 10, 6, generator=gen, requires_grad=True)
    w_s = torch.randn(40, 6, generator=gen, requires_grad=True)
    h_t = torch.randn(4, 10, 5, generator=gen)
    w_t = torch.randn(40, 5, generator=gen)
    ref = naive_loss(h_s @ w_s.t(), h_t @ w_t.t(), mask, "jsd", 2.0)
    whole = fused_linear_distill_loss(h_s, w_s, h_t, w_t, mask, kind="jsd", temperature=2.0)
    assert_close(whole, ref, 1e-5, "whole batch")
    # micro-batches of 1 and 3 sequences, each divided by the global count (int and tensor)
    total = int(mask.sum())
    parts = [
        fused_linear_distill_loss(
            h_s[rows],
            w_s,
            h_t[rows],
            w_t,
            mask[rows],
            kind="jsd",
            temperature=2.0,
            num_valid_tokens=count,
        )
        for rows, count in ((slice(0, 1), total), (slice(1, 4), torch.tensor(total)))
    ]
    assert_close(parts[0] + parts[1], ref, 1e-5, "sum of micro-batches")
    for g, w in zip(grads_of(parts[0] + parts[1], h_s, w_s), grads_of(ref, h_s, w_s), strict=True):
        assert_close(g, w, 1e-4, "grad")
    logits = distill_loss(h_s @ w_s.t(), h_t @ w_t.t(), mask, kind="jsd", temperature=2.0)
    assert_close(logits, ref, 1e-5, "distill_loss")
    # a divisor below 1 (global count / (ranks × accumulation) of a tiny batch) is kept as is
    half = distill_loss(
        h_s @ w_s.t(), h_t @ w_t.t(), mask, kind="jsd", temperature=2.0, num_valid_tokens=0.5
    )
    assert_close(half, ref * total / 0.5, 1e-5, "divisor 0.5")


def test_temperature_squared_switch():
    student, teacher, mask = torch.randn(5, 20), torch.randn(5, 20), torch.ones(5)
    on = distill_loss(student, teacher, mask, kind="rkl", temperature=2.0)
    off = distill_loss(
        student, teacher, mask, kind="rkl", temperature=2.0, scale_by_temperature_squared=False
    )
    assert math.isclose(scalar(on), 4.0 * scalar(off), rel_tol=1e-6)


@pytest.mark.parametrize("kind", ["fkl", "jsd", "srkl"])
def test_temperature_squared_off_gradients_match_reference(kind):
    """Without τ² the gradient w.r.t. the logits is ∂D/∂s / τ (not τ·∂D/∂s), at τ = 2."""
    c = make_case(23, 8, 71, seed=11)
    logits_s = c["h_s"] @ c["w_s"].t()
    logits_t = c["h_t"] @ c["w_t"].t()
    ref = naive_loss(logits_s, logits_t, c["mask"], kind, 2.0, scale=False)
    kwargs = {"kind": kind, "temperature": 2.0, "scale_by_temperature_squared": False}
    fused = fused_linear_distill_loss(
        c["h_s"], c["w_s"], c["h_t"], c["w_t"], c["mask"], chunk_size=8, **kwargs
    )
    assert_close(fused, ref, 1e-5, "fused loss")
    for got, want in zip(
        grads_of(fused, c["h_s"], c["w_s"]), grads_of(ref, c["h_s"], c["w_s"]), strict=True
    ):
        assert_close(got, want, 1e-4, "fused grad")
    student = logits_s.detach().requires_grad_()
    reference = logits_s.detach().double().requires_grad_()
    out = distill_loss(student, logits_t.detach(), c["mask"], chunk_size=8, **kwargs)
    ref = naive_loss(reference, logits_t.detach(), c["mask"], kind, 2.0, scale=False)
    assert_close(out, ref, 1e-5, "logits loss")
    assert_close(grads_of(out, student)[0], grads_of(ref, reference)[0], 1e-4, "logits grad")


def test_user_errors_name_the_argument():
    student, teacher, mask = torch.randn(4, 10), torch.randn(4, 10), torch.ones(4)
    cases = [
        ({"kind": "kl"}, "kind"),
        ({"kind": "jsd", "beta": 1.5}, "beta"),
        ({"kind": "skl", "beta": -0.1}, "beta"),
        ({"kind": "srkl", "beta": "0.1"}, "beta"),
        ({"kind": "fkl", "temperature": 0.0}, "temperature"),
        ({"kind": "fkl", "chunk_size": 0}, "chunk_size"),
        ({"kind": "fkl", "num_valid_tokens": -1}, "num_valid_tokens"),
    ]
    for kwargs, name in cases:
        with pytest.raises(PoclError, match=name):
            distill_loss(student, teacher, mask, **kwargs)
    with pytest.raises(PoclError, match="response_mask"):
        distill_loss(student, teacher, torch.ones(5), kind="fkl")
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    with pytest.raises(PoclError, match="labels"):
        fused_linear_distill_loss(h, w, h, w, mask, kind="fkl", labels=torch.tensor([1, 2, 3, 10]))
    with pytest.raises(PoclError, match="teacher_head_weight"):
        fused_linear_distill_loss(h, w, h, torch.randn(10, 4), mask, kind="fkl")


def test_no_grad_mode_gives_the_same_loss():
    c = make_case(19, 8, 60)
    labels = torch.randint(0, 60, (19,))
    kwargs = {"kind": "srkl", "temperature": 2.0, "labels": labels, "chunk_size": 8}
    with_grad = fused_linear_distill_loss(
        c["h_s"], c["w_s"], c["h_t"], c["w_t"], c["mask"], **kwargs
    )
    with torch.no_grad():
        without = fused_linear_distill_loss(
            c["h_s"], c["w_s"], c["h_t"], c["w_t"], c["mask"], **kwargs
        )
    assert not without[0].requires_grad
    for a, b in zip(with_grad, without, strict=True):
        assert scalar(a) == scalar(b)


def test_gathered_parameters_passes_plain_tensors_through():
    weight = torch.randn(5, 3, requires_grad=True)
    with gathered_parameters(weight, None):
        assert weight.shape == (5, 3)


# ----------------------------------------------------------------------------- ZeRO-3


def _zero_worker(out_path: str) -> None:
    """On each of 2 ranks: the same 3 KD steps of a tied-embedding GPT-2 under ZeRO-0 with
    the naive loss on full logits, and under ZeRO-3 with the fused loss on the partitioned
    head. Rank 0 writes both loss trajectories and final head weights."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers import GPT2Config, GPT2LMHeadModel

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()

    def build(seed):
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=96,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=32,
            tie_word_embeddings=True,
        )
        return GPT2LMHeadModel(config)

    teacher = build(1).eval()
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, 96, (2, 12), generator=gen) for _ in range(3)]
    mask = torch.ones(2, 11)
    mask[0, 7:] = 0

    def run(stage: int, fused: bool):
        model = build(0)
        assert model.lm_head.weight is model.transformer.wte.weight
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "steps_per_print": 10**6,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        losses, grads = [], []
        for input_ids in batches:
            hidden = engine.module.transformer(input_ids=input_ids).last_hidden_state[:, :-1]
            with torch.no_grad():
                t_hidden = teacher.transformer(input_ids=input_ids).last_hidden_state[:, :-1]
            weight = engine.module.lm_head.weight
            if fused:
                with gathered_parameters(weight):
                    assert weight.shape == (96, 32)
                    loss = fused_linear_distill_loss(
                        hidden,
                        weight,
                        t_hidden,
                        teacher.lm_head.weight,
                        mask,
                        kind="jsd",
                        temperature=2.0,
                        chunk_size=5,
                    )
            else:
                logits = engine.module.lm_head(hidden)
                loss = naive_loss(
                    logits, t_hidden @ teacher.lm_head.weight.t(), mask, "jsd", 2.0
                ).float()
            engine.backward(loss)
            if not grads:  # the tied weight's full gradient (embedding + head) of step 1
                grads.append(safe_get_full_grad(engine.module.lm_head.weight).clone())
            engine.step()
            losses.append(float(loss.detach()))
        weight = engine.module.lm_head.weight
        with gathered_parameters(weight):
            final = weight.detach().clone()
        if stage == 3:
            assert weight.numel() == 0 or weight.ds_numel == 96 * 32  # partitioned again
        return losses, grads[0], final

    reference_losses, reference_grad, reference_weight = run(0, fused=False)
    fused_losses, fused_grad, fused_weight = run(3, fused=True)
    if rank == 0:
        Path(out_path).write_text(
            json.dumps(
                {
                    "reference": reference_losses,
                    "fused": fused_losses,
                    "grad_scale": float(reference_grad.abs().max()),
                    "max_grad_diff": float((reference_grad - fused_grad).abs().max()),
                    "max_weight_diff": float((reference_weight - fused_weight).abs().max()),
                    "weight_change": float((fused_weight - build(0).lm_head.weight).abs().max()),
                }
            )
        )


@pytest.mark.slow
def test_zero3_partitioned_tied_head_matches_zero0(tmp_path):
    from tests import launchers

    out = tmp_path / "zero.json"
    result = launchers.run("torchrun", __file__, ["zero", str(out)], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["max_grad_diff"] < 1e-5 * report["grad_scale"]
    assert report["weight_change"] > 1e-3  # the tied head did train
    for ref, got in zip(report["reference"], report["fused"], strict=True):
        assert math.isclose(ref, got, rel_tol=1e-4)
    # Adam turns float-rounding differences of near-zero gradients into ~lr-sized steps
    assert report["max_weight_diff"] < 0.05 * report["weight_change"]


if __name__ == "__main__" and sys.argv[1:2] == ["zero"]:
    from pocl_ds.cli import run_main

    run_main(lambda: _zero_worker(sys.argv[2]))


def test_the_kernel_reads_the_device_once_per_call():
    """Its one host read is the valid-row count (its chunk plan) fused with the label check;
    no other item/tolist/bool in the forward or the backward, so a trainer step's micro-batches
    do not each stall a GPU on checks."""
    import traceback

    from torch.overrides import TorchFunctionMode

    reads = []

    class HostReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in (
                "item",
                "tolist",
                "__bool__",
                "__float__",
                "__int__",
            ):
                frames = [f.filename for f in traceback.extract_stack()[:-1]]
                reads.append(next(f for f in reversed(frames) if "/torch/" not in f))
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    hs = torch.randn(64, 16, generator=gen, requires_grad=True)
    ws = torch.randn(100, 16, generator=gen, requires_grad=True)
    ht, wt = torch.randn(64, 16, generator=gen), torch.randn(100, 16, generator=gen)
    labels = torch.randint(0, 100, (64,), generator=gen)
    mask = torch.rand(64, generator=gen) > 0.2
    with HostReads():
        loss, _, _ = fused_linear_distill_loss(
            hs, ws, ht, wt, mask, kind="fkl", labels=labels, sft_weight=0.3, chunk_size=16
        )
        loss.backward()
    assert [Path(f).name for f in reads] == ["divergence.py"]


# ----------------------------------------------------------------------------- CPU block lanes


@pytest.fixture
def two_intra_op_threads():
    """The tests run on one intra-op thread; lanes need torch to allow two (also used by
    tests/test_cpu_kernel.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("kind", "labels"), [("jsd", True), ("srkl", False), ("tvd", True)])
def test_block_lanes_give_the_gradients_of_one_lane(
    kind, labels, monkeypatch, two_intra_op_threads
):
    """Two lanes share out a chunk's blocks on their own threads: every block is computed as
    on one lane (bitwise-equal gradients), only the block sums are added in another order,
    and a lane-count result never depends on thread timing (two calls agree bitwise)."""
    import threading

    gen = torch.Generator().manual_seed(11)
    hs = torch.randn(96, 32, generator=gen)
    ws = torch.randn(3000, 32, generator=gen) * 0.3
    ht, wt = torch.randn(96, 32, generator=gen), torch.randn(3000, 32, generator=gen) * 0.3
    target = torch.randint(0, 3000, (96,), generator=gen) if labels else None
    # blocks of 20 rows at V = 3000: a 48-row chunk has 3 blocks, shared out 1 + 2
    monkeypatch.setattr(divergence, "_CPU_BLOCK_ELEMENTS", 20 * 3000)
    threads_seen = set()
    blocks_divergence = divergence._blocks_divergence_

    def recorded(*args, **kwargs):
        threads_seen.add(threading.current_thread().name)
        assert torch.get_num_threads() == 1 and not torch.is_grad_enabled()
        return blocks_divergence(*args, **kwargs)

    monkeypatch.setattr(divergence, "_blocks_divergence_", recorded)

    def run(lanes: int):
        monkeypatch.setattr(divergence, "CPU_ELEMENTWISE_THREADS", lanes)
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        out = fused_linear_distill_loss(
            h, w, ht, wt, torch.ones(96), kind=kind, labels=target, chunk_size=48,
            **({"sft_weight": 0.3} if labels else {}),
        )  # fmt: skip
        loss = out[0] if labels else out  # the mixed loss α·CE + (1 − α)·KD, or KD alone
        loss.backward()
        return loss.detach(), h.grad, w.grad

    one = run(1)
    assert threads_seen == {threading.current_thread().name}
    threads_seen.clear()
    two, again = run(2), run(2)
    assert len(threads_seen) == 2 and threading.current_thread().name not in threads_seen
    assert torch.get_num_threads() == 2, "the matmuls get every thread back"
    assert all(torch.equal(a, b) for a, b in zip(two, again, strict=True))
    assert torch.equal(one[1], two[1]) and torch.equal(one[2], two[2])
    assert_close(two[0], one[0], 1e-6, "loss")


def _kernel_in_a_forked_child(queue) -> None:
    gen = torch.Generator().manual_seed(3)
    logits, teacher = torch.randn(64, 500, generator=gen), torch.randn(64, 500, generator=gen)
    queue.put(float(distill_loss(logits, teacher, torch.ones(64), kind="jsd")))


def test_a_forked_child_starts_its_own_lanes(monkeypatch, two_intra_op_threads):
    """A fork keeps the parent's pool object but none of its threads: without a fresh pool the
    child's first kernel call would wait forever."""
    import multiprocessing

    monkeypatch.setattr(divergence, "_CPU_BLOCK_ELEMENTS", 16 * 500)  # 4 blocks of 16 rows
    gen = torch.Generator().manual_seed(3)
    logits, teacher = torch.randn(64, 500, generator=gen), torch.randn(64, 500, generator=gen)
    want = float(distill_loss(logits, teacher, torch.ones(64), kind="jsd"))
    assert divergence._lane_pool, "the parent's call started the lanes"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_kernel_in_a_forked_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, "the child hung or failed"
    assert queue.get(timeout=5) == pytest.approx(want, rel=1e-6)


def test_the_mixture_ratio_is_weight_times_expm1_of_d():
    """excess = w·(p/q − 1) from the exponentials equals w·expm1(d) (to float64 rounding here,
    for d from −30 to 30), is exactly 0 at p = q, and stays finite where q underflows: capped
    like d, and 0 where p and q both do."""
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(4, 400, generator=gen, dtype=torch.float64) * 10
    t = s + torch.linspace(-30, 30, 400, dtype=torch.float64)
    t[0] = s[0]  # p = q on a whole row
    q_exp, p_exp = torch.empty_like(s), torch.empty_like(t)
    q_total, log_q_total = divergence._shifted_exp_(s, q_exp)
    p_total, log_p_total = divergence._shifted_exp_(t, p_exp)
    d = (t - s) + (log_q_total - log_p_total)
    excess, f = torch.empty_like(s), torch.empty_like(s)
    divergence._log_mixture_ratio_(p_exp, q_exp, q_total / p_total, 0.3, excess, f)
    assert torch.equal(excess[0], torch.zeros(400)) and torch.equal(f[0], torch.zeros(400))
    torch.testing.assert_close(excess, 0.3 * torch.expm1(d), rtol=1e-9, atol=0.0)
    torch.testing.assert_close(f, torch.log1p(0.3 * torch.expm1(d)), rtol=1e-9, atol=0.0)

    p_exp32 = torch.tensor([[0.5, 0.0, 1e-30, 1.0]])
    q_exp32 = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # q underflowed in the first three
    excess32, f32 = torch.empty(1, 4), torch.empty(1, 4)
    ones = torch.ones(1, 1)
    divergence._log_mixture_ratio_(p_exp32, q_exp32, ones, 0.5, excess32, f32)
    cap = 0.5 * math.expm1(divergence._MAX_LOG_RATIO)
    assert excess32.tolist()[0] == pytest.approx([cap, 0.0, cap, 0.0])
    assert torch.isfinite(f32).all()
