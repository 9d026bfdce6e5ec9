"""Session-wide hygiene for the multi-process tests."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from pocl_ds.cli import SHM_BUFFER_PREFIX

_STARTED = time.time()


def pytest_sessionfinish(session, exitstatus) -> None:
    """Ranks the fault tests kill never reach ``cli.release_shm_buffer``; remove the DeepSpeed
    /dev/shm segments this session's jobs left, or each run of the suite would keep gigabytes
    of RAM (66 MB a rank) until reboot."""
    for segment in Path("/dev/shm").glob(f"{SHM_BUFFER_PREFIX}_{os.getuid()}_*"):
        with contextlib.suppress(OSError):
            if segment.stat().st_mtime >= _STARTED:
                segment.unlink()
