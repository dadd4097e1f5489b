"""`Speculator`: keeps a `Pipeline` fed with a predictor's view of the next transfers."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from typing import Any

from ._core import MAX_PREDICT, Pipeline, Transfer
from .predictors import Learned, Predictor


class Speculator:
    """Requests go through `request(key, buf, offset, length)`; after each one the predictor
    observes it and the pipeline is topped up to `depth` predicted transfers ahead.

    A key names a transfer; the buffer last requested under a key is what gets pre-encrypted
    when the key is predicted (so unchanged memory gives hits; changed bytes are caught by
    the pipeline's validation, never delivered stale).

    `depth` is at most `pipellm.MAX_PREDICT` (each top-up asks the predictor for `depth` keys).
    """

    def __init__(self, pipe: Pipeline, predictor: Predictor | None = None, depth: int = 8) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise TypeError(f"depth must be an int, got {type(depth).__name__}")
        if not 1 <= depth <= MAX_PREDICT:
            raise ValueError(f"depth must be in 1..{MAX_PREDICT}, got {depth}")
        self.pipe = pipe
        self.predictor: Predictor = predictor if predictor is not None else Learned()
        self.depth = depth
        self._specs: dict[Hashable, tuple[Any, int, int | None]] = {}
        # handed to the pipeline, in order, not yet requested
        self._issued: deque[Hashable] = deque()
        # The last top-up found nothing new and no hint arrived since: asking the predictor
        # again would find nothing either (hint-driven predictors only learn from hints).
        self._exhausted = False

    def register(self, key: Hashable, buf: Any, offset: int = 0, length: int | None = None) -> None:
        """Names a transfer before it is first requested (so hint-driven predictors can
        pre-encrypt it from the start)."""
        self._specs[key] = (buf, offset, length)

    def forget(self, key: Hashable) -> None:
        """The transfer named `key` will not come again (an evicted adapter, a freed block):
        its buffer is no longer predicted, and chunks of it kept write-protected between uses
        (`Pipeline(keep_armed=...)`) are released, so the memory can be freed or reused.
        Predictions already handed to the pipeline stay there until requested or
        relinquished."""
        spec = self._specs.pop(key, None)
        if spec is not None:
            self.pipe.unwatch(spec[0])

    def prime(self) -> None:
        """Asks the predictor for the first transfers before any request (hint-taking
        predictors know them: a layer cycle starts at its first layer)."""
        self._top_up(force=True)

    def hint(self, kind: str, key: Hashable) -> None:
        """Passes a serving event to a hint-taking predictor: "swap_out" (a block left the
        device) for `SwapFifo`, "enqueue" (a request's adapter will be needed) for
        `AdapterQueue`; other predictors ignore it."""
        p: Any = self.predictor
        if kind == "swap_out" and hasattr(p, "swapped_out"):
            p.swapped_out(key)
        elif kind == "enqueue" and hasattr(p, "enqueue"):
            p.enqueue(key)
        else:
            return
        self._exhausted = False  # the next top-up (`flush` or a request) asks again

    def flush(self) -> None:
        """Tops the pipeline up after a batch of hints (a scheduler step's swap-outs or
        arrivals), so their transfers are encrypted before they are requested. Hints alone do
        not, which keeps a batch of n hints O(n) instead of O(n * depth)."""
        self._top_up()

    def expect(self, keys: Iterable[Hashable]) -> None:
        """The caller knows the next transfers, in order (each registered before): they are
        pre-encrypted now, ahead of whatever the predictor would have said."""
        keys = list(keys)
        missing = [k for k in keys if k not in self._specs]
        if missing:
            raise KeyError(f"expect: not registered: {missing[:3]!r}")
        if keys:
            self.pipe.predict([self._specs[k] for k in keys])
            self._issued.extend(keys)

    def request(
        self, key: Hashable, buf: Any, offset: int = 0, length: int | None = None
    ) -> Transfer:
        self._specs[key] = (buf, offset, length)
        transfer = self.pipe.request(buf, offset, length)
        if self._issued and self._issued[0] == key:
            self._issued.popleft()  # the common case, O(1)
        else:
            self._exhausted = False  # a surprise: the predictor may now say more
            if key in self._issued:
                # Everything predicted before it was skipped (the pipeline sent NOPs for it).
                for _ in range(list(self._issued).index(key) + 1):
                    self._issued.popleft()
        self.predictor.observe(key)
        self._top_up()
        return transfer

    def _top_up(self, force: bool = False) -> None:
        # Amortised: refill only once half the lookahead is used up, so the O(depth) work
        # below costs O(1) per request (it sits on the request path).
        if not force and (len(self._issued) > self.depth // 2 or self._exhausted):
            return
        wanted = [k for k in self.predictor.predict(self.depth) if k in self._specs]
        issued = list(self._issued)
        if issued != wanted[: len(issued)]:
            # The predictor changed its mind: drop what is not in the ring yet, and keep the
            # ring's entries (their positions are reserved; requests will use or skip them).
            self.pipe.clear_plan()
            in_ring = issued[: self.pipe.queued()[0]]
            overlap = next(
                (
                    len(in_ring) - j
                    for j in range(len(in_ring) + 1)
                    if in_ring[j:] == wanted[: len(in_ring) - j]
                ),
                0,
            )
            self._issued = deque(in_ring)
            new = wanted[overlap:]
        else:
            new = wanted[len(issued) :]
        if new:
            self.pipe.predict([self._specs[k] for k in new])
            self._issued.extend(new)
        # Hint-driven predictors run dry between hints; stream learners never do.
        self._exhausted = not new and len(wanted) < self.depth
