"""Argument types shared by the command-line entry points: a bad value is a one-line usage error
(exit status 2) before any work starts, never a traceback after it."""

from __future__ import annotations

import argparse
import math
import os
import stat


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def socket_fd(text: str) -> int:
    """The number of an open socket this process inherited (``--fd``: a parent bound it)."""
    try:
        is_socket = stat.S_ISSOCK(os.fstat(int(text)).st_mode)
    except (ValueError, OSError):
        is_socket = False
    if not is_socket:
        raise argparse.ArgumentTypeError(f"expected the number of an open socket, got {text!r}")
    return int(text)
