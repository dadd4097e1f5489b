"""The package ships its typing information, and the stubs match the extension."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipellm
from pipellm import _core

PKG = Path(pipellm.__file__).resolve().parent


def test_py_typed_and_stub_ship_with_the_package() -> None:
    assert (PKG / "py.typed").is_file()
    assert (PKG / "_core.pyi").is_file()


def stub_names() -> dict[str, set[str]]:
    """Top-level names (constants, functions, classes) of _core.pyi, and for each class the
    names it declares."""
    tree = ast.parse((PKG / "_core.pyi").read_text())
    names: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
            names[node.name] = members
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = set()
        elif isinstance(node, ast.FunctionDef):
            names[node.name] = set()
    return names


def test_stub_declares_every_public_name_and_method() -> None:
    stubs = stub_names()
    for name in pipellm.__all__:
        if hasattr(_core, name):  # classes written in Python carry their own annotations
            assert name in stubs, f"{name} is exported but missing from _core.pyi"
    for cls in (
        "SessionKey",
        "Sender",
        "Receiver",
        "Message",
        "Pipeline",
        "Transfer",
        "LearnedPredictor",
    ):
        runtime = {n for n in dir(getattr(_core, cls)) if not n.startswith("_")}
        missing = runtime - stubs[cls]
        assert not missing, f"{cls}: {sorted(missing)} not in _core.pyi"
        extra = {n for n in stubs[cls] if not n.startswith("_")} - runtime
        assert not extra, f"{cls}: stub declares {sorted(extra)} that do not exist"


def test_the_stats_stub_matches_the_counters() -> None:
    """`PipelineStats` in the stub declares exactly the counters `Pipeline.stats()` returns
    (their one source is the core's `stats!` list), with the right value types."""
    tree = ast.parse((PKG / "_core.pyi").read_text())
    (cls,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PipelineStats")
    declared = {
        item.target.id: ast.unparse(item.annotation)
        for item in cls.body
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
    }
    with pipellm.Pipeline(pipellm.SessionKey.generate(), 0, slots=2, chunk_bytes=4096) as p:
        stats = p.stats()
    assert set(declared) == set(stats), sorted(set(declared) ^ set(stats))
    for name, value in stats.items():
        assert type(value).__name__ == declared[name], (name, value, declared[name])


def test_the_package_carries_the_interposer() -> None:
    """Every maturin build puts the interposer into the package (rust/py/build.rs), and
    `pipellm.cc` finds it there with no environment variable."""
    import shutil

    from pipellm import cc

    shim = PKG / "_lib" / cc.SHIM_NAME
    assert shim.is_file()
    saved = os.environ.pop("PIPELLM_CC_LIB", None)
    try:
        assert cc.shim_path() == shim
    finally:
        if saved is not None:
            os.environ["PIPELLM_CC_LIB"] = saved
    readelf = shutil.which("readelf")
    assert readelf, "readelf (binutils) is needed to read the interposer's link settings"
    dynamic = subprocess.run([readelf, "-d", str(shim)], capture_output=True, text=True).stdout
    assert "Library soname: [libcrypto.so.3]" in dynamic
    assert f"Shared library: [{cc.REAL_ALIAS}]" in dynamic


# Runs the CLI in a child where `import numpy` fails, as on a plain `pip install pipellm`.
_WITHOUT_NUMPY = (
    "import sys; sys.modules['numpy'] = None\n"
    "from pipellm.cli import main\n"
    "sys.exit(main(sys.argv[1:]))"
)


def _cli_without_numpy(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELLM_CC", "LD_"))}
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_NUMPY, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_doctor_and_run_need_nothing_beyond_the_wheel() -> None:
    doctor = _cli_without_numpy("doctor")
    assert doctor.returncode == 0, doctor.stderr
    assert "interposer:" in doctor.stdout and "missing" not in doctor.stdout
    run = _cli_without_numpy(
        "run", "--", sys.executable, "-c", "import os; print(os.environ['LD_PRELOAD'])"
    )
    assert run.returncode == 0, run.stderr
    assert "libcrypto.so.3" in run.stdout


@pytest.mark.parametrize("command", ["bench", "soak"])
def test_commands_that_need_numpy_name_the_extra(command: str) -> None:
    p = _cli_without_numpy(command)
    assert p.returncode == 2
    assert "pipellm[bench]" in p.stderr
    assert "Traceback" not in p.stderr
