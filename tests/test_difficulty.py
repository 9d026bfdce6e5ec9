"""Difficulty measurer: ranks, RRF, ordering, partition, scoring, cache, 1 vs 2 ranks, and the
order it finds on the synthetic graded tasks."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pocl_ds.data import InstructionSample, collate_for_training, tokenize_samples
from pocl_ds.difficulty import (
    build_result,
    measure_difficulty,
    meta_path_for,
    order_samples,
    partition,
    rank_with_ties,
    reciprocal_rank_fusion,
)
from pocl_ds.errors import PoclError
from pocl_ds.generation import generate
from pocl_ds.metrics import rouge_l
from pocl_ds.models import load_causal_lm, load_tokenizer, train_bpe_tokenizer
from pocl_ds.stats import spearman
from pocl_ds.synthetic import generate_tasks
from tests.launchers import run

REPO = Path(__file__).resolve().parents[1]
TINY_GPT2 = {
    "family": "gpt2",
    "hidden_size": 32,
    "num_layers": 2,
    "num_heads": 2,
    "max_positions": 128,
}


# ------------------------------------------------------------------ pure functions


def test_rank_with_ties_breaks_ties_by_index():
    values = [0.5, 0.2, 0.5, 0.1]
    assert rank_with_ties(values, descending=False) == [3, 2, 4, 1]
    assert rank_with_ties(values, descending=True) == [1, 3, 2, 4]
    # Explicit sample indices decide ties instead of positions.
    assert rank_with_ties(values, descending=True, tie_keys=[9, 0, 3, 1]) == [2, 3, 1, 4]
    # A NaN is hardest whichever way easy points.
    assert rank_with_ties([math.nan, 1.0, 0.0], descending=False) == [3, 2, 1]
    assert rank_with_ties([math.nan, 1.0, 0.0], descending=True) == [3, 1, 2]


def test_reciprocal_rank_fusion_hand_computed():
    fused = reciprocal_rank_fusion([1, 2, 3], [3, 1, 2], k=60)
    assert fused == pytest.approx([1 / 61 + 1 / 63, 1 / 62 + 1 / 61, 1 / 63 + 1 / 62], abs=0)
    assert reciprocal_rank_fusion([1], [1], k=1) == [1.0]
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([1, 2], [1])


def test_order_samples_hand_computed():
    # Sample:        0     1     2     3
    ce = [2.0, 1.0, 3.0, 0.5]  # rank_ce    = 3, 2, 4, 1
    rouge = [0.9, 0.1, 0.5, 0.2]  # rank_rouge = 1, 4, 2, 3
    ranking = order_samples(ce, rouge, rank_by="fusion", order="easy_to_hard", k=60)
    assert ranking.rank_ce == [3, 2, 4, 1]
    assert ranking.rank_rouge == [1, 4, 2, 3]
    # FR: 0 → 1/63+1/61, 1 → 1/62+1/64, 2 → 1/64+1/62 (tie with 1), 3 → 1/61+1/63 (tie with 0)
    assert ranking.fused[0] == ranking.fused[3] and ranking.fused[1] == ranking.fused[2]
    assert ranking.order == [0, 3, 1, 2]
    assert order_samples(ce, rouge, rank_by="ce").order == [3, 1, 0, 2]
    assert order_samples(ce, rouge, rank_by="rouge").order == [0, 2, 3, 1]
    assert order_samples(ce, rouge, rank_by="fusion", order="hard_to_easy").order == [2, 1, 3, 0]
    assert order_samples(ce, rouge, rank_by="fusion", tie_keys=[7, 6, 5, 4]).order == [3, 0, 2, 1]


def test_order_samples_random_is_seeded_and_ignores_scores():
    ce, rouge = [float(i) for i in range(20)], [0.0] * 20
    first = order_samples(ce, rouge, order="random", seed=3).order
    assert first == order_samples(list(reversed(ce)), rouge, order="random", seed=3).order
    assert first != order_samples(ce, rouge, order="random", seed=4).order
    assert sorted(first) == list(range(20)) and first != list(range(20))


def test_order_samples_uses_rrf_k():
    # Sample 0 is ranked (1, 9) and sample 1 (4, 5) by (CE, ROUGE-L); seven fillers sit between.
    # A small k rewards one extreme rank, a large k the better sum: 1/2 + 1/10 > 1/5 + 1/6 at
    # k = 1, but 1/61 + 1/69 < 1/64 + 1/65 at k = 60, so the two swap places.
    rank_ce = [1, 4, 2, 3, 5, 6, 7, 8, 9]
    rank_rouge = [9, 5, 1, 2, 3, 4, 6, 7, 8]
    ce = [float(r) for r in rank_ce]  # ascending CE: rank r has the r-th smallest
    rouge = [float(10 - r) for r in rank_rouge]  # descending ROUGE-L
    small = order_samples(ce, rouge, rank_by="fusion", k=1)
    large = order_samples(ce, rouge, rank_by="fusion", k=60)
    assert small.fused[0] == pytest.approx(1 / 2 + 1 / 10) and small.fused[1] == pytest.approx(
        1 / 5 + 1 / 6
    )
    assert large.fused[0] == pytest.approx(1 / 61 + 1 / 69)
    assert small.order.index(0) < small.order.index(1)
    assert large.order.index(1) < large.order.index(0)


def test_order_samples_random_follows_sample_indices_not_positions():
    # The same samples listed in another order (with their indices) get the same curriculum
    # order of sample indices: the shuffle is over indices, not over input positions.
    indices = [10, 3, 7, 42, 5, 8, 1, 99, 23, 17]
    ce, rouge = [float(i % 4) for i in indices], [0.0] * len(indices)
    ranking = order_samples(ce, rouge, order="random", seed=5, tie_keys=indices)
    as_indices = [indices[p] for p in ranking.order]
    moved = indices[::-1]
    moved_ranking = order_samples(ce[::-1], rouge, order="random", seed=5, tie_keys=moved)
    assert [moved[p] for p in moved_ranking.order] == as_indices


def test_order_samples_rejects_unknown_options():
    with pytest.raises(PoclError, match="rank_by"):
        order_samples([1.0], [1.0], rank_by="bleu")
    with pytest.raises(PoclError, match="order"):
        order_samples([1.0], [1.0], order="shuffled")


@pytest.mark.parametrize(
    ("total", "n", "sizes"),
    [
        (10, 4, [3, 3, 2, 2]),
        (8, 4, [2, 2, 2, 2]),
        (5, 1, [5]),
        (4, 4, [1, 1, 1, 1]),
        (11, 3, [4, 4, 3]),
    ],
)
def test_partition_sizes_contiguous_larger_first(total, n, sizes):
    ordered = [100 + i for i in range(total)]
    subsets = partition(ordered, n)
    assert [len(s) for s in subsets] == sizes
    assert [i for s in subsets for i in s] == ordered
    assert all(len(s) in (total // n, total // n + 1) for s in subsets)


def test_partition_rejects_too_many_subsets():
    with pytest.raises(PoclError, match="num_subsets"):
        partition([1, 2, 3], 4)
    with pytest.raises(PoclError, match="num_subsets"):
        partition([1, 2, 3], 0)


def test_build_result_records_agree_with_subsets():
    ids = [10, 11, 12, 13, 14]
    ce = [1.0, 2.0, 3.0, 4.0, 5.0]
    rouge = [0.5, 0.4, 0.3, 0.2, 0.1]
    result = build_result(
        ids,
        ce,
        rouge,
        rank_by="fusion",
        order="easy_to_hard",
        num_subsets=2,
        seed=0,
        k=60,
        reused=False,
    )
    assert result.order == ids
    assert result.subsets == [[10, 11, 12], [13, 14]]
    assert [r.subset for r in result.records] == [1, 1, 1, 2, 2]
    assert [r.rank_ce for r in result.records] == [1, 2, 3, 4, 5]
    assert result.records[0].fused == pytest.approx(2 / 61)


# ------------------------------------------------------------------ scoring a real model


def _instruction_samples(num_samples: int, seed: int) -> list[InstructionSample]:
    # Short prompts (no template) keep the sequences, hence the tests, small.
    return [
        InstructionSample(
            index=i,
            instruction=task["instruction"],
            input=task["input"],
            references=(task["output"],),
            prompt=f"{task['instruction']}\n{task['input']}\n",
            difficulty=task["difficulty"],
        )
        for i, task in enumerate(generate_tasks(num_samples, seed))
    ]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [s.prompt + s.references[0] for s in _instruction_samples(512, 1)]
    return train_bpe_tokenizer(texts, vocab_size=320, save_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def samples(tokenizer):
    return tokenize_samples(_instruction_samples(24, 0), tokenizer, max_length=64)


def _model(seed=0):
    torch.set_num_threads(1)
    return load_causal_lm(inline_config=TINY_GPT2, vocab_size=320, seed=seed).eval()


def _measure(model, samples, tokenizer, **overrides):
    settings = dict(
        tokenizer=tokenizer,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        batch_size=5,
        max_new_tokens=6,
    )
    settings.update(overrides)
    return measure_difficulty(model, samples, **settings)


def test_scores_match_unbatched_reference(samples, tokenizer):
    model = _model()
    result = _measure(model, samples, tokenizer)
    by_index = {r.index: r for r in result.records}
    assert [r.index for r in result.records] == [s.index for s in samples]
    outputs = generate(
        model,
        [s.prompt_ids for s in samples],
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
        max_new_tokens=6,
        batch_size=5,
        progress=False,
    )
    for sample, output in zip(samples, outputs, strict=True):
        batch = collate_for_training([sample], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits
        expected = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100)
        record = by_index[sample.index]
        assert record.ce == pytest.approx(expected.item(), rel=1e-4)
        text = tokenizer.decode(output, skip_special_tokens=True)
        assert record.rouge_l == rouge_l(text, sample.references)
    assert sorted(r.rank_ce for r in result.records) == list(range(1, len(samples) + 1))
    assert [len(s) for s in result.subsets] == [6, 6, 6, 6]
    assert sorted(i for s in result.subsets for i in s) == sorted(by_index)
    for r in result.records:
        assert r.fused == 1 / (60 + r.rank_ce) + 1 / (60 + r.rank_rouge)
        assert r.index in result.subsets[r.subset - 1]
    assert model.training is False


def test_cache_hit_and_miss(samples, tokenizer, tmp_path, caplog):
    cache = tmp_path / "difficulty.jsonl"
    model = _model()
    caplog.set_level(logging.INFO, logger="pocl_ds.difficulty")

    first = _measure(model, samples, tokenizer, cache_path=cache, cache_key={"student": "a"})
    assert not first.reused and "recomputing (no cache" in caplog.text
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(lines) == len(samples)
    assert set(lines[0]) == {"index", "ce", "rouge_l", "rank_ce", "rank_rouge", "fused", "subset"}
    assert meta_path_for(cache).is_file()

    caplog.clear()
    again = _measure(model, samples, tokenizer, cache_path=cache, cache_key={"student": "a"})
    assert again.reused and "reusing" in caplog.text
    assert again.records == first.records and again.subsets == first.subsets

    # Ordering settings re-sort the cached scores without recomputing them.
    resorted = _measure(
        model,
        samples,
        tokenizer,
        cache_path=cache,
        cache_key={"student": "a"},
        rank_by="ce",
        num_subsets=3,
    )
    assert resorted.reused and len(resorted.subsets) == 3
    assert [r.ce for r in resorted.records] == [r.ce for r in first.records]
    assert json.loads(meta_path_for(cache).read_text())["ordering"]["rank_by"] == "ce"

    caplog.clear()
    changed = _measure(
        model, samples, tokenizer, cache_path=cache, cache_key={"student": "a"}, max_new_tokens=7
    )
    assert not changed.reused and "max_new_tokens: 6 -> 7" in caplog.text

    caplog.clear()
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] += 1.0
    retrained = _measure(
        model, samples, tokenizer, cache_path=cache, cache_key={"student": "a"}, max_new_tokens=7
    )
    assert not retrained.reused and "student weights changed" in caplog.text

    caplog.clear()
    fewer = _measure(
        model,
        samples[:-1],
        tokenizer,
        cache_path=cache,
        cache_key={"student": "a"},
        max_new_tokens=7,
    )
    assert not fewer.reused and "training data changed" in caplog.text

    caplog.clear()
    other = _measure(
        model,
        samples[:-1],
        tokenizer,
        cache_path=cache,
        cache_key={"student": "b"},
        max_new_tokens=7,
    )
    assert not other.reused and "extra.student: 'a' -> 'b'" in caplog.text

    caplog.clear()
    cache.write_text(cache.read_text().replace('"subset": 1', '"subset": 2'))
    edited = _measure(
        model,
        samples[:-1],
        tokenizer,
        cache_path=cache,
        cache_key={"student": "b"},
        max_new_tokens=7,
    )
    assert not edited.reused and "does not match its sidecar" in caplog.text


def test_measure_rejects_duplicate_indices_and_bad_options(samples, tokenizer):
    model = _model()
    with pytest.raises(PoclError, match="distinct"):
        _measure(model, [samples[0], samples[0]], tokenizer, num_subsets=1)
    with pytest.raises(PoclError, match="num_subsets"):
        _measure(model, samples[:3], tokenizer, num_subsets=4)
    with pytest.raises(PoclError, match="rank_by"):
        _measure(model, samples, tokenizer, rank_by="bleu")


# ------------------------------------------------------------------ 1 vs 2 ranks


def _run_ranks(nproc: int, args: list[str], timeout: float) -> None:
    done = run("torchrun", __file__, args, nprocs=nproc, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _worker(work_dir: str) -> None:
    """Score the saved samples with the saved model; rank 0 writes what it got."""
    import torch.distributed as dist

    from pocl_ds.data import TokenizedSample

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    work = Path(work_dir)
    tokenizer = load_tokenizer(work / "tok")
    model = load_causal_lm(str(work / "model")).eval()
    samples = [
        TokenizedSample(
            index=s["index"],
            prompt_ids=tuple(s["prompt_ids"]),
            response_ids=tuple(s["response_ids"]),
            references=tuple(s["references"]),
        )
        for s in json.loads((work / "samples.json").read_text())
    ]
    result = _measure(model, samples, tokenizer, batch_size=3)
    records = [
        [r.index, r.ce.hex(), r.rouge_l.hex(), r.rank_ce, r.rank_rouge, r.subset]
        for r in result.records
    ]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (records, result.subsets))
    if dist.get_rank() == 0:
        assert all(g == gathered[0] for g in gathered), "ranks disagree"
        out = work / f"world{dist.get_world_size()}.json"
        out.write_text(json.dumps({"records": records, "subsets": result.subsets}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_scores_identical_on_one_and_two_ranks(samples, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    _model().save_pretrained(tmp_path / "model")
    (tmp_path / "samples.json").write_text(
        json.dumps(
            [
                {
                    "index": s.index,
                    "prompt_ids": s.prompt_ids,
                    "response_ids": s.response_ids,
                    "references": s.references,
                }
                for s in samples[:17]  # 6 batches of 3, the last short
            ]
        )
    )
    _run_ranks(1, [str(tmp_path)], timeout=120)
    _run_ranks(2, [str(tmp_path)], timeout=120)
    one, two = (json.loads((tmp_path / f"world{w}.json").read_text()) for w in (1, 2))
    assert one == two  # floats compared bit for bit (hex)
    assert len(one["records"]) == 17


# ------------------------------------------------------------------ known difficulty


@pytest.mark.slow
def test_measured_order_tracks_known_difficulty(tokenizer):
    """A student pre-trained briefly on other synthetic tasks finds the graded levels.

    The student is trained on a disjoint task set (seed 1) and then scores the training set
    (seed 0), as a pretrained student scores new data; on its own training data it would just
    have memorised the answers.
    """
    torch.set_num_threads(1)  # more threads than free cores slows these tiny matmuls 10x
    model = load_causal_lm(
        inline_config={**TINY_GPT2, "hidden_size": 64}, vocab_size=320, seed=0
    ).train()
    pretrain = tokenize_samples(_instruction_samples(2048, 1), tokenizer, max_length=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(1500):
        picks = torch.randint(len(pretrain), (16,), generator=generator).tolist()
        batch = collate_for_training([pretrain[i] for i in picks], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    raw = _instruction_samples(256, 0)
    level = {s.index: s.difficulty for s in raw}
    train = tokenize_samples(raw, tokenizer, max_length=64)
    result = _measure(model, train, tokenizer, batch_size=32, max_new_tokens=24)
    position = {index: p for p, index in enumerate(result.order)}
    ids = [s.index for s in train]
    rho = spearman([position[i] for i in ids], [level[i] for i in ids])
    mean_level = [sum(level[i] for i in s) / len(s) for s in result.subsets]
    logging.getLogger(__name__).warning(
        "Spearman rho(order, known level) = %.3f; mean level per subset %s", rho, mean_level
    )
    assert rho > 0.3
    assert mean_level[0] < mean_level[-1]
    hard_first = _measure(
        model, train, tokenizer, batch_size=32, max_new_tokens=24, order="hard_to_easy"
    )
    assert hard_first.order == result.order[::-1]


if __name__ == "__main__":
    _worker(sys.argv[1])
