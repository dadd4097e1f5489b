"""The device end of the channel.

`open_device()` returns the device pipellm's transfers land on:
- on a machine with a usable CUDA GPU, the CUDA device layer (cuda-python: pinned staging,
  copies in IV order on a dedicated stream, decryption by a kernel). It is **not built yet**:
  there `open_device()` raises `DeviceUnavailable` rather than hand out host tensors where
  the program expects CUDA tensors; `kind="cpu-model"` asks for the model explicitly;
- everywhere else, `CpuDevice`: the receiver model plays the GPU. It checks order and tags
  exactly as the device would (docs/protocol.md), decrypts into "device memory" (host memory
  owned by the model), and encrypts in the device-to-host direction as the device would.

The choice is logged once (logger "pipellm", level WARNING so it shows by default), with the
reason; importing pipellm never fails for lack of a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ._core import Message, Receiver, Sender, SessionKey

log = logging.getLogger("pipellm")
_announced = False


class CpuDevice:
    """The receiver model as the device (host-to-device: verify and decrypt; device-to-host:
    encrypt, as the device's copy engine would)."""

    kind = "cpu-model"

    def __init__(self, key: SessionKey, channel: int = 0, usage_limit: int | None = None) -> None:
        kw: dict[str, Any] = {} if usage_limit is None else {"usage_limit": usage_limit}
        self._h2d = Receiver(key, channel, direction="h2d", **kw)
        self._d2h = Sender(key, channel, direction="d2h", **kw)

    def receive(self, messages: Iterable[Message], dst: Any) -> int:
        """Verifies and decrypts `messages` (in the order given, which must be the order they
        were emitted) into the writable buffer `dst` at each message's offset. NOPs only
        advance the receiver. Returns the bytes written. A bad message raises (typed) and
        leaves the receiver where it was; nothing unverified is written."""
        view = memoryview(dst).cast("B")
        n = 0
        for m in messages:
            if m.is_nop:
                self._h2d.open_into(m, bytearray(0))
                continue
            end = m.offset + len(m)
            if end > len(view):
                raise ValueError(f"dst: {len(view)} bytes, message needs bytes {m.offset}..{end}")
            self._h2d.open_into(m, view[m.offset : end])
            n += len(m)
        return n

    def send(self, src: Any, chunk_bytes: int) -> list[tuple[int, Message]]:
        """The device encrypting `src` for the host, chunk by chunk, in IV order: (offset,
        message) pairs."""
        view = memoryview(src).cast("B")
        out = []
        for off in range(0, max(len(view), 1), chunk_bytes):
            out.append((off, self._d2h.seal(view[off : off + chunk_bytes])))
        return out

    @property
    def expected_counter(self) -> int:
        return self._h2d.expected_counter


class DeviceUnavailable(RuntimeError):
    """The device pipellm would use cannot be used here (see `open_device`)."""


def _cuda_unavailable_reason() -> str | None:
    """Why no CUDA device can be used here, or None if one can (never raises)."""
    try:
        from cuda.bindings import driver  # type: ignore[import-not-found]
    except Exception as e:  # not installed, or its native library is missing
        return f"cuda-python not usable ({type(e).__name__}: {e})"
    try:
        (err,) = driver.cuInit(0)
    except Exception as e:  # no driver library: cuInit raises instead of returning
        return f"no CUDA driver ({type(e).__name__}: {e})"
    if int(err) != 0:
        return f"cuInit failed ({err})"
    err, n = driver.cuDeviceGetCount()
    if int(err) != 0 or n == 0:
        return "no CUDA device"
    return None


def open_device(
    key: SessionKey,
    channel: int = 0,
    usage_limit: int | None = None,
    kind: str = "auto",
) -> CpuDevice:
    """The device transfers land on (see the module docstring). `kind`: "auto" or
    "cpu-model"."""
    global _announced
    if kind not in ("auto", "cpu-model"):
        raise ValueError(f"kind: expected 'auto' or 'cpu-model', got {kind!r}")
    if kind == "auto":
        reason = _cuda_unavailable_reason()
        if reason is None:
            raise DeviceUnavailable(
                "a CUDA device is present, but pipellm's CUDA device layer is not built yet;"
                " the CPU receiver model would return host tensors where CUDA tensors are"
                " expected. Use kind='cpu-model' (SecureCopyEngine(device_kind='cpu-model'))"
                " to run on the model explicitly."
            )
    else:
        reason = "the CPU receiver model was requested"
    if not _announced:
        _announced = True
        log.warning(
            "pipellm: %s; transfers are checked and decrypted by the CPU receiver model",
            reason,
        )
    return CpuDevice(key, channel, usage_limit)
