"""The mutation list of ``make mutation-check``: well formed, and every bug applies to this tree."""

from __future__ import annotations

import shutil

import pytest

from mldeploy.book import mutations


def test_list_has_the_required_mutations():
    ms = mutations.load()
    ids = [m["id"] for m in ms]
    assert len(ms) >= 20 and len(ids) == len(set(ids))
    for required in ("gptq-deferred-update", "int8-calibration-off-by-one", "int8-per-tensor"):
        assert required in ids
    assert {"5.1", "5.2", "5.3a", "5.3b", "5.4", "5.5"} <= {m["section"] for m in ms}


@pytest.mark.parametrize("m", mutations.load(), ids=lambda m: m["id"])
def test_each_mutation_applies_and_changes_the_file(m, tmp_path):
    (tmp_path / m["file"]).parent.mkdir(parents=True)
    shutil.copy(mutations.ROOT / m["file"], tmp_path / m["file"])
    before = (tmp_path / m["file"]).read_text()
    mutations.apply(tmp_path, m)
    assert (tmp_path / m["file"]).read_text() != before


def test_a_stale_mutation_is_a_clear_error(tmp_path):
    (tmp_path / "x.py").write_text("a = 1\na = 1\n")
    m = {"id": "x", "file": "x.py", "old": "a = 1", "new": "a = 2"}
    with pytest.raises(ValueError, match="occurs 2× in x.py, not 1×"):
        mutations.apply(tmp_path, m)
    broken = tmp_path / "broken.toml"
    broken.write_text('[[mutation]]\nid = "y"\nfile = "x.py"\n')
    with pytest.raises(ValueError, match="mutation y: missing"):
        mutations.load(broken)
