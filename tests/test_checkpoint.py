"""CheckpointManager on a real 1-rank DeepSpeed engine (ZeRO-2, gloo, in this process) and the
output-directory guard: round trips of weights, optimizer, trainer state and RNG, ``latest``,
best tracking, pruning, damaged checkpoints, and a new run that must not take over an old one."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pocl_ds.checkpoint import CheckpointManager, claim_output_dir, step_tag, verify
from pocl_ds.errors import PoclError

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def engine():
    """A tiny GPT-2 in a DeepSpeed engine on a world of one; the process group and the
    environment it set are undone afterwards, so later tests see a plain process."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pocl_ds.distributed import init_distributed
    from pocl_ds.engine import build_ds_config, create_student_engine

    saved = {key: os.environ.get(key) for key in DIST_ENV}
    init_distributed()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    )
    ds_config = build_ds_config(
        "ds_configs/zero2.json",
        micro_batch_size=2,
        gradient_accumulation_steps=1,
        world_size=1,
        precision="fp32",
        max_grad_norm=1.0,
    )
    yield create_student_engine(model, ds_config, lr=1e-2, weight_decay=0.0)
    torch.distributed.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def train_step(engine) -> None:
    ids = torch.randint(0, 64, (2, 8))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def optimizer_moments(engine) -> list[torch.Tensor]:
    state = engine.optimizer.optimizer.state
    return [s["exp_avg"].clone() for s in state.values()]


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_save_then_load_restores_weights_optimizer_state_and_rng(engine, tmp_path):
    manager = CheckpointManager(tmp_path)
    train_step(engine)
    state = {"position": {"global_step": 1}, "controller": {"stage": 2}}
    tag = manager.save(engine, 1, state)
    after_save = draws()
    saved_weights, saved_moments = weights(engine), optimizer_moments(engine)

    assert tag == step_tag(1) == manager.latest_tag() == manager.find_resumable()
    assert verify(tmp_path / "checkpoints" / tag) is None
    train_step(engine)  # weights, optimizer and RNG all move on
    assert any(not torch.equal(saved_weights[k], v) for k, v in weights(engine).items())

    assert manager.load(engine, tag) == state
    assert draws() == after_save  # python, numpy and torch draw as right after the save
    for name, value in weights(engine).items():
        assert torch.equal(value, saved_weights[name]), name
    for restored, saved in zip(optimizer_moments(engine), saved_moments, strict=True):
        assert torch.equal(restored, saved)


def test_load_without_rng_keeps_the_current_rng(engine, tmp_path):
    manager = CheckpointManager(tmp_path)
    tag = manager.save(engine, 1, {})
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected = draws()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    manager.load(engine, tag, restore_rng=False)
    assert draws() == expected


def test_latest_best_and_pruning_keep_the_newest_and_the_best(engine, tmp_path):
    manager = CheckpointManager(tmp_path, keep=1)
    for step in (1, 2, 3, 4):
        tag = manager.save(engine, step, {"step": step})
        if step == 2:
            manager.mark_best(tag, 31.5)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [step_tag(2), step_tag(4)]
    assert manager.latest_tag() == step_tag(4)
    assert manager.best() == {"tag": step_tag(2), "metric": 31.5}
    assert manager.load(engine, step_tag(2)) == {"step": 2}
    # Saving the same step again (a preemption save, then the epoch-end save) replaces it.
    manager.save(engine, 4, {"step": 4, "again": True})
    assert manager.load(engine, step_tag(4)) == {"step": 4, "again": True}
    assert not list(root.glob("*.old")) and not list(root.glob("*.partial"))


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda d: _flip_byte(d / "mp_rank_00_model_states.pt"), "corrupted"),
        (lambda d: (d / "rng_rank0.pt").write_bytes(b"x"), "rng_rank0.pt has 1 bytes"),
        (lambda d: (d / "trainer_state.json").unlink(), "trainer_state.json is missing"),
        (lambda d: (d / "COMPLETE").unlink(), "no COMPLETE marker"),
    ],
    ids=["flipped-byte", "truncated", "deleted", "no-marker"],
)
def test_a_damaged_checkpoint_is_detected_and_skipped(engine, tmp_path, damage, problem):
    manager = CheckpointManager(tmp_path)
    manager.save(engine, 1, {"step": 1})
    newest = manager.save(engine, 2, {"step": 2})
    damage(tmp_path / "checkpoints" / newest)
    assert problem in verify(tmp_path / "checkpoints" / newest)
    assert manager.find_resumable() == step_tag(1)
    with pytest.raises(PoclError, match=f"{newest}: .*{problem}"):
        manager.load(engine, newest)


# ----------------------------------------------------------------------------- the output dir
def a_finished_run(out: Path) -> Path:
    """The files a run leaves (no engine needed): checkpoints, metrics, export, config."""
    checkpoint = out / "checkpoints" / step_tag(12)
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("{}")
    (out / "checkpoints" / "latest").write_text(step_tag(12))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (out / "final").mkdir()
    (out / "final" / "config.json").write_text("{}")
    (out / "config.yaml").write_text("train: {}\n")
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_a_new_run_into_a_directory_holding_a_run_is_refused(tmp_path):
    out = a_finished_run(tmp_path / "run")
    before = snapshot(out)
    with pytest.raises(PoclError) as err:
        claim_output_dir(out, resume="none", overwrite=False)
    message = str(err.value)
    assert str(out) in message and step_tag(12) in message
    assert "--resume auto" in message and "train.overwrite_output_dir=true" in message
    assert snapshot(out) == before
    # A checkpoint alone, or metrics alone, is a run too.
    for kept in ("checkpoints", "metrics.jsonl"):
        only = tmp_path / f"only_{kept}"
        a_finished_run(only)
        for name in {"checkpoints", "metrics.jsonl", "final"} - {kept}:
            target = only / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
        with pytest.raises(PoclError, match="holds a run"):
            claim_output_dir(only, resume="none", overwrite=False)


def test_overwrite_moves_the_old_run_aside_whole(tmp_path):
    out = a_finished_run(tmp_path / "run")
    before = snapshot(out)
    claim_output_dir(out, resume="none", overwrite=True)
    claim_output_dir(a_finished_run(out), resume="none", overwrite=True)  # twice in a second
    assert out.is_dir() and not any(out.iterdir())
    archives = sorted(tmp_path.glob("run.old-*"))
    assert len(archives) == 2
    assert all(snapshot(archive) == before for archive in archives)


@pytest.mark.parametrize(
    "leftover",
    [[], ["data/synthetic_320_seed0.jsonl", "tokenizer/tokenizer.json", "config.yaml"], ["notes"]],
    ids=["empty", "failed-start", "unrelated-file"],
)
def test_a_directory_without_a_run_is_used_as_it_is(tmp_path, leftover):
    out = tmp_path / "run"
    out.mkdir()
    for name in leftover:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    before = snapshot(out)
    claim_output_dir(out, resume="none", overwrite=False)
    assert snapshot(out) == before and not list(tmp_path.glob("run.old-*"))
    claim_output_dir(tmp_path / "new" / "run", resume="none", overwrite=False)
    assert (tmp_path / "new" / "run").is_dir()


def test_resume_auto_keeps_a_run_with_checkpoints_and_moves_one_without(tmp_path):
    out = a_finished_run(tmp_path / "run")
    before = snapshot(out)
    claim_output_dir(out, resume="auto", overwrite=False)
    assert snapshot(out) == before
    # A run that crashed before its first checkpoint: --resume auto starts fresh, apart.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": 3.0}) + "\n")
    (crashed / "checkpoints" / (step_tag(6) + ".partial")).mkdir(parents=True)
    claim_output_dir(crashed, resume="auto", overwrite=False)
    assert not any(crashed.iterdir())
    (archive,) = tmp_path.glob("crashed.old-*")
    assert (archive / "metrics.jsonl").is_file()


def test_overwrite_and_resume_together_are_refused(tmp_path):
    out = a_finished_run(tmp_path / "run")
    with pytest.raises(PoclError, match=r"overwrite_output_dir.*--resume auto"):
        claim_output_dir(out, resume="auto", overwrite=True)
    assert (out / "metrics.jsonl").is_file()
