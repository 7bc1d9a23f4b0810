"""Where generated files live: a git-ignored ``artifacts/`` folder at the repository root."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def artifacts_dir(*parts: str) -> Path:
    """Return (and create) ``artifacts/<parts...>``; ``MLDEPLOY_ARTIFACTS`` overrides the root."""
    root = Path(os.environ.get("MLDEPLOY_ARTIFACTS", REPO_ROOT / "artifacts"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
