"""A batching engine: one worker thread steps every running sequence together.

Each running sequence owns one slot of a preallocated KV memory (``SlotPool``): its own cache,
at its own position. A step (``Engine.step``) does three things: drop cancelled and expired
sequences (their slots go back to the pool), admit waiting ones (each is prefilled on its own,
by the model's own forward, and yields its first token), and run one batched decode step
(``decode_step``) for the others.

The two policies differ only in *when* waiting requests may join:

- continuous batching: at every step, while there is room (``max_running`` slots,
  ``max_tokens_in_flight`` reserved cache positions);
- static batching: only when the running batch is empty, so a batch runs until its longest
  sequence finishes, and the slots freed by short ones stay idle.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from mldeploy.llm.kv_cache import KVCache
from mldeploy.llm.model import Llama, LlamaConfig, apply_rope

log = logging.getLogger("mldeploy.llm.engine")


MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy (and logits / T would overflow)


class QueueFull(Exception):
    """The waiting queue is at its cap; the client should retry later."""


class SlotPool:
    """KV memory for ``slots`` sequences, allocated once: (slots, kv_heads, max_len, head_dim)
    per layer. A running sequence owns one slot; its ``KVCache`` is a view of that row."""

    def __init__(self, cfg: LlamaConfig, slots: int) -> None:
        shape = (slots, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.keys = [torch.zeros(shape) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape) for _ in range(cfg.n_layers)]
        self.free = list(range(slots))

    def acquire(self) -> tuple[int, KVCache]:
        """A free slot and an empty cache writing into it (old keys are hidden by its length)."""
        slot = self.free.pop(0)
        cache = KVCache(len(self.keys), 1, 1, 0, 1)  # no memory of its own: views of the pool
        cache.keys = [k[slot : slot + 1] for k in self.keys]
        cache.values = [v[slot : slot + 1] for v in self.values]
        cache.max_len = self.keys[0].shape[2]
        return slot, cache

    def release(self, slot: int) -> None:
        self.free.append(slot)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@torch.no_grad()
def decode_step(
    net: Llama, tokens: list[int], pool: SlotPool, slots: list[int], positions: list[int]
) -> torch.Tensor:
    """Next-token logits (rows, vocab) for one new token per row, each row at its own position.

    Row i's token goes to ``positions[i]`` of slot ``slots[i]``: RoPE uses that position, and the
    attention mask over the padded keys hides the positions row i has not filled yet.
    """
    rows, pos = torch.tensor(slots), torch.tensor(positions)
    if int(pos.max()) >= net.cfg.max_seq_len:
        raise ValueError(f"a row exceeds max_seq_len={net.cfg.max_seq_len}")
    width = int(pos.max()) + 1  # keys of the longest row, the new one included
    cos = net.rope_cos[pos][:, None, None, :]  # (rows, 1 head, 1 query, head_dim)
    sin = net.rope_sin[pos][:, None, None, :]
    mask = (torch.arange(width)[None, :] <= pos[:, None])[:, None, None, :]  # (rows,1,1,width)
    x = net.model.embed_tokens(torch.tensor(tokens)[:, None])
    for block in net.model.layers:
        h = block.input_layernorm(x)
        x = x + attend(block.self_attn, h, cos, sin, pool, rows, pos, width, mask)
        x = x + block.mlp(block.post_attention_layernorm(x))
    return net.lm_head(net.model.norm(x))[:, 0]


def attend(attn, x, cos, sin, pool, rows, pos, width, mask) -> torch.Tensor:
    """The model's attention for one query per row, over each row's slot of the pool."""
    cfg, n = attn.cfg, x.shape[0]
    q = attn.q_proj(x).view(n, 1, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(n, 1, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(n, 1, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys, values = pool.keys[attn.layer], pool.values[attn.layer]
    keys[rows, :, pos], values[rows, :, pos] = k[:, :, 0], v[:, :, 0]  # one write per row
    # every row's keys up to the longest row; the mask hides what a shorter row has not written
    out = F.scaled_dot_product_attention(
        q, keys[rows, :, :width], values[rows, :, :width], attn_mask=mask, enable_gqa=True
    )
    return attn.o_proj(out.transpose(1, 2).reshape(n, 1, -1))


@dataclass(eq=False)
class Sequence:
    """One request: its prompt, the tokens generated so far, its slot and its timestamps."""

    id: int
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    deadline: float | None = None  # time.perf_counter() after which the engine drops it
    on_token: Callable[[Sequence, int | None], None] | None = None
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    cache: KVCache | None = None
    cancelled: bool = False
    finish_reason: str | None = None  # "length", "stop", "cancelled", "timeout" or "error"
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    generator: torch.Generator | None = None

    @property
    def need(self) -> int:
        """Cache positions reserved for this sequence: prompt plus every new token."""
        return len(self.prompt) + self.max_tokens


@dataclass
class Stats:
    """What the engine measured: per-request TTFT and TPOT (recent ones), tokens, steps."""

    ttft: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    tpot: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    timed_out: int = 0
    busy_since: float | None = None


class Engine:
    """Schedules sequences onto batched decode steps; ``start()`` runs it in a worker thread."""

    def __init__(
        self,
        net: Llama,
        *,
        batching: str = "continuous",
        max_running: int = 8,
        max_tokens_in_flight: int | None = None,
        max_waiting: int = 64,
        eos_id: int | None = None,
        log_steps: int = 100_000,
    ) -> None:
        if batching not in ("continuous", "static"):
            raise ValueError("batching must be 'continuous' or 'static'")
        limits = (max_running, max_waiting, max_tokens_in_flight or max_running)
        if min(limits) < 1 or max_tokens_in_flight == 0:
            raise ValueError("max_running, max_waiting and max_tokens_in_flight must be >= 1")
        self.net, self.batching, self.eos_id = net.eval(), batching, eos_id
        self.max_running, self.max_waiting = max_running, max_waiting
        self.max_tokens_in_flight = max_tokens_in_flight or max_running * net.cfg.max_seq_len
        self.pool = SlotPool(net.cfg, max_running)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.steps = 0
        self.step_log: collections.deque[list[int]] = collections.deque(maxlen=log_steps)
        self.stats = Stats()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- called by clients (any thread) ----

    def submit(self, prompt: list[int], max_tokens: int, **options) -> Sequence:
        """Queue a request; raises ``QueueFull`` at the cap and ``ValueError`` if it cannot fit."""
        seq = Sequence(next(self._ids), list(prompt), max_tokens, **options)
        if not prompt or max_tokens < 1:
            raise ValueError("need a non-empty prompt and max_tokens >= 1")
        if seq.need > min(self.net.cfg.max_seq_len, self.max_tokens_in_flight):
            raise ValueError(
                f"prompt + max_tokens exceed the context of {self.net.cfg.max_seq_len}"
            )
        with self._cond:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting")
            self.waiting.append(seq)
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Mark ``seq`` cancelled; the next step frees its slot."""
        with self._cond:
            seq.cancelled = True
            self._cond.notify()

    @property
    def tokens_in_flight(self) -> int:
        return sum(s.need for s in self.running)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (liveness: a dead worker serves nobody)."""
        return self._thread is not None and self._thread.is_alive()

    # ---- the scheduler ----

    @torch.no_grad()
    def step(self) -> bool:
        """One scheduler iteration; False if there was nothing to do."""
        self._drop_gone()
        joined = self.admit()
        decoding = [s for s in self.running if s not in joined]
        if not joined and not decoding:
            return False
        for seq in joined:  # prefill: the model's own forward, writing into the slot's cache
            logits = self.net(torch.tensor([seq.prompt]), seq.cache)[0, -1]
            self._emit(seq, logits)
        if decoding:
            tokens = [s.generated[-1] for s in decoding]
            slots, positions = [s.slot for s in decoding], [s.cache.length for s in decoding]
            logits = decode_step(self.net, tokens, self.pool, slots, positions)
            for seq, row in zip(decoding, logits, strict=True):
                seq.cache.advance(1)
                self._emit(seq, row)
        self.steps += 1
        self.step_log.append([s.id for s in self.running])
        self.running = [s for s in self.running if s.finish_reason is None]
        return True

    def _drop_gone(self) -> None:
        """Finish cancelled sequences and those past their deadline, waiting or running."""
        now = time.perf_counter()
        with self._cond:
            gone = {
                s
                for s in itertools.chain(self.waiting, self.running)
                if s.cancelled or (s.deadline is not None and now > s.deadline)
            }
        if not gone:
            return
        # count them and free their slots first: other threads read the queues without the
        # lock, and a sequence out of both queues must already be counted
        for seq in sorted(gone, key=lambda s: s.id):
            self._finish(seq, "cancelled" if seq.cancelled else "timeout")
        with self._cond:
            self.waiting = collections.deque(s for s in self.waiting if s not in gone)
            self.running = [s for s in self.running if s not in gone]

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into the batch, as the policy allows; give each a slot."""
        if self.batching == "static" and self.running:
            return []  # a static batch runs until every sequence in it has finished
        joined = []
        with self._cond:
            while self.waiting and len(self.running) < self.max_running:
                if self.tokens_in_flight + self.waiting[0].need > self.max_tokens_in_flight:
                    break
                seq = self.waiting.popleft()
                seq.slot, seq.cache = self.pool.acquire()
                if seq.temperature > 0:
                    seq.generator = torch.Generator().manual_seed(seq.seed)
                self.running.append(seq)
                joined.append(seq)
        return joined

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Pick the next token, hand it to the client, finish the sequence if it is done."""
        if seq.temperature < MIN_TEMPERATURE:
            token = int(logits.argmax())
        else:  # subtracting the max keeps exp() finite for small temperatures
            probs = torch.softmax((logits - logits.max()) / seq.temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.stats.ttft.append(now - seq.submitted)
        if self.stats.busy_since is None:
            self.stats.busy_since = now
        seq.generated.append(token)
        self.stats.tokens += 1
        if seq.on_token is not None:
            seq.on_token(seq, token)
        if token == self.eos_id:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason, seq.finished_at, seq.cache = reason, time.perf_counter(), None
        if seq.slot is not None:
            self.pool.release(seq.slot)
            seq.slot = None
        if reason in ("cancelled", "timeout", "error"):
            self.stats.cancelled += reason == "cancelled"
            self.stats.timed_out += reason == "timeout"
        else:
            self.stats.finished += 1
            if len(seq.generated) > 1:
                spent = seq.finished_at - seq.first_token_at
                self.stats.tpot.append(spent / (len(seq.generated) - 1))
        if seq.on_token is not None:
            seq.on_token(seq, None)  # None: no more tokens

    def run_until_idle(self) -> int:
        """Step (in this thread) until nothing waits or runs; returns the steps taken."""
        start = self.steps
        while self.step():
            pass
        return self.steps - start

    # ---- the worker thread ----

    def start(self) -> Engine:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        torch.set_num_threads(1)  # shared 2-core machine: one core for the model, one for HTTP
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and not self.running:
                    # wake up now and then: a waiting request's deadline passes without a notify
                    self._cond.wait(timeout=1.0)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # a bug must not kill the worker: fail the batch, keep serving
                log.exception("engine step failed; finishing the running sequences")
                for seq in self.running:  # finished first, then out of the queue, as above
                    if seq.finish_reason is None:
                        self._finish(seq, "error")
                self.running = []

    def metrics(self) -> dict:
        """Recent TTFT/TPOT medians, tokens/s since the first token, running and waiting counts."""
        s = self.stats
        busy = time.perf_counter() - s.busy_since if s.busy_since else 0.0
        return {
            "batching": self.batching,
            # a sequence that finished in the current step leaves ``running`` at the step's end
            "running": sum(seq.finish_reason is None for seq in list(self.running)),
            "waiting": len(self.waiting),
            "steps": self.steps,
            "tokens_generated": s.tokens,
            "requests_finished": s.finished,
            "requests_cancelled": s.cancelled,
            "requests_timed_out": s.timed_out,
            "free_slots": len(self.pool.free),
            "tokens_per_s": round(s.tokens / busy, 1) if busy > 0 else 0.0,
            "ttft_ms_p50": _ms(_quantile(s.ttft, 0.5)),
            "ttft_ms_p99": _ms(_quantile(s.ttft, 0.99)),
            "tpot_ms_p50": _ms(_quantile(s.tpot, 0.5)),
            "tpot_ms_p99": _ms(_quantile(s.tpot, 0.99)),
        }


def _quantile(values, q: float) -> float | None:
    values = sorted(values)
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)
