"""The trainer on 2 CPU ranks: every method ± POCL learns; ZeRO stages, world sizes and teacher
placements agree; export reloads. One torchrun job runs the whole matrix to share start-up."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from pocl_ds.telemetry import read_metrics
from pocl_ds.trainer import lr_at
from tests.launchers import REPO, run

TINY = str(REPO / "launch" / "configs" / "tiny.yaml")
RUNNER = REPO / "tests" / "scripts" / "train_runs.py"
METHODS = ("sft", "kd", "seqkd", "gkd")
# Dropout masks depend on the batch's shape and the rank's RNG, so runs that must agree across
# world sizes train without it.
NO_DROPOUT = (
    "model.student_config={family: gpt2, hidden_size: 32, num_layers: 2, num_heads: 2, "
    "max_positions: 128, resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}"
)
CURRICULA = ("none", "pocl")


def small_run(out: Path, name: str, *extra: str) -> dict:
    """A run that overfits 32 synthetic samples (validation = the same samples)."""
    return {
        "name": name,
        "recipe": TINY,
        "overrides": [
            f"train.output_dir={out / name}",
            f"data.train_path={out / 'data.jsonl'}",
            f"data.valid_path={out / 'data.jsonl'}",
            "data.split_sizes=[0, 0]",
            "train.epochs=12",
            "train.micro_batch_size=4",
            "train.lr=5e-3",
            "eval.valid_rouge_samples=16",
            "curriculum.num_stages=2",
            "curriculum.difficulty_max_new_tokens=8",
            "distill.generation_max_new_tokens=12",
            *extra,
        ],
    }


def run_jobs(tmp: Path, runs: list[dict], launcher: str = "torchrun", nprocs: int = 2) -> dict:
    spec = tmp / f"spec_{runs[0]['name']}.json"
    results = tmp / f"results_{runs[0]['name']}.json"
    spec.write_text(json.dumps({"runs": runs, "results": str(results)}))
    done = run(launcher, RUNNER, [str(spec)], nprocs=nprocs, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(results.read_text())


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def assert_same_losses(first: Path, second: Path) -> None:
    """Two runs that must follow one trajectory: every step's loss within fp32 reduction noise."""
    a, b = losses(first), losses(second)
    assert len(a) == len(b) > 10
    assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def val_losses(run_dir: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]


def test_lr_schedule_warms_up_then_decays_to_zero():
    peak = 1e-3
    lrs = [lr_at(s, 10, peak=peak, warmup_ratio=0.2, schedule="cosine") for s in range(11)]
    assert lrs[:2] == pytest.approx([peak / 2, peak])  # warm-up: 2 steps, linear
    assert lrs[2] == pytest.approx(peak)  # cosine starts at the peak
    assert lrs[6] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs[10] == pytest.approx(0.0, abs=1e-15)
    assert all(a >= b for a, b in itertools.pairwise(lrs[2:]))
    assert lr_at(7, 10, peak=peak, warmup_ratio=0.0, schedule="constant") == peak
    assert lr_at(0, 10, peak=peak, warmup_ratio=0.0, schedule="cosine") == pytest.approx(peak)
    # a schedule shorter than its warm-up stays at the peak once warm
    assert lr_at(3, 3, peak=peak, warmup_ratio=1.0, schedule="cosine") == peak


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    from pocl_ds.synthetic import write_synthetic_tasks

    tmp = tmp_path_factory.mktemp("matrix")
    write_synthetic_tasks(tmp / "data.jsonl", num_samples=32, seed=3)
    teacher = small_run(
        tmp,
        "teacher",
        "distill.method=sft",
        "model.student_config={family: gpt2, hidden_size: 64, num_layers: 2, num_heads: 4, max_positions: 128}",
        "model.teacher_config=null",
        "train.epochs=20",
    )
    teacher_dir = tmp / "teacher" / "final"
    with_teacher = [f"model.teacher={teacher_dir}", "model.teacher_config=null"]
    runs = [teacher]
    for method in METHODS:
        for curriculum in CURRICULA:
            runs.append(
                small_run(
                    tmp,
                    f"{method}_{curriculum}",
                    f"distill.method={method}",
                    f"curriculum.strategy={curriculum}",
                    *with_teacher,
                )
            )
    runs.append(small_run(tmp, "kd_zero3", "train.ds_config=ds_configs/zero3.json", *with_teacher))
    runs.append(small_run(tmp, "kd_teacher_zero3", "model.teacher_partition=true", *with_teacher))
    runs.append(small_run(tmp, "kd_no_dropout", NO_DROPOUT, *with_teacher))
    results = run_jobs(tmp, runs)
    return tmp, results


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("curriculum", CURRICULA)
def test_every_method_and_curriculum_fits_its_data(matrix, method, curriculum):
    tmp, results = matrix
    run_dir = tmp / f"{method}_{curriculum}"
    assert f"{method}_{curriculum}" in results
    curve = losses(run_dir)
    assert len(curve) >= 20 and all(math.isfinite(x) for x in curve)
    # 32 samples seen over and over: the training objective must fall by a wide margin
    # (with POCL its terms change from stage to stage, and it still must).
    assert sum(curve[-2:]) < 0.6 * sum(curve[:2]), curve
    assert len(val_losses(run_dir)) >= 3
    if curriculum == "pocl":
        stages = json.loads((run_dir / "curriculum.json").read_text())["stages"]
        assert [s["stage"] for s in stages] == [1, 2]
        kept = len((run_dir / "difficulty.jsonl").read_text().splitlines())
        assert stages[0]["size"] < stages[1]["size"] == kept >= 30
    assert (run_dir / "final" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("curriculum", CURRICULA)
def test_each_method_trains_what_it_claims(matrix, curriculum):
    """Per-step facts from metrics.jsonl: SFT and SeqKD train the CE alone; GKD trains JSD
    with alpha = 0, on the student's own samples for about half of its steps."""
    tmp, results = matrix
    steps = {
        method: [
            r for r in read_metrics(tmp / f"{method}_{curriculum}" / "metrics.jsonl") if "loss" in r
        ]
        for method in METHODS
    }
    for method in ("sft", "seqkd"):
        assert all(r["sft_weight"] == 1.0 and r["kd"] == 0.0 for r in steps[method])
        assert [r["loss"] for r in steps[method]] == pytest.approx([r["ce"] for r in steps[method]])
    gkd = steps["gkd"]
    assert all(r["sft_weight"] == 0.0 for r in gkd)
    assert [r["loss"] for r in gkd] == pytest.approx([r["kd"] for r in gkd])
    on_policy = [r["student_samples"] for r in gkd]
    assert 0 < sum(on_policy) < len(on_policy)
    labels = {m: results[f"{m}_{curriculum}"]["method"] for m in METHODS}
    assert labels == {"sft": "sft", "kd": "kd (fkl)", "seqkd": "seqkd", "gkd": "gkd (jsd)"}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_per_step_temperature_and_alpha_follow_the_curriculum(matrix, method):
    tmp, _ = matrix
    run_dir = tmp / f"{method}_pocl"
    stages = {
        s["stage"]: s for s in json.loads((run_dir / "curriculum.json").read_text())["stages"]
    }
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert {r["stage"] for r in records} == set(stages)
    for r in records:
        assert r["temperature"] == pytest.approx(stages[r["stage"]]["temperature"])
        assert r["sft_weight"] == pytest.approx(stages[r["stage"]]["sft_weight"])
    # off-policy KD: 0.3 -> 0 over the two stages; GKD 0; SFT and SeqKD 1
    expected = {"kd": [0.3, 0.0], "gkd": [0.0, 0.0], "sft": [1.0, 1.0], "seqkd": [1.0, 1.0]}
    assert [stages[i]["sft_weight"] for i in (1, 2)] == pytest.approx(expected[method])


@pytest.mark.slow
def test_zero2_and_zero3_give_the_same_losses(matrix):
    tmp, _ = matrix
    assert_same_losses(tmp / "kd_none", tmp / "kd_zero3")


@pytest.mark.slow
def test_replicated_and_partitioned_teacher_give_the_same_losses(matrix):
    tmp, _ = matrix
    assert_same_losses(tmp / "kd_none", tmp / "kd_teacher_zero3")


@pytest.mark.slow
def test_one_and_two_ranks_with_the_same_global_batch_agree(matrix):
    tmp, _ = matrix
    single = small_run(
        tmp,
        "kd_one_rank",
        "train.gradient_accumulation_steps=2",
        NO_DROPOUT,
        f"model.teacher={tmp / 'teacher' / 'final'}",
        "model.teacher_config=null",
    )
    run_jobs(tmp, [single], nprocs=1)
    assert_same_losses(tmp / "kd_one_rank", tmp / "kd_no_dropout")


@pytest.mark.slow
def test_exported_model_reloads_with_the_best_checkpoint_logits(matrix):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, results = matrix
    for name in ("kd_none", "kd_zero3"):
        run_dir = tmp / name
        best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
        exported = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
        state = get_fp32_state_dict_from_zero_checkpoint(
            str(run_dir / "checkpoints"), tag=best["tag"]
        )
        state = {k.removeprefix("model."): v for k, v in state.items()}
        reference = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
        missing, unexpected = reference.load_state_dict(state, strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        ids = torch.tensor([tokenizer.encode("Below is an instruction")])
        with torch.no_grad():
            assert torch.allclose(exported(ids).logits, reference(ids).logits, atol=1e-5)
        assert results[name]["best_val_rouge_l"] == pytest.approx(best["metric"])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tiny.yaml", "tiny_pocl.yaml"])
def test_shipped_tiny_recipe_under_the_deepspeed_launcher(recipe, tmp_path):
    """The README's command as a user types it: ``deepspeed --num_gpus 2 launch/train.py``."""
    out = tmp_path / "run"
    done = run(
        "deepspeed",
        REPO / "launch" / "train.py",
        ["--config", str(REPO / "launch" / "configs" / recipe), f"train.output_dir={out}"],
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "config.yaml").is_file() and (out / "final" / "config.json").is_file()
    curve = losses(out)
    assert sum(curve[-3:]) < 0.8 * sum(curve[:3]), curve
    if recipe == "tiny_pocl.yaml":
        stages = json.loads((out / "curriculum.json").read_text())["stages"]
        assert [s["stage"] for s in stages] == [1, 2, 3, 4]
        assert [s["temperature"] for s in stages] == pytest.approx([1.0, 4 / 3, 5 / 3, 2.0])
        assert [s["sft_weight"] for s in stages] == pytest.approx([0.3, 0.2, 0.1, 0.0])
        records = (out / "difficulty.jsonl").read_text().splitlines()
        assert len(records) == stages[-1]["size"]
        assert {"index", "ce", "rouge_l", "rank_ce", "rank_rouge", "fused", "subset"} <= set(
            json.loads(records[0])
        )


@pytest.mark.slow
def test_bf16_student_and_teacher_train(tmp_path):
    """bf16 (DeepSpeed's bf16 optimizer, a bf16 teacher) through the same fused kernel."""
    run = {
        "name": "bf16",
        "recipe": TINY,
        "overrides": [
            f"train.output_dir={tmp_path / 'bf16'}",
            "train.precision=bf16",
            "model.teacher_dtype=bf16",
            "train.max_steps=8",
        ],
    }
    run_jobs(tmp_path, [run], launcher="python", nprocs=1)
    curve = losses(tmp_path / "bf16")
    assert len(curve) == 8 and all(math.isfinite(x) for x in curve)
    assert sum(curve[-2:]) < sum(curve[:2]), curve
