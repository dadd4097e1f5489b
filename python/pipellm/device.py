"""The device end of the channel.

`open_device()` returns the device pipellm's transfers land on:
- on a machine with a CUDA GPU, the CUDA device layer (cuda-python: pinned staging, copies
  in IV order on a dedicated stream, decryption by a kernel): **not built yet**, so today
  every machine gets the CPU model, and says so;
- everywhere else, `CpuDevice`: the receiver model plays the GPU. It checks order and tags
  exactly as the device would (DESIGN.md §1), decrypts into "device memory" (host memory
  owned by the model), and encrypts in the device-to-host direction as the device would.

The choice is logged once (logger "pipellm", level WARNING so it shows by default), with the
reason; importing pipellm never fails
for lack of a GPU.
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


def _cuda_unavailable_reason() -> str:
    """Why the CUDA device layer cannot be used here (never raises)."""
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
    return "the CUDA device layer (kernels, pinned staging) is not built yet"


def open_device(key: SessionKey, channel: int = 0, usage_limit: int | None = None) -> CpuDevice:
    """The device transfers land on (see the module docstring)."""
    global _announced
    if not _announced:
        _announced = True
        log.warning(
            "pipellm: %s; transfers are checked and decrypted by the CPU receiver model",
            _cuda_unavailable_reason(),
        )
    return CpuDevice(key, channel, usage_limit)
