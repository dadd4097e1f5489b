"""The interposer defines exactly the real libcrypto's symbol-version nodes, so the loader
treats a program under `pipellm run` as it would without it: one that needs a newer OpenSSL
than the system's is refused at start, not left to fail later on a missing symbol."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipellm import _elf, cc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def readelf_versions(path: Path) -> list[str]:
    """Version definitions as binutils' readelf lists them (a witness we did not write)."""
    out = subprocess.run(
        ["readelf", "-V", "-W", str(path)], capture_output=True, text=True, check=True
    ).stdout
    section = out.split("Version definition section", 1)[1].split("Version needs section")[0]
    names = re.findall(r"Flags: (\S+)\s+Index: \d+\s+Cnt: \d+\s+Name: (\S+)", section)
    return [name for flags, name in names if "BASE" not in flags]


def test_version_nodes_read_like_readelf() -> None:
    for lib in (cc.real_libcrypto(), cc.shim_path()):
        assert _elf.version_definitions(lib) == readelf_versions(lib)
    assert "OPENSSL_3.0.0" in _elf.version_definitions(cc.real_libcrypto())


def test_loaded_copy_defines_exactly_the_real_librarys_nodes(tmp_path: Path) -> None:
    real = set(_elf.version_definitions(cc.real_libcrypto()))
    ours = _elf.version_definitions(cc.shim_path())
    d = cc.prepare(tmp_path)
    loaded = readelf_versions(d / "libcrypto.so.3")
    kept = {v for v in loaded if v.startswith("OPENSSL_")}
    assert kept == real & set(ours)
    renamed = [v for v in loaded if not v.startswith("OPENSSL_")]
    # Whatever the system's OpenSSL 3 is, the interposer defines more nodes than 3.0.x has:
    # on an older system something was renamed; on the newest nothing is.
    assert sorted(renamed) == sorted(
        "PIPELLM" + v.removeprefix("OPENSSL") for v in set(ours) - real
    )
    # A second prepare leaves the copy as it is (a running process may have it mapped).
    inode = (d / "libcrypto.so.3").stat().st_ino
    cc.prepare(tmp_path)
    assert (d / "libcrypto.so.3").stat().st_ino == inode


@pytest.fixture(scope="module")
def needs_newer_openssl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A program linked against a stand-in libcrypto.so.3 whose one symbol is versioned
    with the first node this system's OpenSSL lacks, as a program built against a newer
    OpenSSL would be."""
    real = set(_elf.version_definitions(cc.real_libcrypto()))
    newer = [v for v in _elf.version_definitions(cc.shim_path()) if v not in real]
    if not newer:
        pytest.skip("the system's OpenSSL defines every node the interposer knows")
    node = newer[0]
    compiler = shutil.which(os.environ.get("CC", "cc"))
    assert compiler, "a C compiler is needed"
    d = tmp_path_factory.mktemp("newer")
    (d / "stub.map").write_text(f"{node} {{ global: pipellm_test_newer_api; }};\n")
    (d / "stub.c").write_text("int pipellm_test_newer_api(void) { return 0; }\n")
    (d / "prog.c").write_text(
        "int pipellm_test_newer_api(void);\nint main(void) { return pipellm_test_newer_api(); }\n"
    )
    stub = d / "stub" / "libcrypto.so.3"
    stub.parent.mkdir()
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(stub), str(d / "stub.c"),
         "-Wl,-soname,libcrypto.so.3", f"-Wl,--version-script={d / 'stub.map'}"],
        check=True,
    )  # fmt: skip
    prog = d / "prog"
    subprocess.run(
        [compiler, "-o", str(prog), str(d / "prog.c"), f"-L{stub.parent}", "-l:libcrypto.so.3"],
        check=True,
    )
    return prog, node


def test_a_program_needing_a_newer_openssl_is_refused_at_start_as_without_us(
    needs_newer_openssl: tuple[Path, str], tmp_path: Path
) -> None:
    prog, node = needs_newer_openssl
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELLM_CC", "LD_"))}
    refusal = f"version `{node}' not found"
    plain = subprocess.run([str(prog)], env=base, capture_output=True, text=True, check=False)
    assert plain.returncode != 0 and refusal in plain.stderr, plain.stderr
    env = cc.environment(base, directory=tmp_path)
    under = subprocess.run([str(prog)], env=env, capture_output=True, text=True, check=False)
    assert under.returncode != 0, "started under the interposer"
    assert refusal in under.stderr, under.stderr
