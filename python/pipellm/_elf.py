"""Symbol-version definitions of an ELF shared library: read them, and write a copy of a
library with some of them renamed.

Why: the interposer stands in for `libcrypto.so.3` and must define the same version nodes
(`OPENSSL_3.0.0`, `OPENSSL_3.1.0`, ...) as the real library it forwards to: the dynamic
loader checks a program's version needs against the library with that SONAME, so a node the
interposer defines but the system's libcrypto lacks would let a program that needs it start
and fail later on an unresolved symbol, instead of being refused at start as it is without
the interposer. The interposer is built with every node OpenSSL 3 has defined (and a few
later ones); `pipellm.cc.prepare` loads a copy in which each node the real library lacks is
renamed to a same-length name no program asks for (`OPENSSL_3.1.0` -> `PIPELLM_3.1.0`).
The loader compares a node by its ELF hash and then its name, so the copy updates both.

Only what that needs: little-endian ELF64 (x86_64, aarch64), the `SHT_GNU_verdef` section.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

SHT_GNU_VERDEF = 0x6FFFFFFD
VER_FLG_BASE = 0x1
_RENAMED_PREFIX = b"PIPELLM"


class ElfError(ValueError):
    """The file is not an ELF64 little-endian shared library with version definitions."""


def _elf_hash(name: bytes) -> int:
    """The System V ELF hash, which `vd_hash` holds."""
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


def _verdefs(data: bytes | bytearray) -> list[tuple[int, int, bytes]]:
    """(offset of the Elf64_Verdef, file offset of its name in .dynstr, name) for each
    version definition except the file's own (VER_FLG_BASE) entry."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    for _name, sh_type, _fl, _addr, off, _size, link, info, _al, _es in sections:
        if sh_type != SHT_GNU_VERDEF:
            continue
        strtab_off = sections[link][4]
        found = []
        at = off
        for _ in range(info):
            _ver, flags, _ndx, _cnt, _hash, aux, nxt = struct.unpack_from("<HHHHIII", data, at)
            (name_off,) = struct.unpack_from("<I", data, at + aux)
            start = strtab_off + name_off
            name = bytes(data[start : data.index(b"\0", start)])
            if not flags & VER_FLG_BASE:
                found.append((at, start, name))
            if nxt == 0:
                break
            at += nxt
        return found
    raise ElfError("no version definitions (SHT_GNU_verdef)")


def version_definitions(path: str | os.PathLike[str]) -> list[str]:
    """The version nodes `path` defines, in file order (`OPENSSL_3.0.0`, ...)."""
    return [name.decode() for _, _, name in _verdefs(Path(path).read_bytes())]


def copy_renaming_versions(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], keep: set[str]
) -> list[str]:
    """Writes a copy of `src` to `dst` (atomically: a temporary file renamed over it) in
    which every version node not in `keep` is renamed so that no program's version need
    matches it. Returns the renamed nodes' original names."""
    data = bytearray(Path(src).read_bytes())
    renamed = []
    for verdef_at, name_at, name in _verdefs(data):
        if name.decode() in keep:
            continue
        prefix = name.split(b"_", 1)[0]
        if len(prefix) != len(_RENAMED_PREFIX):
            raise ElfError(f"cannot rename version {name.decode()!r} (unexpected prefix)")
        new = _RENAMED_PREFIX + name[len(prefix) :]
        data[name_at : name_at + len(new)] = new
        struct.pack_into("<I", data, verdef_at + 8, _elf_hash(new))
        renamed.append(name.decode())
    out = Path(dst)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    return renamed
