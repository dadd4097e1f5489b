"""pipellm.torch: SecureCopyEngine and secure_transfers, on the CPU receiver model (asked for
explicitly, so these also hold on a machine with a GPU). No GPU tests yet: the CUDA device
layer is not built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pipellm

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pt(torch: Any) -> Any:
    import pipellm.torch as pt

    return pt


@pytest.fixture
def engine(pt: Any) -> Any:
    eng = pt.SecureCopyEngine(chunk_bytes=4096, slots=32, workers=1, device_kind="cpu-model")
    yield eng
    eng.close()


DTYPES = ["float32", "float16", "bfloat16", "int64", "uint8", "bool"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 1000), (2, 3, 777)])
def test_round_trip_every_dtype_and_shape(torch: Any, engine: Any, dtype: str, shape: Any) -> None:
    dt = getattr(torch, dtype)
    x = (torch.rand(shape) * 100).to(dt)
    d = engine.to_device(x)
    assert d.shape == x.shape and d.dtype == x.dtype and d.is_contiguous()
    assert engine.is_device_tensor(d) and not engine.is_device_tensor(x)
    h = engine.to_host(d)
    assert torch.equal(h, x) and not engine.is_device_tensor(h)


def test_non_contiguous_sources_and_outputs(torch: Any, engine: Any) -> None:
    base = torch.arange(6000, dtype=torch.float32).reshape(60, 100)
    for x in (base.t(), base[:, ::3], base[::2].unsqueeze(0).expand(3, 30, 100)):
        assert not x.is_contiguous()
        assert torch.equal(engine.to_device(x), x)
    out = torch.zeros(100, 60).t()  # non-contiguous destination, shape (60, 100)
    res = engine.to_device(base, out=out)
    assert res is out and torch.equal(out, base)


def test_repeated_layer_cycle_hits_and_hint(torch: Any, engine: Any) -> None:
    layers = [torch.randn(64, 64) for _ in range(4)]
    for _ in range(6):
        for w in layers:
            assert torch.equal(engine.to_device(w), w)
            # The layer's compute, the workers' time to encrypt ahead: waited for as a state
            # (every predicted chunk in the ring encrypted), not as time.
            assert engine.pipe.wait_idle()
    s = engine.pipe.stats()
    assert s["hits"] > 0, s  # the learned predictor found the cycle
    assert (s["late"], s["stale"]) == (0, 0), s
    fresh = [torch.randn(32, 32) for _ in range(2)]
    engine.hint(fresh)
    before = engine.pipe.stats()["hits"]
    assert engine.pipe.wait_idle()  # the hinted copies are encrypted (the ring has room)
    for t in fresh:
        assert torch.equal(engine.to_device(t), t)
    after = engine.pipe.stats()
    assert after["hits"] == before + 2, f"hinted copies were pre-encrypted: {after}"
    assert after["late"] == 0, after


def test_changed_source_is_never_delivered_stale(torch: Any, engine: Any) -> None:
    w = torch.randn(64, 64)
    for _ in range(4):
        engine.to_device(w)
    w[3, 7] = 123.0  # changed after its chunk was (likely) pre-encrypted
    assert torch.equal(engine.to_device(w), w)


def test_to_host_non_blocking_is_a_future(torch: Any, engine: Any) -> None:
    d = engine.to_device(torch.arange(10000))
    fut = engine.to_host(d, non_blocking=True)
    assert torch.equal(fut.result(timeout=10), torch.arange(10000))
    out = torch.empty(10000, dtype=torch.int64)
    assert engine.to_host(d, out=out) is out and torch.equal(out, torch.arange(10000))


def test_concurrent_copies_to_the_host_reach_the_receiver_in_order(torch: Any, engine: Any) -> None:
    # The device-to-host receiver accepts messages only in the order the device sent them:
    # non-blocking copies in a row and copies from several threads must all verify.
    import threading

    tensors = [engine.to_device(torch.arange(i * 1000, i * 1000 + 3000)) for i in range(8)]
    futures = [engine.to_host(t, non_blocking=True) for t in tensors for _ in range(4)]
    results: list[Any] = []
    errors: list[BaseException] = []

    def copy_back(t: Any) -> None:
        try:
            for _ in range(10):
                results.append((t, engine.to_host(t)))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=copy_back, args=(t,)) for t in tensors[:4]]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for i, f in enumerate(futures):
        assert torch.equal(f.result(timeout=60), tensors[i // 4])
    assert len(results) == 40 and all(torch.equal(t, r) for t, r in results)


def test_a_copy_to_the_host_that_fails_to_verify_is_named_by_every_later_one(
    torch: Any, engine: Any
) -> None:
    # A failure midway leaves the in-order receiver short of that copy's later messages:
    # every later copy would fail its order check. They name the first failure instead, and
    # nothing unverified is delivered.
    d = engine.to_device(torch.arange(5000))
    real = engine._d2h_rx

    class FailSecond:
        calls = 0

        def open_into(self, m: Any, out: Any) -> None:
            FailSecond.calls += 1
            if FailSecond.calls == 2:
                raise pipellm.AuthenticationError("tag mismatch (injected)")
            real.open_into(m, out)

    engine._d2h_rx = FailSecond()
    with pytest.raises(pipellm.AuthenticationError, match="injected"):
        engine.to_host(d)
    assert FailSecond.calls == 2, "the copy spans several messages: the failure was midway"
    engine._d2h_rx = real
    with pytest.raises(pipellm.PipeLLMError, match="earlier device-to-host copy") as e:
        engine.to_host(d)
    assert isinstance(e.value.__cause__, pipellm.AuthenticationError)


def test_a_closed_engine_refuses_copies(torch: Any, pt: Any) -> None:
    eng = pt.SecureCopyEngine(chunk_bytes=4096, slots=8, workers=1, device_kind="cpu-model")
    d = eng.to_device(torch.arange(100))
    eng.close()
    eng.close()  # twice is fine
    with pytest.raises(pipellm.PipelineClosedError):
        eng.to_host(d)


def test_errors_name_the_argument(torch: Any, engine: Any) -> None:
    with pytest.raises(TypeError, match="tensor"):
        engine.to_device(np.zeros(3))
    with pytest.raises(ValueError, match="out"):
        engine.to_device(torch.zeros(3), out=torch.zeros(4))
    with pytest.raises(ValueError, match="out"):
        engine.to_device(torch.zeros(3), out=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="device tensor"):
        engine.to_host(torch.zeros(3))
    d = engine.to_device(torch.zeros(3))
    with pytest.raises(ValueError, match="host"):
        engine.to_device(d)
    with pytest.raises(ValueError, match="hint"):
        engine.hint([d.new_zeros(2).to("meta")])


def test_device_rejects_a_tampered_chunk(torch: Any, pt: Any) -> None:
    key = pipellm.SessionKey.generate()
    dev = pipellm.device.CpuDevice(key)
    src = np.arange(8192, dtype=np.uint8)
    with pipellm.Pipeline(key, chunk_bytes=4096, slots=4, workers=0) as pipe:
        msgs = pipe.request(src).messages()
    bad = bytearray(msgs[0].to_bytes())
    bad[-5] ^= 1
    dst = np.zeros(8192, dtype=np.uint8)
    with pytest.raises(pipellm.AuthenticationError):
        dev.receive([pipellm.Message.from_bytes(bad)], dst)
    assert not dst.any() and dev.expected_counter == 0
    assert dev.receive(msgs, dst) == 8192 and np.array_equal(dst, src)


def test_secure_transfers_routes_every_copy(torch: Any, pt: Any) -> None:
    x = torch.randn(300, 70)
    with pt.secure_transfers(chunk_bytes=4096, workers=1, device_kind="cpu-model") as eng:
        y = x.to("cuda")
        assert eng.copies_to_device == 1 and eng.is_device_tensor(y) and torch.equal(y, x)
        assert y.to("cuda") is y, "already on the device: no copy"
        z = y.cpu()
        assert eng.copies_to_host == 1 and torch.equal(z, x)
        assert torch.equal(x.t().cuda(), x.t())
        b = x.to("cuda", dtype=torch.bfloat16)
        assert b.dtype == torch.bfloat16 and torch.equal(b, x.to(torch.bfloat16))
        assert torch.equal(x.to(torch.device("cuda", 0), non_blocking=True), x)
        y.copy_(x * 2)
        h = torch.empty_like(x)
        h.copy_(y)
        assert torch.equal(h, x * 2)
        n_dev, n_host = eng.copies_to_device, eng.copies_to_host
        _ = (x + 1).sum(), x.to(torch.float64), x.cpu(), x.clone()  # not transfers
        assert (eng.copies_to_device, eng.copies_to_host) == (n_dev, n_host)
        m = torch.nn.Linear(70, 5).to("cuda")
        assert eng.copies_to_device == n_dev + 2  # weight and bias
        assert torch.equal(m(y), torch.nn.functional.linear(y, m.weight, m.bias))


def test_offloaded_model_example_gives_the_same_logits(torch: Any) -> None:
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "offload_transformer.py"), "--layers", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "logits identical: True" in p.stdout
    assert "no CUDA" in p.stderr or "not built yet" in p.stderr, "the CPU model says so once"
    assert p.stderr.count("CPU receiver model") == 1


def test_a_usable_gpu_without_the_cuda_layer_is_refused_not_faked(
    pt: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipellm.device as dev

    key = pipellm.SessionKey.generate()
    monkeypatch.setattr(dev, "_cuda_unavailable_reason", lambda: None)  # "a GPU is usable"
    with pytest.raises(dev.DeviceUnavailable, match="not built yet"):
        dev.open_device(key)
    with pytest.raises(dev.DeviceUnavailable):
        pt.SecureCopyEngine(key)
    eng = pt.SecureCopyEngine(key, device_kind="cpu-model")  # explicit: allowed
    eng.close()
    with pytest.raises(ValueError, match="kind"):
        dev.open_device(key, kind="tpu")
