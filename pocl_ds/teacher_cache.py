"""Exact offline distillation: each training sample's teacher hidden states, computed once.

The fused kernel takes the teacher's final hidden states [T, H] and its head, never its logits,
and ``hidden @ head`` is the teacher's whole distribution. So keeping the hidden states of the
positions the loss reads (one per response token) replaces every later teacher forward of that
sample, at H/V of the size of its logits. Off-policy methods only: a dataset sample's tokens never
change, an on-policy sample is new each time.

Modes:
    none    run the teacher on every micro-batch (nothing kept).
    memory  each rank keeps entries on the host; at the end of every epoch the ranks exchange
            what they computed, so an entry is computed once whichever rank draws it later.
    disk    ``<output_dir>/teacher_cache/<fingerprint>/<index>.pt``: every rank reads what any
            rank wrote (the directory must be shared by the ranks, as the output directory is),
            and a killed or resumed run reuses it.

An entry is keyed by sample index under a fingerprint of the teacher's weights and dtype, the
tokenizer and the cache dtype, so a changed teacher or tokenizer never reads an old cache. Each
entry also carries a hash of its sample's tokens and a CRC of its bytes; an entry that fails
either (a torn write, changed data) is recomputed and written again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pocl_ds import distributed
from pocl_ds.data import TokenizedSample
from pocl_ds.engine import gathered_parameters, weights_fingerprint
from pocl_ds.models import output_head
from pocl_ds.objective import teacher_inputs

logger = logging.getLogger(__name__)

CacheMode = Literal["none", "memory", "disk"]
CACHE_DIR = "teacher_cache"
# the most entry bytes one rank sends in one exchange round (memory mode)
EXCHANGE_ROUND_BYTES = 256 * 2**20


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's vocabulary, special tokens and class: the ids it produces."""
    state = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()


def _token_hash(sample: TokenizedSample) -> str:
    ids = np.asarray(sample.prompt_ids + sample.response_ids, dtype=np.int64)
    return hashlib.blake2b(ids.tobytes(), digest_size=16).hexdigest()


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def loss_rows(sample: TokenizedSample) -> slice:
    """The positions whose teacher state the loss reads: the state at t meets the target t + 1,
    so the last prompt position through the last-but-one token (one row per response token)."""
    prompt, length = len(sample.prompt_ids), len(sample.prompt_ids) + len(sample.response_ids)
    return slice(max(prompt - 1, 0), length - 1)


class TeacherCache:
    """The teacher's side of the loss for a micro-batch: from the cache where it can, else from
    the teacher (and then kept).

    Args:
        teacher: the frozen teacher (replicated, or partitioned when ``partitioned``).
        mode: none | memory | disk (module docstring).
        dtype: the dtype entries are kept in (None: the teacher's own).
        directory: the run's output directory (disk mode keeps its entries under it).
        tokenizer_id: ``tokenizer_fingerprint`` of the run's tokenizer.
        partitioned: the teacher is ZeRO-3-partitioned: its forward is collective, so the ranks
            agree per micro-batch whether any of them needs it.

    Construction is collective (the fingerprint hashes the teacher's weights; rank 0 clears
    caches of other fingerprints).
    """

    def __init__(
        self,
        teacher: torch.nn.Module,
        *,
        mode: CacheMode,
        dtype: torch.dtype | None,
        directory: str | os.PathLike,
        tokenizer_id: str,
        partitioned: bool,
    ) -> None:
        self.teacher = teacher
        self.mode = mode
        self.partitioned = partitioned
        weight, bias = output_head(teacher)
        self.teacher_dtype = weight.dtype
        self.dtype = dtype or weight.dtype
        self.stats = {"hits": 0, "misses": 0, "rebuilt": 0}
        self._memory: dict[int, tuple[str, torch.Tensor]] = {}
        self._unshared: list[int] = []
        self.head = (weight.detach(), None if bias is None else bias.detach())
        if mode == "none":
            return
        if hasattr(weight, "ds_id"):  # kept once: no gather of the head per micro-batch
            with gathered_parameters(weight, bias):
                self.head = (weight.detach().clone(), None if bias is None else bias.clone())
        self.fingerprint = hashlib.sha256(
            f"{weights_fingerprint(teacher)}|{tokenizer_id}|{self.teacher_dtype}|{self.dtype}".encode()
        ).hexdigest()[:20]
        self.root = Path(directory) / CACHE_DIR
        self.directory = self.root / self.fingerprint
        if mode == "disk":
            if distributed.is_main_process():
                self._clear_other_fingerprints()
                self.directory.mkdir(parents=True, exist_ok=True)
                for partial in self.directory.glob(".*.tmp"):  # of a writer killed mid-entry
                    partial.unlink(missing_ok=True)
            distributed.barrier()

    def size_bytes(self, samples: list[TokenizedSample]) -> int:
        """What the cache holds once every one of ``samples`` is in it: one row of H values
        per response token (plus about a kilobyte of file per entry on disk)."""
        rows = sum(loss_rows(s).stop - loss_rows(s).start for s in samples)
        return rows * self.head[0].shape[1] * torch.empty((), dtype=self.dtype).element_size()

    def held_bytes(self) -> int:
        """Bytes of the entries this rank holds in memory (0 in the other modes)."""
        return sum(h.numel() * h.element_size() for _, h in self._memory.values())

    def _clear_other_fingerprints(self) -> None:
        if not self.root.is_dir():
            return
        for stale in self.root.iterdir():
            if stale.is_dir() and stale.name != self.fingerprint:
                logger.info("teacher cache: removing %s (another teacher or tokenizer)", stale)
                shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ entries
    def _path(self, index: int) -> Path:
        return self.directory / f"{index}.pt"

    def _read(self, sample: TokenizedSample, hidden_size: int | None) -> torch.Tensor | None:
        """The sample's entry, or None (missing, or failing its checks: counted as rebuilt)."""
        token_hash = _token_hash(sample)
        if self.mode == "memory":
            held = self._memory.get(sample.index)
            return held[1] if held is not None and held[0] == token_hash else None
        path = self._path(sample.index)
        if not path.is_file():
            return None
        rows = loss_rows(sample)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            hidden = entry["hidden"]
            ok = (
                entry["tokens"] == token_hash
                and hidden.dtype == self.dtype
                and hidden.shape[0] == rows.stop - rows.start
                and (hidden_size is None or hidden.shape[1] == hidden_size)
                and _crc(hidden) == entry["crc"]
            )
        except Exception:  # a torn or foreign file: rebuilt below
            ok = False
        if not ok:
            self.stats["rebuilt"] += 1
            return None
        return hidden

    def _write(self, sample: TokenizedSample, hidden: torch.Tensor) -> None:
        # a copy: the row is a view of the whole batch's states, which it would keep alive
        hidden = hidden.detach().to(device="cpu", dtype=self.dtype, copy=True).contiguous()
        token_hash = _token_hash(sample)
        if self.mode == "memory":
            self._memory[sample.index] = (token_hash, hidden)
            self._unshared.append(sample.index)
            return
        buffer = io.BytesIO()
        torch.save({"tokens": token_hash, "crc": _crc(hidden), "hidden": hidden}, buffer)
        # Written beside and renamed: a killed writer leaves the old entry or none, and a reader
        # never sees half of one. No fsync: a cache entry lost to a power cut is recomputed.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{sample.index}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getvalue())
        os.replace(tmp, self._path(sample.index))

    # ------------------------------------------------------------------ the loss's inputs
    def inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        samples: list[TokenizedSample],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
        """Teacher hidden states [B, T, H] (exact on the rows the loss reads) and its head,
        for the right-padded micro-batch of ``samples``."""
        if self.mode == "none":
            return teacher_inputs(self.teacher, input_ids, attention_mask)
        width = self.head[0].shape[1]
        entries = [self._read(sample, width) for sample in samples]
        missing = any(entry is None for entry in entries)
        if self.partitioned:  # the teacher's forward gathers layers from every rank
            missing = distributed.all_reduce_sum(float(missing)) > 0
        if missing:
            hidden = teacher_inputs(self.teacher, input_ids, attention_mask)[0]
            for row, (sample, entry) in enumerate(zip(samples, entries, strict=True)):
                if entry is None:
                    self._write(sample, hidden[row, loss_rows(sample)])
            self.stats["misses"] += sum(entry is None for entry in entries)
            self.stats["hits"] += sum(entry is not None for entry in entries)
            return hidden, self.head
        self.stats["hits"] += len(samples)
        batch, length = input_ids.shape
        hidden = torch.zeros(
            (batch, length, width), dtype=self.teacher_dtype, device=self.head[0].device
        )
        for row, (sample, entry) in enumerate(zip(samples, entries, strict=True)):
            hidden[row, loss_rows(sample)] = entry.to(hidden.device, self.teacher_dtype)
        return hidden, self.head

    def share(self) -> None:
        """Memory mode: give every rank the entries the others computed since the last call
        (collective; the trainer calls it at the end of every epoch)."""
        if self.mode != "memory" or distributed.world_size() == 1:
            self._unshared.clear()
            return
        pending = list(self._unshared)
        self._unshared.clear()
        sizes = [self._memory[i][1].numel() * self._memory[i][1].element_size() for i in pending]
        rounds = max(1, -(-int(sum(sizes)) // EXCHANGE_ROUND_BYTES))
        rounds = max(distributed.all_gather_objects(rounds))  # the same number on every rank
        for part in np.array_split(np.asarray(pending, dtype=np.int64), rounds):
            mine = {int(i): self._memory[int(i)] for i in part}
            for theirs in distributed.all_gather_objects(mine):
                self._memory.update(theirs)

    def summary(self) -> dict[str, Any]:
        """Mode, dtype and the entries read, computed and rebuilt over every rank (collective)."""
        counts = {
            k: sum(s[k] for s in distributed.all_gather_objects(self.stats)) for k in self.stats
        }
        return {"mode": self.mode, "dtype": str(self.dtype).replace("torch.", ""), **counts}
