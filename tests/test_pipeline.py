"""The speculative pipeline through the Python API."""

from __future__ import annotations

import logging
import mmap
import resource
import threading
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipellm
from pipellm import Pipeline, PipelineClosedError, Receiver, SessionKey

KEY = SessionKey(bytes(range(32)))


def deliver(rx: Receiver, messages: Any, total: int) -> bytes:
    """Feeds one transfer's messages to the receiver; returns the reassembled bytes."""
    out = bytearray(b"\xee" * total)
    view = memoryview(out)
    for m in messages:
        rx.open_into(m, view[m.offset : m.offset + len(m)])
    return bytes(out)


def wait_for(pipe: Pipeline, key: str, n: int) -> None:
    t0 = time.monotonic()
    while pipe.stats()[key] < n:
        assert time.monotonic() - t0 < 20, f"{key} stuck at {pipe.stats()[key]}"
        time.sleep(0.001)


def test_predicted_transfers_hit_and_decrypt() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    b = rng.standard_normal(1 << 18).astype(np.float32)  # 1 MiB
    rx = Receiver(KEY)
    with Pipeline(KEY, slots=8, chunk_bytes=1 << 20, workers=2) as pipe:
        pipe.predict([a, (b, 4096, 65536)])
        wait_for(pipe, "chunks_pre_encrypted", 4)
        assert deliver(rx, pipe.request(a), a.nbytes) == a.tobytes()
        part = deliver(rx, pipe.request(b, 4096, 65536), 65536)
        assert part == b.tobytes()[4096 : 4096 + 65536]
        s = pipe.stats()
        assert (s["hits"], s["misses"], s["nops"]) == (4, 0, 0)
        assert s["bytes_on_demand"] == 0


def test_unpredicted_and_modified_sources_are_encrypted_on_demand() -> None:
    rx = Receiver(KEY)
    with Pipeline(KEY, slots=4, chunk_bytes=4096, workers=1) as pipe:
        a = bytearray(b"a" * 8192)
        pipe.predict([a])
        wait_for(pipe, "chunks_pre_encrypted", 2)
        a[5000] = ord("Z")  # after encryption: the second chunk is stale
        assert deliver(rx, pipe.request(a), 8192) == bytes(a)
        x = np.full(10_000, 7, dtype=np.uint8)
        assert deliver(rx, pipe.request(x), 10_000) == x.tobytes()
        s = pipe.stats()
        assert (s["hits"], s["stale"], s["misses"]) == (1, 1, 3)


def test_page_protection_detects_python_writes_and_checks_in_constant_time() -> None:
    rx = Receiver(KEY)
    chunk = 1 << 20
    # Pages of its own (an anonymous mapping): a heap allocation, even a large one, may share
    # its first and last pages with other objects, whose writes would dirty those chunks.
    a = np.frombuffer(mmap.mmap(-1, 16 * chunk, flags=mmap.MAP_PRIVATE), dtype=np.uint8)
    with Pipeline(KEY, slots=16, chunk_bytes=chunk, workers=2, validation="protect") as pipe:
        pipe.predict([a])
        wait_for(pipe, "chunks_pre_encrypted", 16)
        a[7 * chunk + 12345] = 99  # faults once, is recorded, goes through
        assert a[7 * chunk + 12345] == 99
        assert deliver(rx, pipe.request(a), a.nbytes) == a.tobytes()
        s = pipe.stats()
        assert (s["hits"], s["stale"]) == (15, 1)
        # 16 checks of 1 MiB each: loads of a write counter, not hashes of the bytes
        assert s["validation_bytes_hashed"] == 0, s
    a[0] = 1  # writable as usual once the pipeline is closed


def test_skipped_predictions_become_nops() -> None:
    rx = Receiver(KEY)
    bufs = [bytes([i]) * 4096 for i in range(3)]
    with Pipeline(KEY, slots=4, chunk_bytes=4096, workers=1) as pipe:
        pipe.predict(bufs)
        wait_for(pipe, "chunks_pre_encrypted", 3)
        msgs = list(pipe.request(bufs[2]))
        assert [m.kind for m in msgs] == ["nop", "nop", "data"]
        assert deliver(rx, msgs, 4096) == bufs[2]
        assert pipe.stats()["nops"] == 2


# A small model of serving: three sources, random predictions, requests and writes.
op = st.one_of(
    st.tuples(
        st.just("predict"),
        st.lists(
            st.tuples(st.integers(0, 2), st.integers(0, 6000), st.integers(0, 6000)),
            min_size=1,
            max_size=4,
        ),
    ),
    st.tuples(
        st.just("request"), st.tuples(st.integers(0, 2), st.integers(0, 6000), st.integers(0, 6000))
    ),
    st.tuples(st.just("write"), st.tuples(st.integers(0, 2), st.integers(0, 5999))),
)


def clamp(off: int, length: int, total: int = 6000) -> tuple[int, int]:
    off %= total + 1
    return off, length % (total - off + 1)


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(op, min_size=1, max_size=20), slots=st.integers(1, 5), workers=st.integers(0, 2)
)
def test_receiver_gets_the_bytes_each_source_held_at_request_time(
    ops: list[Any], slots: int, workers: int
) -> None:
    srcs = [np.arange(6000, dtype=np.uint32).astype(np.uint8) + i for i in range(3)]
    rx = Receiver(KEY)
    with Pipeline(KEY, slots=slots, chunk_bytes=1024, workers=workers) as pipe:
        for kind, arg in ops:
            if kind == "predict":
                specs = []
                for s, o, n in arg:
                    o, n = clamp(o, n)
                    specs.append((srcs[s], o, n))
                pipe.predict(specs)
            elif kind == "request":
                s, o, n = arg
                o, n = clamp(o, n)
                expected = srcs[s].tobytes()[o : o + n]
                msgs = pipe.request(srcs[s], o, n).messages()
                assert sum(1 for m in msgs if not m.is_nop) == -(-n // 1024)
                assert deliver(rx, msgs, n) == expected
            else:
                s, p = arg
                srcs[s][p] ^= 0xFF
        for m in pipe.relinquish():
            assert m.is_nop
            rx.open_into(m, bytearray(0))
        s = pipe.stats()
        assert s["positions_reserved"] == s["hits"] + s["chunks_on_demand"] + s["nops"]
        assert rx.expected_counter == s["positions_reserved"]


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def test_stress_8_threads_request_and_predict() -> None:
    srcs = [np.full(64 << 10, i, dtype=np.uint8) for i in range(16)]
    pipe = Pipeline(KEY, slots=16, chunk_bytes=16 << 10, workers=2)
    rx = Receiver(KEY)
    lock = threading.Lock()
    pending: dict[tuple[int, int], tuple[pipellm.Message, bytes]] = {}
    delivered = [0]
    errors: list[BaseException] = []
    threads_n, rounds = 8, 1000  # a fixed amount of work, however fast the machine is

    def flush() -> None:
        # Deliver, in position order, every message whose predecessors have all arrived.
        while True:
            key = (rx.epoch, rx.expected_counter)
            if key not in pending:
                return
            m, expected = pending.pop(key)
            dst = bytearray(len(m))
            rx.open_into(m, dst)
            assert bytes(dst) == expected
            delivered[0] += 1

    def work(t: int) -> None:
        i = t
        try:
            for _ in range(rounds):
                src = srcs[i % 16]
                if i % 3 == 0:
                    pipe.predict([srcs[(i + 1) % 16], src, (srcs[(i + 5) % 16], 100, 20_000)])
                msgs = pipe.request(src).messages()
                with lock:
                    for m in msgs:
                        exp = b"" if m.is_nop else src.tobytes()[m.offset : m.offset + len(m)]
                        pending[(m.epoch, m.counter)] = (m, exp)
                    flush()
                i += 7
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
        assert not th.is_alive(), "deadlock: a thread did not finish"
    assert not errors, errors[0]
    with lock:
        for m in pipe.relinquish():
            pending[(m.epoch, m.counter)] = (m, b"")
        flush()
        assert not pending, f"{len(pending)} messages never became deliverable"
    s = pipe.stats()
    pipe.close()
    assert s["positions_reserved"] == delivered[0]
    assert s["requests"] == threads_n * rounds
    assert s["bytes_requested"] == threads_n * rounds * (64 << 10)


def test_no_leak_under_a_long_concurrent_loop() -> None:
    """Requests, predictions and dropped messages from 4 threads: after a warm-up phase the
    process must not keep growing over a phase three times as long (staging is pooled,
    source views released, entries retired). The bound is generous: allocator arenas settle
    at their own pace. The phases are counted in requests, not seconds."""
    srcs = [np.full(64 << 10, i, dtype=np.uint8) for i in range(16)]
    pipe = Pipeline(KEY, slots=16, chunk_bytes=16 << 10, workers=2)
    threads_n, warm_up, measured = 4, 2500, 7500  # requests per thread in each phase
    errors: list[BaseException] = []

    def work(t: int, i: int, n: int) -> int:
        try:
            for _ in range(n):
                src = srcs[i % 16]
                if i % 3 == 0:
                    pipe.predict([srcs[(i + 1) % 16], src, (srcs[(i + 5) % 16], 100, 20_000)])
                pipe.request(src).messages()
                i += 7
        except BaseException as e:
            errors.append(e)
        return i

    def phase(n: int, starts: list[int]) -> list[int]:
        ends = list(starts)

        def run(t: int) -> None:
            ends[t] = work(t, starts[t], n)

        threads = [threading.Thread(target=run, args=(t,)) for t in range(threads_n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
            assert not th.is_alive(), "deadlock: a thread did not finish"
        assert not errors, errors[0]
        return ends

    cursor = phase(warm_up, list(range(threads_n)))
    assert pipe.wait_idle()
    start = rss_kib()
    phase(measured, cursor)
    assert pipe.wait_idle()
    end = rss_kib()
    requests = pipe.stats()["requests"]
    pipe.close()
    assert requests == threads_n * (warm_up + measured)
    assert end - start < 32 << 10, f"RSS grew by {end - start} KiB after warm-up"


def test_worker_panics_degrade_to_on_demand_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rx = Receiver(KEY)
    bufs = [bytes([i]) * 4096 for i in range(6)]
    with Pipeline(KEY, slots=4, chunk_bytes=4096, workers=2) as pipe:
        pipe._inject_worker_panics(speculative=3, on_demand=1)
        pipe.predict(bufs)
        t0 = time.monotonic()
        while pipe.stats()["worker_failures"] + pipe.stats()["chunks_pre_encrypted"] < 4:
            assert time.monotonic() - t0 < 20
            time.sleep(0.001)
        with caplog.at_level(logging.WARNING, logger="pipellm"):
            for b in bufs:
                assert deliver(rx, pipe.request(b), 4096) == b
        assert pipe.stats()["worker_failures"] >= 3
        assert any("encryption thread failed" in r.message for r in caplog.records)


def test_closed_pipeline_raises_and_close_is_idempotent() -> None:
    pipe = Pipeline(KEY, slots=2, chunk_bytes=1024)
    data = bytes(4096)
    t = pipe.request(data)
    pipe.close()
    pipe.close()
    assert pipe.closed
    with pytest.raises(PipelineClosedError):
        pipe.request(data)
    with pytest.raises(PipelineClosedError):
        pipe.predict([data])
    assert len(t.messages()) == 4, "a transfer made before close still completes"


def test_predicted_source_cannot_be_resized_while_held() -> None:
    b = bytearray(8192)
    with Pipeline(KEY, slots=2, chunk_bytes=4096) as pipe:
        pipe.predict([b])
        with pytest.raises(BufferError):
            b.extend(b"x")  # the pipeline holds a view: the memory stays where it was
    b.extend(b"x")  # released on close


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="slots"):
        Pipeline(KEY, slots=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        Pipeline(KEY, chunk_bytes=8)
    with pytest.raises(ValueError, match="max_staging_bytes"):
        Pipeline(KEY, slots=4, chunk_bytes=1 << 20, max_staging_bytes=1 << 20)
    with pytest.raises(ValueError, match="workers"):
        Pipeline(KEY, workers=-1)
    with Pipeline(KEY, slots=2, chunk_bytes=1024) as pipe:
        with pytest.raises(ValueError, match="beyond the end"):
            pipe.request(bytes(100), 50, 51)
        with pytest.raises(ValueError, match="offset"):
            pipe.request(bytes(100), -1)
        with pytest.raises(ValueError, match="tuple"):
            pipe.predict([(bytes(10), 0)])
        with pytest.raises(TypeError, match="transfers\\[0\\]"):
            pipe.predict([12])
        with pytest.raises(ValueError, match="beyond the end"):
            pipe.predict([bytes(10), (bytes(10), 5, 6)])
        assert pipe.queued() == (0, 0), "a refused predict queues nothing"


def test_caller_provided_staging_buffers() -> None:
    bufs = [np.zeros(4096, dtype=np.uint8) for _ in range(3)]
    rx = Receiver(KEY)
    src = bytes(range(256)) * 16
    with Pipeline(KEY, slots=99, chunk_bytes=4096, workers=1, staging=bufs) as pipe:
        pipe.predict([src])
        wait_for(pipe, "chunks_pre_encrypted", 1)
        msgs = pipe.request(src).messages()
        ct = bytes(msgs[0].ciphertext)
        assert any(b.tobytes() == ct for b in bufs), "the ciphertext lives in a caller buffer"
        assert deliver(rx, msgs, 4096) == src
    with pytest.raises(ValueError, match="staging buffer 0"):
        Pipeline(KEY, chunk_bytes=4096, staging=[bytearray(100)])
    with pytest.raises(TypeError, match="read-only"):
        Pipeline(KEY, chunk_bytes=16, staging=[bytes(100)])
