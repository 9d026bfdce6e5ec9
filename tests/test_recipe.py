"""build_run: what each method's run is made of (teacher, objective, curation, plans), and the
difficulty measured on the dataset's responses whatever the method (one 1-rank process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.launchers import REPO, run

TINY_POCL = REPO / "launch" / "configs" / "tiny_pocl.yaml"


def _worker(out_dir: str) -> None:
    from pocl_ds import distributed
    from pocl_ds.config import load_config
    from pocl_ds.recipe import build_run

    distributed.init_distributed()
    facts = {}
    for method in ("sft", "kd", "seqkd", "gkd"):
        config = load_config(
            TINY_POCL,
            [
                f"train.output_dir={out_dir}/{method}",
                f"distill.method={method}",
                "data.train_path=synthetic:48",
                "data.split_sizes=[8, 0]",
                "curriculum.num_stages=2",
                "curriculum.difficulty_max_new_tokens=4",
                "distill.generation_max_new_tokens=4",
                "train.micro_batch_size=4",
            ],
        )
        built = build_run(config)
        objective = built.engine.module
        facts[method] = {
            "teacher": built.teacher is not None,
            "kind": objective.kind,
            "on_policy": built.curation.on_policy,
            "alphas": [p.sft_weight for p in built.controller.plans],
            "steps_per_epoch": [len(s) for s in built.samplers],
            "planned_steps": [s["planned_steps"] for s in built.controller.summary()["stages"]],
            "epochs": [p.epochs for p in built.controller.plans],
            "ce": [r.ce for r in built.difficulty.records],
            "responses_are_references": all(
                built.samples_by_index[s.index].response_ids == s.response_ids
                for s in built.data.train
            ),
        }
    # an explicit alpha is honoured for GKD too (the paper's Table 9), and tau may fall
    config = load_config(
        TINY_POCL,
        [
            f"train.output_dir={out_dir}/gkd_alpha",
            "distill.method=gkd",
            "curriculum.sft_weight_start=0.3",
            "curriculum.temperature_start=2.0",
            "curriculum.temperature_end=1.0",
            "data.train_path=synthetic:48",
            "data.split_sizes=[8, 0]",
            "curriculum.num_stages=2",
            "curriculum.difficulty_max_new_tokens=4",
        ],
    )
    plans = build_run(config).controller.plans
    facts["gkd_explicit"] = {
        "alphas": [p.sft_weight for p in plans],
        "temperatures": [p.temperature for p in plans],
    }
    Path(out_dir, "facts.json").write_text(json.dumps(facts))


@pytest.mark.slow
def test_each_method_builds_what_it_needs(tmp_path):
    done = run("python", __file__, [str(tmp_path)], nprocs=1, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts.pop("gkd_explicit") == {"alphas": [0.3, 0.0], "temperatures": [2.0, 1.0]}
    # the teacher stays only where its distributions enter the loss (SeqKD's is freed)
    assert {m: f["teacher"] for m, f in facts.items()} == {
        "sft": False,
        "kd": True,
        "seqkd": False,
        "gkd": True,
    }
    assert {m: f["kind"] for m, f in facts.items()} == {
        "sft": None,
        "kd": "fkl",
        "seqkd": None,
        "gkd": "jsd",
    }
    assert [m for m, f in facts.items() if f["on_policy"]] == ["gkd"]
    assert facts["kd"]["alphas"] == pytest.approx([0.3, 0.0])
    assert facts["gkd"]["alphas"] == [0.0, 0.0]
    assert facts["sft"]["alphas"] == facts["seqkd"]["alphas"] == [1.0, 1.0]
    # SeqKD trains on the teacher's answers but is ranked on the dataset's responses: the
    # same student on the same references gives the same CE as KD's measurement
    assert not facts["seqkd"]["responses_are_references"]
    assert facts["kd"]["responses_are_references"]
    assert facts["seqkd"]["ce"] == pytest.approx(facts["kd"]["ce"], rel=1e-6)
    # the samplers' lengths are curriculum.json's step counts
    for f in facts.values():
        assert f["planned_steps"] == [
            e * s for e, s in zip(f["epochs"], f["steps_per_epoch"], strict=True)
        ]


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from pocl_ds.cli import run_main

    run_main(lambda: _worker(sys.argv[1]))
