"""Checkpoints that survive crashes: atomic ``latest``, verified on resume, best kept, HF export.

Layout under ``<output_dir>/checkpoints/``::

    step-00000040/            DeepSpeed engine files (every rank writes its shard)
        trainer_state.json    curriculum controller, sampler position, counters (rank 0)
        rng_rank{r}.pt        each rank's RNG states
        COMPLETE              written last: the size (and, below 64 MiB, the sha256) of every
                              file above
    latest                    the tag of the newest complete checkpoint (replaced atomically)
    best.json                 the tag and validation ROUGE-L of the best checkpoint

A checkpoint is written as ``step-N.partial/`` and renamed to ``step-N/`` once ``COMPLETE`` is
in it, so a crash (or a full disk) half-way through a save never touches the checkpoints
before it. A checkpoint counts only once ``COMPLETE`` exists and every file has the size and
hash it lists; ``--resume auto`` skips a damaged one, saying which and what it uses instead.

A run owns its ``output_dir``: :func:`claim_output_dir` refuses to start a new run into a
directory that holds another one (checkpoints, ``metrics.jsonl`` or ``final/``), and
``train.overwrite_output_dir=true`` moves the old run aside to ``<output_dir>.old-<time>``
first, so two runs never mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocl_ds import atomic, distributed
from pocl_ds.engine import gathered_parameters
from pocl_ds.errors import PoclError

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
PARTIAL_SUFFIX = ".partial"
# Files up to this size are hashed: trainer state, RNG states, small models. Shards above it
# are only size-checked, so verifying a checkpoint of a large model stays a matter of seconds.
HASH_LIMIT_BYTES = 64 * 2**20
_TAG = re.compile(r"^step-(\d+)$")
# What makes a directory hold a run: a start that failed before training leaves only
# config.yaml, data/ or tokenizer/ (nothing to lose), so those do not count.
RUN_MARKERS = ("checkpoints", "metrics.jsonl", "final")
ARCHIVE_INFIX = ".old-"


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(tag: str) -> int:
    """The step a tag names; -1 for a name that is not a checkpoint tag."""
    match = _TAG.match(tag)
    return int(match.group(1)) if match else -1


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex (files < 64 MiB)}}`` of a checkpoint."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name == COMPLETE:
            continue
        size = path.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size < HASH_LIMIT_BYTES:
            entry["sha256"] = _sha256(path)
        out[str(path.relative_to(directory))] = entry
    return out


def verify(directory: Path) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    if not directory.is_dir():
        return "it does not exist"
    marker = directory / COMPLETE
    if not marker.is_file():
        return "no COMPLETE marker (the save was interrupted or the marker deleted)"
    try:
        expected = json.loads(marker.read_text(encoding="utf-8"))["files"]
        if not isinstance(expected, dict) or not expected:
            raise KeyError("files")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return "its COMPLETE marker is damaged"
    for name, entry in expected.items():
        # Checkpoints written before hashes were recorded list a bare size.
        size, digest = (
            (entry, None) if isinstance(entry, int) else (entry["size"], entry.get("sha256"))
        )
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, COMPLETE lists {size}"
        if digest is not None and _sha256(path) != digest:
            return f"{name} is corrupted (its sha256 differs from COMPLETE's)"
    return None


def _collective_check(problem: str | None) -> None:
    """Raise rank 0's ``problem`` as a PoclError on every rank, so all ranks stop together
    (one rank raising alone would leave the others blocked in the next collective)."""
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise PoclError(problem)


class CheckpointManager:
    """Saves and finds checkpoints of one run; every rank calls ``save``/``load`` together."""

    def __init__(self, output_dir: str | Path, *, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    # ---------------------------------------------------------------- save
    def save(self, engine: Any, step: int, trainer_state: dict[str, Any]) -> str:
        """Write checkpoint ``step-N`` (every rank), then point ``latest`` at it (rank 0).

        A directory that cannot be written, or a disk without room for another checkpoint
        the size of the last one, is a ``PoclError`` on every rank before anything is written;
        a write that fails half-way is one too. Either way the previous checkpoint is intact.
        """
        tag = step_tag(step)
        staging = self.root / (tag + PARTIAL_SUFFIX)
        previous = self.latest_tag()
        kept = (
            f"the previous checkpoint {previous} is intact"
            if previous
            else "no checkpoint before it"
        )
        problem = None
        if distributed.is_main_process():
            problem = self._prepare(staging, previous)
        _collective_check(None if problem is None else f"{problem}; {kept}")
        try:
            engine.save_checkpoint(str(self.root), tag=staging.name, save_latest=False)
            torch.save(rng_state(), staging / f"rng_rank{distributed.rank()}.pt")
        except (OSError, RuntimeError) as err:
            raise PoclError(
                f"checkpoint {self.root / tag}: could not be written ({err}); {kept}"
            ) from None
        distributed.barrier()
        problem = None
        if distributed.is_main_process():
            try:
                atomic.write_text(staging / STATE_FILE, json.dumps(trainer_state))
                atomic.fsync_files(staging)  # the engine's files, before COMPLETE vouches for them
                atomic.write_text(
                    staging / COMPLETE, json.dumps({"files": manifest(staging)}, indent=1)
                )
                self._publish(staging, self.root / tag)
                atomic.write_text(self.root / "latest", tag)
            except OSError as err:
                problem = f"checkpoint {self.root / tag}: could not be completed ({err}); {kept}"
            else:
                self._prune()
        _collective_check(problem)
        logger.info("checkpoint %s written", self.root / tag)
        return tag

    def _prepare(self, staging: Path, previous: str | None) -> str | None:
        """Rank 0: an empty, writable staging directory with room for a checkpoint, or why
        not."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if staging.exists():  # a leftover of an interrupted save of this same step
                shutil.rmtree(staging)
            staging.mkdir()
            probe = staging / ".write_probe"
            probe.write_bytes(b"0")
            probe.unlink()
        except OSError as err:
            return f"checkpoint directory {self.root} is not writable ({err})"
        if previous is not None:
            needed = sum(p.stat().st_size for p in (self.root / previous).rglob("*") if p.is_file())
            free = shutil.disk_usage(self.root).free
            if free < needed:
                shutil.rmtree(staging, ignore_errors=True)
                return (
                    f"checkpoint directory {self.root} is full: {free / 2**20:.1f} MiB free, a "
                    f"checkpoint needs {needed / 2**20:.1f} MiB (as {previous}); free space or "
                    "lower train.keep_checkpoints, then rerun with --resume auto"
                )
        return None

    @staticmethod
    def _publish(staging: Path, final: Path) -> None:
        # A checkpoint of this very step may exist (a preemption save at an epoch's last step,
        # then the epoch-end save): move it aside first, as a directory cannot be replaced.
        old = final.with_name(final.name + ".old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            atomic.replace(final, old)
        atomic.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)

    def mark_best(self, tag: str, metric: float) -> None:
        if distributed.is_main_process():
            atomic.write_text(self.root / "best.json", json.dumps({"tag": tag, "metric": metric}))

    def best(self) -> dict[str, Any] | None:
        path = self.root / "best.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def newest_tag(self) -> str | None:
        """``latest``, else the newest checkpoint directory (complete or not), else None."""
        tags = self._tags()
        return self.latest_tag() or (tags[-1] if tags else None)

    def _tags(self) -> list[str]:
        """Checkpoint directories (complete or not), oldest first."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and _TAG.match(p.name)]
        return sorted(found, key=_step_of)

    def _prune(self) -> None:
        best = (self.best() or {}).get("tag")
        tags = [t for t in self._tags() if (self.root / t / COMPLETE).is_file()]
        for tag in tags[: max(0, len(tags) - self.keep)]:
            if tag != best:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    # ---------------------------------------------------------------- resume
    def latest_tag(self) -> str | None:
        path = self.root / "latest"
        return path.read_text(encoding="utf-8").strip() if path.is_file() else None

    def find_resumable(self) -> str | None:
        """The newest intact checkpoint (the same on every rank), or None when there is none.

        Damaged checkpoints newer than it are named in one warning together with the one
        chosen; when checkpoints exist but none is intact, a ``PoclError`` says so rather than
        silently starting the run over.
        """
        tag, problem = None, None
        if distributed.is_main_process():
            tag, problem = self._newest_intact()
        _collective_check(problem)
        return distributed.broadcast_object(tag)

    def _newest_intact(self) -> tuple[str | None, str | None]:
        latest = self.latest_tag()
        candidates = set(self._tags()) | ({latest} if latest else set())
        damaged: list[str] = []
        for tag in sorted(candidates, key=_step_of, reverse=True):
            problem = verify(self.root / tag)
            if problem is None:
                if damaged:
                    logger.warning(
                        "resuming from %s, the newest intact checkpoint in %s, because the newer "
                        "%s damaged: %s",
                        tag,
                        self.root,
                        "checkpoint is" if len(damaged) == 1 else "checkpoints are",
                        "; ".join(damaged),
                    )
                return tag, None
            damaged.append(f"{tag} ({problem})")
        if damaged:
            return None, (
                f"--resume auto: no intact checkpoint in {self.root}: {'; '.join(damaged)}; "
                "move the directory away to start over"
            )
        return None, None

    def load(self, engine: Any, tag: str, *, restore_rng: bool = True) -> dict[str, Any]:
        """Restore the engine (always whole: under ZeRO-3 the weights live in the optimizer's
        partitions, so a module-only load would silently keep the current weights) and, on
        resume, this rank's RNG; return the trainer state.

        A tag that does not exist or fails verification is a ``PoclError`` on every rank.
        """
        directory = self.root / tag
        problem = None
        if distributed.is_main_process():
            problem = verify(directory)
            if problem is not None:
                available = ", ".join(self._tags()) or "none"
                problem = (
                    f"checkpoint {directory}: {problem} (checkpoints there: {available}; "
                    "--resume auto picks the newest intact one)"
                )
        _collective_check(problem)
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
    model = engine.module.model
    final = Path(output_dir)
    # collective: under ZeRO-3 every rank takes part in gathering the whole student
    with gathered_parameters(*model.parameters()):
        if distributed.is_main_process():
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
    atomic.fsync_files(tmp)
    if final.exists():
        shutil.rmtree(final)
    atomic.replace(tmp, final)
    logger.info("exported the student to %s", final)


# ---------------------------------------------------------------- the run's directory
def claim_output_dir(output_dir: str | Path, *, resume: str, overwrite: bool) -> None:
    """Make ``output_dir`` this run's own before anything is written into it (every rank).

    A new run (``resume="none"``) into a directory that holds another run is a ``PoclError``
    naming it and its latest checkpoint, unless ``overwrite``, which moves the old run to
    ``<output_dir>.old-<time>`` first. ``--resume auto`` into a directory whose run never
    wrote a checkpoint moves that run aside too, and starts fresh. Rank 0 decides and acts;
    every rank raises the same error.
    """
    problem = None
    if distributed.is_main_process():
        problem = _claim(Path(output_dir), resume=resume, overwrite=overwrite)
    _collective_check(problem)


def _claim(out: Path, *, resume: str, overwrite: bool) -> str | None:
    if overwrite and resume != "none":
        return (
            f"train.overwrite_output_dir=true would move away the run that --resume {resume} "
            "continues; drop one of the two"
        )
    held = [name for name in RUN_MARKERS if _holds(out / name)]
    manager = CheckpointManager(out)
    newest = manager.newest_tag()
    fresh_start = resume == "none" or (resume == "auto" and newest is None)
    if held and fresh_start:
        if resume == "none" and not overwrite:
            return (
                f"train.output_dir {out} holds a run ({', '.join(held)}; latest checkpoint: "
                f"{newest or 'none'}): continue it with --resume auto, or set "
                f"train.overwrite_output_dir=true to move it to {out}{ARCHIVE_INFIX}<time> and "
                "start over"
            )
        stamp = out.name + ARCHIVE_INFIX + time.strftime("%Y%m%d-%H%M%S")
        archive, count = out.with_name(stamp), 1
        while archive.exists():  # two runs archived within a second
            count += 1
            archive = out.with_name(f"{stamp}-{count}")
        try:
            atomic.replace(out, archive)
        except OSError as err:
            return f"train.output_dir {out}: could not move its run to {archive} ({err})"
        logger.warning(
            "%s held a run (%s%s): moved it to %s; starting fresh",
            out,
            ", ".join(held),
            "" if resume == "none" else ", no checkpoint to resume from",
            archive,
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"train.output_dir {out}: cannot be created ({err})"
    return None


def _holds(path: Path) -> bool:
    """A run's file, or a run's directory with something in it."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))
