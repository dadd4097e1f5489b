"""The driver backend for real Hopper confidential computing: loading pipellm's libcrypto
interposer into a process whose CUDA driver encrypts through OpenSSL.

How it is loaded: a private directory holds `libcrypto.so.3` (the interposer, whose SONAME
is `libcrypto.so.3`) and `libpipellm-real-crypto.so.3` (a link to the real library, which
the interposer names as a dependency). The directory goes first on `LD_LIBRARY_PATH` and the
interposer into `LD_PRELOAD`, so it wins both when libcrypto is bound at load time and when
the driver calls `dlopen("libcrypto.so.3")`; every symbol it does not define resolves to the
real library. `pipellm run -- CMD` runs a command that way; `enable()` restarts the calling
Python process that way.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import _elf

if TYPE_CHECKING:
    from ._core import HostPool

SHIM_NAME = "libpipellm_cc_shim.so"
REAL_ALIAS = "libpipellm-real-crypto.so.3"
_ACTIVE_FLAG = "PIPELLM_CC_ACTIVE"
_SYSTEM_LIBCRYPTO = (
    "/lib/x86_64-linux-gnu/libcrypto.so.3",
    "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
    "/usr/lib64/libcrypto.so.3",
    "/lib64/libcrypto.so.3",
    "/usr/lib/aarch64-linux-gnu/libcrypto.so.3",
    "/usr/lib/libcrypto.so.3",
)


class InterposerError(RuntimeError):
    """The interposer cannot be set up (not built, or no real libcrypto found)."""


def shim_path() -> Path:
    """The interposer library: `PIPELLM_CC_LIB`, else the copy the package carries (every
    wheel and every maturin build puts it in `pipellm/_lib`), else a plain cargo build in a
    source checkout."""
    env = os.environ.get("PIPELLM_CC_LIB")
    if env:
        if not Path(env).is_file():
            raise InterposerError(f"PIPELLM_CC_LIB={env} is not a file")
        return Path(env)
    here = Path(__file__).resolve().parent
    for c in (here / "_lib" / SHIM_NAME, here.parent.parent / "target" / "release" / SHIM_NAME):
        if c.is_file():
            return c
    raise InterposerError(
        f"the interposer library ({SHIM_NAME}) is missing from {here / '_lib'}: this pipellm"
        " was not built by maturin (reinstall the wheel, or `pip install .` from a checkout),"
        " or set PIPELLM_CC_LIB"
    )


def real_libcrypto() -> Path:
    """The libcrypto.so.3 the CUDA driver would load: `PIPELLM_REAL_LIBCRYPTO`, else what
    the dynamic linker's cache names, else the usual system paths."""
    env = os.environ.get("PIPELLM_REAL_LIBCRYPTO")
    if env:
        p = Path(env)
        if not p.is_file():
            raise InterposerError(f"PIPELLM_REAL_LIBCRYPTO={env} is not a file")
        return p.resolve()
    found: list[str] = []
    try:
        out = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        for line in out.splitlines():
            if line.strip().startswith("libcrypto.so.3 ") and "=>" in line:
                found.append(line.split("=>", 1)[1].strip())
    except (OSError, subprocess.SubprocessError):
        pass
    for c in [*found, *_SYSTEM_LIBCRYPTO]:
        p = Path(c)
        if p.is_file() and p.resolve().name != SHIM_NAME:
            return p.resolve()
    raise InterposerError(
        "no libcrypto.so.3 (OpenSSL 3) found; set PIPELLM_REAL_LIBCRYPTO to its path"
    )


def prepare(directory: str | os.PathLike[str] | None = None) -> Path:
    """Creates (idempotently) the directory the interposer is loaded from and returns it:
    `libcrypto.so.3`, a copy of the interposer that defines exactly the symbol-version nodes
    of the real library (see `_elf`), and `libpipellm-real-crypto.so.3`, a link to the real
    library."""
    shim, real = shim_path(), real_libcrypto()
    if directory is None:
        # One directory per (interposer, library, user); `_write_matching_copy` renews the
        # copy in it when either file changes.
        tag = hashlib.sha256(f"{shim}|{real}|{os.getuid()}".encode()).hexdigest()[:16]
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        directory = base / "pipellm" / "cc" / tag
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _write_matching_copy(shim, real, d / "libcrypto.so.3")
    link = d / REAL_ALIAS
    if not (link.is_symlink() and Path(os.readlink(link)) == real):
        tmp = d / f".{REAL_ALIAS}.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(real)
        tmp.replace(link)  # atomic: a concurrent launcher never sees a missing link
    return d


def _write_matching_copy(shim: Path, real: Path, dest: Path) -> None:
    """Writes `dest`, the interposer with the version nodes the real library lacks renamed,
    so that the loader refuses a program needing a newer OpenSSL exactly as it would
    without the interposer. Warns (once per copy) about nodes of the real library the
    interposer does not define: a program needing one would not start under `pipellm run`."""
    try:
        real_nodes = set(_elf.version_definitions(real))
        ours = _elf.version_definitions(shim)
    except (OSError, _elf.ElfError) as e:
        raise InterposerError(f"cannot read the version nodes of {real} or {shim}: {e}") from e
    stamp = dest.with_name(dest.name + ".source")
    source = f"{shim}:{shim.stat().st_mtime_ns}|{real}:{real.stat().st_mtime_ns}"
    if dest.is_file() and stamp.is_file() and stamp.read_text() == source:
        return
    _elf.copy_renaming_versions(shim, dest, keep=real_nodes)
    missing = sorted(real_nodes - set(ours))
    if missing:
        print(
            f"pipellm: {real} defines version nodes the interposer does not"
            f" ({', '.join(missing)}); programs that need them will not start under it:"
            " upgrade pipellm",
            file=sys.stderr,
        )
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
    tmp.write_text(source)
    tmp.replace(stamp)


def environment(
    base: Mapping[str, str] | None = None,
    *,
    workers: int | None = None,
    depth: int | None = None,
    log: bool = False,
    directory: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """The environment that loads the interposer into a child process."""
    env = dict(os.environ if base is None else base)
    d = prepare(directory)
    lib = str(d / "libcrypto.so.3")
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(d), env.get("LD_LIBRARY_PATH")) if p)
    preload = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    env["LD_PRELOAD"] = ":".join([lib, *[p for p in preload if p != lib]])
    env["PIPELLM_REAL_LIBCRYPTO"] = str(real_libcrypto())
    env[_ACTIVE_FLAG] = "1"
    # A raylet that finds RAY_LD_PRELOAD_ON_WORKERS=0 unsets LD_PRELOAD before it starts any
    # worker. Ray sets it only when it preloads its own jemalloc (LD_PRELOAD was empty), but
    # every process of such a node inherits it: a `pipellm run -- ray start` launched from one
    # would start workers without the interposer.
    if env.get("RAY_LD_PRELOAD_ON_WORKERS") == "0":
        del env["RAY_LD_PRELOAD_ON_WORKERS"]
    if workers is not None:
        env["PIPELLM_CC_WORKERS"] = str(workers)
    if depth is not None:
        env["PIPELLM_CC_DEPTH"] = str(depth)
    if log:
        env["PIPELLM_CC_LOG"] = "1"
    return env


def run(cmd: Sequence[str], **kwargs: object) -> None:
    """Replaces this process with `cmd`, the interposer loaded (`pipellm run`)."""
    if not cmd:
        raise InterposerError("no command given: pipellm run -- CMD [ARGS...]")
    env = environment(**kwargs)  # type: ignore[arg-type]
    exe = shutil.which(cmd[0], path=env.get("PATH"))
    if exe is None:
        raise InterposerError(f"command not found: {cmd[0]}")
    os.execve(exe, list(cmd), env)


def enable(**kwargs: object) -> None:
    """For programs that start their own process: call first thing (before CUDA is
    initialised). If the interposer is not loaded yet, restarts the interpreter with the same
    arguments and the interposer loaded; in the restarted process it returns at once."""
    if _loaded():
        return
    if os.environ.get(_ACTIVE_FLAG) == "1":
        raise InterposerError(
            "the interposer was requested but is not loaded in this process (LD_PRELOAD"
            " was dropped or refused); see `pipellm doctor`"
        )
    env = environment(**kwargs)  # type: ignore[arg-type]
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _process_symbol(name: str) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        return getattr(ctypes.CDLL(None), name)  # type: ignore[no-any-return]
    except AttributeError:
        return None


def _api(name: str, *argtypes: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    """One of the interposer's C API functions (returning an int status code), or
    RuntimeError if the interposer is not loaded in this process."""
    fn = _process_symbol(name)
    if fn is None:
        raise RuntimeError("the interposer is not loaded in this process (see pipellm run)")
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def _loaded() -> bool:
    return _process_symbol("pipellm_cc_active") is not None


def status() -> dict[str, object]:
    """Whether the interposer is loaded in this process, active, and its counters."""
    active = _process_symbol("pipellm_cc_active")
    if active is None:
        return {"loaded": False, "active": False, "stats": {}}
    active.restype = ctypes.c_int
    stats_fn = _process_symbol("pipellm_cc_stats")
    name_fn = _process_symbol("pipellm_cc_stat_name")
    path_fn = _process_symbol("pipellm_cc_real_path")
    assert stats_fn is not None and name_fn is not None and path_fn is not None
    stats_fn.restype = ctypes.c_size_t
    stats_fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
    name_fn.restype = ctypes.c_char_p
    name_fn.argtypes = [ctypes.c_size_t]
    path_fn.restype = ctypes.c_char_p
    n = stats_fn(None, 0)
    buf = (ctypes.c_uint64 * n)()
    stats_fn(buf, n)
    names = [name_fn(i).decode() for i in range(n)]
    real = path_fn()
    return {
        "loaded": True,
        "active": bool(active()),
        "real_libcrypto": real.decode() if real else None,
        "stats": dict(zip(names, (int(v) for v in buf), strict=True)),
    }


# Buffers registered with the interposer, kept alive until unwatched: their memory must stay
# mapped while its pages may be write-protected.
_watched: dict[int, object] = {}


def _pinned(buf: object) -> object:
    """`buf` held so that its memory stays where it is while registered: an exported buffer
    (a memoryview of it) cannot be resized (a bytearray reallocated) under the interposer's
    workers, which read watched memory directly."""
    try:
        return memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        return buf


def watch(buf: object) -> None:
    """Registers the memory of `buf` with the interposer (this process must run under it:
    `pipellm run`, `enable()`): chunks the driver encrypts from it are then validated by page
    protection, so a hit copies the ciphertext without reading the source. Until
    `unwatch(buf)`, only this process's own code may write `buf` (not `read(2)`, not a
    device), and its pages are read-only between uses (a write takes one fault, handled, and
    goes through). pipellm keeps `buf` alive until then. For memory allocated once and reused:
    offloaded weights, KV swap space, adapters. Not for a `HostPool` (or a view of one): its
    writes go through a second mapping that the interposer's watches would not see."""
    from ._core import _buffer_span, _in_host_pool

    fn = _api("pipellm_cc_watch", ctypes.c_void_p, ctypes.c_size_t)
    addr, n = _buffer_span(buf)
    if _in_host_pool(addr, n):
        # Pool writes go through a second mapping the interposer does not see: a watched
        # chunk would not notice them.
        raise TypeError("a HostPool cannot be watched by the interposer (its writes bypass it)")
    rc = fn(addr, n)
    if rc == -1:
        raise ValueError("buf: empty buffer")
    if rc == -2:
        raise ValueError("buf overlaps memory that is already watched")
    if rc != 0:
        raise RuntimeError(f"the interposer refused to watch buf (code {rc})")
    _watched[addr] = _pinned(buf)


def unwatch(buf: object) -> None:
    """Unregisters `buf` (see `watch`): when this returns, no pre-encryption thread reads it
    any more and its pages are writable again (it may be freed)."""
    from ._core import _buffer_span

    fn = _api("pipellm_cc_unwatch", ctypes.c_void_p)
    addr, _ = _buffer_span(buf)
    if fn(addr) != 0:
        raise ValueError("buf is not watched")
    _watched.pop(addr, None)


# Pools lent to the interposer as D2H destinations, kept alive until unregistered: a chunk may
# still be decrypting into them.
_receiving: dict[int, object] = {}


def receive(pool: HostPool) -> None:
    """Registers `pool` with the interposer as a destination for device-to-host copies (this
    process must run under it: `pipellm run`, `enable()`). A D2H chunk the driver decrypts
    into the pool is then answered after its tag check alone, and decrypted afterwards on a
    pipellm thread: the copy returns sooner. Until its plaintext is in place the chunk's pages
    are inaccessible, so whoever reads them waits; `pool.write` waits too, then writes. A
    chunk whose tag fails is zeroed, the copy fails, and the interposer stops its pipeline.
    While registered, no pipellm `Pipeline` may watch the pool's memory (refused both ways).
    pipellm keeps `pool` alive until `unreceive(pool)`."""
    from ._core import _buffer_span, _host_pool_end_loan, _host_pool_lend

    fn = _api("pipellm_cc_receive", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    if _buffer_span(pool)[0] in _receiving:
        # Refused before the loan: undoing a failed registration's loan would end this one's.
        raise ValueError("pool is already registered with the interposer")
    view, alias, n = _host_pool_lend(pool)
    rc = fn(view, alias, n)
    if rc != 0:
        _host_pool_end_loan(pool)
        if rc == -2:
            raise ValueError("pool overlaps memory the interposer already watches or receives into")
        raise RuntimeError(f"the interposer refused the pool (code {rc})")
    _receiving[view] = pool


def unreceive(pool: HostPool) -> None:
    """Unregisters `pool` (see `receive`) once every chunk decrypting into it is in place.
    Raises `BlockingIOError` if a copy into it is in progress (between its decryption calls):
    call again once it returned."""
    from ._core import _buffer_span, _host_pool_end_loan

    fn = _api("pipellm_cc_unreceive", ctypes.c_void_p)
    view, _ = _buffer_span(pool)
    rc = fn(view)
    if rc == -6:
        raise BlockingIOError("a device-to-host copy into the pool is in progress")
    if rc != 0:
        raise ValueError("pool is not registered with the interposer")
    _host_pool_end_loan(pool)
    _receiving.pop(view, None)
