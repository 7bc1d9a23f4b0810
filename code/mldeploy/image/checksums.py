"""SHA-256 checksum files in ``sha256sum`` format, so an image build can check a model by coreutils.

Imports only the standard library: the serving image and its health check can use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A model file is missing, or does not match the digest recorded next to it."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 digest of a file, read in chunks so large models need little memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: str | Path) -> Path:
    """Where the checksum of ``path`` lives: ``<name>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_checksum(path: str | Path) -> Path:
    """Write ``<digest>  <name>`` (the ``sha256sum`` line, file name relative) beside the file."""
    path = Path(path)
    target = checksum_path(path)
    target.write_text(f"{sha256_file(path)}  {path.name}\n", encoding="ascii")
    return target


def verify_checksum(path: str | Path) -> str:
    """Check a file against its ``.sha256``; return the digest or raise :class:`ChecksumError`."""
    path = Path(path)
    record = checksum_path(path)
    if not path.is_file():
        raise ChecksumError(f"no model file at {path}")
    if not record.is_file():
        raise ChecksumError(
            f"no checksum file {record.name} beside {path.name}: run `make artifacts`"
        )
    fields = record.read_text(encoding="ascii", errors="replace").split()
    if len(fields) != 2 or fields[1].lstrip("*") != path.name or len(fields[0]) != 64:
        raise ChecksumError(f"{record.name} is not a sha256sum line for {path.name}")
    actual = sha256_file(path)
    if actual != fields[0].lower():
        raise ChecksumError(
            f"{path.name} does not match {record.name}: the file changed after export"
        )
    return actual
