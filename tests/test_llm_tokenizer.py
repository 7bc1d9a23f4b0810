"""SentencePiece BPE tokenizer: lossless round trip, same ids in transformers, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mldeploy.llm import tokenizer as tk


@pytest.fixture(scope="module")
def corpus() -> tuple[str, str]:
    return tk.corpus_text()


@pytest.fixture(scope="module")
def model_path(corpus: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tk.train_tokenizer(corpus[0], tmp_path_factory.mktemp("spm") / "tokenizer.model")


def test_vocabulary_size_and_byte_fallback(model_path: Path) -> None:
    tok = tk.Tokenizer(model_path)
    assert tok.vocab_size == 512
    ids = tok.encode("ü€")  # not in the ASCII training text: falls back to UTF-8 bytes
    assert tok.pieces("ü") == ["<0xC3>", "<0xBC>"]
    assert tok.decode(ids) == "ü€"


def test_round_trip_of_held_out_source(model_path: Path, corpus: tuple[str, str]) -> None:
    tok = tk.Tokenizer(model_path)
    text = corpus[1]
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # indentation, blank lines and tabs survive
    assert len(ids) < 0.8 * len(text)  # BPE merges: fewer tokens than characters


def test_transformers_tokenizer_gives_the_same_ids(
    model_path: Path, corpus: tuple[str, str]
) -> None:
    tok = tk.Tokenizer(model_path)
    hf = tk.to_transformers(model_path)
    text = corpus[1][:20_000] + "\n\tcafé = 'ü'  \n"
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text


def test_bad_input_is_a_clear_error(model_path: Path) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        tk.Tokenizer(model_path).encode(b"bytes")  # type: ignore[arg-type]
