"""Predictors of the next transfers (docs/pipeline.md says how a Speculator uses them).

Every predictor works on *keys*: any hashable value naming a transfer (a layer index, a
``("kv", block)`` tuple, an adapter name). `observe(key)` records a transfer that happened;
`predict(n)` returns the keys expected next, most likely first. `Speculator` connects a
predictor to a `Pipeline`.

- `LayerCycle(order)`: weight offloading as in FlexGen: layers stream in the same order every
  step, so after layer i comes layer i+1, cyclically.
- `SwapFifo(lifo=False)`: KV-cache swapping as in vLLM: what was swapped out comes back in
  first-in first-out order (`lifo=True`: last-in first-out, as request-wise preemption often
  does). Tell it about swap-outs with `swapped_out(key)`.
- `AdapterQueue()`: multi-LoRA serving: the adapters of the requests waiting in the queue load
  in queue order. Tell it about arrivals with `enqueue(key)`.
- `LoadOnce(order)`: a model load (or any one-time sequence: a first KV restore, new
  adapters): these transfers, once each, in this order; after the last, nothing.
- `Learned()`: no hint: learns repetition in the observed stream (period detection, then
  successor statistics; implemented in Rust).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from typing import Protocol

from ._core import LearnedPredictor


class Predictor(Protocol):
    def observe(self, key: Hashable) -> None: ...
    def predict(self, n: int) -> list[Hashable]: ...


def _ordered(order: Sequence[Hashable], twice: str) -> tuple[list[Hashable], dict[Hashable, int]]:
    """`order` as a list and each key's index in it; `twice` says why a key named twice is
    refused."""
    if not order:
        raise ValueError("order must name at least one transfer")
    keys = list(order)
    index = {k: i for i, k in enumerate(keys)}
    if len(index) != len(keys):
        raise ValueError(f"order names a transfer twice{twice}")
    return keys, index


class LayerCycle:
    """Keys in a fixed cyclic order; after `observe(k)`, the keys that follow k."""

    def __init__(self, order: Sequence[Hashable]) -> None:
        self._order, self._index = _ordered(order, "; use Learned for such cycles")
        self._pos: int | None = None

    def observe(self, key: Hashable) -> None:
        self._pos = self._index.get(key, self._pos)

    def predict(self, n: int) -> list[Hashable]:
        start = -1 if self._pos is None else self._pos
        m = len(self._order)
        return [self._order[(start + 1 + j) % m] for j in range(n)]


class LoadOnce:
    """Each key of `order` once, in order (a server start loading every layer's weights):
    before any transfer, the first keys; after `observe(k)`, the keys after k; after the
    last, nothing. A key outside `order` changes nothing."""

    def __init__(self, order: Sequence[Hashable]) -> None:
        self._order, self._index = _ordered(order, ": a load copies each one once")
        self._next = 0

    def observe(self, key: Hashable) -> None:
        i = self._index.get(key)
        if i is not None:
            self._next = max(self._next, i + 1)

    def predict(self, n: int) -> list[Hashable]:
        return self._order[self._next : self._next + n]


class SwapFifo:
    """Swapped-out keys come back in the order they left (or the reverse, `lifo=True`)."""

    def __init__(self, lifo: bool = False) -> None:
        self._lifo = lifo
        self._out: deque[Hashable] = deque()

    def swapped_out(self, key: Hashable) -> None:
        self._out.append(key)

    def observe(self, key: Hashable) -> None:
        """A swap-in happened: that block is no longer waiting."""
        end = -1 if self._lifo else 0
        if self._out and self._out[end] == key:  # the predicted one: O(1)
            self._out.pop() if self._lifo else self._out.popleft()
            return
        try:
            self._out.remove(key)
        except ValueError:
            pass

    def predict(self, n: int) -> list[Hashable]:
        seq = reversed(self._out) if self._lifo else iter(self._out)
        return [k for _, k in zip(range(n), seq, strict=False)]


class AdapterQueue:
    """Adapters load in the order their requests wait in the queue."""

    def __init__(self) -> None:
        self._queue: deque[Hashable] = deque()

    def enqueue(self, key: Hashable) -> None:
        self._queue.append(key)

    def enqueue_many(self, keys: Iterable[Hashable]) -> None:
        self._queue.extend(keys)

    def observe(self, key: Hashable) -> None:
        """The adapter was loaded for the request at the head of the queue (or one later)."""
        if self._queue and self._queue[0] == key:  # the predicted one: O(1)
            self._queue.popleft()
            return
        try:
            self._queue.remove(key)
        except ValueError:
            pass

    def predict(self, n: int) -> list[Hashable]:
        out: list[Hashable] = []
        for k in self._queue:
            if len(out) == n:
                break
            if not out or out[-1] != k:  # consecutive requests share a loaded adapter
                out.append(k)
        return out


class Learned:
    """Learns the stream's repetition without hints (Rust: period, then successors)."""

    def __init__(self, history: int = 4096, max_period: int = 1024) -> None:
        self._core = LearnedPredictor(history, max_period)
        self._ids: dict[Hashable, int] = {}
        self._keys: list[Hashable] = []

    def _id(self, key: Hashable) -> int:
        i = self._ids.get(key)
        if i is None:
            i = self._ids[key] = len(self._keys)
            self._keys.append(key)
        return i

    def observe(self, key: Hashable) -> None:
        self._core.observe(self._id(key))

    def predict(self, n: int) -> list[Hashable]:
        return [self._keys[i] for i in self._core.predict(n)]

    @property
    def period(self) -> int | None:
        return self._core.period
