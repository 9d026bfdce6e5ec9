"""The paper's recipes can't run here (GPT-2 1.5B, OPT 2.7B, the dolly hub set), so each one is
loaded and run for 2 optimizer steps with tiny models and synthetic data swapped in: everything
else — method, curriculum, DeepSpeed config, schedule — is the recipe's own."""

import json
from pathlib import Path

import pytest

from pocl_ds.config import load_config
from pocl_ds.methods import method_spec
from tests.launchers import REPO, run

PAPER = sorted((REPO / "launch" / "configs" / "paper").rglob("*.yaml"))
PAPER_RUNS = [p for p in PAPER if p.parent.name in ("gpt2", "opt")]
TINY_MODEL = "{family: %s, hidden_size: 32, num_layers: 1, num_heads: 2, max_positions: 128}"


def tiny_overrides(recipe: Path, out: Path) -> list[str]:
    family = "opt" if recipe.parent.name == "opt" else "gpt2"
    return [
        "model.teacher=null",
        "model.student=null",
        f"model.teacher_config={TINY_MODEL % family}",
        f"model.student_config={TINY_MODEL % family}",
        "model.teacher_dtype=fp32",
        "data.train_path=synthetic:48",
        "data.format=auto",
        "data.split_sizes=[8, 0]",
        "data.max_length=96",
        "data.max_prompt_length=null",
        "train.precision=fp32",
        "train.micro_batch_size=2",
        "train.max_steps=2",
        f"train.output_dir={out / recipe.parent.name / recipe.stem}",
        "eval.valid_rouge_samples=4",
        "eval.max_new_tokens=4",
        "eval.evaluate_at_end=false",
        "curriculum.difficulty_max_new_tokens=4",
        "distill.generation_max_new_tokens=4",
    ]


def test_paper_recipes_keep_the_papers_settings():
    config = load_config(REPO / "launch/configs/paper/gpt2/kd_fkl_pocl.yaml")
    assert (config.model.teacher, config.model.student) == (
        "runs/paper/gpt2/teacher_sft/final",
        "gpt2",
    )
    assert config.train.epochs == 20 and config.curriculum.num_stages == 4
    assert (config.curriculum.temperature_start, config.curriculum.temperature_end) == (1.0, 2.0)
    assert config.eval.seeds == [10, 20, 30, 40, 50]
    # alpha 0.3 -> 0 for off-policy KD and 0 for GKD come from the method table (SPEC)
    kd = method_spec(config.distill.method)
    assert kd.alpha_schedule(config.curriculum.sft_weight_start, None) == (0.3, 0.0)
    gkd = load_config(REPO / "launch/configs/paper/gpt2/gkd_pocl.yaml")
    assert method_spec(gkd.distill.method).alpha_schedule(
        gkd.curriculum.sft_weight_start, gkd.curriculum.sft_weight_end
    ) == (0.0, 0.0)
    # generated answers may be as long as the room max_length leaves after a prompt
    assert config.distill.generation_max_new_tokens == (
        config.data.max_length - config.data.max_prompt_length
    )
    assert len(PAPER_RUNS) == 38  # 2 pairs × (teacher SFT + 9 methods × ± POCL)


@pytest.mark.slow
def test_every_paper_recipe_runs_two_steps_with_tiny_models(tmp_path):
    runs = [
        {
            "name": f"{p.parent.name}/{p.stem}",
            "recipe": str(p),
            "overrides": tiny_overrides(p, tmp_path),
        }
        for p in PAPER_RUNS
    ]
    spec = tmp_path / "spec.json"
    results = tmp_path / "results.json"
    spec.write_text(json.dumps({"runs": runs, "results": str(results)}))
    done = run("python", REPO / "tests" / "scripts" / "train_runs.py", [str(spec)], timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    summaries = json.loads(results.read_text())
    assert sorted(summaries) == sorted(r["name"] for r in runs)
    for name, summary in summaries.items():
        assert summary["steps"] == 2, name
        assert (Path(summary["final"]) / "config.json").is_file(), name
