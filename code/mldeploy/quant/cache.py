"""Cache keys that include the code producing a file, and writes that readers never see half-done.

Notebooks 5.3a/b/c and the tests share ``artifacts/5.3/`` and may run at the same time (``make
test`` runs test files and notebooks on two processes).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FunctionType, ModuleType


def source_digest(*objects: ModuleType | type | FunctionType) -> str:
    """Short SHA-256 of the source code of modules, classes or functions (in the order given)."""
    digest = hashlib.sha256()
    for obj in objects:
        digest.update(inspect.getsource(obj).encode())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success it replaces ``path`` in one step
    (``os.replace``), on failure it is removed. Concurrent writers never share the temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def one_builder(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock named after the cache entry ``path`` while checking and building it.

    A second process that needs the same entry waits here, then finds it built, instead of
    training the same model again beside the first. The lock is released when the block ends,
    also when the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
