"""Native CPU rows for the divergence kernel's jsd without labels (`cpu_kernel.cpp`).

On CPU the fused kernel's elementwise work runs as eager PyTorch ops on row blocks, and each
op writes its result back to memory: a jsd block costs two exps and a log1p per element plus
about 25 simple passes. The native rows do the same arithmetic in four sweeps per row, the
intermediates in registers (README, "The divergence kernel", has the measurements).

It is built on first use with `torch.utils.cpp_extension` (a C++ compiler and ninja; about
30 s once per machine and source) for CPUs with AVX2, into a directory named by a hash of the
source, the flags and torch's version under `TORCH_EXTENSIONS_DIR` (default
~/.cache/torch_extensions); every later process imports the built library from there, taking
no lock. Where it cannot be built, or `ENABLED` is False, the kernel keeps its eager blocks,
which compute the same thing.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

# False: always the eager blocks (for comparison, and as a switch should a build misbehave).
ENABLED = True

_NAME = "pocl_ds_cpu_kernel"
_SOURCE = Path(__file__).with_suffix(".cpp")
_BUILD_FLAGS = ["-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
# torch's build lock is a file that a process killed while building leaves behind, and every
# later build waits on it forever; a lock older than any build is taken to be such a one.
_STALE_LOCK_S = 600.0
_lock = threading.Lock()
_built: dict[str, ModuleType | None] = {}


def native_rows() -> ModuleType | None:
    """The built extension, or None where it is switched off or cannot be built here (the
    reason is logged once)."""
    if not ENABLED:
        return None
    with _lock:
        if "module" not in _built:
            _built["module"] = _load()
        return _built["module"]


def build_directory() -> Path:
    """Where this source, these flags and this torch build their library."""
    digest = hashlib.sha256(_SOURCE.read_bytes())
    digest.update(" ".join([*_BUILD_FLAGS, torch.__version__]).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"{_NAME}_{digest.hexdigest()[:16]}"


def _load() -> ModuleType | None:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        logger.info("native CPU jsd rows need AVX2 (this CPU: %s): eager blocks", capability)
        return None
    directory = build_directory()
    library = directory / f"{_NAME}.so"
    try:
        return _import(library) if library.exists() else _build(directory)
    except Exception as error:  # a missing compiler or ninja: the eager blocks still work
        logger.warning(
            "native CPU jsd rows could not be built or loaded in %s (%s): eager blocks",
            directory,
            error,
        )
        return None


def _import(library: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(_NAME, str(library))
    spec = importlib.util.spec_from_file_location(_NAME, library, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _build(directory: Path) -> ModuleType:
    """Build (and import) the library in `directory`; ranks that race here wait on torch's
    lock while one of them builds."""
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        logger.warning("removing %s, left by a build that did not finish", lock)
        lock.unlink(missing_ok=True)
    logger.info("building the native CPU jsd rows in %s (once; about 30 s)", directory)
    started = time.perf_counter()
    module = load(name=_NAME, sources=[str(_SOURCE)], extra_cflags=_BUILD_FLAGS,
                  build_directory=str(directory), verbose=False)  # fmt: skip
    logger.info("native CPU jsd rows built in %.1f s", time.perf_counter() - started)
    return module
