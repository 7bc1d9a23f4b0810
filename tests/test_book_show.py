"""``show``: library code printed whole, private names refused."""

from __future__ import annotations

import inspect

import pytest

from mldeploy.book.source import show
from mldeploy.serving import batching


def test_show_prints_the_whole_public_method(capsys):
    show(batching.MicroBatcher.gather)
    printed = capsys.readouterr().out
    source = inspect.getsource(batching.MicroBatcher.gather)
    assert printed.startswith("async def gather(")  # dedented
    assert len(printed.strip().splitlines()) == len(source.strip().splitlines())


@pytest.mark.parametrize("name", ["_take", "_enqueue"])
def test_show_refuses_private_names(name):
    with pytest.raises(ValueError, match="private"):
        show(getattr(batching.MicroBatcher, name))
