"""One way to put a file or a directory in place so that a crash leaves the old one or the new
one, never half of either: write beside it, fsync, rename, fsync the directory.

Every writer of run state (checkpoints, curriculum, difficulty and SeqKD caches, metrics) goes
through here, so a power cut or a SIGKILL never leaves a torn file that a resume would trust.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_files(directory: str | os.PathLike) -> None:
    """Flush every file under ``directory`` to disk: files written by libraries that do not
    (DeepSpeed, Hugging Face), before a rename or a marker publishes them."""
    for path in Path(directory).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def replace(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename ``source`` over ``target`` (files, or a directory onto a free name) durably."""
    os.replace(source, target)
    fsync_directory(Path(target).parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; the parent directory is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))
