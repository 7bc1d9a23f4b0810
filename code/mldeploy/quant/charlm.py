"""A character-level language model worth compressing, trained on the standard library's own source.

Every machine with Python 3.11 has the corpus offline. The model is a wide MLP over a fixed window
of characters (Bengio-style): almost all of its parameters sit in three ``nn.Linear`` layers, which
is exactly where INT8/INT4 weight quantization acts. Trained weights are cached under
``artifacts/5.3/`` keyed by a hash of the configuration and of the code that trains them, so
notebooks and tests train at most once and a change to the training code trains again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    import onnxruntime

from mldeploy import reproducibility
from mldeploy.paths import artifacts_dir
from mldeploy.quant import cache
from mldeploy.reproducibility import single_thread
from mldeploy.training import set_seed

# A fixed, sorted list of standard-library modules: the same text on every Python 3.11 install.
TRAIN_FILES = (
    "abc.py",
    "argparse.py",
    "ast.py",
    "bisect.py",
    "collections/__init__.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "datetime.py",
    "difflib.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "inspect.py",
    "json/decoder.py",
    "json/encoder.py",
    "pathlib.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "tempfile.py",
    "typing.py",
)
VALID_FILES = ("heapq.py", "textwrap.py")  # held out: perplexity is measured on unseen files

# Vocabulary: newline plus printable ASCII; tabs become spaces, anything else one "unknown" id.
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = len(CHARS)
VOCAB_SIZE = len(CHARS) + 1
_LOOKUP = np.full(256, UNKNOWN, dtype=np.uint8)
for _i, _c in enumerate(CHARS):
    _LOOKUP[ord(_c)] = _i


@dataclass(frozen=True)
class CharLMConfig:
    """Model size and training budget; the defaults train in about half a minute on 2 CPU cores."""

    context: int = 32
    embed: int = 32
    hidden: int = 512
    steps: int = 800
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        """Short hash of everything the trained weights depend on (cache key)."""
        blob = json.dumps(
            {
                "config": dataclasses.asdict(self),
                "train": TRAIN_FILES,
                "torch": torch.__version__,
                "compute": reproducibility.PINNED_ENV if reproducibility.pinned() else "native",
                "code": training_code_digest(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def training_code_digest() -> str:
    """Hash of the code the trained weights depend on: this module (model, corpus, training loop),
    the seeding and the single-thread settings."""
    import sys

    return cache.source_digest(sys.modules[__name__], set_seed, reproducibility)


class CharMLP(nn.Module):
    """Embedded ``context`` characters → (Linear → ReLU) × 2 → Linear → next-character logits."""

    def __init__(
        self, context: int = 32, embed: int = 32, hidden: int = 512, vocab: int = VOCAB_SIZE
    ):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, embed)
        self.fc1 = nn.Linear(context * embed, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx).flatten(1)
        h = F.relu(self.fc1(h))
        h = F.relu(self.fc2(h))
        return self.head(h)

    def linears(self) -> dict[str, nn.Linear]:
        """The quantizable layers, in the order data flows through them."""
        return {"fc1": self.fc1, "fc2": self.fc2, "head": self.head}


def encode(text: str) -> np.ndarray:
    """Character ids (uint8) of a text, using the fixed vocabulary."""
    raw = np.frombuffer(
        text.replace("\t", "    ").encode("ascii", errors="replace"), dtype=np.uint8
    )
    return _LOOKUP[raw]


def decode(ids: np.ndarray) -> str:
    """Text of character ids; the unknown id shows as '?'."""
    return "".join(CHARS[i] if i < UNKNOWN else "?" for i in np.asarray(ids).tolist())


def read_stdlib(files: tuple[str, ...]) -> str:
    """Concatenated source of standard-library files (from this interpreter's ``stdlib`` path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"standard-library files not found under the stdlib folder: {missing}"
        )
    return "\n".join((root / name).read_text(encoding="utf-8") for name in files)


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint8 character ids
    valid: np.ndarray


def load_corpus() -> Corpus:
    """Training and held-out validation text as character ids."""
    return Corpus(encode(read_stdlib(TRAIN_FILES)), encode(read_stdlib(VALID_FILES)))


def windows(ids: np.ndarray, context: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``ids[p : p+context]`` (int64, shape (n, context)) and targets ``ids[p+context]``."""
    positions = np.asarray(positions)
    x = ids[positions[:, None] + np.arange(context)[None, :]].astype(np.int64)
    return x, ids[positions + context].astype(np.int64)


def sample_windows(
    ids: np.ndarray, context: int, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows at seeded random positions (calibration and evaluation sets)."""
    rng = np.random.default_rng(seed)
    return windows(ids, context, rng.integers(0, len(ids) - context, size=n))


def train_charlm(cfg: CharLMConfig, corpus: Corpus) -> CharMLP:
    """Seeded AdamW training with a cosine schedule; bit-identical across runs on one machine."""
    with single_thread():
        return _train(cfg, corpus)


def _train(cfg: CharLMConfig, corpus: Corpus) -> CharMLP:
    set_seed(cfg.seed)
    model = CharMLP(cfg.context, cfg.embed, cfg.hidden)
    fit(model, corpus.train, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    return model


def fit(
    model: CharMLP,
    ids: np.ndarray,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> float:
    """Train ``model`` in place on random windows of ``ids``: AdamW, cosine schedule to zero.

    Used for the first training and for the equal-budget fine-tuning of QAT and PTQ; returns the
    mean loss of the last 50 steps.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    data = torch.from_numpy(ids.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(model.context + 1)
    # fused: its sqrt rounds alike on every CPU, unlike MKL's (see mldeploy.reproducibility)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    losses = []
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - model.context - 1, (batch_size,), generator=generator)
        chunk = data[starts[:, None] + offsets]
        loss = F.cross_entropy(model(chunk[:, :-1]), chunk[:, -1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return float(np.mean(losses[-50:]))


def cached_charlm(
    cfg: CharLMConfig = CharLMConfig(), corpus: Corpus | None = None
) -> tuple[CharMLP, bool]:
    """The trained model for ``cfg`` (from ``artifacts/5.3/`` if cached) and whether it was."""
    path = artifacts_dir("5.3") / f"charlm-{cfg.key()}.pt"
    with cache.one_builder(path):  # another process training it: wait, then load its file
        if path.is_file():
            model = CharMLP(cfg.context, cfg.embed, cfg.hidden)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval(), True
        reproducibility.require_pinned()  # a cache holds only numbers from the pinned path
        model = train_charlm(cfg, corpus if corpus is not None else load_corpus())
        with cache.atomic_output(path) as tmp:  # a half-written cache file is never read
            torch.save(model.state_dict(), tmp)
        return model, False


@dataclass(frozen=True)
class LMMetrics:
    """Perplexity on held-out text; agreement and KL divergence relative to a reference model."""

    perplexity: float
    agreement: float = 1.0
    kl: float = 0.0


def lm_metrics(
    logits: np.ndarray, targets: np.ndarray, reference: np.ndarray | None = None
) -> LMMetrics:
    """Perplexity = exp(mean cross-entropy); with ``reference`` logits also top-1 agreement and
    mean KL(reference ‖ model) in nats."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)
    nll = -logp.gather(1, torch.as_tensor(targets).long()[:, None]).mean()
    if reference is None:
        return LMMetrics(float(torch.exp(nll)))
    ref = torch.log_softmax(torch.as_tensor(reference, dtype=torch.float64), dim=-1)
    kl = (ref.exp() * (ref - logp)).sum(-1).mean()
    agree = (logp.argmax(-1) == ref.argmax(-1)).double().mean()
    return LMMetrics(float(torch.exp(nll)), float(agree), float(kl))


@torch.no_grad()
def logits_of(model: nn.Module, x: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """Logits of a PyTorch model for int64 windows, in batches."""
    model.eval()
    xs = torch.from_numpy(np.asarray(x, dtype=np.int64))
    return torch.cat([model(xs[i : i + batch_size]) for i in range(0, len(xs), batch_size)]).numpy()


def session_logits(
    session: onnxruntime.InferenceSession, x: np.ndarray, batch_size: int = 2048
) -> np.ndarray:
    """Logits of an exported model (ONNX Runtime session) for int64 windows, in batches."""
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.int64)
    return np.concatenate(
        [session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    )
