"""pocl_ds.objective on tiny Hugging Face GPT-2s: α mixing, the CE-only path, teacher alignment,
the compared vocabulary and the settings bound at construction.

References are computed the obvious way from the models' own full logits (float64 softmaxes of
`model(...).logits`), so each test also checks that hidden states, heads and labels are lined
up as Hugging Face lines them up. Those comparisons run both models and the kernel in float64
(`tiny_pair`), where agreement to 1e-9 holds on every CPU; fp32 accuracy is test_divergence's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pocl_ds.data import IGNORE_INDEX
from pocl_ds.errors import PoclError
from pocl_ds.models import load_causal_lm
from pocl_ds.objective import DistillationObjective, LossTerms, teacher_inputs
from tests.test_divergence import naive_divergence

torch.set_num_threads(1)

VOCAB = 56  # the models' output width
TOKENS = 50  # the tokenizer's size: rows 50..55 are padding


def tiny_gpt2(seed: int, hidden: int = 32, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    config = {"family": "gpt2", "hidden_size": hidden, "num_layers": 2, "num_heads": 2}
    model = load_causal_lm(
        inline_config={**config, "max_positions": 64}, vocab_size=VOCAB, seed=seed
    )
    return model.to(dtype).eval()


def tiny_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Student and teacher in float64, for the tests that compare with full-logit references:
    the kernel and the models then agree to rounding (≈1e-15), so a 1e-9 bound is exact on any
    CPU. In fp32 a small KL (≈0.01) is a difference of O(1) log-probabilities, and its rounding
    error (≈1e-7 absolute) depends on the BLAS kernel, which varies between machines."""
    return tiny_gpt2(seed, dtype=torch.float64), tiny_gpt2(seed + 1, dtype=torch.float64)


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two right-padded sequences; the prompt and the padding are labelled IGNORE_INDEX."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, TOKENS, (2, 12), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def num_targets(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())


def reference_terms(student, teacher, batch, *, kind, temperature, vocab, beta=None, scale=True):
    """(kd, ce) in float64 from both models' full logits, over the first `vocab` columns."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits_s = student(**inputs).logits[:, :-1, :vocab].double()
    with torch.no_grad():
        logits_t = teacher(**inputs).logits[:, :-1, :vocab].double()
    targets = batch["labels"][:, 1:]
    mask = targets.ne(IGNORE_INDEX)
    per_token = naive_divergence(logits_s, logits_t, kind, temperature, beta)
    kd = (per_token * mask).sum() / mask.sum() * (temperature**2 if scale else 1.0)
    ce = F.cross_entropy(
        logits_s.reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    return kd, ce


def run(objective, batch, teacher=None, **kwargs) -> LossTerms:
    if teacher is not None:
        hidden, head = teacher_inputs(teacher, batch["input_ids"], batch["attention_mask"])
        kwargs = {"teacher_hidden": hidden, "teacher_head": head, **kwargs}
    return objective(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        num_valid_tokens=num_targets(batch),
        **kwargs,
    )


def value(tensor: torch.Tensor) -> float:
    return float(tensor.detach())


def head_grad(model, loss) -> torch.Tensor:
    return torch.autograd.grad(loss, model.lm_head.weight)[0]


def test_alpha_mixes_ce_and_kd_and_matches_full_logits():
    student, teacher, batch = *tiny_pair(), make_batch()
    objective = DistillationObjective(student, kind="fkl", vocab_size=VOCAB, chunk_size=5)
    terms = run(objective, batch, teacher, temperature=2.0, sft_weight=0.3)
    assert value(terms.loss) == pytest.approx(0.3 * value(terms.ce) + 0.7 * value(terms.kd))
    kd, ce = reference_terms(student, teacher, batch, kind="fkl", temperature=2.0, vocab=VOCAB)
    assert value(terms.kd) == pytest.approx(value(kd), rel=1e-9)
    assert value(terms.ce) == pytest.approx(value(ce), rel=1e-9)
    got, want = head_grad(student, terms.loss), head_grad(student, 0.3 * ce + 0.7 * kd)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", [None, "jsd"])
def test_ce_only_path_equals_hugging_face_cross_entropy(kind):
    """SFT (kind None) and α = 1: the loss is the model's own CE on the response tokens, with
    its gradient, and kd is 0; no teacher is needed."""
    student, batch = tiny_gpt2(0), make_batch(1)
    objective = DistillationObjective(student, kind=kind, vocab_size=VOCAB)
    terms = run(objective, batch, sft_weight=1.0 if kind else 0.0)
    hf = student(**batch).loss  # HF shifts the labels itself and averages over the targets
    assert value(terms.kd) == 0.0
    assert value(terms.loss) == pytest.approx(value(hf), rel=1e-6)
    assert value(terms.ce) == value(terms.loss)
    torch.testing.assert_close(head_grad(student, terms.loss), head_grad(student, hf))


def test_alpha_one_never_runs_the_divergence():
    """At α = 1 a non-finite teacher cannot reach the loss: the KD kernel is skipped."""
    student, batch = tiny_gpt2(0), make_batch(2)
    objective = DistillationObjective(student, kind="srkl", vocab_size=VOCAB)
    hidden, (weight, bias) = teacher_inputs(
        tiny_gpt2(1), batch["input_ids"], batch["attention_mask"]
    )
    hidden = torch.full_like(hidden, float("nan"))
    terms = run(
        objective,
        batch,
        teacher_hidden=hidden,
        teacher_head=(weight, bias),
        temperature=2.0,
        sft_weight=1.0,
    )
    assert torch.isfinite(terms.loss) and value(terms.kd) == 0.0
    assert value(terms.loss) == pytest.approx(value(student(**batch).loss), rel=1e-6)


def test_teacher_states_are_aligned_with_the_students():
    """The teacher's hidden state at t meets the student's at t: a teacher that is the student
    gives exactly 0, one whose states are shifted by a position does not."""
    student, batch = tiny_gpt2(0), make_batch(3)
    objective = DistillationObjective(student, kind="jsd", vocab_size=VOCAB)
    same = run(objective, batch, student, temperature=2.0, sft_weight=0.0)
    assert value(same.kd) == 0.0 and value(same.loss) == 0.0
    hidden, head = teacher_inputs(student, batch["input_ids"], batch["attention_mask"])
    shifted = torch.cat([hidden[:, 1:], hidden[:, -1:]], dim=1)
    off = run(
        objective, batch, teacher_hidden=shifted, teacher_head=head, temperature=2.0, sft_weight=0.0
    )
    assert value(off.kd) > 1e-3


def test_vocab_size_cuts_the_padded_head_rows():
    """Head rows past the tokenizer, made to dominate both softmaxes, change nothing: kd and ce
    are those of the first TOKENS columns and the padded rows get no gradient."""
    student, teacher, batch = *tiny_pair(), make_batch(4)
    with torch.no_grad():  # tied embeddings: only the head reads rows no input id uses
        student.lm_head.weight[TOKENS:] = 3.0
        teacher.lm_head.weight[TOKENS:] = -3.0
    objective = DistillationObjective(student, kind="rkl", vocab_size=TOKENS)
    terms = run(objective, batch, teacher, temperature=2.0, sft_weight=0.5)
    kd, ce = reference_terms(student, teacher, batch, kind="rkl", temperature=2.0, vocab=TOKENS)
    assert value(terms.kd) == pytest.approx(value(kd), rel=1e-9)
    assert value(terms.ce) == pytest.approx(value(ce), rel=1e-9)
    wide_kd, _ = reference_terms(student, teacher, batch, kind="rkl", temperature=2.0, vocab=VOCAB)
    assert abs(value(wide_kd) - value(kd)) > 0.1 * value(kd)  # the padded rows would matter
    grad = head_grad(student, terms.loss)
    assert not grad[TOKENS:].any() and grad[:TOKENS].abs().max() > 0
    torch.testing.assert_close(grad, head_grad(student, 0.5 * ce + 0.5 * kd), rtol=1e-9, atol=1e-12)


def test_kind_none_is_the_ce_whatever_the_teacher_and_alpha():
    """SeqKD: no distillation term even with a teacher at hand and α < 1."""
    student, batch = tiny_gpt2(0), make_batch(5)
    objective = DistillationObjective(student, kind=None, vocab_size=VOCAB)
    terms = run(objective, batch, tiny_gpt2(1), temperature=2.0, sft_weight=0.0)
    assert value(terms.kd) == 0.0
    assert value(terms.loss) == pytest.approx(value(student(**batch).loss), rel=1e-6)


def test_temperature_squared_setting_is_bound_at_construction():
    student, teacher, batch = *tiny_pair(), make_batch(6)
    objective = DistillationObjective(
        student, kind="fkl", vocab_size=VOCAB, scale_by_temperature_squared=False
    )
    terms = run(objective, batch, teacher, temperature=2.0, sft_weight=0.0)
    kd, _ = reference_terms(
        student, teacher, batch, kind="fkl", temperature=2.0, vocab=VOCAB, scale=False
    )
    assert value(terms.kd) == pytest.approx(value(kd), rel=1e-9)
    torch.testing.assert_close(
        head_grad(student, terms.loss), head_grad(student, kd), rtol=1e-9, atol=1e-12
    )


def test_beta_is_bound_at_construction():
    student, teacher, batch = *tiny_pair(), make_batch(7)
    objective = DistillationObjective(student, kind="skl", beta=0.5, vocab_size=VOCAB)
    terms = run(objective, batch, teacher, temperature=1.0, sft_weight=0.0)
    kd, _ = reference_terms(
        student, teacher, batch, kind="skl", temperature=1.0, vocab=VOCAB, beta=0.5
    )
    default, _ = reference_terms(student, teacher, batch, kind="skl", temperature=1.0, vocab=VOCAB)
    assert value(terms.kd) == pytest.approx(value(kd), rel=1e-9)
    assert abs(value(default) - value(kd)) > 0.1 * value(kd)  # β = 0.1 would not pass


def test_user_errors_name_the_setting():
    student = tiny_gpt2(0)
    with pytest.raises(PoclError, match="kind"):
        DistillationObjective(student, kind="kl", vocab_size=VOCAB)
    with pytest.raises(PoclError, match="beta"):
        DistillationObjective(student, kind="jsd", beta=1.5, vocab_size=VOCAB)
    objective = DistillationObjective(student, kind="fkl", vocab_size=VOCAB)
    with pytest.raises(PoclError, match="teacher"):
        run(objective, make_batch(), temperature=1.0, sft_weight=0.5)
    wide = DistillationObjective(student, kind=None, vocab_size=VOCAB + 1)
    with pytest.raises(PoclError, match="vocab_size"):
        run(wide, make_batch(), sft_weight=1.0)
