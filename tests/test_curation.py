"""SeqKD answers (EOS only when finished, a cache keyed by teacher and settings) and on-policy
samples (seeds, coins, padded vocabulary rows, truncation counts)."""

import logging

import pytest
import torch

from pocl_ds import distributed
from pocl_ds.curation import CurationPolicy, on_policy_seeds, seqkd_responses
from pocl_ds.data import TokenizedSample
from pocl_ds.generation import generate
from pocl_ds.models import load_causal_lm

VOCAB = 96  # the models' embedding rows
TOKENIZER_SIZE = 90  # the ids a tokenizer would have: rows 90..95 are padding
PAD = 0
MAX_LENGTH = 40
torch.set_num_threads(1)


def tiny_model(seed: int = 0):
    return load_causal_lm(
        inline_config={
            "family": "gpt2",
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "max_positions": 64,
            "initializer_range": 0.3,  # spread logits: greedy has no near-ties
        },
        vocab_size=VOCAB,
        seed=seed,
    )


def with_logit_offsets(model, offsets: dict[int, float]):
    """``model`` with constants added to some ids' logits (e.g. huge ones on padded rows)."""
    bias = torch.zeros(VOCAB)
    for token, value in offsets.items():
        bias[token] = value
    model.lm_head.register_forward_hook(lambda module, args, output: output + bias)
    return model


def tiny_samples(count: int = 6) -> list[TokenizedSample]:
    generator = torch.Generator().manual_seed(1)
    samples = []
    for index in range(count):
        length = int(torch.randint(2, 9, (), generator=generator))
        prompt = torch.randint(2, TOKENIZER_SIZE, (length,), generator=generator).tolist()
        samples.append(TokenizedSample(10 + index, tuple(prompt), (5, 1), ("ref",)))
    return samples


def run_seqkd(teacher, samples, cache_path, **overrides):
    settings = dict(
        cache_path=cache_path,
        cache_key={"teacher": "tiny", "teacher_dtype": "fp32"},
        pad_id=PAD,
        eos_id=1,
        vocab_size=TOKENIZER_SIZE,
        max_length=MAX_LENGTH,
        max_new_tokens=6,
        batch_size=4,
        synced_gpus=False,
    )
    settings.update(overrides)
    return seqkd_responses(teacher, samples, **settings)


def free_greedy(model, samples, max_new_tokens: int) -> list[list[int]]:
    return generate(
        model,
        [s.prompt_ids for s in samples],
        pad_id=PAD,
        eos_id=None,
        max_new_tokens=max_new_tokens,
        vocab_size=TOKENIZER_SIZE,
        progress=False,
    )


# ----------------------------------------------------------------------------- SeqKD


def test_seqkd_answers_cut_at_the_budget_get_no_eos(tmp_path, caplog):
    teacher, samples = tiny_model(), tiny_samples()
    free = free_greedy(teacher, samples, 6)
    # An id some answers produce within the budget and others never do: those stop there.
    eos = next(t for row in free for t in row if 0 < sum(t in other for other in free) < len(free))
    caplog.set_level(logging.INFO, logger="pocl_ds.curation")
    result = run_seqkd(teacher, samples, tmp_path / "seqkd.jsonl", eos_id=eos)
    expected_truncated = 0
    for sample, row, curated in zip(samples, free, result.samples, strict=True):
        assert curated.prompt_ids == sample.prompt_ids
        if eos in row:  # finished: the answer up to its EOS, and the EOS target
            assert curated.response_ids == (*row[: row.index(eos)], eos)
        else:  # cut off at 6 tokens: no EOS target at the cut
            assert curated.response_ids == tuple(row)
            expected_truncated += 1
    assert 0 < expected_truncated < len(samples)
    assert result.truncated == expected_truncated
    assert (
        f"{expected_truncated} of {len(samples)} teacher answers cut off by the token budget "
        "(max_new_tokens 6, max_length 40): kept without EOS" in caplog.text
    )
    # Reused from the cache, the answers keep their finished/truncated state.
    again = run_seqkd(teacher, samples, tmp_path / "seqkd.jsonl", eos_id=eos)
    assert again == result


def test_seqkd_answers_cut_by_the_length_limit_get_no_eos(tmp_path):
    teacher, samples = tiny_model(), tiny_samples()
    longest = max(len(s.prompt_ids) for s in samples)
    result = run_seqkd(
        teacher,
        samples,
        tmp_path / "seqkd.jsonl",
        eos_id=VOCAB + 5,  # never drawn
        max_length=longest + 3,
        max_new_tokens=20,
    )
    assert result.truncated == len(samples)
    for sample, curated in zip(samples, result.samples, strict=True):
        assert len(sample.prompt_ids) + len(curated.response_ids) == longest + 3
        assert VOCAB + 5 not in curated.response_ids


def test_seqkd_cache_is_keyed_on_the_teacher_and_every_setting(tmp_path, caplog):
    samples, cache = tiny_samples(), tmp_path / "seqkd.jsonl"
    first, second = tiny_model(seed=0), tiny_model(seed=1)
    caplog.set_level(logging.INFO, logger="pocl_ds.curation")

    def run(teacher, **overrides):
        caplog.clear()
        result = run_seqkd(teacher, samples, cache, **overrides)
        return result, "reusing" in caplog.text

    answers, reused = run(first)
    assert not reused and sorted(p.name for p in tmp_path.iterdir()) == [cache.name]
    assert run(first) == (answers, True)

    # Another teacher (same prompts, same settings): its own answers, never the cached ones.
    other, reused = run(second)
    assert not reused and "teacher_weights" in caplog.text
    assert [list(s.response_ids) for s in other.samples] != [
        list(s.response_ids) for s in answers.samples
    ]
    assert other == run_seqkd(second, samples, tmp_path / "fresh.jsonl")

    # The caller's teacher key (name, dtype) and each generation setting are keyed too.
    _, reused = run(second, cache_key={"teacher": "tiny", "teacher_dtype": "bf16"})
    assert not reused and "teacher.teacher_dtype" in caplog.text
    for setting, value in [("max_new_tokens", 5), ("max_length", 30), ("vocab_size", 80),
                           ("eos_id", 2), ("pad_id", 3)]:  # fmt: skip
        _, reused = run(second, cache_key={"teacher": "tiny", "teacher_dtype": "bf16"},
                        **{setting: value})  # fmt: skip
        assert not reused, setting
        caplog.clear()
        _, reused = run(second, cache_key={"teacher": "tiny", "teacher_dtype": "bf16"},
                        **{setting: value})  # fmt: skip
        assert reused, setting
    # Other prompts regenerate as well.
    caplog.clear()
    fewer = run_seqkd(second, samples[:3], cache)
    assert "reusing" not in caplog.text and "prompts" in caplog.text
    assert len(fewer.samples) == 3


def test_seqkd_regenerates_a_cache_of_the_old_format(tmp_path, caplog):
    cache = tmp_path / "seqkd.jsonl"
    cache.write_text('{"prompts": [], "max_new_tokens": 6}\n')
    caplog.set_level(logging.INFO, logger="pocl_ds.curation")
    run_seqkd(tiny_model(), tiny_samples(), cache)
    assert "older version" in caplog.text and "reusing" not in caplog.text


# ----------------------------------------------------------------------------- vocabulary


def test_generated_answers_never_use_padded_vocabulary_rows(tmp_path):
    # Padded embedding rows with huge logits: any sampler that looks past the tokenizer's
    # ids would pick them every time.
    huge = {token: 1e4 for token in range(TOKENIZER_SIZE, VOCAB)}
    model = with_logit_offsets(tiny_model(), huge)
    unmasked = generate(model, [[5, 6, 7]], pad_id=PAD, eos_id=None, max_new_tokens=3,
                        progress=False)  # fmt: skip
    assert all(t >= TOKENIZER_SIZE for t in unmasked[0])

    seqkd = run_seqkd(model, tiny_samples(), tmp_path / "seqkd.jsonl")
    policy = make_policy(max_new_tokens=8)
    batches = policy.apply(model, [tiny_samples()], step=0, synced_gpus=False)
    for sample in [*seqkd.samples, *batches[0]]:
        assert sample.response_ids and all(t < TOKENIZER_SIZE for t in sample.response_ids)


# ----------------------------------------------------------------------------- on-policy


def make_policy(**overrides) -> CurationPolicy:
    settings = dict(
        on_policy=True,
        on_policy_prob=1.0,
        seed=42,
        max_length=MAX_LENGTH,
        max_new_tokens=6,
        pad_id=PAD,
        eos_id=1,
        vocab_size=TOKENIZER_SIZE,
    )
    settings.update(overrides)
    return CurationPolicy(**settings)


def test_on_policy_seeds_never_collide():
    seeds = {
        (seed, step, rank): on_policy_seeds(seed, step, rank, 8)
        for seed, step, rank in [(42, 0, 0), (42, 1, 0), (43, 0, 0), (42, 0, 1), (42, 1, 1)]
    }
    every = [s for row in seeds.values() for s in row]
    assert len(set(every)) == len(every)


def test_on_policy_samples_differ_across_ranks_and_seed_step_pairs(monkeypatch):
    model, samples = tiny_model(), tiny_samples()

    def responses(seed: int, step: int, rank: int) -> list[tuple[int, ...]]:
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        policy = make_policy(seed=seed)
        (batch,) = policy.apply(model, [samples], step=step, synced_gpus=False)
        return [s.response_ids for s in batch]

    base = responses(42, 1, 0)
    assert base == responses(42, 1, 0)  # reproducible
    # Rank 1's i-th prompt does not draw rank 0's numbers: the same prompts sample differently.
    assert base != responses(42, 1, 1)
    # seed 42 at step 1 is not seed 43 at step 0.
    assert base != responses(43, 0, 0)


def test_on_policy_coin_is_the_same_on_every_rank(monkeypatch):
    def coins(rank: int, seed: int = 42) -> list[bool]:
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        policy = make_policy(seed=seed, on_policy_prob=0.5)
        return [policy.uses_student_samples(step) for step in range(200)]

    on_rank0 = coins(0)
    assert on_rank0 == coins(1) == coins(3)
    assert 60 < sum(on_rank0) < 140
    assert coins(0, seed=7) != on_rank0
    assert not any(make_policy(on_policy=False).uses_student_samples(s) for s in range(50))


def test_on_policy_counts_truncated_samples_and_keeps_them_over_resume():
    samples = tiny_samples()
    # EOS forced at once: every sample is finished, its response just the EOS target.
    finishing = with_logit_offsets(tiny_model(), {1: 1e4})
    policy = make_policy()
    (batch,) = policy.apply(finishing, [samples], step=0, synced_gpus=False)
    assert [s.response_ids for s in batch] == [(1,)] * len(samples)
    assert policy.truncated_samples == 0

    # EOS never drawn: every sample runs to its 6-token budget and has no EOS target.
    rambling = with_logit_offsets(tiny_model(), {1: -1e4})
    (first, second) = policy.apply(rambling, [samples[:2], samples[2:]], step=1, synced_gpus=False)
    assert [len(s.response_ids) for s in first + second] == [6] * len(samples)
    assert all(1 not in s.response_ids for s in first + second)
    assert [s.index for s in first + second] == [s.index for s in samples]
    assert policy.truncated_samples == len(samples)
    assert policy.on_policy_steps == 2

    resumed = make_policy()
    resumed.load_state_dict(policy.state_dict())
    assert (resumed.truncated_samples, resumed.on_policy_steps) == (len(samples), 2)


def test_off_policy_steps_keep_the_data():
    samples = tiny_samples()
    policy = make_policy(on_policy=False)
    batches = [samples[:3], samples[3:]]
    assert policy.apply(tiny_model(), batches, step=0, synced_gpus=False) is batches
    assert policy.state_dict() == {"on_policy_steps": 0, "truncated_samples": 0}


@pytest.mark.parametrize("eos_first", [True, False])
def test_samples_stay_within_max_length(eos_first):
    model = with_logit_offsets(tiny_model(), {1: 1e4 if eos_first else -1e4})
    long = TokenizedSample(0, tuple(range(2, MAX_LENGTH)), (1,), ("r",))  # 2 tokens of room
    policy = make_policy(max_new_tokens=10)
    ((sample,),) = policy.apply(model, [[long]], step=0, synced_gpus=False)
    if eos_first:
        assert sample.response_ids == (1,)
    else:  # cut by the length limit: two tokens, no EOS
        assert len(sample.response_ids) == 2 and 1 not in sample.response_ids
        assert policy.truncated_samples == 1
