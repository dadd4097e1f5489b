"""Hostile arguments: the CLI and the Python API refuse them with one clean, typed error that
names the argument, never a traceback, an abort, a panic, a huge allocation or wrong bytes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import pipellm
from pipellm import HostPool, LearnedPredictor, Message, Pipeline, Receiver, Sender, SessionKey

KEY = SessionKey(bytes(range(32)))

# ---------------------------------------------------------------- 1. CLI validation

BAD_CLI = [
    ["bench", "--link-gbps", "0"],
    ["bench", "--link-gbps", "-4"],
    ["bench", "--link-gbps", "nan"],
    ["bench", "--link-gbps", "inf"],
    ["bench", "--link-gbps", "fast"],
    ["bench", "--max-layers", "-1"],
    ["bench", "--workers", "-1"],
    ["bench", "--workers", "0"],
    ["bench", "--workers", "5000"],
    ["bench", "--steps", "0"],
    ["bench", "--distinct-layers", "0"],
    ["bench", "--depth", "-1"],
    ["bench", "--rounds", "0"],
    ["bench", "--iterations", "0"],
    ["bench", "--rank", "0"],
    ["bench", "--rank", "100000"],
    ["bench", "--chunk-mib", "-1"],
    ["bench", "--workers", "2.5"],
    ["soak", "--seed", "-5"],
    ["soak", "--seconds", "nan"],
    ["soak", "--seconds", "-1"],
    ["soak", "--threads", "0"],
    ["soak", "--ops", "0"],
    ["run", "--workers", "-1", "--", "true"],
    ["run", "--depth", "0", "--", "true"],
]


@pytest.mark.parametrize("argv", BAD_CLI, ids=lambda a: " ".join(a))
def test_cli_rejects_bad_numbers_with_a_usage_error(argv: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pipellm.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert r.stdout == "", "nothing runs"
    # argparse's own error path: usage, then one error line naming the option
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pipellm ") and "error: argument" in last and argv[1] in last, last


def test_cli_keeps_zero_meaning_default() -> None:
    from pipellm import cli

    # --max-layers 0 means all layers, --depth 0 and --chunk-mib 0 the workload's default:
    # they still parse (parsing is all that is checked here; nothing runs).
    ap_args = ["bench", "--max-layers", "0", "--depth", "0", "--chunk-mib", "0"]
    parsed: dict[str, object] = {}

    def fake_dispatch(args: object) -> int:
        parsed.update(vars(args))
        return 0

    orig = cli._dispatch
    cli._dispatch = fake_dispatch  # type: ignore[assignment]
    try:
        assert cli.main(ap_args) == 0
    finally:
        cli._dispatch = orig  # type: ignore[assignment]
    assert parsed["max_layers"] == 0 and parsed["depth"] == 0 and parsed["chunk_mib"] == 0


# ---------------------------------------------------------------- 2. aborts and panics


RAISES = """
def raises(f):
    try:
        f()
    except BaseException as e:
        print(type(e).__name__, "|", isinstance(e, ValueError), "|", e)
    else:
        print("no error")
"""


def _child(code: str) -> str:
    """Runs `code` in a fresh interpreter (an abort kills it, not pytest); returns stdout."""
    r = subprocess.run(
        [sys.executable, "-c", "import pipellm\n" + RAISES + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RUST_BACKTRACE": "0"},
    )
    assert r.returncode == 0, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    return r.stdout.strip()


@pytest.mark.parametrize(
    ("expr", "word"),
    [
        ("pipellm.LearnedPredictor().predict(2**40)", "n"),
        ("pipellm.LearnedPredictor().predict(2**61)", "n"),
        ("pipellm.LearnedPredictor(history=2**40)", "history"),
        ("pipellm.LearnedPredictor(history=2**62)", "history"),
        ("pipellm.LearnedPredictor(history=pipellm.MAX_HISTORY + 1)", "history"),
        ("pipellm.LearnedPredictor().predict(pipellm.MAX_PREDICT + 1)", "n"),
    ],
)
def test_predictor_sizes_are_bounded(expr: str, word: str) -> None:
    out = _child(f"raises(lambda: {expr})")
    name, is_value_error, msg = out.split(" | ")
    assert is_value_error == "True", out
    assert "Panic" not in name and msg.startswith(word + " "), out


def test_predictor_at_its_bounds_works() -> None:
    out = _child(
        """
        p = pipellm.LearnedPredictor(history=pipellm.MAX_HISTORY)
        for k in [1, 2, 3] * 4:
            p.observe(k)
        print(len(p.predict(pipellm.MAX_PREDICT)))
        """
    )
    assert out == str(pipellm.MAX_PREDICT)


def test_speculator_depth_is_bounded() -> None:
    out = _child(
        """
        p = pipellm.Pipeline(pipellm.SessionKey(bytes(32)), slots=2, chunk_bytes=4096)
        def go():
            s = pipellm.Speculator(p, pipellm.Learned(), depth=2**40)
            for m in s.request("a", bytes(4096)):
                pass
        raises(go)
        """
    )
    assert out.startswith("ValueError | True | depth"), out


def test_tiny_chunks_of_a_huge_request_are_refused() -> None:
    out = _child(
        """
        p = pipellm.Pipeline(pipellm.SessionKey(bytes(32)), slots=4, chunk_bytes=16, workers=0)
        big = bytes(128 << 20)
        raises(lambda: p.request(big))
        raises(lambda: p.predict([big]))
        raises(lambda: p.predict([bytes(1 << 20)] * 2))
        """
    )
    lines = out.splitlines()
    assert len(lines) == 3, out
    for line in lines:
        assert line.startswith("ValueError | True |") and "chunks" in line, out
    assert str(pipellm.MAX_TRANSFER_CHUNKS) in lines[0]


def test_staging_cap_counts_whole_pages_per_slot() -> None:
    out = _child(
        """
        k = pipellm.SessionKey(bytes(32))
        raises(lambda: pipellm.Pipeline(k, slots=65536, chunk_bytes=16, max_staging_bytes=1 << 20))
        p = pipellm.Pipeline(k, slots=256, chunk_bytes=16, max_staging_bytes=1 << 20)
        print(p)
        """
    )
    first, second = out.splitlines()
    assert first.startswith("ValueError | True |") and "max_staging_bytes" in first, out
    assert second.startswith("Pipeline(")


# ---------------------------------------------------------------- 3. overlapping pool writes


@pytest.mark.parametrize(
    ("dst", "src", "n"),
    [(100, 0, 4096), (0, 100, 4096), (4096, 0, 8192), (7, 7, 100), (1, 0, 3 * 4096 - 1)],
)
def test_host_pool_write_from_its_own_view_is_a_memmove(dst: int, src: int, n: int) -> None:
    pool = HostPool(3 * 4096)
    pool.write(0, os.urandom(3 * 4096))
    view = memoryview(pool)
    expected = bytearray(view)
    expected[dst : dst + n] = expected[src : src + n]
    pool.write(dst, view[src : src + n])
    assert bytes(view) == bytes(expected)


def test_host_pool_write_from_a_copy_still_works() -> None:
    pool = HostPool(8192)
    data = os.urandom(5000)
    pool.write(100, data)
    assert bytes(memoryview(pool)[100:5100]) == data


# ---------------------------------------------------------------- 4. aliased staging buffers


def test_staging_buffers_must_not_overlap() -> None:
    buf = bytearray(4096)
    with pytest.raises(ValueError, match="staging buffers 0 and 1 overlap"):
        Pipeline(KEY, chunk_bytes=4096, staging=[buf] * 4)
    big = bytearray(3 * 4096)
    mv = memoryview(big)
    with pytest.raises(ValueError, match="staging buffers 0 and 2 overlap"):
        Pipeline(KEY, chunk_bytes=4096, staging=[mv[0:4096], mv[8192:], mv[4000:8096]])
    # Adjacent is fine.
    Pipeline(KEY, chunk_bytes=4096, staging=[mv[0:4096], mv[4096:8192], mv[8192:]]).close()


def test_a_source_must_not_overlap_a_staging_buffer() -> None:
    bufs = [bytearray(4096) for _ in range(2)]
    with Pipeline(KEY, chunk_bytes=4096, workers=1, staging=bufs) as pipe:
        with pytest.raises(ValueError, match="staging buffer 1"):
            pipe.request(bufs[1])
        with pytest.raises(ValueError, match="staging buffer 0"):
            pipe.predict([memoryview(bufs[0])[100:200]])
        with pytest.raises(ValueError, match="staging buffer 0"):
            pipe.request(memoryview(bufs[0]), 4000, 96)
        assert pipe.stats()["requests"] == 0
        # Other memory streams as before; the receiver accepts it.
        rx = Receiver(KEY)
        src = os.urandom(3 * 4096)
        out = bytearray(len(src))
        for m in pipe.request(src):
            rx.open_into(m, memoryview(out)[m.offset : m.offset + len(m)])
        assert bytes(out) == src


def test_the_receiver_accepts_what_a_pipeline_over_distinct_staging_sends() -> None:
    bufs = [bytearray(4096) for _ in range(4)]
    rx = Receiver(KEY)
    src = os.urandom(4 * 4096)
    out = bytearray(len(src))
    with Pipeline(KEY, chunk_bytes=4096, workers=1, staging=bufs) as pipe:
        pipe.predict([src])
        pipe.wait_idle()
        for m in pipe.request(src):
            rx.open_into(m, memoryview(out)[m.offset : m.offset + len(m)])
    assert bytes(out) == src


# ---------------------------------------------------------------- 5. error types


def _pool_write(off: object) -> None:
    HostPool(4096).write(off, b"x")  # type: ignore[arg-type]


def _msg(off: object) -> None:
    Message.from_bytes(Sender(KEY).seal(b"abc").to_bytes(), off)  # type: ignore[arg-type]


def _req(**kw: object) -> None:
    with Pipeline(KEY, slots=2, chunk_bytes=4096, workers=0) as p:
        p.request(bytes(100), **kw)  # type: ignore[arg-type]


OUT_OF_RANGE = [
    ("channel", lambda v: Sender(KEY, channel=v)),
    ("channel", lambda v: Receiver(KEY, channel=v)),
    ("channel", lambda v: Pipeline(KEY, channel=v)),
    ("usage_limit", lambda v: Sender(KEY, usage_limit=v)),
    ("usage_limit", lambda v: Pipeline(KEY, usage_limit=v)),
    ("slots", lambda v: Pipeline(KEY, slots=v)),
    ("chunk_bytes", lambda v: Pipeline(KEY, chunk_bytes=v)),
    ("workers", lambda v: Pipeline(KEY, workers=v)),
    ("max_staging_bytes", lambda v: Pipeline(KEY, max_staging_bytes=v)),
    ("keep_armed", lambda v: Pipeline(KEY, keep_armed=v)),
    ("nbytes", lambda v: HostPool(v)),
    ("offset", _pool_write),
    ("offset", lambda v: _req(offset=v)),
    ("length", lambda v: _req(length=v)),
    ("offset", _msg),
    ("key", lambda v: LearnedPredictor().observe(v)),
    ("n", lambda v: LearnedPredictor().predict(v)),
    ("history", lambda v: LearnedPredictor(history=v)),
    ("max_period", lambda v: LearnedPredictor(max_period=v)),
]


@pytest.mark.parametrize("value", [-1, -(2**70), 2**64, 2**200])
@pytest.mark.parametrize(("name", "call"), OUT_OF_RANGE, ids=[n for n, _ in OUT_OF_RANGE])
def test_out_of_range_ints_are_value_errors_naming_the_argument(
    name: str, call: object, value: int
) -> None:
    with pytest.raises(ValueError) as e:
        call(value)  # type: ignore[operator]
    assert str(e.value).startswith(name + " "), str(e.value)
    # The class is also an OverflowError, which such values raised before.
    assert isinstance(e.value, pipellm.ArgumentRangeError)
    assert isinstance(e.value, OverflowError)


@pytest.mark.parametrize("value", [1.5, "3", None, b"1"])
@pytest.mark.parametrize(("name", "call"), OUT_OF_RANGE, ids=[n for n, _ in OUT_OF_RANGE])
def test_non_ints_are_type_errors_naming_the_argument(
    name: str, call: object, value: object
) -> None:
    if value is None and name == "length":
        pytest.skip("length=None means: to the end")
    with pytest.raises(TypeError) as e:
        call(value)  # type: ignore[operator]
    assert str(e.value).startswith(name + " must be an int"), str(e.value)


def test_predict_offsets_name_the_problem() -> None:
    with Pipeline(KEY, slots=2, chunk_bytes=4096, workers=0) as p:
        with pytest.raises(ValueError, match="beyond the end"):
            p.predict([(bytes(10), 2**63, None)])
        with pytest.raises(ValueError, match=r"transfers\[0\] offset must be at most"):
            p.predict([(bytes(10), 2**64, None)])
        with pytest.raises(ValueError, match=r"transfers\[1\] length must be >= 0"):
            p.predict([bytes(10), (bytes(10), 0, -1)])
        with pytest.raises(TypeError, match=r"transfers\[0\] offset must be an int"):
            p.predict([(bytes(10), 1.5, None)])


def test_ints_in_range_and_index_types_still_work() -> None:
    import numpy as np

    assert len(HostPool(np.int64(4096))) == 4096
    p = LearnedPredictor(history=np.uint32(16))
    p.observe(2**64 - 1)
    p.observe(2**64 - 1)
    p.observe(2**64 - 1)
    assert p.predict(np.int8(2)) == [2**64 - 1] * 2
    m = Message.from_bytes(Sender(KEY).seal(b"abc").to_bytes(), 2**64 - 1)
    assert m.offset == 2**64 - 1


# ---------------------------------------------------------------- 6. failed request, no hole

CB = 4096
UNITS = CB // 16 + 1  # one data message of CB bytes


def _deliver(rx: Receiver, msgs: list[Message], dst: bytearray) -> None:
    for m in msgs:
        if m.is_nop:
            rx.open(m)
        else:
            rx.open_into(m, memoryview(dst)[m.offset : m.offset + len(m)])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("then", ["request", "relinquish"])
def test_a_request_failing_part_way_leaves_the_stream_deliverable(workers: int, then: str) -> None:
    # Room for 5 chunks and one 16-byte message: the second 3-chunk request fails at its third.
    limit = 5 * UNITS + 2
    rx = Receiver(KEY, usage_limit=limit, rotate=False)
    src, dst = bytearray(os.urandom(3 * CB)), bytearray(3 * CB)
    with Pipeline(
        KEY, slots=2, chunk_bytes=CB, workers=workers, usage_limit=limit, rotate=False
    ) as p:
        _deliver(rx, list(p.request(src)), dst)
        assert dst == src
        with pytest.raises(pipellm.IvExhaustedError):
            p.request(src)
        if then == "relinquish":
            nops = p.relinquish()
            assert len(nops) == 2 and all(m.is_nop for m in nops)
            _deliver(rx, nops, dst)
        small, out = bytearray(b"s" * 16), bytearray(16)
        msgs = list(p.request(small))
        # The failed request's two positions lead as NOPs (unless relinquish sent them).
        assert [m.is_nop for m in msgs] == [True, True, False][2 if then == "relinquish" else 0 :]
        _deliver(rx, msgs, out)
        assert out == small
        _deliver(rx, p.relinquish(), out)
        assert rx.expected_counter == 6
        with pytest.raises(pipellm.IvExhaustedError):
            p.request(small)  # nothing left, and nothing consumed by trying
        assert p.relinquish() == []


def test_hits_of_a_failed_request_become_nops() -> None:
    # Two speculative positions (2 * 2 * UNITS) and less than one more chunk: the third chunk
    # of the request can neither be predicted nor encrypted on demand.
    limit = 4 * UNITS + UNITS - 1
    rx = Receiver(KEY, usage_limit=limit, rotate=False)
    src = bytearray(os.urandom(3 * CB))
    with Pipeline(KEY, slots=2, chunk_bytes=CB, workers=2, usage_limit=limit, rotate=False) as p:
        p.predict([src])
        assert p.wait_idle()
        with pytest.raises(pipellm.IvExhaustedError):
            p.request(src)
        small, out = bytearray(b"t" * 16), bytearray(16)
        msgs = list(p.request(small))
        assert [m.is_nop for m in msgs] == [True, True, False]
        _deliver(rx, msgs, out)
        assert out == small
        assert p.stats()["hits"] == 2


# ---------------------------------------------------------------- 7. sources released once consumed


@pytest.mark.parametrize("validation", ["fingerprint", "protect"])
@pytest.mark.parametrize("predicted", [False, True])
def test_a_consumed_source_can_be_resized_at_once(validation: str, predicted: bool) -> None:
    with Pipeline(KEY, slots=4, chunk_bytes=CB, workers=2, validation=validation) as p:
        for _ in range(3):
            b = bytearray(os.urandom(3 * CB))
            if predicted:
                p.predict([b])
                assert p.wait_idle()
            t = p.request(b)
            for _m in t:
                pass
            del b[-1]  # no BufferError: the pipeline let go of its view
            b.extend(b"xy")
            del t
        if predicted:
            # With page protection a write to a heap page the bytearray shares makes a hit stale.
            s = p.stats()
            assert s["hits"] + s["stale"] == 9


def test_a_dropped_transfer_releases_its_source() -> None:
    with Pipeline(KEY, slots=4, chunk_bytes=CB, workers=2) as p:
        b = bytearray(os.urandom(3 * CB))
        p.predict([b])
        assert p.wait_idle()
        t = p.request(b)
        next(t)
        del t  # two messages never taken
        b.extend(b"x")


@pytest.mark.parametrize("predicted", [False, True])
def test_a_consumed_numpy_source_is_freed(predicted: bool) -> None:
    import gc
    import weakref

    import numpy as np

    with Pipeline(KEY, slots=4, chunk_bytes=CB, workers=2) as p:
        a = np.arange(3 * CB // 8, dtype=np.int64)
        ref = weakref.ref(a)
        if predicted:
            p.predict([a])
            assert p.wait_idle()
        msgs = list(p.request(a))
        assert len(msgs) == 3
        del a
        gc.collect()
        assert ref() is None, "the pipeline still holds the array"


# ---------------------------------------------------------------- 8. fork

FORK_SCRIPT = r"""
import os, sys, threading
import pipellm
from pipellm import Pipeline, Receiver, SessionKey

key = SessionKey(bytes(range(32)))
cb = 1 << 16
p = Pipeline(key, slots=8, chunk_bytes=cb, workers=2)
rx = Receiver(key)
srcs = [bytearray(os.urandom(8 * cb)) for _ in range(4)]
dst = bytearray(8 * cb)
stop = False


def busy() -> None:
    # Keeps the workers encrypting (and the pipeline's locks taken) while the parent forks.
    i = 0
    while not stop:
        s = srcs[i % 4]
        p.predict([srcs[(i + 1) % 4]])
        for m in p.request(s):
            if m.is_nop:
                rx.open(m)
            else:
                rx.open_into(m, memoryview(dst)[m.offset : m.offset + len(m)])
        assert dst == s
        i += 1


t = threading.Thread(target=busy)
t.start()
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            p.request(srcs[0])
        except pipellm.PipelineClosedError as e:
            code = 0 if "belongs to process %d" % os.getppid() in str(e) else 4
        except BaseException:
            code = 5
        try:
            p.close()
            assert p.closed
        except BaseException:
            code = 6
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
stop = True
t.join()
for m in p.request(srcs[0]):  # the parent's pipeline still works
    if m.is_nop:
        rx.open(m)
    else:
        rx.open_into(m, memoryview(dst)[m.offset : m.offset + len(m)])
assert dst == srcs[0]
p.close()
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_a_clear_error_and_never_hangs_or_panics() -> None:
    r = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", FORK_SCRIPT, "40"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    assert r.stdout.strip() == "ok"
    assert "PanicException" not in r.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_exits_normally_with_its_inherited_pipeline() -> None:
    # A normal interpreter exit in the child drops the pipeline, its Transfer and messages.
    script = textwrap.dedent(
        """
        import os, sys
        from pipellm import Pipeline, SessionKey
        p = Pipeline(SessionKey(bytes(range(32))), slots=4, chunk_bytes=4096, workers=2)
        b = bytearray(os.urandom(3 * 4096))
        p.predict([b])
        t = p.request(b)
        m = next(t)
        pid = os.fork()
        if pid == 0:
            q = Pipeline(SessionKey(bytes(range(32))), slots=2, chunk_bytes=4096, workers=1)
            assert len(list(q.request(b))) == 3  # a new pipeline works in the child
            q.close()
            sys.exit(0)  # normal exit: p, t and m are dropped
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        print("ok", len(list(t)))
        """
    )
    r = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    assert r.stdout.strip() == "ok 2"
    assert "PanicException" not in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- 9. Ctrl-C in messages()

INTERRUPT_SCRIPT = r"""
import os, signal, threading
from pipellm import Pipeline, Receiver, SessionKey

key = SessionKey(bytes(range(32)))
cb = 1 << 14
src = os.urandom(4096 * cb)  # 4096 chunks, each encrypted on demand (no workers)
p = Pipeline(key, slots=4, chunk_bytes=cb, workers=0)
t = p.request(src)
total = len(t)


def interrupt_once_started() -> None:
    # Waits for messages() to have taken a message, then presses Ctrl-C.
    while t.remaining == total:
        pass
    os.kill(os.getpid(), signal.SIGINT)


threading.Thread(target=interrupt_once_started).start()
try:
    t.messages()
    raise SystemExit("messages() ran to the end through Ctrl-C")
except KeyboardInterrupt:
    pass
# Nothing is lost: the messages taken before the interrupt are held (still counted as
# remaining) and come first from the next call; a lost one would be a gap the receiver
# refuses.
assert t.remaining == total, (t.remaining, total)
msgs = t.messages()
assert len(msgs) == total and t.remaining == 0
rx = Receiver(key)
out = bytearray(len(src))
for m in msgs:
    rx.open_into(m, memoryview(out)[m.offset : m.offset + len(m)])
assert out == src
p.close()
"""


def test_ctrl_c_interrupts_messages_and_loses_nothing() -> None:
    r = subprocess.run(
        [sys.executable, "-c", INTERRUPT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
