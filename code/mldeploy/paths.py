"""Where generated files live: a git-ignored ``artifacts/`` folder at the repository root."""

from __future__ import annotations

from pathlib import Path

from mldeploy.settings import REPO_ROOT, PathSettings

__all__ = ["REPO_ROOT", "artifacts_dir"]


def artifacts_dir(*parts: str) -> Path:
    """Return (and create) ``artifacts/<parts...>``; ``MLDEPLOY_ARTIFACTS`` overrides the root."""
    path = PathSettings().artifacts.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
