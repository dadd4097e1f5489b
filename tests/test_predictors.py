"""Predictors on serving workloads: accuracy of the next prediction, and end to end."""

from __future__ import annotations

import mmap
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np
import pytest

import pipellm
from pipellm import AdapterQueue, LayerCycle, Learned, Pipeline, Receiver, Speculator, SwapFifo
from pipellm.harness.workloads import (
    MODELS,
    flexgen_stream,
    multi_lora_stream,
    random_stream,
    vllm_swap_stream,
)


def page_aligned(nbytes: int, value: int) -> np.ndarray:
    """An array on pages of its own (an anonymous mapping): under page protection no other
    object's writes share them, so a chunk can only be stale if the test writes it."""
    a = np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=np.uint8)
    a[:] = value
    return a


def hit_rate(predictor: Any, events: Iterable[Any], warmup: int) -> float:
    """Fraction of transfers (after `warmup`) that were the predictor's first prediction."""
    hits = total = seen = 0
    for ev in events:
        if ev[0] == "hint":
            _, kind, key = ev
            if kind == "swap_out" and isinstance(predictor, SwapFifo):
                predictor.swapped_out(key)
            elif kind == "enqueue" and isinstance(predictor, AdapterQueue):
                predictor.enqueue(key)
            continue
        key = ev[1]
        if seen >= warmup:
            total += 1
            hits += predictor.predict(1)[:1] == [key]
        predictor.observe(key)
        seen += 1
    return hits / total


def flexgen() -> list[Any]:
    return list(flexgen_stream(layers=48, steps=30))


def swap() -> list[Any]:
    return list(vllm_swap_stream(rounds=120))


def lora() -> list[Any]:
    return list(multi_lora_stream(iterations=600))


def test_hinted_predictors_on_their_own_workloads() -> None:
    assert hit_rate(LayerCycle([("layer", i) for i in range(48)]), flexgen(), 1) >= 0.99
    assert hit_rate(SwapFifo(), swap(), 0) >= 0.99
    assert hit_rate(AdapterQueue(), lora(), 0) >= 0.99


@pytest.mark.parametrize("workload", [flexgen, swap, lora], ids=["flexgen", "vllm-swap", "lora"])
def test_learned_predictor_without_hints(workload: Any) -> None:
    events = workload()
    warmup = len([e for e in events if e[0] == "h2d"]) // 10
    assert hit_rate(Learned(), events, warmup) >= 0.95


def test_random_requests_give_a_low_hit_rate_and_no_errors() -> None:
    events = list(random_stream(5000))
    assert hit_rate(Learned(), events, 500) < 0.05
    assert hit_rate(LayerCycle([("rand", i) for i in range(1000)]), events, 500) < 0.05


def test_load_once_predicts_each_key_once_in_order() -> None:
    from pipellm import LoadOnce

    p = LoadOnce(["a", "b", "c", "d"])
    assert p.predict(2) == ["a", "b"]  # before any transfer: the first ones
    p.observe("a")
    assert p.predict(2) == ["b", "c"]
    p.observe("c")  # one skipped: the order goes on after it
    assert p.predict(5) == ["d"]
    p.observe("zz")  # not in the load: changes nothing
    assert p.predict(1) == ["d"]
    p.observe("b")  # a late one never moves the load back
    assert p.predict(1) == ["d"]
    p.observe("d")
    assert p.predict(3) == []  # after the last, nothing (not a cycle)
    with pytest.raises(ValueError, match="once"):
        LoadOnce(["a", "a"])
    with pytest.raises(ValueError):
        LoadOnce([])


def test_layer_cycle_and_queues_behave() -> None:
    lc = LayerCycle(["a", "b", "c"])
    assert lc.predict(2) == ["a", "b"]
    lc.observe("c")
    assert lc.predict(4) == ["a", "b", "c", "a"]
    with pytest.raises(ValueError):
        LayerCycle(["a", "a"])
    fifo, lifo = SwapFifo(), SwapFifo(lifo=True)
    for k in "xyz":
        fifo.swapped_out(k)
        lifo.swapped_out(k)
    assert fifo.predict(2) == ["x", "y"] and lifo.predict(2) == ["z", "y"]
    fifo.observe("x")
    assert fifo.predict(5) == ["y", "z"]
    q = AdapterQueue()
    q.enqueue_many(["A", "A", "B", "A"])
    assert q.predict(3) == ["A", "B", "A"]


def test_model_shapes_match_published_sizes() -> None:
    # An OPT-30B KV block of 16 tokens: 16 x 7168 hidden x 2 bytes = 224 KiB per layer for K.
    assert MODELS["opt-30b"].kv_block_bytes() == 224 << 10
    # Llama-2-70B uses grouped-query attention: 8 KV heads of 128.
    assert MODELS["llama-2-70b"].kv_block_bytes() == 16 * 8 * 128 * 2
    # OPT-30B has about 30e9 parameters in its 48 layers (embeddings are the rest).
    total = MODELS["opt-30b"].layers * MODELS["opt-30b"].layer_weight_bytes() / 2
    assert 28e9 < total < 31e9
    # A rank-16 adapter on q, k, v, o of a 4096-wide model is 1 MiB per layer (S-LoRA).
    shape = pipellm.harness.workloads.ModelShape("llama-7b", 32, 4096, 32, 32, 11008, "llama", "x")
    assert shape.lora_layer_bytes(16) == 1 << 20


def test_speculator_with_learned_predictor_end_to_end() -> None:
    """A layer cycle through the pipeline with no hints: after warm-up most chunks hit, and
    the receiver gets every byte of every request."""
    key = pipellm.SessionKey.generate()
    rx = Receiver(key)
    layers: list[np.ndarray] = [page_aligned(64 << 10, i) for i in range(6)]
    names: list[Hashable] = [("layer", i) for i in range(6)]
    with Pipeline(key, slots=12, chunk_bytes=32 << 10, workers=2, validation="protect") as pipe:
        spec = Speculator(pipe, depth=6)
        for _step in range(12):
            for name, layer in zip(names, layers, strict=True):
                dst = bytearray(layer.nbytes)
                view = memoryview(dst)
                for m in spec.request(name, layer):
                    rx.open_into(m, view[m.offset : m.offset + len(m)])
                assert bytes(dst) == layer.tobytes()
                # The device computes; the workers encrypt ahead. Waiting for them instead
                # of for time makes every prediction in the ring ready when it is requested.
                assert pipe.wait_idle()
        s = pipe.stats()
        chunks = 12 * 6 * 2
        # Nothing is late (waited for) or stale (nothing writes the layers): each chunk is a
        # hit, or a miss while the cycle is being learned.
        assert (s["late"], s["stale"]) == (0, 0), s
        assert s["hits"] + s["misses"] == chunks, s
        assert s["hits"] >= 0.7 * chunks, s
        for m in pipe.relinquish():
            rx.open_into(m, bytearray(0))
        assert rx.expected_counter == pipe.stats()["positions_reserved"]
