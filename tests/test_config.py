"""Recipes and DeepSpeed configs: everything shipped loads; every mistake is named in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pocl_ds.config import ExperimentConfig, field_docs, load_config, save_config
from pocl_ds.engine import build_ds_config
from pocl_ds.errors import PoclError

REPO = Path(__file__).resolve().parent.parent
# experiments/ holds grid files, not recipes: tests/test_experiment.py loads those
RECIPES = sorted(
    p for p in (REPO / "launch" / "configs").rglob("*.yaml") if "experiments" not in p.parts
)
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
TINY = REPO / "launch" / "configs" / "tiny.yaml"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_loads(recipe):
    config = load_config(recipe)
    assert isinstance(config, ExperimentConfig)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_deepspeed_config_fills(path):
    config = build_ds_config(
        path, micro_batch_size=4, gradient_accumulation_steps=2, world_size=2, precision="bf16"
    )
    assert config["train_batch_size"] == 16
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(config)


def test_pinned_global_batch_that_disagrees_is_refused(tmp_path):
    pinned = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    pinned["train_batch_size"] = 7
    path = tmp_path / "pinned.json"
    path.write_text(json.dumps(pinned))
    with pytest.raises(PoclError, match=r"train_batch_size=7 .* = 16"):
        build_ds_config(
            path, micro_batch_size=4, gradient_accumulation_steps=2, world_size=2, precision="fp32"
        )


def test_overrides_apply_with_types_and_round_trip(tmp_path):
    config = load_config(
        TINY, ["train.lr=1e-4", "curriculum.strategy=pocl", "eval.seeds=[1, 2]", "train.epochs=3"]
    )
    assert config.train.lr == pytest.approx(1e-4)
    assert config.curriculum.strategy == "pocl" and config.eval.seeds == [1, 2]
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_every_field_is_documented():
    docs = field_docs()
    assert len(docs) > 50
    assert all(docs.values()), [k for k, v in docs.items() if not v]


BAD = [
    (["train.lr=-1"], "train.lr"),
    (["train.lr=abc"], "train.lr"),
    (["train.epochs=0"], "train.epochs"),
    (["train.epochs=1.5"], "train.epochs"),
    (["train.micro_batch_size=-4"], "train.micro_batch_size"),
    (["train.precision=fp64"], "train.precision"),
    (["train.colour=red"], "train.colour"),
    (["trian.lr=1"], "trian"),
    (["distill.divergence=kl"], "distill.divergence"),
    (["distill.beta=1.5"], "distill.beta"),
    (["distill.temperature=0"], "distill.temperature"),
    (["curriculum.num_stages=0"], "curriculum.num_stages"),
    (["curriculum.order=sideways"], "curriculum.order"),
    (["distill.method=sft", "distill.sft_weight=0.3"], "distill.sft_weight"),
    (["distill.method=seqkd", "curriculum.sft_weight_start=0.3"], "curriculum.sft_weight_start"),
    (["distill.method=pretrain", "curriculum.strategy=pocl"], "curriculum.strategy"),
    (["data.overflow=wrap"], "data.overflow"),
    (["data.split_sizes=[1]"], "data.split_sizes"),
    (["eval.seeds=[]"], "eval.seeds"),
    (["eval.greedy=maybe"], "eval.greedy"),
    (["model.student_config=null", "model.student=null"], "model.student"),
    (["nodot=1"], "nodot"),
    (["train.lr"], "train.lr"),
]


@pytest.mark.parametrize(("overrides", "culprit"), BAD, ids=[b[1] + ":" + b[0][0] for b in BAD])
def test_bad_override_exits_2_naming_the_field(overrides, culprit):
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(TINY), *overrides],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert culprit in lines[0]


def test_falling_temperature_and_explicit_alpha_are_accepted():
    # The paper's Table 8 ablates tau 2 -> 1; Table 9 runs GKD + POCL with alpha 0.3 -> 0.
    config = load_config(
        TINY,
        [
            "curriculum.temperature_start=2.0",
            "curriculum.temperature_end=1.0",
            "distill.method=gkd",
            "curriculum.sft_weight_start=0.3",
        ],
    )
    assert (config.curriculum.temperature_start, config.curriculum.temperature_end) == (2.0, 1.0)
    assert config.curriculum.sft_weight_start == 0.3 and config.curriculum.sft_weight_end is None
    # alpha = 1 is what SFT trains anyway, so saying it is not an error
    assert load_config(TINY, ["distill.method=sft", "distill.sft_weight=1"]).distill.sft_weight == 1


def test_bad_recipe_files_are_named(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PoclError, match=r"missing\.yaml"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(PoclError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("train: 3\n")
    with pytest.raises(PoclError, match="train: expected a mapping"):
        load_config(scalar)


def test_unknown_command_line_flag_exits_2():
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(TINY), "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--bogus" in result.stderr


def test_a_precision_the_accelerator_lacks_is_named():
    from deepspeed.accelerator import get_accelerator

    from pocl_ds.engine import check_precision_supported

    config = build_ds_config(
        REPO / "ds_configs" / "zero2.json",
        micro_batch_size=1,
        gradient_accumulation_steps=1,
        world_size=1,
        precision="fp16",
    )
    if get_accelerator().is_fp16_supported():
        check_precision_supported(config)  # a GPU: nothing to refuse
    else:
        with pytest.raises(PoclError, match=r"train\.precision: fp16 is not supported"):
            check_precision_supported(config)
