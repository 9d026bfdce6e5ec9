"""The six KD divergences of SPEC.md as a chunked, fused, Triton-free kernel.

Per valid token, with p = softmax(teacher / τ) and q = softmax(student / τ) over the vocabulary:

    loss = τ² · Σ_{t: m_t=1} D(p_t, q_t) / num_valid_tokens      (τ² switchable)

Naive KD code materialises several fp32 [tokens × vocab] tensors per loss; with a 50k–150k
vocabulary that is what runs out of memory first. Here the tokens are processed in chunks of
`chunk_size` rows: for each chunk the logits are formed (from hidden states and lm_head weights
in `fused_linear_distill_loss`), the divergence and its gradient with respect to the student
logits are computed in closed form, and the gradient is pushed through the head right away
(`grad_hidden = G·W`, `grad_weight += Gᵀ·h`, the latter accumulated in fp32). The backward only
rescales these saved gradients, so no [tokens × vocab] tensor lives past its chunk, and the
forward+backward costs the four N×H×V matmuls plus a few elementwise passes.

Gradients with respect to the student's scaled logits s = z/τ (u, c are per-token helpers,
m = β·p + (1−β)·q and m' = (1−β)·p + β·q):

    fkl   D = Σ p(log p − log q)                       ∂D/∂s = q − p
    rkl   D = Σ q(log q − log p)                       ∂D/∂s = q(u − Σ q·u),  u = log q − log p
    tvd   D = ½ Σ |p − q|                              ∂D/∂s = q(g − Σ q·g),  g = ½·sign(q − p)
    jsd   D = β·KL(p‖m) + (1−β)·KL(q‖m)                ∂D/∂s = (1−β)·q(u − Σ q·u), u = log q − log m
    skl   D = KL(p‖m)                                  ∂D/∂s = q·Σr − r,  r = (1−β)·p·q/m
    srkl  D = KL(q‖m')                                 ∂D/∂s = q(u − Σ q·u), u = log(q/m') − β·q/m'

and ∂loss/∂z = (τ² or 1)/τ · ∂D/∂s / num_valid_tokens. The mixture kinds are formed from
d = log p − log q and log(m/q) = log1p(β·(p/q − 1)) (1−β for srkl's m'), never from log m: each
summed term then vanishes where p = q, so p = q gives exactly 0 (in fp32 and bf16) and fp32
values stay within ~1e-4 relative of float64 at a 50k vocabulary; tokens both models find
unlikely stay finite.

Everything here is torch ops but one path: on CPU, jsd without labels in fp32 runs its rows in
native code (`cpu_kernel`, the same formulas in four sweeps per row, built on first use),
where eager ops pass over each block some 25 times; without a compiler it stays on the ops.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from pocl_ds import cpu_kernel
from pocl_ds.data import IGNORE_INDEX
from pocl_ds.errors import PoclError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

KINDS = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")
DEFAULT_BETA = {"jsd": 0.5, "skl": 0.1, "srkl": 0.1}

# Rows of logits per chunk. Two fp32 chunk buffers (student, teacher) live at a time, plus a
# third with labels: at V = 50257 that is 206 MB each for 1024 rows, against the 2 GB (N = 1024)
# to 8.5 GB (N = 4096) a naive implementation peaks at. Smaller chunks re-read the head weights
# more often (each chunk streams W through four matmuls), which costs matmul speed on CPU.
DEFAULT_CHUNK_SIZE = 1024

# On CPU the elementwise work runs on row blocks of about this many elements (2 MB in fp32), so
# the ~20 passes over a block hit the cache instead of memory; on accelerators a block is the
# whole chunk (there, launches cost more than memory traffic).
_CPU_BLOCK_ELEMENTS = 1 << 19

# Cap on d = log p − log q in the mixture divergences, so that e^d stays finite in fp32 (see
# `_log_ratio_` for why the cap changes no result).
_MAX_LOG_RATIO = 50.0

# Threads of the elementwise block loop on CPU (at most torch's intra-op thread count): the
# chunk's blocks are shared out among this many threads, each of which runs its ops on one
# intra-op thread (see `_elementwise_threads`); 0: one loop whose ops use all of torch's threads.
CPU_ELEMENTWISE_THREADS = 2


@dataclass(frozen=True)
class _Divergence:
    """A validated (kind, β) pair. `kind` is "zero" where the divergence vanishes identically."""

    kind: str
    beta: float


def resolve_divergence(kind: str, beta: float | None = None) -> _Divergence:
    """Validate `kind` and `beta` and apply SPEC's defaults and β endpoints.

    β is used by jsd, skl and srkl (default `DEFAULT_BETA[kind]`); the other kinds accept and
    ignore it. Endpoints: jsd at β ∈ {0, 1} is 0; skl at β = 0 is fkl and at β = 1 is 0; srkl
    at β = 0 is rkl and at β = 1 is 0.
    """
    if kind not in KINDS:
        raise PoclError(f"kind={kind!r} is not a divergence; set `kind` to one of {KINDS}")
    if beta is None:
        beta = DEFAULT_BETA.get(kind, 0.0)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise PoclError(f"beta={beta!r} must be a number in [0, 1]; fix `beta`")
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise PoclError(f"beta={beta} is outside [0, 1]; set `beta` in [0, 1] (default 0.5/0.1)")
    if kind == "jsd" and beta in (0.0, 1.0):
        return _Divergence("zero", beta)
    if kind in ("skl", "srkl") and beta == 1.0:
        return _Divergence("zero", beta)
    if kind in ("skl", "srkl") and beta == 0.0:
        return _Divergence("fkl" if kind == "skl" else "rkl", beta)
    return _Divergence(kind, beta)


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise PoclError(f"temperature={temperature!r} must be a positive number; fix `temperature`")
    if not (math.isfinite(temperature) and temperature > 0):
        raise PoclError(f"temperature={temperature} must be finite and > 0; fix `temperature`")
    return float(temperature)


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise PoclError(f"chunk_size={chunk_size!r} must be a positive int; fix `chunk_size`")
    return chunk_size


def _compared_vocab(vocab_size: int | None, *widths: int) -> int:
    """How many leading vocabulary entries (logit columns, head rows) take part.

    None: every entry both models have, min(widths). Otherwise the tokenizer's size: rows
    past it (embedding tables padded to a multiple of 64 or 128) are no token, so both models
    give them zero probability and they are never a label.
    """
    narrow = min(widths)
    if vocab_size is None:
        return narrow
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise PoclError(f"vocab_size={vocab_size!r} must be an int; pass the tokenizer's size")
    if not 1 <= vocab_size <= narrow:
        raise PoclError(
            f"vocab_size={vocab_size} is outside [1, {narrow}] (the narrower model's output "
            f"width; widths {widths}); pass the tokenizer's size, at most every model's width"
        )
    return vocab_size


def _divisor(num_valid_tokens: float | Tensor | None, local_count: int) -> float | Tensor:
    """What the summed divergence is divided by.

    Default: this call's valid-token count, clamped at 1. A given value is used as it is (a
    trainer whose engine averages over ranks and micro-batches passes global_tokens /
    (world × accumulation), which may be below 1); 0 (no valid token anywhere) becomes 1.
    """
    if num_valid_tokens is None:
        return float(max(local_count, 1))
    if isinstance(num_valid_tokens, Tensor):
        if num_valid_tokens.numel() != 1:
            raise PoclError("num_valid_tokens must be a scalar; pass the global valid-token count")
        value = num_valid_tokens.detach().reshape(()).to(torch.float32)
        return torch.where(value > 0, value, torch.ones_like(value))
    if isinstance(num_valid_tokens, bool) or not isinstance(num_valid_tokens, (int, float)):
        raise PoclError(f"num_valid_tokens={num_valid_tokens!r} must be a number or a 0-d tensor")
    if not (math.isfinite(num_valid_tokens) and num_valid_tokens >= 0):
        raise PoclError(f"num_valid_tokens={num_valid_tokens} must be finite and >= 0")
    return float(num_valid_tokens) if num_valid_tokens > 0 else 1.0


def _flat_rows(x: Tensor, name: str) -> Tensor:
    """[B, T, D] or [N, D] -> [N, D]."""
    if x.dim() < 2:
        raise PoclError(f"`{name}` has shape {tuple(x.shape)}; expected [B, T, D] or [N, D]")
    return x.reshape(-1, x.shape[-1])


def _valid_rows(
    response_mask: Tensor, num_rows: int, labels: Tensor | None = None, vocab: int = 0
) -> tuple[Tensor, Tensor | None]:
    """The indices of the rows that count, and their labels (None without labels).

    The chunk loop needs the number of valid rows on the host; that count and the number of
    bad labels come back in one read, the call's only synchronisation with the device."""
    mask = response_mask.reshape(-1) != 0
    if mask.numel() != num_rows:
        raise PoclError(
            f"`response_mask` has {mask.numel()} positions but the inputs have {num_rows} tokens; "
            "pass a mask of the inputs' leading shape"
        )
    if labels is None:
        count = int(mask.sum())
        return torch.nonzero_static(mask, size=count).reshape(-1), None
    flat_labels = labels.reshape(-1)
    if flat_labels.numel() != num_rows:
        raise PoclError(
            f"labels has {flat_labels.numel()} positions, the hidden states {num_rows}; "
            "pass labels aligned with the hidden states"
        )
    outside = ((flat_labels < 0) & (flat_labels != IGNORE_INDEX)) | (flat_labels >= vocab)
    count, bad = torch.stack([mask.sum(), (mask & outside).sum()]).tolist()
    if bad:
        raise PoclError(
            f"labels hold ids outside [0, {vocab}) at response positions; every label "
            f"must be a token of the compared vocabulary (or IGNORE_INDEX={IGNORE_INDEX})"
        )
    valid_index = torch.nonzero_static(mask, size=count).reshape(-1)
    return valid_index, flat_labels.index_select(0, valid_index)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32 for every model dtype; fp64 stays fp64 (gradcheck)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _block_rows(vocab: int, device: torch.device, chunk_rows: int) -> int:
    if device.type != "cpu":
        return max(chunk_rows, 1)
    return max(1, min(chunk_rows, _CPU_BLOCK_ELEMENTS // max(vocab, 1)))


class _Workspace:
    """Scratch [block_rows × V] buffers reused by every block of one kernel call: the student's
    and the teacher's exponentials, a scratch block and, with ``ce_block``, one for the block's
    CE gradient (a mixed loss at τ ≠ 1; so no [chunk × V] CE buffer is needed). One set per
    lane, the threads that share out a chunk's blocks on CPU (`_block_lanes`)."""

    def __init__(
        self,
        rows: int,
        vocab: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        ce_block: bool = False,
    ) -> None:
        self.rows = rows
        self.lanes = _block_lanes(device)
        count = 4 if ce_block else 3
        self._buffers = [
            [torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(count)]
            for _ in range(self.lanes)
        ]

    def get(self, rows: int, lane: int = 0) -> list[Tensor]:
        return [buf[:rows] for buf in self._buffers[lane]]


def _shifted_exp_(logits: Tensor, exp_out: Tensor) -> tuple[Tensor, Tensor]:
    """logits <- logits − rowmax; exp_out <- exp(logits). Returns (Z, log Z), each [rows, 1].

    Then log-softmax = logits − log Z and softmax = exp_out / Z: the 1/Z is kept as a row
    factor rather than applied, which saves a pass over [rows × V] wherever it can be folded.
    """
    logits.sub_(logits.amax(dim=1, keepdim=True))
    torch.exp(logits, out=exp_out)
    total = exp_out.sum(dim=1, keepdim=True)
    return total, total.log()


def _row_dot(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    """Σ_v a·b per row, as [rows, 1]."""
    return torch.mul(a, b, out=scratch).sum(dim=1, keepdim=True)


def _log_ratio_(s: Tensor, log_q_total: Tensor, t: Tensor, log_p_total: Tensor) -> Tensor:
    """t <- d = log p − log q from the shifted logits, capped at L = _MAX_LOG_RATIO.

    d is exactly 0 wherever p = q (identical logits give identical shifts and totals), as
    log(p/m) = d − f must be for jsd and skl to be exactly 0 at p = q. The cap only touches
    tokens with q < e^−L·p: there log(p/m) moves by less than e^−L over the mixture's weight
    on p, and the terms weighted by q by less than e^−L; both far below float64 rounding.
    """
    return t.sub_(s).add_(log_q_total - log_p_total).clamp_max_(_MAX_LOG_RATIO)


def _mixture_ratio_cap(weight: float) -> float:
    """The cap on m/q − 1 = weight·(p/q − 1): the cap on d (`_log_ratio_`) carried over."""
    return weight * math.expm1(_MAX_LOG_RATIO)


def _log_mixture_ratio_(
    p_exp: Tensor, q_exp: Tensor, q_over_p_total: Tensor, weight: float, excess: Tensor, out: Tensor
) -> Tensor:
    """For the mixture m = weight·p + (1 − weight)·q: excess <- m/q − 1 = weight·(p/q − 1) and
    out <- log m − log q = log1p(excess).

    p/q = (p_exp/q_exp)·(Z_q/Z_p) is a division, not an exp of d: the exponentials are already
    there, and expm1 cost as much as the rest of a block's passes together. Both outputs vanish
    exactly at p = q (equal exponentials and totals give a ratio of exactly 1) and stay accurate
    for small d, unlike log m formed from log p and log q. Where q_exp underflows the ratio is
    capped like d (`_log_ratio_`); 0/0 (both underflow) gets excess 0, a term that p = q = 0
    weighs by 0.
    """
    cap = _mixture_ratio_cap(weight)
    torch.div(p_exp, q_exp, out=excess).mul_(q_over_p_total * weight).sub_(weight)
    excess.nan_to_num_(nan=0.0, posinf=cap).clamp_max_(cap)
    return torch.log1p(excess, out=out)


def _block_divergence_(
    s: Tensor,
    q_exp: Tensor,
    q_total: Tensor,
    log_q_total: Tensor,
    t: Tensor,
    div: _Divergence,
    p_exp: Tensor,
    scratch: Tensor,
) -> tuple[Tensor, Tensor | float]:
    """Σ over the block's rows of D, and ∂D/∂s, in place.

    s: [rows, V] student logits after `_shifted_exp_` (q = q_exp / q_total); t: [rows, V]
    teacher scaled logits. On return s holds G' with ∂D/∂s = factor · G' (factor: [rows, 1] or
    a number); t, p_exp and scratch are clobbered.

    Every sum runs over terms that vanish where p = q (never a constant such as log β taken
    off a sum that assumes Σ p = 1, whose rounding is as large as the divergence itself), and
    the mixture and tvd sums run per row, so p = q gives exactly 0 and fp32 values stay close
    to float64 also where a block is a whole chunk (accelerators).
    """
    p_total, log_p_total = _shifted_exp_(t, p_exp)
    if div.kind == "fkl":
        # log p − log q = (t − s) + (log Z_q − log Z_p); Σ_v p = 1.
        p = p_exp.div_(p_total)
        total = torch.dot(p.reshape(-1), t.sub_(s).reshape(-1)) + (log_q_total - log_p_total).sum()
        torch.addcmul(p, q_exp, q_total.reciprocal(), value=-1.0, out=s)  # p − q
        return total, -1.0
    if div.kind == "rkl":
        u = s.sub_(t)  # log q − log p − (log Z_p − log Z_q)
        c = _row_dot(q_exp, u, scratch).div_(q_total)
        total = (c + log_p_total - log_q_total).sum()
        u.sub_(c).mul_(q_exp)
        return total, q_total.reciprocal()
    if div.kind == "tvd":
        # d = Z_p·(p − q), formed so that it is exactly 0 where p = q
        d = p_exp.addcmul_(q_exp, p_total / q_total, value=-1.0)
        total = 0.5 * torch.linalg.vector_norm(d, ord=1, dim=1, keepdim=True).div_(p_total).sum()
        d.sign_()
        # g = ½·sign(q − p) = −½·d, so q(g − Σ q·g) = ½·q(Σ q·d − d).
        c = _row_dot(q_exp, d, scratch).div_(q_total)
        torch.sub(c, d, out=s).mul_(q_exp)
        return total, 0.5 * q_total.reciprocal()
    beta = div.beta
    q_over_p_total = q_total / p_total
    if div.kind == "srkl":
        # m' = (1−β)·p + β·q, f = log(m'/q): D = −Σ q·f. With e = m'/q − 1 the gradient's
        # u = log(q/m') − β·q/m' is −(y + β) for y = f − β·e/(1 + e), which is 0 at p = q;
        # the constant β cancels in u − Σ q·u.
        excess = scratch
        f = _log_mixture_ratio_(p_exp, q_exp, q_over_p_total, 1.0 - beta, excess, s)
        total = -_row_dot(q_exp, f, t).div_(q_total).sum()
        y = f.addcdiv_(excess, torch.add(excess, 1.0, out=t), value=-beta)
        y.sub_(_row_dot(q_exp, y, t).div_(q_total)).mul_(q_exp)
        return total, -q_total.reciprocal()
    # jsd and skl: m = β·p + (1−β)·q, f = log(m/q), and log(p/m) = d − f.
    d = _log_ratio_(s, log_q_total, t, log_p_total)
    excess = scratch
    f = _log_mixture_ratio_(p_exp, q_exp, q_over_p_total, beta, excess, s)
    log_p_over_m = d.sub_(f)
    if div.kind == "skl":
        kl_p = _row_dot(p_exp, log_p_over_m, s).div_(p_total).sum()  # Σ KL(p‖m)
        # r = (1−β)·p·q/m = (1−β)/Z_p · w with w = p_exp/(1 + e); ∂D/∂s = q·Σr − r
        w = p_exp.div_(excess.add_(1.0))
        c = w.sum(dim=1, keepdim=True).div_(q_total)
        torch.addcmul(w, q_exp, c, value=-1.0, out=s)
        return kl_p, -(1.0 - beta) * p_total.reciprocal()
    kl_p = _row_dot(p_exp, log_p_over_m, scratch).div_(p_total).sum()  # Σ KL(p‖m)
    c = _row_dot(q_exp, f, scratch).div_(q_total)  # Σ q·f = −Σ KL(q‖m)
    total = beta * kl_p - (1.0 - beta) * c.sum()
    # u = log q − log m = −f: ∂D/∂s = (1−β)·q(u − Σ q·u) = −(1−β)·q(f − Σ q·f)
    f.sub_(c).mul_(q_exp)
    return total, -(1.0 - beta) * q_total.reciprocal()


def _label_columns(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(keep [rows] bool, column [rows, 1]): which rows have a label, and where to read it (0
    for ignored rows, whose terms `keep` zeroes)."""
    keep = labels != IGNORE_INDEX
    return keep, torch.where(keep, labels, torch.zeros_like(labels)).unsqueeze(1)


def _block_cross_entropy_(
    s: Tensor,
    q_exp: Tensor,
    q_total: Tensor,
    log_q_total: Tensor,
    labels: Tensor,
    temperature: float,
    work: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """CE at temperature 1 of one block, from s after `_shifted_exp_` (left unchanged).

    Writes G' into `work` with ∂CE/∂z = factor · G' (softmax(z) − onehot(label)); rows whose
    label is IGNORE_INDEX get 0 loss and factor 0. Returns (Σ CE, factor [rows, 1]).
    At τ = 1 `work` may be None: G' is then q_exp − Z·onehot, left for `_add_ce_grad_` to
    form inside its own pass (q_exp is already softmax(z)'s numerator).
    """
    keep, safe = _label_columns(labels)
    if temperature == 1.0:
        total, log_total = q_total, log_q_total
        if work is None:
            picked = s.gather(1, safe)
            return ((log_total - picked).squeeze(1) * keep).sum(), keep.unsqueeze(1) / total
        work.copy_(q_exp)
    else:
        # z − max z = τ·(s − max s) since τ > 0
        torch.mul(s, temperature, out=work)
        work.exp_()
        total = work.sum(dim=1, keepdim=True)
        log_total = total.log()
    picked = s.gather(1, safe) * temperature
    ce = ((log_total - picked).squeeze(1) * keep).sum()
    work.scatter_add_(1, safe, -total)
    return ce, keep.unsqueeze(1) / total


def _add_ce_grad_(
    grad: Tensor, weight: float, work: Tensor | None, q_exp: Tensor, factor: Tensor, labels: Tensor
) -> None:
    """grad += weight · ∂CE/∂z, from `_block_cross_entropy_`'s work and factor (work None: the
    τ = 1 form, q_exp·factor − onehot, whose onehot part is a scatter, not a pass)."""
    if work is not None:
        grad.addcmul_(work, factor * weight)
        return
    grad.addcmul_(q_exp, factor * weight)
    keep, safe = _label_columns(labels)
    grad.scatter_add_(1, safe, keep.unsqueeze(1).to(grad.dtype).mul_(-weight))


def _block_lanes(device: torch.device) -> int:
    """How many threads share out a chunk's blocks: CPU_ELEMENTWISE_THREADS on CPU, at most
    torch's intra-op threads (a rank given one core keeps one); one on accelerators."""
    if device.type != "cpu" or CPU_ELEMENTWISE_THREADS <= 0:
        return 1
    return max(1, min(CPU_ELEMENTWISE_THREADS, torch.get_num_threads()))


_lane_pool: dict[int, ThreadPoolExecutor] = {}


def _lane_executor(lanes: int) -> ThreadPoolExecutor:
    """The block loop's threads, started once per process and lane count, then kept."""
    if lanes not in _lane_pool:
        _lane_pool[lanes] = ThreadPoolExecutor(lanes, thread_name_prefix="pocl-ds-blocks")
    return _lane_pool[lanes]


def _forget_lane_pool() -> None:
    """A forked child has none of its parent's threads: it starts its own pool when needed."""
    _lane_pool.clear()


os.register_at_fork(after_in_child=_forget_lane_pool)


def _in_one_intra_op_thread(run: Callable[..., _T], *args: object) -> _T:
    """`run(*args)` on this thread with one intra-op thread and autograd off (both per thread)."""
    torch.set_num_threads(1)
    with torch.no_grad():
        return run(*args)


@contextlib.contextmanager
def _elementwise_threads(device: torch.device) -> Iterator[None]:
    """Hold torch at one intra-op thread while the block loop runs (CPU_ELEMENTWISE_THREADS >
    0), and give the matmuls around it all of them again afterwards.

    Each block op is short (a few hundred µs), so with torch's threads a chunk issues thousands
    of OpenMP parallel regions; on a CPU shared with other jobs every region waits for
    descheduled threads (measured on the 2-core machine under load: 11 ns/element on one
    thread against 23–57 ns on two). Lanes of single-threaded ops instead meet once per chunk;
    README ("The divergence kernel") has their measurements, quiet and under load.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or CPU_ELEMENTWISE_THREADS <= 0 or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _chunk_divergence_(
    s: Tensor,
    t: Tensor | None,
    div: _Divergence,
    temperature: float,
    workspace: _Workspace,
    kd_factor: Tensor,
    labels: Tensor | None = None,
    ce_grad: Tensor | None = None,
    ce_factor: Tensor | None = None,
    mix: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the block kernel over a chunk's rows; returns (Σ D, Σ CE) of the chunk.

    s, t: [rows, V] student/teacher scaled logits. On return ∂D/∂s = kd_factor · s (G' in s,
    kd_factor: [rows, 1]); with `labels` the CE sum is formed too and its ∂CE/∂z is
    ce_factor · ce_grad (CE only needs the student, so the "zero" kind skips the teacher).

    With ``mix = (a, b)`` (labels and a divergence) s instead holds a·∂D/∂s + b·∂CE/∂z whole,
    combined block by block while the block is still in cache; kd_factor, ce_grad and
    ce_factor are not used. One gradient then needs one pair of matmuls, not two.

    The blocks are shared out in contiguous runs among the workspace's lanes; the sums are
    added in lane order, so a result depends on the lane count, never on thread timing. A
    lane runs its blocks as eager ops (`_blocks_divergence_`) or, for jsd without labels on
    CPU, as native rows (`_native_jsd_rows`).
    """
    if div.kind == "zero" and labels is None:
        return s.new_zeros(()), s.new_zeros(())
    args = (s, t, div, temperature, kd_factor, labels, ce_grad, ce_factor, mix)
    run = _native_jsd_rows if _native_jsd_applies(s, t, div, labels) else _blocks_divergence_
    blocks = -(-s.shape[0] // workspace.rows)
    lanes = max(1, min(workspace.lanes, blocks))
    spans = [range(lane * blocks // lanes, (lane + 1) * blocks // lanes) for lane in range(lanes)]
    with _elementwise_threads(s.device):
        if lanes == 1:
            return run(spans[0], workspace.rows, workspace.get, *args)
        pool = _lane_executor(workspace.lanes)
        futures = [
            pool.submit(
                _in_one_intra_op_thread,
                run,
                span,
                workspace.rows,
                functools.partial(workspace.get, lane=lane),
                *args,
            )
            for lane, span in enumerate(spans)
        ]
        sums = [future.result() for future in futures]
    return sum(kd for kd, _ in sums), sum(ce for _, ce in sums)


def _blocks_divergence_(
    blocks: range,
    block_rows: int,
    buffers: Callable[[int], list[Tensor]],
    s: Tensor,
    t: Tensor | None,
    div: _Divergence,
    temperature: float,
    kd_factor: Tensor,
    labels: Tensor | None,
    ce_grad: Tensor | None,
    ce_factor: Tensor | None,
    mix: tuple[float, float] | None,
) -> tuple[Tensor, Tensor]:
    """`_chunk_divergence_` over the chunk's blocks numbered in `blocks`, each of `block_rows`
    rows (the last may be shorter), with `buffers(rows)` as the block workspace."""
    kd_total = s.new_zeros(())
    ce_total = s.new_zeros(())
    for index in blocks:
        block = slice(index * block_rows, min((index + 1) * block_rows, s.shape[0]))
        q_exp, p_exp, scratch, *mixed_ce = buffers(block.stop - block.start)
        s_block = s[block]
        q_total, log_q_total = _shifted_exp_(s_block, q_exp)
        ce_work, ce_row_factor = None, None
        if labels is not None:
            if mix:  # at τ = 1 the CE gradient needs no block of its own (q_exp serves)
                ce_work = mixed_ce[0] if temperature != 1.0 else None
            else:
                ce_work = ce_grad[block] if ce_grad is not None else scratch
            ce, ce_row_factor = _block_cross_entropy_(
                s_block, q_exp, q_total, log_q_total, labels[block], temperature, ce_work
            )
            ce_total += ce
            if ce_factor is not None and not mix:
                ce_factor[block] = ce_row_factor
        if div.kind == "zero":
            continue
        kd, factor = _block_divergence_(
            s_block, q_exp, q_total, log_q_total, t[block], div, p_exp, scratch
        )
        kd_total += kd
        if mix:
            kd_weight, ce_weight = mix
            s_block.mul_(factor * kd_weight)
            if ce_weight:
                _add_ce_grad_(s_block, ce_weight, ce_work, q_exp, ce_row_factor, labels[block])
        else:
            kd_factor[block] = factor
    return kd_total, ce_total


def _native_jsd_applies(s: Tensor, t: Tensor | None, div: _Divergence, labels) -> bool:
    """Whether `_native_jsd_rows` serves this chunk: jsd without labels, fp32 on CPU, where
    `cpu_kernel` is built (the first call here builds it, on the caller's thread)."""
    return (
        div.kind == "jsd"
        and labels is None
        and t is not None
        and s.device.type == "cpu"
        and s.dtype == torch.float32
        and cpu_kernel.native_rows() is not None
    )


def _native_jsd_rows(
    blocks: range,
    block_rows: int,
    _buffers: Callable[[int], list[Tensor]],
    s: Tensor,
    t: Tensor,
    div: _Divergence,
    _temperature: float,
    kd_factor: Tensor,
    *_no_labels: None,
) -> tuple[Tensor, Tensor]:
    """`_blocks_divergence_` for jsd without labels in native code (`cpu_kernel.cpp`): the
    same rows, formulas and outputs (G' in s, row factors in kd_factor); no workspace."""
    rows = slice(blocks.start * block_rows, min(blocks.stop * block_rows, s.shape[0]))
    total = cpu_kernel.native_rows().jsd_rows_(
        s[rows], t[rows], kd_factor[rows], div.beta, _MAX_LOG_RATIO, _mixture_ratio_cap(div.beta)
    )
    return s.new_tensor(total), s.new_zeros(())


def _kd_grad_scale(temperature: float, scale_by_temperature_squared: bool) -> float:
    """∂(loss·N)/∂z = this · ∂D/∂s: (τ² or 1) from the loss, 1/τ from s = z/τ."""
    return temperature if scale_by_temperature_squared else 1.0 / temperature


def _scaled_logits_(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, tau: float):
    """out <- (hidden·Wᵀ + bias)/τ in `out`'s dtype, with the matmul in the inputs' dtype."""
    inv_tau = 1.0 / tau
    if hidden.dtype == out.dtype:
        if bias is None:
            torch.mm(hidden, weight.t(), out=out)
            if tau != 1.0:
                out.mul_(inv_tau)
        else:
            torch.addmm(bias, hidden, weight.t(), beta=inv_tau, alpha=inv_tau, out=out)
        return
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    out.copy_(logits)
    if tau != 1.0:
        out.mul_(inv_tau)


@dataclass
class _HeadGrads:
    """Gradients of one loss term (KD or CE) times the divisor, filled chunk by chunk."""

    hidden: Tensor  # [N, H] compute dtype
    weight: Tensor  # [V_s, H] fp32 (fp64 for fp64 inputs)
    bias: Tensor | None  # [V_s]

    def add_chunk(
        self, rows: slice, grad: Tensor, factor: Tensor | None, hidden: Tensor, weight: Tensor
    ) -> None:
        """Add a chunk whose ∂/∂logits is factor · grad (grad alone when factor is None).

        grad: [c, V'] G'; factor: [c, 1] row factors (scale folded in); hidden: [c, H] the
        chunk's hidden states; weight: [V', H] the head rows in use.
        """
        vocab = grad.shape[1]
        out = self.hidden[rows]
        if grad.dtype == weight.dtype:
            torch.mm(grad, weight, out=out)
            scaled = hidden if factor is None else hidden * factor.to(hidden.dtype)
            self.weight[:vocab].addmm_(grad.t(), scaled)
        else:  # low-precision head: scale the hidden states in fp32 before rounding them
            low = grad.to(weight.dtype)
            out.copy_(low @ weight)
            scaled = hidden.float() if factor is None else hidden.float() * factor
            self.weight[:vocab].add_(low.t() @ scaled.to(weight.dtype))
        if factor is not None:
            out.mul_(factor)
        if self.bias is not None:
            if factor is None:
                self.bias[:vocab].add_(grad.sum(dim=0).to(self.bias.dtype))
            else:
                self.bias[:vocab].addmv_(grad.t().to(self.bias.dtype), factor.reshape(-1))


class _FusedLinearDistill(torch.autograd.Function):
    """Forward computes both losses and all student gradients; backward only rescales them."""

    @staticmethod
    # Over 80 lines on purpose: one pass over the chunks owns every buffer (the block
    # workspace, the fp32 head-gradient accumulators), so none outlives it; split into helpers,
    # each buffer would be threaded through all of them.
    def forward(
        ctx,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor | None,
        teacher_weight: Tensor | None,
        teacher_bias: Tensor | None,
        labels: Tensor | None,
        div: _Divergence,
        temperature: float,
        scale_by_temperature_squared: bool,
        divisor: float | Tensor,
        chunk_size: int,
        vocab: int,
        grads_wanted: bool,
        sft_weight: float | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        num_rows = student_hidden.shape[0]
        device = student_hidden.device
        dtype = _compute_dtype(student_hidden, student_weight)
        # needs_input_grad is also set under torch.no_grad(); grads_wanted says if grad mode was on
        need_grad = grads_wanted and any(ctx.needs_input_grad[:3])
        with_ce = labels is not None
        ws = student_weight[:vocab]
        bs = student_bias[:vocab] if student_bias is not None else None
        bt = teacher_bias[:vocab] if teacher_bias is not None else None

        def new_grads() -> _HeadGrads:
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            return _HeadGrads(
                hidden=torch.empty(num_rows, student_hidden.shape[1], dtype=dtype, device=device),
                weight=torch.zeros(student_weight.shape, dtype=acc, device=device),
                bias=None
                if student_bias is None
                else torch.zeros(student_bias.shape, dtype=acc, device=device),
            )

        # A mixed loss α·CE + (1 − α)·KD: one gradient, one pair of matmuls per chunk.
        mixed = sft_weight is not None and with_ce and div.kind != "zero"
        kd_scale = _kd_grad_scale(temperature, scale_by_temperature_squared)
        mix = ((1.0 - sft_weight) * kd_scale, sft_weight) if mixed and need_grad else None
        mixed_grads = new_grads() if mix else None
        kd_grads = new_grads() if need_grad and div.kind != "zero" and not mixed else None
        ce_grads = new_grads() if need_grad and with_ce and not mixed else None
        rows = min(chunk_size, max(num_rows, 1))
        student_buf = torch.empty(rows, vocab, dtype=dtype, device=device)
        teacher_buf = (
            torch.empty(rows, vocab, dtype=dtype, device=device) if div.kind != "zero" else None
        )
        ce_buf = torch.empty(rows, vocab, dtype=dtype, device=device) if ce_grads else None
        kd_factor = torch.empty(rows, 1, dtype=dtype, device=device)
        ce_factor = torch.empty(rows, 1, dtype=dtype, device=device)
        workspace = _Workspace(
            _block_rows(vocab, device, rows),
            vocab,
            dtype,
            device,
            ce_block=mix is not None and temperature != 1.0,
        )
        kd_sum = torch.zeros((), dtype=dtype, device=device)
        ce_sum = torch.zeros((), dtype=dtype, device=device)
        # With no CE and an identically-zero divergence there is nothing to compute.
        stop = num_rows if with_ce or div.kind != "zero" else 0
        for start in range(0, stop, chunk_size):
            chunk = slice(start, min(start + chunk_size, num_rows))
            count = chunk.stop - chunk.start
            h_s, s = student_hidden[chunk], student_buf[:count]
            _scaled_logits_(s, h_s, ws, bs, temperature)
            t = None
            if teacher_buf is not None:
                t = teacher_buf[:count]
                _scaled_logits_(t, teacher_hidden[chunk], teacher_weight[:vocab], bt, temperature)
            ce_grad = ce_buf[:count] if ce_buf is not None else None
            kd, ce = _chunk_divergence_(
                s,
                t,
                div,
                temperature,
                workspace,
                kd_factor[:count],
                labels[chunk] if with_ce else None,
                ce_grad,
                ce_factor[:count],
                mix,
            )
            kd_sum += kd
            ce_sum += ce
            if mixed_grads is not None:
                mixed_grads.add_chunk(chunk, s, None, h_s, ws)
            if kd_grads is not None:
                kd_grads.add_chunk(chunk, s, kd_factor[:count].mul_(kd_scale), h_s, ws)
            if ce_grads is not None:
                ce_grads.add_chunk(chunk, ce_grad, ce_factor[:count], h_s, ws)

        loss_scale = temperature**2 if scale_by_temperature_squared else 1.0
        kd_loss = (kd_sum * loss_scale / divisor).to(
            torch.float32 if dtype != torch.float64 else dtype
        )
        ce_loss = (ce_sum / divisor).to(kd_loss.dtype)
        loss = (
            (1.0 - sft_weight) * kd_loss + sft_weight * ce_loss if mixed else kd_loss.new_zeros(())
        )
        ctx.kd_grads, ctx.ce_grads, ctx.divisor = kd_grads, ce_grads, divisor
        ctx.mixed_grads = mixed_grads
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype)
        ctx.bias_dtype = student_bias.dtype if student_bias is not None else None
        ctx.bias_shape = student_bias.shape if student_bias is not None else None
        ctx.shapes = (student_hidden.shape, student_weight.shape)
        ctx.device = device
        if mixed:  # only the mixed loss carries the gradient; kd and ce are its parts, for logs
            ctx.mark_non_differentiable(kd_loss, ce_loss)
        else:
            ctx.mark_non_differentiable(loss)
            if not with_ce:
                ctx.mark_non_differentiable(ce_loss)
        return kd_loss, ce_loss, loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kd: Tensor | None, grad_ce: Tensor | None, grad_loss: Tensor | None):
        hidden_dtype, weight_dtype = ctx.dtypes
        pairs = (ctx.kd_grads, grad_kd), (ctx.ce_grads, grad_ce), (ctx.mixed_grads, grad_loss)
        terms = [(grads, g) for grads, g in pairs if grads is not None and g is not None]
        # Out of place, so a second backward (retain_graph, gradcheck) sees the same saved
        # gradients; the forward's chunk buffers are gone by now, so this does not raise the peak.
        grad_hidden = grad_weight = grad_bias = None
        for grads, g in terms:
            factor = (g / ctx.divisor).to(grads.weight.dtype)
            if grad_hidden is None:
                grad_hidden = grads.hidden * factor.to(grads.hidden.dtype)
                grad_weight = grads.weight * factor
                grad_bias = grads.bias * factor if grads.bias is not None else None
            else:
                grad_hidden.addcmul_(grads.hidden, factor.to(grads.hidden.dtype))
                grad_weight.addcmul_(grads.weight, factor)
                if grad_bias is not None:
                    grad_bias.addcmul_(grads.bias, factor)
        if grad_hidden is None:  # the KD term vanishes identically and there is no CE
            hidden_shape, weight_shape = ctx.shapes
            grad_hidden = torch.zeros(hidden_shape, dtype=hidden_dtype, device=ctx.device)
            grad_weight = torch.zeros(weight_shape, dtype=weight_dtype, device=ctx.device)
            if ctx.bias_shape is not None:
                grad_bias = torch.zeros(ctx.bias_shape, dtype=ctx.bias_dtype, device=ctx.device)
        grad_bias = grad_bias.to(ctx.bias_dtype) if grad_bias is not None else None
        return (
            grad_hidden.to(hidden_dtype),
            grad_weight.to(weight_dtype),
            grad_bias,
            *([None] * 12),
        )


class _DistillLogits(torch.autograd.Function):
    """`distill_loss` on given logits: the gradient w.r.t. the student logits is formed in the
    forward, one chunk of valid rows at a time, and only rescaled in the backward."""

    @staticmethod
    def forward(
        ctx,
        student_logits: Tensor,
        teacher_logits: Tensor,
        valid_index: Tensor,
        div: _Divergence,
        temperature: float,
        scale_by_temperature_squared: bool,
        divisor: float | Tensor,
        chunk_size: int,
        vocab: int,
        grads_wanted: bool,
    ) -> Tensor:
        device = student_logits.device
        dtype = _compute_dtype(student_logits, teacher_logits)
        num_valid = valid_index.numel()
        need_grad = grads_wanted and ctx.needs_input_grad[0] and div.kind != "zero"
        grad_logits = torch.zeros_like(student_logits) if need_grad else None
        rows = min(chunk_size, max(num_valid, 1))
        student_buf = torch.empty(rows, vocab, dtype=dtype, device=device)
        teacher_buf = torch.empty(rows, vocab, dtype=dtype, device=device)
        workspace = _Workspace(_block_rows(vocab, device, rows), vocab, dtype, device)
        kd_factor = torch.empty(rows, 1, dtype=dtype, device=device)
        kd_sum = torch.zeros((), dtype=dtype, device=device)
        stop = num_valid if div.kind != "zero" else 0
        for start in range(0, stop, chunk_size):
            index = valid_index[start : start + chunk_size]
            s, t = student_buf[: index.numel()], teacher_buf[: index.numel()]
            for buf, logits in ((s, student_logits), (t, teacher_logits)):
                if logits.dtype == dtype and logits.shape[1] == vocab:
                    torch.index_select(logits, 0, index, out=buf)
                else:
                    buf.copy_(logits[index, :vocab])
                if temperature != 1.0:
                    buf.mul_(1.0 / temperature)
            factor = kd_factor[: index.numel()]
            kd, _ = _chunk_divergence_(s, t, div, temperature, workspace, factor)
            kd_sum += kd
            if grad_logits is not None:
                grad_logits[:, :vocab].index_copy_(0, index, s.mul_(factor).to(grad_logits.dtype))
        loss_scale = temperature**2 if scale_by_temperature_squared else 1.0
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        ctx.grad_logits = grad_logits
        ctx.grad_scale = _kd_grad_scale(temperature, scale_by_temperature_squared)
        ctx.divisor = divisor
        ctx.meta = (student_logits.shape, student_logits.dtype, device)
        return (kd_sum * loss_scale / divisor).to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor):
        if ctx.grad_logits is None:
            shape, dtype, device = ctx.meta
            return torch.zeros(shape, dtype=dtype, device=device), *([None] * 9)
        # out of place: a second backward (retain_graph, gradcheck) must see the same gradient
        factor = (grad_loss * ctx.grad_scale / ctx.divisor).to(ctx.grad_logits.dtype)
        return ctx.grad_logits * factor, *([None] * 9)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    response_mask: Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    scale_by_temperature_squared: bool = True,
    num_valid_tokens: float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """τ² · Σ_{valid t} D(p_t, q_t) / num_valid_tokens from given logits (SPEC.md).

    Args:
        student_logits: [B, T, V_s] or [N, V_s], any float dtype; receives the gradient.
        teacher_logits: [B, T, V_t] or [N, V_t]; no gradient.
        response_mask: [B, T] or [N], nonzero = the token counts; others are skipped.
        kind: one of KINDS. beta: mixture weight for jsd/skl/srkl (DEFAULT_BETA if None).
        temperature: τ > 0; both distributions are softmax(logits / τ).
        chunk_size: valid rows per chunk (memory ∝ chunk_size × V); the result does not
            depend on it.
        scale_by_temperature_squared: multiply by τ² (SPEC default) so gradient magnitudes do
            not shrink as τ grows.
        num_valid_tokens: divisor; pass the global valid-token count of the whole batch
            (micro-batches × ranks), or that count over world × accumulation when the engine
            averages. Default: this call's count, clamped at 1. 0 counts as 1.
        vocab_size: both distributions are over the first `vocab_size` columns (the
            tokenizer's ids); the columns past it get probability 0 and no gradient.
            Default: min(V_s, V_t).

    Returns:
        0-d fp32 tensor (fp64 for fp64 inputs).
    """
    div = resolve_divergence(kind, beta)
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    student = _flat_rows(student_logits, "student_logits")
    teacher = _flat_rows(teacher_logits, "teacher_logits").detach()
    if student.shape[0] != teacher.shape[0]:
        raise PoclError(
            f"student_logits has {student.shape[0]} tokens, teacher_logits {teacher.shape[0]}; "
            "both must come from the same batch"
        )
    vocab = _compared_vocab(vocab_size, student.shape[1], teacher.shape[1])
    valid_index, _ = _valid_rows(response_mask, student.shape[0])
    divisor = _divisor(num_valid_tokens, valid_index.numel())
    return _DistillLogits.apply(
        student,
        teacher,
        valid_index,
        div,
        temperature,
        scale_by_temperature_squared,
        divisor,
        chunk_size,
        vocab,
        torch.is_grad_enabled(),
    )


# Over 80 lines on purpose: half of it is the docstring of the kernel's public entry point,
# which documents every argument; the body only validates inputs and calls the autograd pass.
def fused_linear_distill_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_head_weight: Tensor | None,
    response_mask: Tensor,
    *,
    kind: str | None,
    temperature: float = 1.0,
    beta: float | None = None,
    labels: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    scale_by_temperature_squared: bool = True,
    num_valid_tokens: float | Tensor | None = None,
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    vocab_size: int | None = None,
    sft_weight: float | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """`distill_loss` of the logits `hidden · weightᵀ + bias`, never holding [tokens × vocab].

    The caller aligns positions: hidden state t predicts labels[t] and is counted where
    response_mask[t] is nonzero (masked rows are dropped before any matmul).

    Args:
        student_hidden: [B, T, H_s] or [N, H_s]; receives a gradient.
        student_head_weight: [V_s, H_s], same dtype as student_hidden; receives a gradient
            (accumulated in fp32). Under ZeRO-3 call inside `engine.gathered_parameters(...)`.
        teacher_hidden: [B, T, H_t] or [N, H_t]; teacher_head_weight: [V_t, H_t]; no gradient.
            Both None (SFT): only the CE is computed (labels required), kd_loss is 0 and
            kind, beta and temperature are not used (kind may be None).
        response_mask: [B, T] or [N]. kind, temperature, beta, chunk_size,
            scale_by_temperature_squared, num_valid_tokens: as in `distill_loss`.
        vocab_size: only the first `vocab_size` head rows (the tokenizer's ids) take part:
            rows past it get probability 0 in both models and no gradient, and are never a
            label. Default: min(V_s, V_t) (V_s without a teacher).
        labels: [B, T] or [N] token ids (IGNORE_INDEX to skip). When given, also
            returns the student's cross-entropy at temperature 1 from the same logits, summed
            over the same valid tokens and divided by the same `num_valid_tokens`.
        student_head_bias: [V_s] or None (receives a gradient); teacher_head_bias: [V_t].

    Vocabulary widths may differ (padded embedding tables): both distributions, and the CE,
    are over the first `vocab_size` ids; labels must be ids below it.

        sft_weight: α ∈ [0, 1], with `labels` and a teacher: the kernel forms the gradient of
            the mixed loss α·CE + (1 − α)·kd_loss itself, block by block, and returns it too.

    Cost: the four N×H×V matmuls of logits and gradients. With labels but no `sft_weight`,
    six: the CE gradient needs its own pair because the caller weighs the terms afterwards.

    Returns:
        kd_loss (0-d fp32); (kd_loss, ce_loss) when `labels` is given; (loss, kd_loss, ce_loss)
        with `sft_weight`, where only `loss` carries a gradient.
    """
    temperature = _check_temperature(temperature)
    chunk_size = _check_chunk_size(chunk_size)
    if sft_weight is not None and (labels is None or teacher_hidden is None):
        raise PoclError("sft_weight mixes the CE with the divergence: pass labels and a teacher")
    if sft_weight is not None and not 0.0 <= sft_weight <= 1.0:
        raise PoclError(f"sft_weight={sft_weight} must be in [0, 1]")
    student = _flat_rows(student_hidden, "student_hidden")
    pairs = [("student", student, student_head_weight)]
    if (teacher_hidden is None) != (teacher_head_weight is None):
        raise PoclError(
            "pass both teacher_hidden and teacher_head_weight, or neither (CE only, for SFT)"
        )
    teacher = None
    if teacher_hidden is None:
        if labels is None:
            raise PoclError("without a teacher the loss is the CE alone; pass `labels`")
        div = _Divergence("zero", 0.0)
    else:
        div = resolve_divergence(kind, beta)
        teacher = _flat_rows(teacher_hidden, "teacher_hidden").detach()
        pairs.append(("teacher", teacher, teacher_head_weight))
        if student.shape[0] != teacher.shape[0]:
            raise PoclError(
                f"student_hidden has {student.shape[0]} tokens, teacher_hidden "
                f"{teacher.shape[0]}; both must come from the same batch"
            )
    for name, hidden, weight in pairs:
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
            raise PoclError(
                f"{name}_head_weight has shape {tuple(weight.shape)} but {name}_hidden has "
                f"width {hidden.shape[1]}; pass the lm_head weight [V, H] of the same model"
            )
        if weight.dtype != hidden.dtype:
            raise PoclError(
                f"{name}_hidden is {hidden.dtype} but {name}_head_weight is {weight.dtype}; "
                "run each model's head in its own dtype"
            )
    widths = [w.shape[0] for w in (student_head_weight, teacher_head_weight) if w is not None]
    vocab = _compared_vocab(vocab_size, *widths)
    valid_index, valid_labels = _valid_rows(response_mask, student.shape[0], labels, vocab)
    divisor = _divisor(num_valid_tokens, valid_index.numel())
    kd_loss, ce_loss, loss = _FusedLinearDistill.apply(
        student.index_select(0, valid_index),
        student_head_weight,
        student_head_bias,
        teacher.index_select(0, valid_index) if teacher is not None else None,
        teacher_head_weight.detach() if teacher_head_weight is not None else None,
        teacher_head_bias.detach() if teacher_head_bias is not None else None,
        valid_labels,
        div,
        temperature,
        scale_by_temperature_squared,
        divisor,
        chunk_size,
        vocab,
        torch.is_grad_enabled(),
        sft_weight,
    )
    if sft_weight is not None:
        return loss, kd_loss, ce_loss
    return (kd_loss, ce_loss) if labels is not None else kd_loss
