"""The method table: what each method needs, trains and how its alpha is set (SPEC)."""

from __future__ import annotations

import pytest

from pocl_ds.methods import METHODS, method_spec


def test_each_method_row():
    sft, kd, seqkd, gkd = (method_spec(name) for name in ("sft", "kd", "seqkd", "gkd"))
    assert (sft.teacher, kd.teacher, seqkd.teacher, gkd.teacher) == (
        "none",
        "train",
        "generate",
        "train",
    )
    assert [m.trained_divergence("rkl") for m in (sft, kd, seqkd, gkd)] == [
        None,
        "rkl",
        None,
        "jsd",
    ]
    assert [m.on_policy for m in (sft, kd, seqkd, gkd)] == [False, False, False, True]
    assert [m.label("tvd") for m in (sft, kd, seqkd, gkd)] == [
        "sft",
        "kd (tvd)",
        "seqkd",
        "gkd (jsd)",
    ]


def test_pretraining_targets_every_token_and_needs_no_teacher():
    pretrain = method_spec("pretrain")
    assert pretrain.loss_on_prompt and pretrain.teacher == "none"
    assert pretrain.alpha(None) == 1.0 and pretrain.trained_divergence("fkl") is None
    assert not any(method_spec(m).loss_on_prompt for m in ("sft", "kd", "seqkd", "gkd"))


def test_alpha_rules():
    kd, gkd, seqkd = method_spec("kd"), method_spec("gkd"), method_spec("seqkd")
    # unset: 0 without curriculum; SPEC's 0.3 -> 0 off-policy and 0 -> 0 on-policy under POCL
    assert kd.alpha(None) == 0.0 and gkd.alpha(None) == 0.0 and seqkd.alpha(None) == 1.0
    assert kd.alpha_schedule(None, None) == (0.3, 0.0)
    assert gkd.alpha_schedule(None, None) == (0.0, 0.0)
    # an explicit setting is honoured, GKD included (the paper's Table 9)
    assert gkd.alpha(0.2) == 0.2
    assert gkd.alpha_schedule(0.3, None) == (0.3, 0.0)
    assert gkd.alpha_schedule(0.0, 0.3) == (0.0, 0.3)
    assert seqkd.alpha_schedule(None, None) == (1.0, 1.0)


def test_every_configurable_method_has_a_row():
    from typing import get_args, get_type_hints

    from pocl_ds.config import DistillConfig

    assert set(get_args(get_type_hints(DistillConfig)["method"])) == set(METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        method_spec("distill")
