"""`pipellm doctor`: what this machine offers pipellm, and which backend it will use."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from typing import Any

from . import __version__, cc, write_tracker


def _cc_mode() -> tuple[str, str]:
    """('on' | 'off' | 'unknown', how it was found)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown", "no nvidia-smi: no NVIDIA driver on this machine"
    try:
        out = subprocess.run(
            [smi, "conf-compute", "-f"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        return "unknown", f"nvidia-smi conf-compute failed: {e}"
    text = (out.stdout + out.stderr).strip()
    low = text.lower()
    if "cc status: on" in low or "cc mode: on" in low:
        return "on", text.splitlines()[0]
    if "cc status: off" in low or "cc mode: off" in low:
        return "off", text.splitlines()[0]
    return "unknown", text.splitlines()[0] if text else f"exit status {out.returncode}"


def _openssl_version(path: str) -> str | None:
    try:
        lib = ctypes.CDLL(path)
        fn = lib.OpenSSL_version
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.c_int]
        v = fn(0)
        return v.decode() if v else None
    except (OSError, AttributeError):
        return None


def report() -> dict[str, Any]:
    mode, how = _cc_mode()
    out: dict[str, Any] = {
        "pipellm": __version__,
        "package": str(Path(cc.__file__).resolve().parent),
        "cc_mode": mode,
        "cc_mode_source": how,
    }
    try:
        real = cc.real_libcrypto()
        out["libcrypto"] = str(real)
        out["libcrypto_version"] = _openssl_version(str(real))
    except cc.InterposerError as e:
        out["libcrypto"] = None
        out["libcrypto_error"] = str(e)
    try:
        out["interposer"] = str(cc.shim_path())
    except cc.InterposerError as e:
        out["interposer"] = None
        out["interposer_error"] = str(e)
    out["write_tracker"] = write_tracker()
    st = cc.status()
    out["interposer_loaded"] = st["loaded"]
    out["interposer_active"] = st["active"]
    if mode == "on":
        ready = out["interposer"] is not None and out["libcrypto"] is not None
        out["backend"] = "driver" if ready else "driver (interposer missing: CC without pipellm)"
    else:
        out["backend"] = "channel"
    return out


def render(r: dict[str, Any]) -> str:
    lines = [
        f"pipellm {r['pipellm']} at {r['package']}",
        f"confidential computing: {r['cc_mode']} ({r['cc_mode_source']})",
        "libcrypto the driver would load: "
        + (
            f"{r['libcrypto']} ({r.get('libcrypto_version') or 'version unknown'})"
            if r["libcrypto"]
            else f"none ({r.get('libcrypto_error')})"
        ),
        "interposer: "
        + (r["interposer"] if r["interposer"] else f"missing ({r.get('interposer_error')})"),
        "interposer in this process: "
        + ("loaded, active" if r["interposer_active"] else "loaded, inert")
        if r["interposer_loaded"]
        else "interposer in this process: not loaded (use `pipellm run -- CMD`)",
        f"write tracker for validation='protect': {r['write_tracker']}"
        + (
            " (kernel write protection: no signal handler)"
            if r["write_tracker"] == "uffd"
            else " (page protection + SIGSEGV handler)"
            if r["write_tracker"] == "mprotect"
            else ""
        ),
        f"backend pipellm will use: {r['backend']}"
        + (
            ""
            if r["backend"] != "channel"
            else " (pipellm encrypts and a receiver model or kernel decrypts)"
        ),
    ]
    return "\n".join(lines)
