import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocl_ds.data import InstructionSample, load_instructions, render_prompt
from pocl_ds.errors import PoclError
from pocl_ds.evaluate import (
    EvalReport,
    SuiteScores,
    encode_prompts,
    evaluate,
    evaluate_model,
    format_table,
    mean_std,
    prompt_limit,
)
from pocl_ds.generation import generate
from pocl_ds.metrics import exact_match, rouge_l
from pocl_ds.models import load_causal_lm, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("POCL_DATA_DIR", REPO.parent / "shared" / "data"))
torch.set_num_threads(1)

CORPUS = [
    "Write a response that appropriately completes the request.",
    "The cat sat on the mat and looked at the garden.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Give three tips for staying healthy: eat well, sleep, and exercise.",
    "What is the boiling point of water? It is one hundred degrees Celsius.",
    render_prompt("Say something.", ""),
    render_prompt("Say something.", "Some context."),
]
QUESTIONS = [
    ("Name a color.", "", ["Blue."]),
    ("What is the capital of France?", "", ["Paris", "Paris is the capital."]),
    ("Summarize the text.", "The cat sat on the mat.", ["A cat sat on a mat."]),
    ("Give a tip for staying healthy.", "", ["Sleep well."]),
    ("Translate to German: the garden", "", ["der Garten"]),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(
        CORPUS * 4, vocab_size=400, save_dir=tmp_path_factory.mktemp("tokenizer")
    )


def tiny_lm(tokenizer, seed: int = 0, max_positions: int = 128):
    return load_causal_lm(
        inline_config={
            "family": "gpt2",
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "max_positions": max_positions,
            "initializer_range": 0.3,  # spread logits: greedy has no near-ties
        },
        vocab_size=len(tokenizer),
        seed=seed,
    )


def samples(rows=QUESTIONS) -> list[InstructionSample]:
    return [
        InstructionSample(
            index=i,
            instruction=instruction,
            input=context,
            references=tuple(refs),
            prompt=render_prompt(instruction, context),
        )
        for i, (instruction, context, refs) in enumerate(rows)
    ]


SMALL = dict(batch_size=2, max_total_length=80, max_prompt_length=64, progress=False)


def test_mean_std_is_population_std():
    assert mean_std([10.0, 20.0]) == (15.0, 5.0)
    assert mean_std([7.0]) == (7.0, 0.0)


def test_format_table_paper_shape():
    report = EvalReport(
        scores=[
            SuiteScores("kd", "dolly", 3, {10: 10.0, 20: 20.0}, {10: 0.0, 20: 0.0}),
            SuiteScores("kd", "vicuna", 3, {10: 30.0, 20: 30.0}, {10: 0.0, 20: 100.0}),
            SuiteScores("pocl", "dolly", 3, {10: 12.0, 20: 12.0}, {10: 0.0, 20: 0.0}),
        ]
    )
    lines = format_table(report).splitlines()
    assert lines[0] == "| Model | dolly | vicuna | Avg. |"
    # Avg. per seed is (10+30)/2 = 20 and (20+30)/2 = 25: mean 22.5, std 2.5.
    assert lines[2] == "| kd | 15.00 ± 5.00 | 30.00 ± 0.00 | 22.50 ± 2.50 |"
    assert lines[3] == "| pocl | 12.00 ± 0.00 | – | 12.00 ± 0.00 |"
    assert "50.00 ± 50.00" in format_table(report, metric="exact_match")


def test_evaluate_writes_scores_generations_and_table(tokenizer, tmp_path):
    models = {"student": tiny_lm(tokenizer, 0), "teacher": tiny_lm(tokenizer, 1)}
    suites = {"qa": samples(), "summary": samples(QUESTIONS[2:4])}
    report = evaluate(models, suites, tokenizer, seeds=(10, 20), output_dir=tmp_path, **SMALL)

    table = (tmp_path / "table.md").read_text()
    assert "| Model | qa | summary | Avg. |" in table
    for model in models:
        assert table.count(f"| {model} |") == 2  # the ROUGE-L and the exact-match table

    lines = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2 * (5 + 2)  # models x seeds x prompts
    keys = {"suite", "seed", "prompt", "generation", "references", "rouge_l", "model"}
    assert keys <= set(lines[0])
    for line in lines:
        assert line["rouge_l"] == pytest.approx(
            100 * rouge_l(line["generation"], line["references"])
        )
    # Seeds change samples: the same prompt gets different text under seed 10 and 20.
    by_seed = {s: [x["generation"] for x in lines if x["seed"] == s] for s in (10, 20)}
    assert by_seed[10] != by_seed[20]

    document = json.loads((tmp_path / "eval.json").read_text())
    assert document["settings"]["seeds"] == [10, 20]
    qa = document["models"]["teacher"]["suites"]["qa"]
    for seed in (10, 20):
        rows = [x for x in lines if (x["model"], x["suite"], x["seed"]) == ("teacher", "qa", seed)]
        assert qa["rouge_l"]["per_seed"][str(seed)] == pytest.approx(
            sum(x["rouge_l"] for x in rows) / len(rows)
        )
    assert (qa["rouge_l"]["mean"], qa["rouge_l"]["std"]) == pytest.approx(
        mean_std(list(qa["rouge_l"]["per_seed"].values()))
    )
    assert report.models() == ["student", "teacher"]
    assert report.suites() == ["qa", "summary"]


def test_scores_are_right_for_a_known_generation(tokenizer):
    # Make the reference the model's own greedy answer: ROUGE-L and exact match must be 100.
    model = tiny_lm(tokenizer)
    suite = samples()
    TOTAL = 100
    prompt_ids = [tokenizer(s.prompt, add_special_tokens=False)["input_ids"] for s in suite]
    tokens = generate(
        model,
        prompt_ids,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        max_new_tokens=TOTAL,
        max_total_length=TOTAL,
        progress=False,
    )
    answers = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    rows = [
        (s.instruction, s.input, [answer, "unrelated words"])
        for s, answer in zip(suite, answers, strict=True)
        if any(c.isalnum() for c in answer)
    ]
    assert rows, "the tiny model produced no scorable text"
    report = evaluate_model(
        model,
        tokenizer,
        {"own": samples(rows)},
        greedy=True,
        batch_size=8,
        max_total_length=TOTAL,
        max_prompt_length=None,
        progress=False,
    )
    (scores,) = report.scores
    assert scores.rouge_l == {10: pytest.approx(100.0)}
    assert scores.exact_match == {10: pytest.approx(100.0)}
    assert report.settings["seeds"] == [10]


def test_prompts_are_cut_from_the_left(tokenizer):
    model = tiny_lm(tokenizer)
    long_context = " ".join(CORPUS * 3)
    report = evaluate_model(
        model,
        tokenizer,
        {"long": samples([("Summarize.", long_context, ["A summary."])])},
        seeds=(10,),
        batch_size=1,
        max_total_length=80,
        max_prompt_length=60,
        progress=False,
    )
    (record,) = report.generations
    assert record.exact_match == exact_match(record.generation, record.references)
    assert record.generation  # room was left for an answer after the cut prompt


def test_encode_prompts_keeps_the_end_of_a_long_prompt(tokenizer):
    prompt = render_prompt("Summarize.", " ".join(CORPUS * 3))
    full = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cue = tokenizer("### Response:", add_special_tokens=False)["input_ids"]
    (ids,), cut = encode_prompts(tokenizer, [prompt], max_prompt_length=20)
    assert cut == 1 and len(full) > 20
    assert ids == full[-20:]  # the tail, with the cue the model answers after
    assert cue[-1] in ids[-4:]
    (short,), cut = encode_prompts(tokenizer, [prompt], max_prompt_length=None)
    assert (short, cut) == (full, 0)


def test_prompt_limit_fits_prompts_to_the_model():
    common = dict(max_total_length=512, max_prompt_length=256, max_new_tokens=None)
    assert prompt_limit(1024, **common) == 256  # a real model: max_prompt_length only
    assert prompt_limit(512, **common) == 256
    assert prompt_limit(128, **common) == 64  # a short model keeps half its positions
    assert prompt_limit(None, **common) == 256
    free = dict(max_total_length=512, max_prompt_length=None)
    assert prompt_limit(128, max_new_tokens=28, **free) == 100
    assert prompt_limit(128, max_new_tokens=None, **free) == 127


def test_prompts_longer_than_the_model_are_fitted_from_the_left(tokenizer, tmp_path):
    # 64 positions, far fewer than the prompt's tokens or max_prompt_length (256): the prompt
    # is cut from the left to 64 - 64 // 2 = 32 tokens and the model answers its cue.
    model = tiny_lm(tokenizer, max_positions=64)
    suite = samples([("Summarize.", " ".join(CORPUS * 3), ["A summary."])])
    full = tokenizer(suite[0].prompt, add_special_tokens=False)["input_ids"]
    assert len(full) > 64
    report = evaluate(
        {"tiny": model},
        {"long": suite},
        tokenizer,
        greedy=True,
        max_total_length=512,
        progress=False,
        output_dir=tmp_path,
    )
    (scores,) = report.scores
    assert scores.prompts_cut == 1
    document = json.loads((tmp_path / "eval.json").read_text())
    assert document["models"]["tiny"]["suites"]["long"]["prompts_cut"] == 1
    (expected,) = generate(
        model,
        [full[-32:]],
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        max_new_tokens=512,
        max_total_length=512,
        vocab_size=len(tokenizer),
        progress=False,
    )
    (record,) = report.generations
    assert record.generation == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert record.generation


def test_user_errors(tokenizer):
    model = tiny_lm(tokenizer)
    with pytest.raises(PoclError, match="at least one seed"):
        evaluate_model(model, tokenizer, {"qa": samples()}, seeds=())
    with pytest.raises(PoclError, match="no samples"):
        evaluate_model(model, tokenizer, {"qa": []})
    with pytest.raises(PoclError, match="both named"):
        from pocl_ds.evaluate import merge_reports

        report = evaluate_model(model, tokenizer, {"qa": samples()[:1]}, seeds=(1,), **SMALL)
        merge_reports([report, report])


def _real_suites(limit: int) -> dict[str, list[InstructionSample]]:
    files = {
        "dolly": DATA_DIR / "dolly" / "test_500.jsonl",
        "selfinst": DATA_DIR / "selfinst" / "test_242.jsonl",
        "vicuna": DATA_DIR / "vicuna" / "test_80.jsonl",
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        pytest.skip(f"real evaluation suites not found ({', '.join(missing)}); set POCL_DATA_DIR")
    return {name: load_instructions(path)[:limit] for name, path in files.items()}


def test_real_suites_run_through_evaluation(tokenizer):
    suites = _real_suites(limit=3)
    report = evaluate(
        {"tiny": tiny_lm(tokenizer)},
        suites,
        tokenizer,
        seeds=(10, 20),
        batch_size=3,
        max_total_length=128,
        max_prompt_length=96,
        progress=False,
    )
    assert report.suites() == ["dolly", "selfinst", "vicuna"]
    assert len(report.generations) == 3 * 2 * 3
    assert all(0.0 <= g.rouge_l <= 100.0 for g in report.generations)
    assert {len(g.references) for g in report.generations} >= {1}
    table = format_table(report)
    assert "| tiny |" in table and "| dolly | selfinst | vicuna | Avg. |" in table


# ----------------------------------------------------------------------------- the launcher


def _load_launcher():
    spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_resolves_models_and_suites(tmp_path, monkeypatch):
    launcher = _load_launcher()
    export = tmp_path / "run" / "final"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    assert launcher.resolve_model_dir(str(tmp_path / "run")) == export
    assert launcher.resolve_model_dir(str(export)) == export
    with pytest.raises(PoclError, match=r"config\.json"):
        launcher.resolve_model_dir(str(tmp_path))
    data = tmp_path / "dolly" / "test_5.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    assert launcher.resolve_suite(str(data)) == ("dolly", data)
    assert launcher.resolve_suite(f"mine={data}") == ("mine", data)
    monkeypatch.setenv("POCL_DATA_DIR", str(tmp_path))
    with pytest.raises(PoclError, match="POCL_DATA_DIR"):
        launcher.resolve_suite("vicuna")
    with pytest.raises(PoclError, match="no such file"):
        launcher.resolve_suite(str(tmp_path / "nope.jsonl"))


def _export(tokenizer, directory: Path) -> Path:
    tiny_lm(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _run_launcher(args: list[str], *, ranks: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    prefix = [sys.executable]
    if ranks > 1:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return subprocess.run(
        [*prefix, str(REPO / "launch/evaluate.py"), *args],
        env=env, cwd=REPO, timeout=400, capture_output=True, text=True,
    )  # fmt: skip


def test_launcher_user_error_exits_2(tmp_path):
    data = tmp_path / "qa.jsonl"  # a suite of its own: the test needs no shared data
    data.write_text(json.dumps({"instruction": "Name a color.", "output": "Blue."}) + "\n")
    result = _run_launcher(
        ["--model", str(tmp_path / "missing"), "--data", str(data), "--output", str(tmp_path)],
        ranks=1,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --model")


@pytest.mark.slow
def test_launcher_two_ranks_equal_one_rank(tokenizer, tmp_path):
    model_dir = _export(tokenizer, tmp_path / "student")
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": q, "input": c, "output": refs}) + "\n"
            for q, c, refs in QUESTIONS
        )
    )
    common = ["--model", str(model_dir), "--data", str(data), "--seeds", "10", "20",
              "--batch-size", "2", "--max-length", "80"]  # fmt: skip
    outputs = {}
    for ranks in (1, 2):
        out = tmp_path / f"out{ranks}"
        result = _run_launcher([*common, "--output", str(out)], ranks=ranks)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "| student |" in result.stdout
        outputs[ranks] = out
    for name in ("generations.jsonl", "table.md"):
        assert (outputs[1] / name).read_text() == (outputs[2] / name).read_text()
    one, two = (json.loads((outputs[r] / "eval.json").read_text()) for r in (1, 2))
    assert one["models"] == two["models"]
    assert two["settings"]["world_size"] == 2
