"""Time limits that stretch on a loaded machine.

Every limit a test, the demo or a notebook waits for is a generous base multiplied by
``MLDEPLOY_TIMEOUT_FACTOR`` (default 1). On a runner that is also doing other work, set it to 3
(or more), at most 100: nothing gets faster, but a slow machine is no longer reported as a failure.
The value is read and checked by ``mldeploy.settings.ToolSettings``.
"""

from __future__ import annotations

from mldeploy import settings

ENV = settings.env_name(settings.ToolSettings, "timeout_factor")


def factor() -> float:
    """The multiplier from the environment; ``settings.SettingsError`` (a ``ValueError`` with one
    line) for anything but a number in (0, 100]."""
    return settings.tools().timeout_factor


def scaled(seconds: float) -> float:
    """``seconds`` times the factor."""
    return seconds * factor()
