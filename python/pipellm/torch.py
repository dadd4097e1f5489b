"""PyTorch integration: tensor copies between host and device through the secure channel and
the speculative pipeline.

    engine = pipellm.torch.SecureCopyEngine()          # own session key, picks the device
    w_dev = engine.to_device(w)                        # H2D: pre-encrypted if predicted
    y_host = engine.to_host(y_dev)                     # D2H: decrypted off the caller's path

    with pipellm.torch.secure_transfers():             # unmodified model code
        out = model_with_offloading(x)                 # every .to/.cuda/.cpu/.copy_ routed

Predictions come from the learned predictor (it finds the layer cycle of weight offloading by
itself); `engine.hint(tensors)` says what comes next when the caller knows.

Where no CUDA device layer is available (today: everywhere, see `pipellm.device`), the
device is the CPU receiver model: "device tensors" are host tensors that the engine produced
by verifying and decrypting a transfer, and that it remembers as device-resident, so copying
them back to the host goes through the device-to-host direction.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ._buffers import _tensor_bytes
from ._core import Message, Pipeline, PipelineClosedError, PipeLLMError, Receiver, SessionKey
from .device import CpuDevice, open_device
from .predictors import Learned
from .speculator import Speculator


def _byte_view(t: torch.Tensor) -> Any:
    """A writable numpy uint8 view of a contiguous CPU tensor's bytes (no copy)."""
    return _tensor_bytes(t, "tensor")


class SecureCopyEngine:
    """Host↔device tensor copies through the secure channel.

    Usable with no arguments: it makes its own session key and picks the device
    (`device_kind="cpu-model"` asks for the CPU receiver model; see `pipellm.device`). `workers`
    threads pre-encrypt predicted host→device copies (chunks of `chunk_bytes`, up to
    `slots` in flight); one more thread verifies and decrypts device→host copies, in the
    order the device sent them."""

    def __init__(
        self,
        key: SessionKey | None = None,
        *,
        channel: int = 0,
        workers: int = 2,
        chunk_bytes: int = 1 << 20,
        slots: int = 64,
        depth: int = 8,
        device: CpuDevice | None = None,
        device_kind: str = "auto",
    ) -> None:
        self.key = key if key is not None else SessionKey.generate()
        self.device = (
            device if device is not None else open_device(self.key, channel, kind=device_kind)
        )
        self.chunk_bytes = chunk_bytes
        self.pipe = Pipeline(
            self.key,
            channel,
            slots=slots,
            chunk_bytes=chunk_bytes,
            workers=workers,
            max_staging_bytes=slots * chunk_bytes,
        )
        self.spec = Speculator(self.pipe, Learned(), depth=depth)
        self._d2h_rx = Receiver(self.key, channel, direction="d2h")
        # The device-to-host receiver accepts messages only in the order the device sent
        # them: one thread verifies and decrypts, and each copy's work is queued under
        # `_lock` right after the device sent it, so the queue's order is the send order
        # (two threads, or non-blocking copies in a row, cannot reach the receiver out of
        # order).
        self._d2h_pool = ThreadPoolExecutor(1, thread_name_prefix="pipellm-to-host")
        self._lock = threading.RLock()
        # A copy whose messages did not all verify leaves the receiver short of them: every
        # later copy would fail its order check. The first failure is kept and named instead.
        self._d2h_failed: BaseException | None = None
        self._closed = False
        # CPU model: tensors this engine made "device-resident", by id, weakly held (a
        # WeakSet would compare tensors with ==, which is elementwise).
        self._on_device: dict[int, weakref.ref[torch.Tensor]] = {}
        self.copies_to_device = 0
        self.copies_to_host = 0

    # -------------------------------------------------------------------- host to device

    def is_device_tensor(self, t: torch.Tensor) -> bool:
        if t.device.type == "cuda":
            return True
        r = self._on_device.get(id(t))
        return r is not None and r() is t

    def _mark_on_device(self, t: torch.Tensor) -> None:
        k = id(t)

        def forget(_r: object) -> None:
            self._on_device.pop(k, None)

        self._on_device[k] = weakref.ref(t, forget)

    def to_device(
        self, tensor: torch.Tensor, out: torch.Tensor | None = None, non_blocking: bool = False
    ) -> torch.Tensor:
        """Copies a host tensor to the device through the channel and returns the device
        tensor (`out` if given: same shape and dtype). Any dtype, shape and strides: a
        non-contiguous tensor is made contiguous first (one host copy). With the CPU model
        the copy is complete on return whatever `non_blocking` says."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu" or self.is_device_tensor(tensor):
            raise ValueError(f"tensor: expected a host (CPU) tensor, got one on {tensor.device}")
        if out is not None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
            if out.shape != tensor.shape or out.dtype != tensor.dtype:
                raise ValueError(
                    f"out: shape {tuple(out.shape)} {out.dtype} does not match tensor "
                    f"{tuple(tensor.shape)} {tensor.dtype}"
                )
        src = tensor if tensor.is_contiguous() else tensor.contiguous()
        dst = out if out is not None and out.is_contiguous() else torch.empty_like(src)
        if src.numel() == 0:
            result = dst
        else:
            with self._lock:
                key = (src.data_ptr(), src.nbytes)
                transfer = self.spec.request(key, _byte_view(src))
                self.device.receive(transfer, _byte_view(dst))
                self.copies_to_device += 1
            result = dst
        if out is not None and result is not out:
            with _Bypass():
                out.copy_(result)  # a non-contiguous `out`: fill it from the checked bytes
            result = out
        self._mark_on_device(result)
        return result

    def hint(self, tensors: Iterable[torch.Tensor]) -> None:
        """The next host→device copies, in order: they are pre-encrypted now."""
        keys = []
        with self._lock:
            for t in tensors:
                if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                    raise ValueError("hint: expected host (CPU) tensors")
                if not t.is_contiguous():
                    continue  # its copy is made contiguous at transfer time: new memory
                key = (t.data_ptr(), t.nbytes)
                self.spec.register(key, _byte_view(t))
                keys.append(key)
            self.spec.expect(keys)

    # -------------------------------------------------------------------- device to host

    def to_host(
        self, tensor: torch.Tensor, out: torch.Tensor | None = None, non_blocking: bool = False
    ) -> torch.Tensor | Future[torch.Tensor]:
        """Copies a device tensor to the host: the device encrypts, a host thread verifies and
        decrypts off the caller's thread (copies are verified in the order they were made).
        Returns the host tensor, or with `non_blocking` a Future whose result is readable
        only once its tags verified."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
        if not self.is_device_tensor(tensor):
            raise ValueError("tensor: expected a device tensor (one this engine put there)")
        if out is not None and (out.shape != tensor.shape or out.dtype != tensor.dtype):
            raise ValueError("out: shape or dtype does not match tensor")
        src = tensor if tensor.is_contiguous() else tensor.contiguous()
        dst = out if out is not None and out.is_contiguous() else torch.empty_like(src)

        def finish(sealed: list[tuple[int, Message]]) -> torch.Tensor:
            self._raise_if_d2h_failed()
            view = memoryview(_byte_view(dst)) if dst.numel() else None
            try:
                for off, m in sealed:
                    self._d2h_rx.open_into(
                        m, view[off : off + len(m)] if view is not None else bytearray(0)
                    )
            except BaseException as e:
                with self._lock:
                    self._d2h_failed = self._d2h_failed or e
                raise
            if out is not None and dst is not out:
                with _Bypass():
                    out.copy_(dst)
                return out
            return dst

        with self._lock:
            if self._closed:
                raise PipelineClosedError("the engine is closed")
            self._raise_if_d2h_failed()
            sealed = self.device.send(_byte_view(src), self.chunk_bytes)
            self.copies_to_host += 1
            fut = self._d2h_pool.submit(finish, sealed)  # open until `_closed` is set
        return fut if non_blocking else fut.result()

    def _raise_if_d2h_failed(self) -> None:
        if self._d2h_failed is not None:
            raise PipeLLMError(
                "an earlier device-to-host copy failed to verify; the device-to-host stream "
                "cannot continue (nothing unverified was delivered)"
            ) from self._d2h_failed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True  # no copy is queued from now on: the queue can close
        self._d2h_pool.shutdown(wait=True)
        with self._lock:
            for m in self.pipe.relinquish():
                self.device.receive([m], bytearray(0))
            self.pipe.close()

    def __enter__(self) -> SecureCopyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Bypass(TorchFunctionMode):
    """Our own tensor operations inside the engine are not routed again."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def _is_device(d: Any) -> bool:
    return d is not None and torch.device(d).type == "cuda"


def _to_target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(device, dtype) a `Tensor.to(...)` call asks for (None: unchanged)."""
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.Tensor):
            device, dtype = a.device, a.dtype
        elif isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
            device = a if not isinstance(a, int) else torch.device("cuda", a)
    return device, dtype


class _SecureTransfers(TorchFunctionMode):
    """Routes host↔device copies to a SecureCopyEngine; everything else runs as usual.

    A torch-function mode (not a dispatch mode): it sees `.to("cuda")` before PyTorch
    initialises CUDA, so the same routing works with the CPU model on machines without a
    GPU."""

    def __init__(self, engine: SecureCopyEngine) -> None:
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        eng = self.engine
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu) and args:
            src = args[0]
            if func is torch.Tensor.cuda:
                device, dtype = "cuda", None
            elif func is torch.Tensor.cpu:
                device, dtype = "cpu", None
            else:
                device, dtype = _to_target(tuple(args[1:]), kwargs)
            if device is not None:
                to_dev = _is_device(device)
                if to_dev and not eng.is_device_tensor(src):
                    with _Bypass():
                        if dtype is not None and dtype != src.dtype:
                            src = src.to(dtype)  # convert on the host, then transfer
                        return eng.to_device(src)
                if not to_dev and eng.is_device_tensor(src):
                    with _Bypass():
                        host = eng.to_host(src)
                        assert isinstance(host, torch.Tensor)
                        return host if dtype is None or dtype == host.dtype else host.to(dtype)
                if to_dev and eng.is_device_tensor(src) and (dtype is None or dtype == src.dtype):
                    return src  # already there
        elif func is torch.Tensor.copy_ and len(args) >= 2:
            dst, src = args[0], args[1]
            with _Bypass():
                if eng.is_device_tensor(dst) and not eng.is_device_tensor(src):
                    eng.to_device(src.to(dst.dtype) if src.dtype != dst.dtype else src, out=dst)
                    return dst
                if not eng.is_device_tensor(dst) and eng.is_device_tensor(src):
                    host = eng.to_host(src)
                    assert isinstance(host, torch.Tensor)
                    dst.copy_(host)
                    return dst
        return func(*args, **kwargs)


@contextlib.contextmanager
def secure_transfers(
    engine: SecureCopyEngine | None = None, **engine_kwargs: Any
) -> Iterator[SecureCopyEngine]:
    """Inside the block, every host→device and device→host tensor copy (`.to`, `.cuda`,
    `.cpu`, `.copy_`, `non_blocking` included) goes through `engine` (a new one with
    `engine_kwargs` if none is given, closed at the end)."""
    own = engine is None
    eng = engine if engine is not None else SecureCopyEngine(**engine_kwargs)
    try:
        with _SecureTransfers(eng):
            yield eng
    finally:
        if own:
            eng.close()
