"""Checks a built pipellm wheel: what `pip install` gives users (docs/packaging.md).

    python scripts/check_wheel.py WHEEL
    python scripts/check_wheel.py --same-files-as WHEEL OTHER_WHEEL

The first form checks that WHEEL is manylinux-tagged, carries the extension and the
libcrypto interposer with the interposer's link settings intact (SONAME libcrypto.so.3, the
real library named as a dependency and found through $ORIGIN), that auditwheel grafted no
library into it (above all no libcrypto: the interposer must forward to the system's), and
that both libraries are stripped. It prints the sizes and the glibc symbol versions that set
the manylinux policy. The second form also checks that OTHER_WHEEL (built from the sdist)
holds the same files. Exit status 1 on the first failed check.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

EXTENSION = "pipellm/_core.abi3.so"
INTERPOSER = "pipellm/_lib/libpipellm_cc_shim.so"
REAL_ALIAS = "libpipellm-real-crypto.so.3"


def fail(msg: str) -> None:
    print(f"check_wheel: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def tool(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def glibc_floor(lib: Path) -> tuple[tuple[int, ...], list[str]]:
    """The newest GLIBC_x.y version `lib` needs and the symbols that need it."""
    need: dict[tuple[int, ...], set[str]] = defaultdict(set)
    for line in tool("objdump", "-T", str(lib)).splitlines():
        m = re.search(r"\bGLIBC_([0-9.]+)\)?\s+(\S+)$", line)
        if m and "*UND*" in line:
            need[tuple(int(x) for x in m.group(1).split("."))].add(m.group(2))
    top = max(need)
    return top, sorted(need[top])


def check(wheel: Path) -> None:
    tag = wheel.name.removesuffix(".whl").split("-")[-1]
    if not tag.startswith("manylinux_"):
        fail(f"{wheel.name}: platform tag {tag!r} is not a manylinux tag")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        for required in (EXTENSION, INTERPOSER, "pipellm/py.typed", "pipellm/_core.pyi"):
            if required not in names:
                fail(f"{wheel.name} lacks {required}")
        grafted = [n for n in names if ".libs/" in n or re.search(r"/libcrypto[^/]*$", n)]
        if grafted:
            fail(f"{wheel.name}: libraries grafted into the wheel: {grafted}")
        with tempfile.TemporaryDirectory() as tmp:
            z.extract(EXTENSION, tmp)
            z.extract(INTERPOSER, tmp)
            ext, shim = Path(tmp, EXTENSION), Path(tmp, INTERPOSER)
            dynamic = tool("readelf", "-d", str(shim))
            for what, pattern in (
                ("SONAME libcrypto.so.3", r"\(SONAME\).*\[libcrypto\.so\.3\]"),
                (f"NEEDED {REAL_ALIAS}", rf"\(NEEDED\).*\[{re.escape(REAL_ALIAS)}\]"),
                ("RUNPATH $ORIGIN", r"\((RUN)?PATH\).*\[\$ORIGIN\]"),
            ):
                if not re.search(pattern, dynamic):
                    fail(f"{INTERPOSER}: {what} missing:\n{dynamic}")
            for lib in (ext, shim):
                sections = tool("readelf", "-S", "-W", str(lib))
                if re.search(r"\s\.(symtab|debug_info)\s", sections):
                    fail(f"{lib.name} is not stripped (has .symtab or .debug_info)")
            print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.2f} MiB")
            for lib, member in ((ext, EXTENSION), (shim, INTERPOSER)):
                version, symbols = glibc_floor(lib)
                shown = ", ".join(symbols[:6]) + (" ..." if len(symbols) > 6 else "")
                print(
                    f"  {member}: {lib.stat().st_size / 2**20:.2f} MiB,"
                    f" needs GLIBC_{'.'.join(map(str, version))} ({shown})"
                )


def same_files(a: Path, b: Path) -> None:
    with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
        na, nb = set(za.namelist()), set(zb.namelist())
    # Directory entries are written by some tools and not others; files are what counts.
    na = {n for n in na if not n.endswith("/")}
    nb = {n for n in nb if not n.endswith("/")}
    if na != nb:
        fail(
            f"{a.name} and {b.name} differ: only in the first {sorted(na - nb)},"
            f" only in the second {sorted(nb - na)}"
        )
    print(f"{b.name} (from the sdist) holds the same {len(na)} files")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("other", type=Path, nargs="?")
    ap.add_argument("--same-files-as", action="store_true")
    args = ap.parse_args()
    check(args.wheel)
    if args.same_files_as:
        if args.other is None:
            fail("--same-files-as needs a second wheel")
        check(args.other)
        same_files(args.wheel, args.other)


if __name__ == "__main__":
    main()
