"""Checkpoints that survive crashes: atomic ``latest``, verified on resume, best kept, HF export.

Layout under ``<output_dir>/checkpoints/``::

    step-00000040/            DeepSpeed engine files (every rank writes its shard)
        trainer_state.json    curriculum controller, sampler position, counters (rank 0)
        rng_rank{r}.pt        each rank's RNG states
        COMPLETE              written last: the size of every file above
    latest                    the tag of the newest complete checkpoint (replaced atomically)
    best.json                 the tag and validation ROUGE-L of the best checkpoint

A checkpoint counts only once ``COMPLETE`` exists and every file has the size it lists, so a
crash half-way through a save leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocl_ds import distributed
from pocl_ds.errors import PoclError

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _listing(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }


def verify(directory: Path) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    marker = directory / COMPLETE
    if not marker.is_file():
        return "no COMPLETE marker (the save was interrupted)"
    try:
        expected = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError):
        return "COMPLETE marker is damaged"
    for name, size in expected.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    return None


class CheckpointManager:
    """Saves and finds checkpoints of one run; every rank calls ``save``/``load`` together."""

    def __init__(self, output_dir: str | Path, *, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    # ---------------------------------------------------------------- save
    def save(self, engine: Any, step: int, trainer_state: dict[str, Any]) -> str:
        tag = step_tag(step)
        directory = self.root / tag
        if distributed.is_main_process():
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if directory.exists():  # a leftover of an interrupted save of this same step
                    shutil.rmtree(directory)
            except OSError as err:
                raise PoclError(f"checkpoint directory {self.root}: cannot write ({err})") from None
        distributed.barrier()
        try:
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
            torch.save(rng_state(), directory / f"rng_rank{distributed.rank()}.pt")
        except (OSError, RuntimeError) as err:
            raise PoclError(
                f"checkpoint {directory}: could not be written ({err}); the previous "
                f"checkpoint {self.latest_tag()} is intact"
            ) from None
        distributed.barrier()
        if distributed.is_main_process():
            try:
                _atomic_write_text(directory / STATE_FILE, json.dumps(trainer_state))
                listing = _listing(directory)
                _atomic_write_text(directory / COMPLETE, json.dumps({"files": listing}))
                _atomic_write_text(self.root / "latest", tag)
            except OSError as err:
                raise PoclError(
                    f"checkpoint {directory}: could not be completed ({err}); the previous "
                    f"checkpoint {self.latest_tag()} is intact"
                ) from None
            self._prune()
        distributed.barrier()
        logger.info("checkpoint %s written", directory)
        return tag

    def mark_best(self, tag: str, metric: float) -> None:
        if distributed.is_main_process():
            _atomic_write_text(self.root / "best.json", json.dumps({"tag": tag, "metric": metric}))

    def best(self) -> dict[str, Any] | None:
        path = self.root / "best.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def _complete_tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and (p / COMPLETE).is_file()
        )

    def _prune(self) -> None:
        best = (self.best() or {}).get("tag")
        tags = self._complete_tags()
        for tag in tags[: max(0, len(tags) - self.keep)]:
            if tag != best:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    # ---------------------------------------------------------------- resume
    def latest_tag(self) -> str | None:
        path = self.root / "latest"
        return path.read_text(encoding="utf-8").strip() if path.is_file() else None

    def find_resumable(self) -> str | None:
        """The newest intact checkpoint, warning about each damaged one skipped on the way."""
        latest = self.latest_tag()
        candidates = sorted(set(self._complete_tags()) | ({latest} if latest else set()))
        candidates.reverse()
        skipped: list[str] = []
        for tag in candidates:
            problem = verify(self.root / tag)
            if problem is None:
                if skipped:
                    logger.warning(
                        "checkpoint %s is damaged (%s); resuming from %s instead",
                        skipped[0],
                        "; ".join(skipped[1:]) or "see above",
                        tag,
                    )
                return tag
            logger.warning("checkpoint %s is unusable: %s", self.root / tag, problem)
            skipped.append(str(self.root / tag))
        return None

    def load(self, engine: Any, tag: str, *, restore_rng: bool = True) -> dict[str, Any]:
        """Restore the engine (always whole: under ZeRO-3 the weights live in the optimizer's
        partitions, so a module-only load would silently keep the current weights) and, on
        resume, this rank's RNG; return the trainer state."""
        directory = self.root / tag
        loaded, _ = engine.load_checkpoint(str(self.root), tag=tag)
        if loaded is None:
            raise PoclError(f"checkpoint {directory}: DeepSpeed could not load it")
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        if restore_rng:
            rng_file = directory / f"rng_rank{distributed.rank()}.pt"
            if rng_file.is_file():
                set_rng_state(torch.load(rng_file, weights_only=False))
        return state


def export_pretrained(engine: Any, tokenizer: Any, output_dir: str | Path) -> Path:
    """Write the student as a Hugging Face model (consolidated from ZeRO-3) with its tokenizer."""
    import deepspeed

    model = engine.module.model
    final = Path(output_dir)
    params = list(model.parameters())
    zero3 = any(hasattr(p, "ds_id") for p in params)
    if zero3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if distributed.is_main_process():
                _save_hf(model, tokenizer, final)
    elif distributed.is_main_process():
        _save_hf(model, tokenizer, final)
    distributed.barrier()
    return final


def _save_hf(model: torch.nn.Module, tokenizer: Any, final: Path) -> None:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    logger.info("exported the student to %s", final)
