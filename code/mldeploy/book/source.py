"""Library code shown in the book: whole functions, methods and classes, never cut-out text."""

from __future__ import annotations

import inspect
import textwrap


def show(obj: object) -> None:
    """Print the source of a public function, method or class of the library, whole.

    Private names (``_name``) are refused: what a page shows is the library's public surface, so a
    reader can call what they read."""
    name = getattr(obj, "__qualname__", repr(obj))
    private = [p for p in name.split(".") if p.startswith("_") and not p.endswith("__")]
    if private:
        raise ValueError(f"{name} is private; show a public function, method or class")
    print(textwrap.dedent(inspect.getsource(obj)).rstrip() + "\n")
