"""`Speculator`: keeps a `Pipeline` fed with a predictor's view of the next transfers."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from ._core import Pipeline, Transfer
from .predictors import Learned, Predictor


class Speculator:
    """Requests go through `request(key, buf, offset, length)`; after each one the predictor
    observes it and the pipeline is topped up to `depth` predicted transfers ahead.

    A key names a transfer; the buffer last requested under a key is what gets pre-encrypted
    when the key is predicted (so unchanged memory gives hits; changed bytes are caught by
    the pipeline's validation, never delivered stale).
    """

    def __init__(self, pipe: Pipeline, predictor: Predictor | None = None, depth: int = 8) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.pipe = pipe
        self.predictor: Predictor = predictor if predictor is not None else Learned()
        self.depth = depth
        self._specs: dict[Hashable, tuple[Any, int, int | None]] = {}
        self._issued: list[Hashable] = []  # handed to the pipeline, in order, not yet requested

    def register(self, key: Hashable, buf: Any, offset: int = 0, length: int | None = None) -> None:
        """Names a transfer before it is first requested (so hint-driven predictors can
        pre-encrypt it from the start)."""
        self._specs[key] = (buf, offset, length)

    def prime(self) -> None:
        """Asks the predictor for the first transfers before any request (hint-taking
        predictors know them: a layer cycle starts at its first layer)."""
        self._top_up()

    def request(
        self, key: Hashable, buf: Any, offset: int = 0, length: int | None = None
    ) -> Transfer:
        self._specs[key] = (buf, offset, length)
        transfer = self.pipe.request(buf, offset, length)
        if key in self._issued:
            # Everything predicted before it was skipped (the pipeline sent NOPs for it).
            del self._issued[: self._issued.index(key) + 1]
        self.predictor.observe(key)
        self._top_up()
        return transfer

    def _top_up(self) -> None:
        wanted = [k for k in self.predictor.predict(self.depth) if k in self._specs]
        if self._issued != wanted[: len(self._issued)]:
            # The predictor changed its mind: drop what is not in the ring yet, and keep the
            # ring's entries (their positions are reserved; requests will use or skip them).
            self.pipe.clear_plan()
            in_ring = self._issued[: self.pipe.queued()[0]]
            overlap = next(
                (
                    len(in_ring) - j
                    for j in range(len(in_ring) + 1)
                    if in_ring[j:] == wanted[: len(in_ring) - j]
                ),
                0,
            )
            self._issued = in_ring
            new = wanted[overlap:]
        else:
            new = wanted[len(self._issued) :]
        if new:
            self.pipe.predict([self._specs[k] for k in new])
            self._issued.extend(new)
