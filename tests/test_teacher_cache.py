"""pocl_ds.teacher_cache in one process: cached teacher states give the live teacher's loss and
gradients, half-precision caches stay close, torn entries and changed samples are rebuilt, and a
changed teacher or tokenizer never reads an old cache. The 2-rank runs (memory exchange, shared
disk, partitioned teacher) are in test_trainer's matrix; kill and resume in test_faults."""

from __future__ import annotations

import pytest
import torch

from pocl_ds.config import load_config
from pocl_ds.data import TokenizedSample, collate_for_training
from pocl_ds.errors import PoclError
from pocl_ds.objective import DistillationObjective
from pocl_ds.teacher_cache import CACHE_DIR, TeacherCache, loss_rows, tokenizer_fingerprint
from tests.launchers import REPO
from tests.test_objective import VOCAB, tiny_gpt2

torch.set_num_threads(1)


def samples(seed: int = 0, count: int = 3) -> list[TokenizedSample]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        prompt = torch.randint(0, 50, (3 + index,), generator=gen).tolist()
        response = torch.randint(0, 50, (5 + 2 * index,), generator=gen).tolist()
        out.append(TokenizedSample(index, tuple(prompt), tuple(response), ("",)))
    return out


def cache_for(teacher, tmp_path, mode="disk", dtype=None, tokenizer_id="tok") -> TeacherCache:
    return TeacherCache(
        teacher,
        mode=mode,
        dtype=dtype,
        directory=tmp_path,
        tokenizer_id=tokenizer_id,
        partitioned=False,
    )


def loss_and_grads(student, cache: TeacherCache, batch_samples) -> tuple[float, list]:
    """The KD objective's loss and the student's gradients with the cache's teacher states."""
    batch = collate_for_training(batch_samples, pad_id=0)
    objective = DistillationObjective(student, kind="fkl", vocab_size=VOCAB)
    hidden, head = cache.inputs(batch["input_ids"], batch["attention_mask"], batch_samples)
    student.zero_grad()
    terms = objective(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        teacher_hidden=hidden,
        teacher_head=head,
        temperature=2.0,
        sft_weight=0.3,
        num_valid_tokens=float(batch["labels"][:, 1:].ne(-100).sum()),
    )
    terms.loss.backward()
    return float(terms.loss.detach()), [
        p.grad.clone() for p in student.parameters() if p.grad is not None
    ]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_states_give_the_live_teachers_loss_and_gradients(mode, tmp_path):
    student, teacher = tiny_gpt2(0), tiny_gpt2(1)
    batch = samples()
    live_loss, live_grads = loss_and_grads(student, cache_for(teacher, tmp_path, "none"), batch)
    cache = cache_for(teacher, tmp_path, mode)
    first_loss, _ = loss_and_grads(student, cache, batch)  # computes and keeps
    # another grouping of the same samples: entries are per sample, not per batch
    loss_and_grads(student, cache, batch[::-1])
    cached_loss, cached_grads = loss_and_grads(student, cache, batch)
    assert cache.stats == {"hits": 6, "misses": 3, "rebuilt": 0}
    assert first_loss == live_loss
    assert cached_loss == pytest.approx(live_loss, rel=1e-6)
    for cached, live in zip(cached_grads, live_grads, strict=True):
        assert relative(cached, live) <= 1e-6
    if mode == "disk":
        files = sorted(p.name for p in (tmp_path / CACHE_DIR / cache.fingerprint).iterdir())
        assert files == ["0.pt", "1.pt", "2.pt"]
        # one row per response token, nothing of the prompt beyond its last position
        entry = torch.load(tmp_path / CACHE_DIR / cache.fingerprint / "2.pt", weights_only=True)
        assert entry["hidden"].shape == (len(batch[2].response_ids), 32)


@pytest.mark.parametrize(("dtype", "bound"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision_caches_halve_the_bytes_within_a_small_error(dtype, bound, tmp_path):
    student, teacher = tiny_gpt2(0), tiny_gpt2(1)
    batch = samples()
    live_loss, live_grads = loss_and_grads(student, cache_for(teacher, tmp_path, "none"), batch)
    cache = cache_for(teacher, tmp_path, "memory", dtype=dtype)
    loss_and_grads(student, cache, batch)
    loss, grads = loss_and_grads(student, cache, batch)
    assert cache.stats["hits"] == 3
    assert next(iter(cache._memory.values()))[1].dtype == dtype
    assert 0 < abs(loss - live_loss) / live_loss <= bound
    assert max(relative(g, w) for g, w in zip(grads, live_grads, strict=True)) <= 10 * bound


def test_torn_entries_and_changed_samples_are_rebuilt(tmp_path):
    student, teacher = tiny_gpt2(0), tiny_gpt2(1)
    batch = samples()
    cache = cache_for(teacher, tmp_path)
    live_loss, _ = loss_and_grads(student, cache, batch)
    directory = tmp_path / CACHE_DIR / cache.fingerprint
    torn = (directory / "1.pt").read_bytes()
    (directory / "1.pt").write_bytes(torn[: len(torn) // 2])
    # sample 2 keeps its index but its tokens change (the data changed)
    changed = TokenizedSample(2, batch[2].prompt_ids, (*batch[2].response_ids[:-1], 7), ("",))
    resumed = cache_for(teacher, tmp_path)  # a new run on the same directory
    loss, _ = loss_and_grads(student, resumed, batch[:2])
    assert resumed.stats == {"hits": 1, "misses": 1, "rebuilt": 1}
    loss_and_grads(student, resumed, [changed])
    assert resumed.stats == {"hits": 1, "misses": 2, "rebuilt": 2}  # its entry was of old tokens
    loss_and_grads(student, resumed, batch[:2])
    assert resumed.stats == {"hits": 3, "misses": 2, "rebuilt": 2}
    assert loss == pytest.approx(
        loss_and_grads(student, cache_for(teacher, tmp_path, "none"), batch[:2])[0], rel=1e-6
    )
    assert live_loss != loss  # a different batch: the check above compares like with like


def test_a_changed_teacher_or_tokenizer_never_reads_an_old_cache(tmp_path):
    teacher, student = tiny_gpt2(1), tiny_gpt2(0)
    first = cache_for(teacher, tmp_path)
    loss_and_grads(student, first, samples())
    assert cache_for(tiny_gpt2(1), tmp_path).fingerprint == first.fingerprint  # the same teacher
    assert cache_for(teacher, tmp_path, tokenizer_id="another").fingerprint != first.fingerprint
    with torch.no_grad():
        next(teacher.parameters())[0, 0] += 1e-3
    changed = cache_for(teacher, tmp_path)
    assert changed.fingerprint != first.fingerprint
    assert not (tmp_path / CACHE_DIR / first.fingerprint).exists()  # removed, not just ignored
    loss_and_grads(student, changed, samples())
    assert changed.stats == {"hits": 0, "misses": 3, "rebuilt": 0}


def test_tokenizer_fingerprint_follows_the_vocabulary(tmp_path):
    from pocl_ds.models import train_bpe_tokenizer

    texts = ["the cat sat on the mat", "a dog ran in the park"] * 20
    one = train_bpe_tokenizer(texts, vocab_size=300, save_dir=tmp_path / "a")
    again = train_bpe_tokenizer(texts, vocab_size=300, save_dir=tmp_path / "b")
    other = train_bpe_tokenizer(
        texts + ["zebra quartz"] * 20, vocab_size=300, save_dir=tmp_path / "c"
    )
    assert tokenizer_fingerprint(one) == tokenizer_fingerprint(again)
    assert tokenizer_fingerprint(one) != tokenizer_fingerprint(other)


def test_loss_rows_are_the_response_targets_states():
    sample = TokenizedSample(0, (1, 2, 3), (4, 5), ("",))
    assert loss_rows(sample) == slice(2, 4)  # states at 2 and 3 predict tokens 4 and 5


@pytest.mark.parametrize("method", ["gkd", "seqkd", "sft"])
def test_the_cache_is_refused_where_the_loss_has_no_fixed_teacher_states(method):
    overrides = [f"distill.method={method}", "distill.teacher_cache=disk"]
    with pytest.raises(PoclError, match=r"distill\.teacher_cache"):
        load_config(REPO / "launch" / "configs" / "tiny.yaml", overrides)


# ----------------------------------------------------------------------------- 2 ranks
@pytest.fixture(scope="module")
def cached_runs(tmp_path_factory):
    """kd on 2 ranks, 3 epochs of 32 samples: live teacher, then memory and disk caches, and a
    ZeRO-3-partitioned teacher with a disk cache, in one torchrun job."""
    from pocl_ds.synthetic import write_synthetic_tasks
    from tests.test_trainer import run_jobs, small_run

    tmp = tmp_path_factory.mktemp("cached")
    write_synthetic_tasks(tmp / "data.jsonl", num_samples=32, seed=3)
    common = ["train.epochs=3", "curriculum.strategy=none", "distill.method=kd"]
    runs = [
        small_run(tmp, "live", *common),
        small_run(tmp, "memory", *common, "distill.teacher_cache=memory"),
        small_run(tmp, "disk", *common, "distill.teacher_cache=disk"),
        small_run(
            tmp,
            "partitioned",
            *common,
            "distill.teacher_cache=disk",
            "model.teacher_partition=true",
        ),
    ]
    return tmp, run_jobs(tmp, runs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["memory", "disk", "partitioned"])
def test_two_ranks_train_on_cached_states_as_on_the_live_teacher(cached_runs, name):
    from tests.test_trainer import losses

    tmp, results = cached_runs
    live, cached = losses(tmp / "live"), losses(tmp / name)
    assert len(live) == len(cached) == 12
    # Entries are computed in another batch (another padded length, so other BLAS blocking):
    # states agree to fp32 rounding, and a KL of 0.01 from O(1) log-probabilities carries
    # ~1e-7 of it absolute. Same inputs give 1e-6 (the unit tests above).
    assert cached == pytest.approx(live, rel=1e-5, abs=1e-7)
    # each sample's states computed once over both ranks and 3 epochs: memory entries are
    # exchanged at epoch ends, disk entries are read by whichever rank draws the sample
    assert results[name]["teacher_cache"] == {
        "mode": "memory" if name == "memory" else "disk",
        "dtype": "float32",
        "hits": 3 * 32 - 32,
        "misses": 32,
        "rebuilt": 0,
    }
    if name != "memory":
        (directory,) = (tmp / name / CACHE_DIR).iterdir()
        assert len(list(directory.glob("*.pt"))) == 32
    assert results["live"]["teacher_cache"] == {
        "mode": "none",
        "dtype": "float32",
        "hits": 0,
        "misses": 0,
        "rebuilt": 0,
    }
