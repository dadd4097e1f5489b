"""Write watches kept armed between uses (`keep_armed`) and `HostPool` (sources rewritten
through a second mapping): both save `mprotect` calls without ever delivering stale bytes."""

from __future__ import annotations

import mmap
import time

import numpy as np
import pytest

import pipellm
from pipellm import HostPool, Pipeline, Receiver, Sender, SessionKey

KEY = SessionKey(bytes(range(32)))
CHUNK = 64 << 10


def deliver(rx: Receiver, messages: object, total: int) -> bytes:
    out = bytearray(b"\xee" * total)
    view = memoryview(out)
    for m in messages:  # type: ignore[attr-defined]
        rx.open_into(m, view[m.offset : m.offset + len(m)])
    return bytes(out)


def own_pages(nbytes: int, value: int = 0) -> np.ndarray:
    """An array on pages of its own (an anonymous mapping). A heap allocation, even a large
    one, may share its first and last pages with other objects once malloc's mmap threshold
    has grown (a test run frees large buffers), and their writes would count as writes to the
    protected chunks there, whenever they happen to come."""
    a = np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=np.uint8)
    a[:] = value
    return a


def wait_for(pipe: Pipeline, key: str, n: int) -> None:
    t0 = time.monotonic()
    while pipe.stats()[key] < n:  # type: ignore[literal-required]
        assert time.monotonic() - t0 < 20, f"{key} stuck at {pipe.stats()}"
        time.sleep(0.001)


def cycle(pipe: Pipeline, rx: Receiver, src: object, expected: bytes) -> dict[str, int]:
    """Predicts `src`, waits for its chunks, requests it; returns the stats' increments."""
    before = pipe.stats()
    n = -(-len(expected) // CHUNK)
    pipe.predict([src])
    wait_for(pipe, "chunks_pre_encrypted", before["chunks_pre_encrypted"] + n)
    assert deliver(rx, pipe.request(src), len(expected)) == expected
    # Consumed entries hand their watches back on the planner thread.
    wait_for(pipe, "watches_kept", n)
    after = pipe.stats()
    return {k: after[k] - before[k] for k in ("hits", "stale", "watches_reused")}  # type: ignore[literal-required]


def test_kept_watches_skip_rearming_and_python_writes_between_uses_are_caught() -> None:
    rx = Receiver(KEY)
    a = own_pages(8 * CHUNK)
    with Pipeline(
        KEY, slots=8, chunk_bytes=CHUNK, workers=1, validation="protect", keep_armed=8
    ) as pipe:
        assert cycle(pipe, rx, a, a.tobytes()) == {"hits": 8, "stale": 0, "watches_reused": 0}
        assert cycle(pipe, rx, a, a.tobytes()) == {"hits": 8, "stale": 0, "watches_reused": 8}
        a[3 * CHUNK + CHUNK // 2] = 7  # read-only between uses: faults, is recorded
        assert a[3 * CHUNK + CHUNK // 2] == 7
        assert cycle(pipe, rx, a, a.tobytes()) == {"hits": 8, "stale": 0, "watches_reused": 7}
        assert pipe.unwatch(a) == 8
        assert pipe.stats()["watches_kept"] == 0
    a[0] = 1


def test_without_keep_armed_nothing_stays_protected() -> None:
    rx = Receiver(KEY)
    a = np.zeros(4 * CHUNK, dtype=np.uint8)
    with Pipeline(KEY, slots=4, chunk_bytes=CHUNK, workers=1, validation="protect") as pipe:
        pipe.predict([a])
        wait_for(pipe, "chunks_pre_encrypted", 4)
        assert deliver(rx, pipe.request(a), a.nbytes) == a.tobytes()
        assert pipe.stats()["watches_kept"] == 0
        assert pipe.unwatch(a) == 0


def test_keep_armed_is_checked() -> None:
    with pytest.raises(ValueError, match="page protection"):
        Pipeline(KEY, slots=2, chunk_bytes=CHUNK, keep_armed=2)
    with pytest.raises(ValueError, match="keep_armed"):
        Pipeline(
            KEY,
            slots=2,
            chunk_bytes=CHUNK,
            validation="protect",
            keep_armed=pipellm.MAX_KEEP_ARMED + 1,
        )
    with pytest.raises(ValueError, match="keep_armed"):
        Pipeline(KEY, slots=2, chunk_bytes=CHUNK, validation="protect", keep_armed=-1)


def test_pool_is_read_only_as_a_buffer_and_written_through_its_methods() -> None:
    pool = HostPool(3 * 4096 + 100)
    assert len(pool) == pool.nbytes == 3 * 4096 + 100
    view = np.frombuffer(memoryview(pool), dtype=np.uint8)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0] = 1
    assert memoryview(pool).readonly
    pool.write(4096 - 2, b"\x01\x02\x03\x04")
    assert view[4094:4098].tolist() == [1, 2, 3, 4]
    pool.write(pool.nbytes - 1, np.array([9], dtype=np.uint8))
    assert view[-1] == 9
    with pytest.raises(ValueError, match="beyond"):
        pool.write(pool.nbytes - 1, b"ab")
    with pytest.raises(ValueError, match="offset"):
        pool.write(-1, b"a")
    with pytest.raises(ValueError):
        HostPool(0)
    assert "HostPool" in repr(pool)


def test_pool_writes_invalidate_pre_encrypted_chunks_without_faults() -> None:
    rx = Receiver(KEY)
    pool = HostPool(4 * CHUNK)
    pool.write(0, np.arange(4 * CHUNK, dtype=np.uint32).astype(np.uint8))
    src = memoryview(pool)[CHUNK : 3 * CHUNK]  # two chunks in the middle of the pool
    current = lambda: bytes(src)  # noqa: E731
    with Pipeline(
        KEY, slots=4, chunk_bytes=CHUNK, workers=1, validation="protect", keep_armed=4
    ) as pipe:
        assert cycle(pipe, rx, src, current()) == {"hits": 2, "stale": 0, "watches_reused": 0}
        # Rewritten between uses through the pool: no fault, so the watches stay armed
        # (reused), and the chunks are encrypted afresh from the new bytes.
        pool.write(CHUNK + 10, b"\xff" * 3)
        pool.write(2 * CHUNK + 10, b"\xfe" * 3)
        assert cycle(pipe, rx, src, current()) == {"hits": 2, "stale": 0, "watches_reused": 2}
        # Rewritten after the chunks were encrypted: caught at request time (stale).
        before = pipe.stats()
        pipe.predict([src])
        wait_for(pipe, "chunks_pre_encrypted", before["chunks_pre_encrypted"] + 2)
        pool.write(2 * CHUNK + 500, b"\x00\x11")
        assert deliver(rx, pipe.request(src), 2 * CHUNK) == current()
        after = pipe.stats()
        assert (after["hits"] - before["hits"], after["stale"] - before["stale"]) == (1, 1)
        assert after["watches_reused"] - before["watches_reused"] == 2
        # Writes elsewhere in the pool leave the chunks valid.
        before = after
        pipe.predict([src])
        wait_for(pipe, "chunks_pre_encrypted", before["chunks_pre_encrypted"] + 2)
        pool.write(0, b"\x42" * 100)
        pool.write(3 * CHUNK, b"\x42" * 100)
        assert deliver(rx, pipe.request(src), 2 * CHUNK) == current()
        assert pipe.stats()["hits"] - before["hits"] == 2


def test_receive_into_writes_only_verified_plaintext() -> None:
    key = SessionKey.generate()
    tx, rx = Sender(key, direction="d2h"), Receiver(key, direction="d2h")
    pool = HostPool(2 * 4096)
    view = np.frombuffer(memoryview(pool), dtype=np.uint8)
    m = tx.seal(b"kv block" * 100)
    pool.receive_into(rx, m, 4096)
    assert bytes(view[4096 : 4096 + 800]) == b"kv block" * 100
    # A tampered message is refused and the pool keeps its bytes.
    good = tx.seal(b"\x01" * 800)
    wire = bytearray(good.to_bytes())
    wire[-1] ^= 1
    bad = pipellm.Message.from_bytes(bytes(wire))
    with pytest.raises(pipellm.AuthenticationError):
        pool.receive_into(rx, bad, 4096)
    assert bytes(view[4096 : 4096 + 800]) == b"kv block" * 100
    pool.receive_into(rx, good, 0)  # the genuine one is still the next expected
    assert bytes(view[:800]) == b"\x01" * 800
    with pytest.raises(ValueError, match="beyond"):
        pool.receive_into(rx, tx.seal(b"x" * 10), pool.nbytes - 5)


def test_a_forked_child_does_not_inherit_the_pool() -> None:
    import os
    import signal

    pool = HostPool(4096)
    pool.write(0, b"secret")
    pid = os.fork()
    if pid == 0:  # the child: the pool's pages are not mapped here
        import faulthandler

        faulthandler.disable()  # the expected crash needs no traceback on stderr
        try:
            bytes(memoryview(pool)[:6])
        finally:
            os._exit(0)  # reached only if the read did not fault
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV, status
    assert bytes(memoryview(pool)[:6]) == b"secret"


def test_speculator_forget_releases_kept_chunks() -> None:
    from pipellm import LayerCycle, Speculator

    rx = Receiver(KEY)
    layers = [own_pages(2 * CHUNK, i) for i in range(3)]
    with Pipeline(
        KEY, slots=8, chunk_bytes=CHUNK, workers=1, validation="protect", keep_armed=16
    ) as pipe:
        spec = Speculator(pipe, LayerCycle(list(range(3))), depth=2)
        for i, layer in enumerate(layers):
            spec.register(i, layer)
        spec.prime()
        for _ in range(2):
            for i, layer in enumerate(layers):
                assert pipe.wait_idle()  # the worker pre-encrypted the predicted layers
                assert deliver(rx, spec.request(i, layer), layer.nbytes) == layer.tobytes()
        s = pipe.stats()
        assert (s["hits"], s["late"], s["misses"]) == (12, 0, 0), s  # 6 layers of 2 chunks
        # Layers 0 and 1 are predicted again (their chunks' watches are in the ring); layer
        # 2's two chunks are kept armed until it is predicted next. Consumed entries are
        # retired to the planner; wait_idle drops them, so their watches are kept by then.
        assert pipe.wait_idle()
        assert pipe.stats()["watches_kept"] == 2
        spec.forget(2)
        assert pipe.stats()["watches_kept"] == 0
        spec.forget(2)  # unknown now: nothing happens
        assert pipe.stats()["watches_kept"] == 0
