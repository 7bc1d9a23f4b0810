"""nbval: the cells of 5.4 tagged ``container-engine`` build and run the real image.

Where no engine answers they are skipped with one line (a student's laptop); with CI=true they
run anyway, so a CI without an engine fails instead of passing silently.
"""

import pytest

from mldeploy import settings

TAG = "container-engine"


def pytest_collection_modifyitems(config, items):
    cells = [
        item
        for item in items
        if TAG in getattr(getattr(item, "cell", None), "metadata", {}).get("tags", [])
    ]
    if not cells or settings.tools().ci:
        return
    from mldeploy.image.engine import available

    if available() is None:
        skip = pytest.mark.skip(
            reason="no container engine (Docker or Podman): the image cells of 5.4 were not run"
        )
        for item in cells:
            item.add_marker(skip)
