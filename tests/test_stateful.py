"""Stateful property tests (hypothesis RuleBasedStateMachine) over the channel and the
pipeline: arbitrary interleavings of predict, request, source modification, relinquishing
(NOPs), plain sends, key rotation (a tiny usage limit) and close, checked against invariants:

- no (epoch, IV) is ever emitted twice;
- the receiver model accepts every message in the order it is emitted, and each data
  message decrypts to the source's bytes as they were when the request was made (nothing
  stale, nothing unverified);
- the pipeline's counters agree with what was observed;
- after close, every call fails with PipelineClosedError and nothing is emitted.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pipellm import Pipeline, PipelineClosedError, Receiver, Sender, SessionKey

CHUNK = 4096
SOURCES = 4


class ChannelAndPipeline(RuleBasedStateMachine):
    @initialize(
        workers=st.integers(0, 2),
        validation=st.sampled_from(["fingerprint", "protect"]),
        rotate_every=st.sampled_from([10**12, 4000, 20000]),
    )
    def setup(self, workers: int, validation: str, rotate_every: int) -> None:
        key = SessionKey.generate()
        self.pipe = Pipeline(
            key,
            channel=3,
            slots=6,
            chunk_bytes=CHUNK,
            workers=workers,
            usage_limit=rotate_every,
            validation=validation,  # type: ignore[arg-type]
            max_staging_bytes=6 * CHUNK,
        )
        self.rx = Receiver(key, channel=3, usage_limit=rotate_every)
        # A plain sender on another channel shares the key: its IVs must never collide.
        self.tx = Sender(key, channel=4, usage_limit=rotate_every)
        self.rx_plain = Receiver(key, channel=4, usage_limit=rotate_every)
        rng = np.random.default_rng(0)
        self.sources = [
            rng.integers(0, 256, CHUNK * (1 + i), dtype=np.uint8) for i in range(SOURCES)
        ]
        self.seen_ivs: set[tuple[int, int, bytes]] = set()
        self.requests = 0
        self.bytes_requested = 0
        self.delivered = 0  # messages the receiver model accepted from the pipeline

    def _emit(self, channel: int, m: object) -> None:
        ident = (channel, m.epoch, m.iv)  # type: ignore[attr-defined]
        assert ident not in self.seen_ivs, f"IV reused: {ident}"
        self.seen_ivs.add(ident)

    @precondition(lambda self: not self.pipe.closed)
    @rule(i=st.integers(0, SOURCES - 1), whole=st.booleans(), off=st.integers(0, 3))
    def predict(self, i: int, whole: bool, off: int) -> None:
        src = self.sources[i]
        if whole:
            self.pipe.predict([src])
        else:
            o = min(off * 1000, src.nbytes - 1)
            self.pipe.predict([(src, o, src.nbytes - o)])

    @precondition(lambda self: not self.pipe.closed)
    @rule(i=st.integers(0, SOURCES - 1), whole=st.booleans(), off=st.integers(0, 3))
    def request(self, i: int, whole: bool, off: int) -> None:
        src = self.sources[i]
        o = 0 if whole else min(off * 1000, src.nbytes - 1)
        expected = src[o:].copy()  # the bytes as they are now
        transfer = self.pipe.request(src, o, src.nbytes - o)
        self.requests += 1
        self.bytes_requested += expected.nbytes
        got = np.zeros_like(expected)
        for m in transfer:
            self._emit(3, m)
            dst = memoryview(got)[m.offset : m.offset + len(m)] if len(m) else bytearray(0)
            self.rx.open_into(m, dst)
            self.delivered += 1
        assert np.array_equal(got, expected), "stale or corrupt plaintext delivered"

    @precondition(lambda self: not self.pipe.closed)
    @rule(i=st.integers(0, SOURCES - 1), at=st.integers(0, 10**6), value=st.integers(0, 255))
    def modify_source(self, i: int, at: int, value: int) -> None:
        src = self.sources[i]
        src[at % src.nbytes] = value ^ 0xA5

    @precondition(lambda self: not self.pipe.closed)
    @rule()
    def relinquish(self) -> None:
        for m in self.pipe.relinquish():
            assert m.is_nop
            self._emit(3, m)
            self.rx.open_into(m, bytearray(0))
            self.delivered += 1

    @rule(n=st.integers(0, 3 * CHUNK))
    def plain_send(self, n: int) -> None:
        data = bytes(range(256)) * (n // 256) + bytes(n % 256)
        m = self.tx.seal(data)
        self._emit(4, m)
        assert self.rx_plain.open(m) == data

    @precondition(lambda self: not self.pipe.closed)
    @rule()
    def clear_plan(self) -> None:
        self.pipe.clear_plan()

    @precondition(lambda self: not self.pipe.closed)
    @rule()
    def close(self) -> None:
        # Positions still in the ring would leave a gap for the receiver: relinquish first,
        # as a serving loop shutting down cleanly does.
        self.relinquish()
        self.pipe.close()

    @precondition(lambda self: self.pipe.closed)
    @rule(i=st.integers(0, SOURCES - 1))
    def calls_after_close_fail(self, i: int) -> None:
        with pytest.raises(PipelineClosedError):
            self.pipe.request(self.sources[i])
        with pytest.raises(PipelineClosedError):
            self.pipe.predict([self.sources[i]])

    @invariant()
    def counters_agree(self) -> None:
        s = self.pipe.stats()
        assert s["requests"] == self.requests
        assert s["bytes_requested"] == self.bytes_requested
        assert self.rx.expected_counter == self.delivered or self.rx.epoch > 0
        assert s["worker_failures"] == 0
        # every position reserved is either delivered already or still in the ring
        in_ring = self.pipe.queued()[0] if not self.pipe.closed else 0
        assert s["positions_reserved"] >= self.delivered
        if not self.pipe.closed:
            assert s["positions_reserved"] <= self.delivered + in_ring

    def teardown(self) -> None:
        self.pipe.close()


TestChannelAndPipeline = ChannelAndPipeline.TestCase
TestChannelAndPipeline.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
