"""Time limits that stretch on a loaded machine.

Every limit a test, the demo or a notebook waits for is a generous base multiplied by
``MLDEPLOY_TIMEOUT_FACTOR`` (default 1). On a runner that is also doing other work, set it to 3
(or more): nothing gets faster, but a slow machine is no longer reported as a failure.
"""

from __future__ import annotations

import os

ENV = "MLDEPLOY_TIMEOUT_FACTOR"


def factor() -> float:
    """The multiplier from the environment; a clear error for anything but a positive number."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1000:
        raise ValueError(f"{ENV} must be a positive number such as 3, got {raw!r}")
    return value


def scaled(seconds: float) -> float:
    """``seconds`` times the factor."""
    return seconds * factor()
