import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocl_ds.errors import PoclError
from pocl_ds.generation import (
    Generations,
    _sample,
    distributed_generate,
    generate,
    plan_batches,
    prompt_seed,
)
from pocl_ds.models import load_causal_lm, unwrap_model

REPO = Path(__file__).resolve().parents[1]
VOCAB = 96
PAD, EOS = 0, 1
torch.set_num_threads(1)


def tiny_model(family: str = "gpt2", max_positions: int = 64):
    # A wide init spreads the logits, so greedy argmax has no near-ties that float noise from
    # padding or batch shape could flip.
    return load_causal_lm(
        inline_config={
            "family": family,
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "max_positions": max_positions,
            "initializer_range": 0.3,
        },
        vocab_size=VOCAB,
        seed=0,
    )


def tiny_prompts(count: int = 9, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 13, (count,), generator=generator).tolist()
    return [torch.randint(2, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Token by token, whole prefix each step, no cache, no padding, no batching."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_naive_no_cache_loop(family):
    model = tiny_model(family)
    prompts = tiny_prompts()
    outputs = generate(
        model, prompts, pad_id=PAD, eos_id=None, max_new_tokens=8, batch_size=4, progress=False
    )
    assert outputs == [naive_greedy(model, p, 8) for p in prompts]


def test_left_padding_does_not_change_a_prompts_output():
    model = tiny_model()
    short, long = [5, 17, 33], list(range(2, 14))
    alone = generate(model, [short], pad_id=PAD, eos_id=None, max_new_tokens=10, progress=False)
    padded = generate(
        model, [long, short], pad_id=PAD, eos_id=None, max_new_tokens=10, progress=False
    )
    assert padded[1] == alone[0]


def test_kv_cache_and_full_recompute_agree_when_sampling():
    model = tiny_model("llama")
    prompts = tiny_prompts()
    kwargs = dict(pad_id=PAD, eos_id=EOS, max_new_tokens=8, greedy=False, seed=3, progress=False)
    cached = generate(model, prompts, batch_size=4, **kwargs)
    recomputed = generate(model, prompts, batch_size=4, use_cache=False, **kwargs)
    assert cached == recomputed


def test_stops_at_eos_per_row():
    model = tiny_model()
    prompts = tiny_prompts()
    free = generate(
        model, prompts, pad_id=PAD, eos_id=None, max_new_tokens=8, batch_size=4, progress=False
    )
    eos = free[0][2]  # a token row 0 produces at step 3
    stopped = generate(
        model, prompts, pad_id=PAD, eos_id=eos, max_new_tokens=8, batch_size=4, progress=False
    )
    for full, cut in zip(free, stopped, strict=True):
        expected = full[: full.index(eos)] if eos in full else full
        assert cut == expected
    assert len(stopped[0]) <= 2
    # Several stop ids (LLaMA-3 style): the first one met ends the row.
    both = generate(
        model, prompts, pad_id=PAD, eos_id=[eos, free[1][0]], max_new_tokens=8, progress=False
    )
    assert both[1] == []


def test_max_new_tokens_and_max_total_length():
    model = tiny_model()
    prompts = [[3] * 2, [4] * 7, [5] * 12, [6] * 20]
    outputs = generate(
        model,
        prompts,
        pad_id=PAD,
        eos_id=None,
        max_new_tokens=6,
        max_total_length=12,
        batch_size=4,
        progress=False,
    )
    assert [len(o) for o in outputs] == [6, 5, 0, 0]
    # The model's 64 positions cap prompt + output as well.
    capped = generate(model, [[7] * 60], pad_id=PAD, eos_id=None, max_new_tokens=20, progress=False)
    assert len(capped[0]) == 4
    # A row that stops early must not walk past the position table while its batch goes on.
    mixed = generate(
        model, [[7] * 60, [8] * 2], pad_id=PAD, eos_id=None, max_new_tokens=60, progress=False
    )
    assert [len(o) for o in mixed] == [4, 60]


def test_prompt_errors_are_user_errors():
    model = tiny_model()
    with pytest.raises(PoclError, match="more than the model's 64 positions"):
        generate(model, [[3] * 65], pad_id=PAD, eos_id=EOS, max_new_tokens=2, progress=False)
    with pytest.raises(PoclError, match="empty"):
        generate(model, [[]], pad_id=PAD, eos_id=EOS, max_new_tokens=2, progress=False)
    with pytest.raises(PoclError, match="batch_size"):
        generate(model, [[3]], pad_id=PAD, eos_id=EOS, max_new_tokens=2, batch_size=0)


def test_sampling_is_seeded_per_prompt_not_per_batch():
    model = tiny_model()
    prompts = tiny_prompts()
    kwargs = dict(pad_id=PAD, eos_id=EOS, max_new_tokens=10, greedy=False, progress=False)
    by_three = generate(model, prompts, batch_size=3, seed=10, **kwargs)
    one_by_one = generate(model, prompts, batch_size=1, seed=10, **kwargs)
    assert by_three == one_by_one == generate(model, prompts, batch_size=3, seed=10, **kwargs)
    assert generate(model, prompts, batch_size=3, seed=20, **kwargs) != by_three
    greedy = generate(model, prompts, pad_id=PAD, eos_id=EOS, max_new_tokens=10, progress=False)
    assert greedy != by_three


def test_sampler_follows_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -float("inf")]).repeat(6000, 1)
    generators = [torch.Generator().manual_seed(prompt_seed(0, i)) for i in range(6000)]
    active = torch.ones(6000, dtype=torch.bool)
    tokens = _sample(logits, active, generators, temperature=1.0)
    frequencies = torch.bincount(tokens, minlength=4).double() / 6000
    assert frequencies[3] == 0
    assert torch.allclose(frequencies, torch.softmax(logits[0].double(), -1), atol=0.025)
    generators = [torch.Generator().manual_seed(prompt_seed(0, i)) for i in range(6000)]
    hot = torch.bincount(_sample(logits, active, generators, temperature=4.0), minlength=4)
    assert hot[0] > 2 * torch.bincount(tokens, minlength=4)[0]


def test_vocab_size_keeps_padded_rows_out():
    model = tiny_model()
    outputs = generate(
        model,
        tiny_prompts(),
        pad_id=PAD,
        eos_id=None,
        max_new_tokens=12,
        greedy=False,
        vocab_size=10,
        progress=False,
    )
    assert all(0 <= t < 10 for row in outputs for t in row)


def test_vocab_size_masks_padded_rows_with_huge_logits():
    # Rows 90..95 stand for a padded embedding table; their logits dwarf every real id's.
    model = tiny_model()
    bias = torch.zeros(VOCAB)
    bias[90:] = 1e4
    model.lm_head.register_forward_hook(lambda module, args, output: output + bias)
    prompts = tiny_prompts()
    kwargs = dict(pad_id=PAD, eos_id=None, max_new_tokens=6, batch_size=4, progress=False)
    assert all(t >= 90 for row in generate(model, prompts, **kwargs) for t in row)
    for greedy in (True, False):
        rows = generate(model, prompts, greedy=greedy, vocab_size=90, **kwargs)
        assert all(len(row) == 6 and max(row) < 90 for row in rows)
        assert distributed_generate(model, prompts, greedy=greedy, vocab_size=90, **kwargs) == rows


def test_return_finished_tells_eos_from_the_budget():
    model = tiny_model()
    prompts = tiny_prompts()
    free = generate(
        model, prompts, pad_id=PAD, eos_id=None, max_new_tokens=8, batch_size=4, progress=False
    )
    eos = free[0][2]
    # PAD = EOS (GPT-2 style): rows that stop at the budget are padded with the EOS id, and
    # must still not count as finished.
    result = generate(
        model,
        prompts,
        pad_id=eos,
        eos_id=eos,
        max_new_tokens=8,
        batch_size=4,
        progress=False,
        return_finished=True,
    )
    assert isinstance(result, Generations)
    assert result.finished == [eos in row for row in free]
    assert result.tokens == [row[: row.index(eos)] if eos in row else row for row in free]
    assert 0 < sum(result.finished) < len(prompts)
    shared = distributed_generate(
        model, prompts, pad_id=eos, eos_id=eos, max_new_tokens=8, batch_size=4, progress=False,
        return_finished=True,
    )  # fmt: skip
    assert shared == result


def test_prompt_seeds_replace_the_index_seeds():
    model = tiny_model()
    prompts = tiny_prompts()
    kwargs = dict(pad_id=PAD, eos_id=EOS, max_new_tokens=8, greedy=False, progress=False)
    default = generate(model, prompts, seed=7, **kwargs)
    explicit = [prompt_seed(7, i) for i in range(len(prompts))]
    assert generate(model, prompts, prompt_seeds=explicit, **kwargs) == default
    # The same prompt with another seed draws other tokens.
    twice = generate(model, [prompts[0]] * 2, prompt_seeds=[1, 2], **kwargs)
    assert twice[0] != twice[1]
    with pytest.raises(PoclError, match="prompt_seeds"):
        generate(model, prompts, prompt_seeds=[1], **kwargs)
    assert prompt_seed(42, 1) != prompt_seed(43, 0)
    assert prompt_seed(42, 1, 0, 3) != prompt_seed(42, 1, 1, 3)


def test_plan_batches_sorts_longest_first():
    assert plan_batches([3, 7, 7, 1, 5], 2) == [[1, 2], [4, 0], [3]]


def test_wrapped_model_and_training_mode():
    class LossWrapper(torch.nn.Module):  # the trainer's objective keeps the LM as .model
        def __init__(self, model):
            super().__init__()
            self.model = model

    class Engine(torch.nn.Module):  # a DeepSpeed engine keeps its module as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model()
    engine = Engine(LossWrapper(model))
    assert unwrap_model(engine) is model
    model.train()
    prompts = tiny_prompts(3)
    kwargs = dict(pad_id=PAD, eos_id=None, max_new_tokens=4, progress=False)
    assert generate(engine, prompts, **kwargs) == [
        naive_greedy(model.eval(), p, 4) for p in prompts
    ]
    model.train()
    generate(engine, prompts, **kwargs)
    assert model.training
    with pytest.raises(PoclError, match="expected a Hugging Face causal LM"):
        unwrap_model(torch.nn.Linear(2, 2))


def test_distributed_generate_single_rank_equals_generate():
    model = tiny_model()
    prompts = tiny_prompts()
    kwargs = dict(pad_id=PAD, eos_id=EOS, max_new_tokens=6, batch_size=2, greedy=False, seed=5)
    assert distributed_generate(model, prompts, progress=False, **kwargs) == generate(
        model, prompts, progress=False, **kwargs
    )


def test_bench_generation_appends_rows_and_writes_table(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", REPO / "launch/bench_generation.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--num-prompts", "4", "--batch-sizes", "1", "4", "--new-tokens", "3",
            "--prompt-length", "4", "--repeats", "1", "--hidden", "32", "--vocab", "64",
            "--device", "cpu", "--output-dir", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    assert bench.main(argv) == 0
    rows = (tmp_path / "generation.csv").read_text().splitlines()
    assert rows[0].startswith("timestamp,commit,machine")
    assert len(rows) == 1 + 2 * 4  # header, then 2 runs x 2 batch sizes x cache on/off
    table = (tmp_path / "generation.md").read_text()
    assert table.count("\n| ") == 1 + 4


DIST_PROMPTS = 11  # 6 batches of 2: uneven across ranks, and rows stop at EOS at different steps


def _dist_runs(model, synced: bool) -> dict[str, list[list[int]]]:
    prompts = tiny_prompts(DIST_PROMPTS)
    common = dict(pad_id=PAD, eos_id=EOS, max_new_tokens=10, batch_size=2, progress=False)
    return {
        "greedy": distributed_generate(model, prompts, synced_gpus=synced, **common),
        "sampled": distributed_generate(
            model, prompts, greedy=False, seed=10, synced_gpus=synced, **common
        ),
    }


def _worker(out_dir: str) -> None:
    import deepspeed

    from pocl_ds.distributed import init_distributed

    info = init_distributed()
    results = {"plain": _dist_runs(tiny_model(), synced=False)}
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    engine, *_ = deepspeed.initialize(model=tiny_model(), config=ds_config)
    engine.eval()
    # Parameters are partitioned: each forward gathers them collectively, so both ranks must
    # run the same number of forwards although their batches stop at different steps.
    assert engine.module.transformer.wte.weight.numel() == 0
    results["zero3"] = _dist_runs(engine, synced=True)
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(results))


@pytest.mark.slow
def test_two_ranks_give_exactly_the_one_rank_result(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         __file__, str(tmp_path)],
        env=env, cwd=REPO, timeout=300, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _dist_runs(tiny_model(), synced=False)
    assert len({tuple(map(tuple, rows)) for rows in expected.values()}) == 2
    for rank in (0, 1):
        ranked = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert ranked["plain"] == expected
        assert ranked["zero3"] == expected


def _zero_engine(stage: int):
    """The tiny model in a training engine (client AdamW), as the trainer holds the student.
    Under ZeRO-3 every parameter is partitioned (no persistent small ones), and a layer's
    are gathered for its forward and released after it (no prefetch, no keeping for reuse)."""
    import deepspeed

    model = tiny_model()
    zero = {"stage": stage}
    if stage == 3:
        zero.update(
            stage3_param_persistence_threshold=0,
            stage3_prefetch_bucket_size=0,
            stage3_max_reuse_distance=0,
        )
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


class _WholeWeightProbe:
    """Per forward of a block: was its weight whole when the forward began? Registered ahead
    of DeepSpeed's hooks, so their per-layer gather comes after it; a hook of our own, so it
    must survive the gathered path's setting aside of DeepSpeed's hooks."""

    def __init__(self, engine) -> None:
        self.weight = engine.module.transformer.h[0].attn.c_attn.weight
        self.seen: list[bool] = []
        engine.module.transformer.h[0].register_forward_pre_hook(self._record, prepend=True)

    def _record(self, module, args) -> None:
        self.seen.append(self.weight.numel() > 0)

    def take(self) -> list[bool]:
        seen, self.seen = self.seen, []
        return seen


DIST_KWARGS = dict(pad_id=PAD, eos_id=EOS, max_new_tokens=10, batch_size=2, progress=False)


def _zero3_runs(engine, probe, own_prompts, **gather) -> dict:
    """Greedy and sampled outputs over the shared prompt list, greedy outputs of this rank's
    own prompts (a different number per rank, as on-policy samples are), and per call whether
    the weights were whole at each forward."""
    prompts = tiny_prompts(DIST_PROMPTS)
    runs = {
        "greedy": distributed_generate(engine, prompts, synced_gpus=True, **gather, **DIST_KWARGS)
    }
    runs["greedy_whole"] = probe.take()
    runs["sampled"] = distributed_generate(
        engine, prompts, greedy=False, seed=10, synced_gpus=True, **gather, **DIST_KWARGS
    )
    probe.take()
    runs["own"] = generate(engine, own_prompts, synced_gpus=True, **gather, **DIST_KWARGS)
    runs["own_whole"] = probe.take()
    return runs


def _train_step(engine) -> float:
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def _nested_gathers(engine, probe, own_prompts) -> dict:
    """Generation inside an outer gather (as an evaluation runs its seeds): the inner block
    reuses the whole weights (same storage, no second gather) and leaves them whole, and the
    outputs and forwards are those of a call that gathered for itself."""
    import deepspeed

    from pocl_ds.engine import gathered_for_generation

    weight = engine.module.transformer.wte.weight
    with gathered_for_generation(engine.module) as outer:
        storage = weight.data_ptr()
        with gathered_for_generation(engine.module) as inner:
            reused = inner and weight.data_ptr() == storage
        still_whole = weight.numel() > 0
        own = generate(engine, own_prompts, synced_gpus=True, **DIST_KWARGS)
        whole = probe.take()
        ours = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    # the one-collective gather assembles every parameter exactly as DeepSpeed's own does
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        as_deepspeed = all(
            torch.equal(ours[name], p) for name, p in engine.module.named_parameters()
        )
    return {
        "as_deepspeed": as_deepspeed,
        "outer": outer,
        "reused": reused,
        "still_whole": still_whole,
        "own": own,
        "own_whole": whole,
        "partitioned_after": weight.numel() == 0,
    }


def _zero3_worker(out_dir: str) -> None:
    from pocl_ds.distributed import init_distributed

    info = init_distributed()
    own_prompts = tiny_prompts(11 - 8 * info.rank, seed=20 + info.rank)  # 11 and 3 prompts
    zero1 = _zero_engine(1)
    results = {
        "zero1": _dist_runs(zero1, synced=False),
        "zero1_own": generate(zero1, own_prompts, **DIST_KWARGS),
    }
    zero3 = _zero_engine(3)
    probe = _WholeWeightProbe(zero3)
    whole_bytes = sum(p.ds_numel * p.element_size() for p in zero3.module.parameters())
    budgets = {"default": {}, "exact": whole_bytes, "short": whole_bytes - 1}
    for name, budget in budgets.items():
        gather = {} if name == "default" else {"gather_budget_bytes": budget}
        results[f"zero3_{name}"] = _zero3_runs(zero3, probe, own_prompts, **gather)
    results["partitioned_after"] = zero3.module.transformer.wte.weight.numel() == 0
    results["nested"] = _nested_gathers(zero3, probe, own_prompts)
    # DeepSpeed's hooks are back: a training step runs as ZeRO-1's does, and afterwards both
    # paths still agree on the new weights.
    results["losses"] = [_train_step(zero1), _train_step(zero3)]
    probe.take()  # the training forward's
    prompts = tiny_prompts(DIST_PROMPTS)
    results["after_step"] = [
        [
            distributed_generate(zero3, prompts, synced_gpus=True, **DIST_KWARGS, **gather),
            probe.take(),
        ]
        for gather in ({}, {"gather_budget_bytes": 0})
    ]
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(results))


def _run_zero3_worker(tmp_path: Path, ranks: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(ranks), __file__, "zero3", str(tmp_path)],
        env=env, cwd=REPO, timeout=300, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.slow
def test_zero3_on_one_rank_generates_from_its_partitions(tmp_path):
    """One rank: each partition is its whole parameter, used without a gather or a copy."""
    (ranked,) = _run_zero3_worker(tmp_path, 1)
    expected = _dist_runs(tiny_model(), synced=False)
    for name, gathered in (("default", True), ("short", False)):
        runs = ranked[f"zero3_{name}"]
        assert {k: runs[k] for k in expected} == expected, name
        assert runs["own"] == ranked["zero1_own"], name
        assert set(runs["greedy_whole"]) == {gathered}, name
    nested = ranked["nested"]
    assert nested["outer"] and nested["reused"] and nested["as_deepspeed"]
    assert ranked["partitioned_after"] and nested["partitioned_after"]


@pytest.mark.slow
def test_zero3_gathers_the_model_once_when_it_fits(tmp_path):
    """ZeRO-1, ZeRO-3 gathered whole and ZeRO-3 layer by layer give the same tokens; the whole
    model is gathered exactly when its bytes fit the budget, and then no forward waits for
    the other rank (no dummy forwards)."""
    ranks = _run_zero3_worker(tmp_path, 2)
    expected = _dist_runs(tiny_model(), synced=False)
    for ranked in ranks:
        assert ranked["zero1"] == expected
        for name, gathered in (("default", True), ("exact", True), ("short", False)):
            runs = ranked[f"zero3_{name}"]
            assert {k: runs[k] for k in expected} == expected, name
            assert runs["own"] == ranked["zero1_own"], name
            assert set(runs["greedy_whole"]) == set(runs["own_whole"]) == {gathered}, name
        assert ranked["partitioned_after"]
        nested = ranked["nested"]
        assert nested["outer"] and nested["reused"] and nested["still_whole"]
        assert nested["as_deepspeed"]
        assert nested["own"] == ranked["zero1_own"]
        assert nested["own_whole"] == ranked["zero3_default"]["own_whole"]  # no dummy forwards
        assert nested["partitioned_after"]
        assert ranked["losses"][1] == pytest.approx(ranked["losses"][0], rel=1e-6)
        (gathered, whole), (layered, never_whole) = ranked["after_step"]
        assert gathered == layered and set(whole) == {True} and set(never_whole) == {False}
    # Rank 1 has 3 own prompts to rank 0's 11: layer by layer it runs as many forwards as
    # rank 0 (dummies included), gathered whole only its own.
    layered, gathered = (
        [len(r[f"zero3_{name}"]["own_whole"]) for r in ranks] for name in ("short", "default")
    )
    assert layered[0] == layered[1] > gathered[1] and gathered[0] <= layered[0]


if __name__ == "__main__":
    from pocl_ds.cli import run_main

    if sys.argv[1] == "zero3":
        run_main(lambda: _zero3_worker(sys.argv[2]))
    else:
        run_main(lambda: _worker(sys.argv[1]))
