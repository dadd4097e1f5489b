from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pipellm


def pytest_configure(config: pytest.Config) -> None:
    """With PIPELLM_TEST_INSTALLED=VENV (scripts/test), the suite must run against the copy of
    pipellm installed from the wheel into VENV: not the checkout's sources, not an editable
    install. Otherwise a green run could hide a file the wheel forgot."""
    venv = os.environ.get("PIPELLM_TEST_INSTALLED")
    if not venv:
        return
    where = Path(pipellm.__file__).resolve()
    if not where.is_relative_to(Path(venv).resolve()):
        raise pytest.UsageError(f"PIPELLM_TEST_INSTALLED={venv} but pipellm comes from {where}")


def available_trackers() -> list[str]:
    """The write trackers this machine offers, preferred first (a fresh interpreter asked to
    use uffd says which one it got)."""
    out = ["mprotect"]
    r = subprocess.run(
        [sys.executable, "-c", "import pipellm; print(pipellm.write_tracker())"],
        env={**os.environ, "PIPELLM_WRITE_TRACKER": "uffd"},
        capture_output=True,
        text=True,
        check=True,
    )
    if r.stdout.strip() == "uffd":
        out.insert(0, "uffd")
    return out


@pytest.fixture
def key() -> pipellm.SessionKey:
    return pipellm.SessionKey.generate()


@pytest.fixture
def torch() -> Any:
    """PyTorch, which is an optional extra. CI installs it and sets PIPELLM_REQUIRE_TORCH=1,
    so there a missing torch fails the run instead of skipping its tests."""
    try:
        import torch as t
    except ImportError:
        if os.environ.get("PIPELLM_REQUIRE_TORCH") == "1":
            pytest.fail("PIPELLM_REQUIRE_TORCH=1 but torch is not installed")
        pytest.importorskip("torch")
        raise
    return t


@pytest.fixture
def ray() -> str:
    """Where Ray is installed (an optional dependency; tests marked `ray` start local clusters
    with it, in subprocesses, so it is found, not imported here). With PIPELLM_REQUIRE_RAY=1 a
    missing ray fails the run instead of skipping its tests."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        if os.environ.get("PIPELLM_REQUIRE_RAY") == "1":
            pytest.fail("PIPELLM_REQUIRE_RAY=1 but ray is not installed")
        pytest.skip("ray is not installed")
    return spec.origin


EMULATOR_SRC = Path(__file__).resolve().parent / "driver_emulator" / "driver_emulator.c"


def compile_c(source: Path, out_dir: Path) -> Path:
    """Builds one of the tests' C programs (warnings are errors), linked against the
    system's libcrypto.so.3 the way a driver binds it at load time."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    assert compiler, f"a C compiler is needed to build {source.name}"
    out = out_dir / source.stem
    flags = ["-O2", "-Wall", "-Werror", "-pthread"]
    subprocess.run([compiler, *flags, "-o", str(out), str(source), "-l:libcrypto.so.3"], check=True)
    return out


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The driver emulator (tests/driver_emulator), built once per module."""
    return compile_c(EMULATOR_SRC, tmp_path_factory.mktemp("emu"))
