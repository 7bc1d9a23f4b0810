"""A SentencePiece BPE tokenizer trained on the chapter's standard-library corpus.

The options make the ids identical in sentencepiece, transformers' ``LlamaTokenizer``, llama.cpp
and ONNX Runtime GenAI: byte fallback (no unknown token: any byte has an id), identity
normalization, no dummy prefix, whitespace kept as written, no whitespace-only pieces.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

from mldeploy.quant.charlm import TRAIN_FILES, VALID_FILES, read_stdlib

SPM_OPTIONS = {
    "model_type": "bpe",
    "vocab_size": 512,
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": False,
    "split_digits": True,
    "character_coverage": 1.0,
    "max_sentence_length": 100_000,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "num_threads": 1,
    "minloglevel": 2,
}


def normalize_layout(text: str) -> str:
    """Indent with one tab per level and squeeze runs of spaces inside a line to one space.

    A 512-piece vocabulary has no room for pieces made of runs of spaces, so four-space
    indentation would cost one token per space (a quarter of all tokens), and a model trained on
    column-aligned comments learns that a space is most often followed by another space: greedy
    decoding then emits spaces forever. Python accepts tab indentation; ``str.expandtabs(4)``
    shows generated text in the usual layout.
    """
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" ")
        depth = (len(line) - len(body)) // 4
        lines.append("\t" * depth + re.sub(r" {2,}", " ", body.rstrip()))
    return "\n".join(lines)


def corpus_text() -> tuple[str, str]:
    """Training and held-out text: 5.3's standard-library files, in ``normalize_layout``."""
    return normalize_layout(read_stdlib(TRAIN_FILES)), normalize_layout(read_stdlib(VALID_FILES))


def train_tokenizer(text: str, path: Path, vocab_size: int = 512) -> Path:
    """Train a BPE model on ``text`` (one sentence per line) and write ``path`` atomically."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=model,
        **{**SPM_OPTIONS, "vocab_size": vocab_size},
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    return path


class Tokenizer:
    """Text ↔ ids with a trained SentencePiece model (no BOS/EOS added)."""

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)


def to_transformers(path: Path):
    """transformers' ``LlamaTokenizer`` reading ``tokenizer.model``'s folder (needs protobuf)."""
    with warnings.catch_warnings():  # tqdm warns about notebook widgets on import
        warnings.simplefilter("ignore")
        import transformers

    return transformers.LlamaTokenizer.from_pretrained(
        str(Path(path).parent),
        add_bos_token=False,
        add_eos_token=False,
        legacy=False,
        add_prefix_space=False,
    )
