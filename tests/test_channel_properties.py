"""Hypothesis properties of the channel: the receiver accepts exactly the in-order stream."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import pipellm
from pipellm import IvOrderError, PipeLLMError, Receiver, Sender, SessionKey

KEY = SessionKey(bytes(range(32)))

# An op is a payload (data message) or None (NOP).
ops_strategy = st.lists(st.one_of(st.binary(max_size=300), st.none()), min_size=1, max_size=25)


def seal_all(tx: Sender, ops: list[bytes | None]) -> list[pipellm.Message]:
    return [tx.seal_nop() if op is None else tx.seal(op) for op in ops]


@settings(max_examples=150, deadline=None)
@given(ops=ops_strategy, limit=st.integers(min_value=20, max_value=500))
def test_in_order_stream_roundtrips(ops: list[bytes | None], limit: int) -> None:
    tx, rx = Sender(KEY, 5, usage_limit=limit), Receiver(KEY, 5, usage_limit=limit)
    for m, op in zip(seal_all(tx, ops), ops, strict=True):
        dst = bytearray(len(m))
        rx.open_into(m, dst)
        assert bytes(dst) == (op or b"")
    assert (rx.epoch, rx.expected_counter, rx.usage) == (tx.epoch, tx.next_counter, tx.usage)


@settings(max_examples=150, deadline=None)
@given(
    ops=ops_strategy,
    deliveries=st.lists(st.integers(min_value=0, max_value=30), max_size=60),
    limit=st.integers(min_value=20, max_value=500),
)
def test_only_the_next_message_is_accepted(
    ops: list[bytes | None], deliveries: list[int], limit: int
) -> None:
    """Drops, duplicates, reorders: a delivery is accepted iff it is the next message."""
    tx, rx = Sender(KEY, usage_limit=limit), Receiver(KEY, usage_limit=limit)
    msgs = seal_all(tx, ops)
    nxt = 0
    for d in deliveries:
        i = d % len(msgs)
        dst = bytearray(b"\xee" * len(msgs[i]))
        state = (rx.epoch, rx.expected_counter, rx.usage)
        if i == nxt:
            rx.open_into(msgs[i], dst)
            assert bytes(dst) == (ops[i] or b"")
            nxt += 1
        else:
            try:
                rx.open_into(msgs[i], dst)
            except IvOrderError:
                pass
            else:
                raise AssertionError(f"accepted message {i} while {nxt} was next")
            assert (rx.epoch, rx.expected_counter, rx.usage) == state
            assert dst == bytearray(b"\xee" * len(msgs[i]))


@settings(max_examples=200, deadline=None)
@given(ops=ops_strategy, data=st.data())
def test_any_single_bit_flip_is_rejected(ops: list[bytes | None], data: st.DataObject) -> None:
    tx, rx = Sender(KEY), Receiver(KEY)
    msgs = seal_all(tx, ops)
    target = data.draw(st.integers(0, len(msgs) - 1))
    for m in msgs[:target]:
        rx.open(m)
    wire = bytearray(msgs[target].to_bytes())
    bit = data.draw(st.integers(0, len(wire) * 8 - 1))
    wire[bit // 8] ^= 1 << (bit % 8)
    try:
        bad = pipellm.Message.from_bytes(bytes(wire))
    except ValueError:
        pass  # malformed: rejected before reaching the receiver
    else:
        dst = bytearray(b"\x11" * len(bad))
        try:
            rx.open_into(bad, dst)
        except (PipeLLMError, ValueError):
            pass
        else:
            raise AssertionError(f"bit {bit} flipped and still accepted")
        assert dst == bytearray(b"\x11" * len(bad))
    assert rx.open(msgs[target]) == (ops[target] or b"")
