"""The secure channel through the Python API: round trips, every buffer type, every error."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

import pipellm
from pipellm import (
    AuthenticationError,
    IvExhaustedError,
    IvOrderError,
    PipeLLMError,
    Receiver,
    Sender,
    SessionKey,
)


def pair(key: SessionKey, **kw: Any) -> tuple[Sender, Receiver]:
    return Sender(key, **kw), Receiver(key, **kw)


# ---------------------------------------------------------------- round trips, buffer types

SOURCES = {
    "bytes": lambda: b"\x01\x02weights" * 100,
    "bytearray": lambda: bytearray(range(256)) * 5,
    "memoryview": lambda: memoryview(bytearray(b"kv-block" * 64)),
    "memoryview-slice": lambda: memoryview(bytearray(4096))[100:900],
    "numpy-u8": lambda: np.arange(1000, dtype=np.uint8),
    "numpy-f32-2d": lambda: np.random.default_rng(0).standard_normal((64, 33)).astype(np.float32),
    "numpy-f16": lambda: np.linspace(0, 1, 777, dtype=np.float16),
    "empty": lambda: b"",
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_seal_open_roundtrip_every_source_type(key: SessionKey, kind: str) -> None:
    tx, rx = pair(key)
    src = SOURCES[kind]()
    expected = bytes(memoryview(src).cast("B")) if not isinstance(src, bytes) else src
    m = tx.seal(src)
    assert len(m) == len(expected)
    assert m.counter == 0 and m.epoch == 0 and not m.is_nop
    assert len(m.iv) == 12 and len(m.tag) == 16
    if expected:
        assert bytes(m.ciphertext) != expected
    assert rx.open(m) == expected


@pytest.mark.parametrize(
    "make_dst",
    [
        lambda n: bytearray(n),
        lambda n: np.zeros(n, dtype=np.uint8),
        lambda n: memoryview(bytearray(n)),
        lambda n: np.zeros(n // 4, dtype=np.float32),
    ],
    ids=["bytearray", "numpy", "memoryview", "numpy-f32"],
)
def test_open_into_every_destination_type(key: SessionKey, make_dst: Any) -> None:
    tx, rx = pair(key)
    src = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)
    dst = make_dst(4096)
    rx.open_into(tx.seal(src), dst)
    assert bytes(memoryview(dst).cast("B")) == src.tobytes()


def test_torch_tensors_as_source_and_destination(key: SessionKey, torch: Any) -> None:
    tx, rx = pair(key)
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.uint8):
        src = (torch.arange(1000) % 97).to(dtype).reshape(10, 100)
        dst = torch.empty_like(src)
        rx.open_into(tx.seal(src), dst)
        assert torch.equal(src, dst)


def test_non_contiguous_torch_tensor_is_rejected(key: SessionKey, torch: Any) -> None:
    tx = Sender(key)
    t = torch.arange(100, dtype=torch.float32).reshape(10, 10).t()
    with pytest.raises(ValueError, match="contiguous"):
        tx.seal(t)
    assert tx.next_counter == 0, "a refused call must not consume an IV"


def test_message_ciphertext_is_read_only_and_outlives_message(key: SessionKey) -> None:
    m = Sender(key).seal(b"x" * 100)
    view = m.ciphertext
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1  # type: ignore[index]
    snapshot = bytes(view)
    del m
    assert bytes(view) == snapshot


def test_wire_roundtrip(key: SessionKey) -> None:
    tx, rx = pair(key)
    m = tx.seal(b"payload")
    wire = m.to_bytes()
    assert len(wire) == pipellm.HEADER_LEN + 16 + 7
    m2 = pipellm.Message.from_bytes(wire)
    assert (m2.counter, m2.tag, bytes(m2.ciphertext)) == (m.counter, m.tag, bytes(m.ciphertext))
    assert rx.open(m2) == b"payload"


# ---------------------------------------------------------------- NOPs


def test_nop_consumes_one_iv(key: SessionKey) -> None:
    tx, rx = pair(key)
    a, n, b = tx.seal(b"a"), tx.seal_nop(), tx.seal(b"b")
    assert (a.counter, n.counter, b.counter) == (0, 1, 2)
    assert n.is_nop and len(n) == 0
    assert rx.open(a) == b"a"
    with pytest.raises(IvOrderError) as e:
        rx.open(b)  # the NOP was not delivered: a gap
    assert e.value.kind == "gap" and e.value.expected == (0, 1) and e.value.got == (0, 2)
    rx.open_into(n, bytearray(0))
    assert rx.open(b) == b"b"


# ---------------------------------------------------------------- rejections


def test_replay_is_rejected_and_state_unchanged(key: SessionKey) -> None:
    tx, rx = pair(key)
    m0, m1 = tx.seal(b"zero"), tx.seal(b"one")
    rx.open(m0)
    with pytest.raises(IvOrderError) as e:
        rx.open(m0)
    assert e.value.kind == "replay"
    assert isinstance(e.value, PipeLLMError)
    assert rx.expected_counter == 1
    assert rx.open(m1) == b"one"


def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def test_tampered_tag_is_rejected_and_dst_untouched(key: SessionKey) -> None:
    tx, rx = pair(key)
    m = tx.seal(b"secret weights" * 10)
    wire = m.to_bytes()
    tag_bit = pipellm.HEADER_LEN * 8 + 5
    bad = pipellm.Message.from_bytes(flip(wire, tag_bit))
    dst = bytearray(b"\xee" * len(m))
    with pytest.raises(AuthenticationError):
        rx.open_into(bad, dst)
    assert dst == bytearray(b"\xee" * len(m)), "unverified plaintext reached dst"
    assert rx.expected_counter == 0
    assert rx.open(m) == b"secret weights" * 10


def test_tampered_ciphertext_and_aad_are_rejected(key: SessionKey) -> None:
    tx, rx = pair(key)
    m = tx.seal(bytes(300))
    wire = m.to_bytes()
    ct_bit = (pipellm.HEADER_LEN + 16 + 150) * 8
    with pytest.raises(AuthenticationError):
        rx.open(pipellm.Message.from_bytes(flip(wire, ct_bit)))
    # The charge field is AAD (bytes 32..40 of the header): raising it keeps the header
    # consistent, so only the tag can catch it.
    charge_bit = 38 * 8  # +256 units
    with pytest.raises(AuthenticationError):
        rx.open(pipellm.Message.from_bytes(flip(wire, charge_bit)))
    assert rx.open(m) == bytes(300)


def test_message_for_other_channel_is_rejected(key: SessionKey) -> None:
    m = Sender(key, channel=1).seal(b"abc")
    with pytest.raises(AuthenticationError):
        Receiver(key, channel=2).open(m)
    with pytest.raises(AuthenticationError):
        Receiver(key, channel=1, direction="d2h").open(m)
    with pytest.raises(AuthenticationError):
        Receiver(SessionKey.generate(), channel=1).open(m)


# ---------------------------------------------------------------- rotation and exhaustion


def test_key_rotation_with_small_limit(key: SessionKey) -> None:
    tx, rx = pair(key, usage_limit=100)
    epochs = []
    for i in range(20):
        m = tx.seal(bytes([i]) * 300)  # 20 units each: 5 messages per epoch
        epochs.append(m.epoch)
        assert rx.open(m) == bytes([i]) * 300
    assert epochs == [e for e in range(4) for _ in range(5)]
    assert (tx.epoch, tx.next_counter) == (rx.epoch, rx.expected_counter) == (3, 5)
    # Each epoch has its own key: the same plaintext at counter 0 of epochs 0 and 1 (same IV)
    # gives different ciphertexts.
    c = Sender(key, usage_limit=100)
    first = c.seal(bytes(300))
    for _ in range(4):
        c.seal(bytes(300))
    rotated_first = c.seal(bytes(300))
    assert (first.epoch, first.counter, rotated_first.epoch, rotated_first.counter) == (0, 0, 1, 0)
    assert first.iv == rotated_first.iv
    assert bytes(rotated_first.ciphertext) != bytes(first.ciphertext)


def test_exhaustion_without_rotation(key: SessionKey) -> None:
    tx, rx = pair(key, usage_limit=50, rotate=False)
    rx.open(tx.seal(bytes(16 * 48)))  # 49 units
    rx.open(tx.seal_nop())  # 50 units
    with pytest.raises(IvExhaustedError):
        tx.seal(b"x")
    with pytest.raises(IvExhaustedError):
        tx.seal_nop()


def test_message_larger_than_the_usage_limit_is_a_value_error(key: SessionKey) -> None:
    tx = Sender(key, usage_limit=10)
    with pytest.raises(ValueError, match="usage limit"):
        tx.seal(bytes(1000))
    assert tx.next_counter == 0


# ---------------------------------------------------------------- bad input


def test_bad_arguments_raise_typed_errors(key: SessionKey) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SessionKey(b"short")
    with pytest.raises(TypeError, match="key"):
        SessionKey(12345)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channel"):
        Sender(key, channel=-1)
    with pytest.raises(ValueError, match="channel"):
        Sender(key, channel=pipellm.MAX_CHANNEL + 1)
    with pytest.raises(ValueError, match="direction"):
        Sender(key, direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="usage_limit"):
        Receiver(key, usage_limit=1)
    tx, rx = pair(key)
    with pytest.raises(TypeError, match="buf"):
        tx.seal([1, 2, 3])
    with pytest.raises(ValueError, match="contiguous"):
        tx.seal(np.arange(100, dtype=np.uint8).reshape(10, 10)[:, ::2])
    m = tx.seal(b"abcd")
    with pytest.raises(TypeError, match="read-only"):
        rx.open_into(m, b"\x00" * 4)
    ro = np.zeros(4, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(TypeError, match="read-only"):
        rx.open_into(m, ro)
    with pytest.raises(ValueError, match="destination"):
        rx.open_into(m, bytearray(5))
    with pytest.raises(TypeError):
        rx.open_into(b"not a message", bytearray(4))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pipellm.Message.from_bytes(b"PLLM" + bytes(10))
    assert rx.expected_counter == 0 and rx.open(m) == b"abcd"


def test_reprs_never_show_key_material() -> None:
    raw = bytes(range(32))
    k = SessionKey(raw)
    tx = Sender(k)
    text = repr(k) + repr(tx) + repr(Receiver(k)) + repr(tx.seal(b"x"))
    assert raw.hex() not in text and "\\x01\\x02" not in text
    assert "secret" in repr(k)
    assert k.to_bytes() == raw


# ---------------------------------------------------------------- threads and the GIL


def test_concurrent_seal_from_8_threads_is_distinct_and_gap_free(key: SessionKey) -> None:
    tx, rx = pair(key)
    per_thread = 500
    results: list[list[pipellm.Message]] = [[] for _ in range(8)]
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        barrier.wait()
        for j in range(per_thread):
            results[i].append(tx.seal(f"{i}:{j}".encode()))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    msgs = [m for r in results for m in r]
    counters = sorted(m.counter for m in msgs)
    assert counters == list(range(8 * per_thread))
    for r in results:  # each thread saw its own counters increase
        assert [m.counter for m in r] == sorted(m.counter for m in r)
    for m in sorted(msgs, key=lambda m: m.counter):
        rx.open(m)
    assert rx.expected_counter == 8 * per_thread


def test_gil_is_released_while_decrypting(key: SessionKey) -> None:
    tx, rx = pair(key)
    size = 128 << 20
    m = tx.seal(np.ones(size, dtype=np.uint8))
    dst = np.empty(size, dtype=np.uint8)
    started, done = threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        rx.open_into(m, dst)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    spins = 0
    while spins < 200 and not done.is_set():
        spins += 1
    ran_while_busy = not done.is_set()
    t.join()
    assert ran_while_busy, "the main thread could not run Python code during open_into"
    assert dst[0] == 1 and dst[-1] == 1


def test_withheld_epoch_tail_is_detected(key: SessionKey) -> None:
    """A message that opens a new epoch binds how many messages the old epoch held, so an
    attacker cannot drop the old epoch's last message and deliver the next one."""
    tx, rx = pair(key, usage_limit=100)
    m0 = tx.seal(bytes(16 * 49))  # 50 units
    m1 = tx.seal(bytes(16 * 19))  # 20 units: epoch 0 holds 70
    m2 = tx.seal(bytes(16 * 59))  # 60 units: does not fit, opens epoch 1
    assert (m2.epoch, m2.counter) == (1, 0)
    rx.open(m0)
    # From the receiver's state (50 units used) m2 also opens epoch 1, so its position is the
    # expected one; only the handover count shows that m1 is missing.
    with pytest.raises(IvOrderError) as e:
        rx.open(m2)
    assert e.value.kind == "epoch_truncated"
    assert (rx.epoch, rx.expected_counter) == (0, 1)
    rx.open(m1)
    rx.open(m2)
    assert (rx.epoch, rx.expected_counter) == (1, 1)


def test_d2h_direction_is_a_separate_stream(key: SessionKey) -> None:
    """The device's sender (modelled) and the CPU's receiver of D2H use their own key and
    counter: H2D traffic does not move them, and messages cannot cross directions."""
    h2d_tx, h2d_rx = pair(key, channel=0)
    d2h_tx, d2h_rx = pair(key, channel=0, direction="d2h")
    up, down = h2d_tx.seal(b"weights"), d2h_tx.seal(b"logits")
    assert (up.counter, down.counter) == (0, 0) and up.iv != down.iv
    assert down.direction == "d2h" and d2h_rx.direction == "d2h"
    with pytest.raises(AuthenticationError):
        d2h_rx.open(up)
    assert d2h_rx.open(down) == b"logits" and h2d_rx.open(up) == b"weights"


def test_receiver_serialises_concurrent_callers(key: SessionKey) -> None:
    """Many threads delivering the same in-order stream: each message is accepted exactly
    once, whichever thread delivers it, and everything else is a replay or a gap."""
    tx, rx = pair(key)
    msgs = [tx.seal(i.to_bytes(4, "little") * 1024) for i in range(200)]
    accepted: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for i, m in enumerate(msgs):
            try:
                rx.open(m)
            except IvOrderError:
                continue
            with lock:
                accepted.append(i)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(accepted) == list(range(200))
    assert rx.expected_counter == 200
