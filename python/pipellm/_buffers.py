"""Adapters for objects that hold bytes but do not export the buffer protocol.

The Rust core calls `as_buffer` only when an object is not a buffer exporter; today that means
CPU torch tensors. The result shares memory with the input (no copy).
"""

from __future__ import annotations

from typing import Any


def as_buffer(obj: Any, what: str) -> Any:
    """Return a buffer-protocol object viewing the bytes of `obj`, or raise TypeError/ValueError."""
    if _is_torch_tensor(obj):
        return _tensor_bytes(obj, what)
    raise TypeError(
        f"{what}: expected a buffer (bytes, bytearray, memoryview, numpy array or CPU torch "
        f"tensor), got {type(obj).__name__}"
    )


def _is_torch_tensor(obj: Any) -> bool:
    mod = type(obj).__module__
    if not mod.startswith("torch"):
        return False
    import torch  # only imported when a tensor was passed, so torch stays optional

    return isinstance(obj, torch.Tensor)


def _tensor_bytes(t: Any, what: str) -> Any:
    import torch

    if t.device.type != "cpu":
        raise ValueError(
            f"{what}: tensor is on {t.device}; pass a CPU tensor (device tensors go through "
            "the device layer)"
        )
    if not t.is_contiguous():
        raise ValueError(f"{what}: tensor is not contiguous (call .contiguous() first)")
    # A byte view of the same storage: works for every dtype numpy lacks (bfloat16, float8).
    flat = t.detach().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return flat.numpy()
