"""The package ships its typing information, and the stubs match the extension."""

from __future__ import annotations

import ast
from pathlib import Path

import pipellm
from pipellm import _core

PKG = Path(pipellm.__file__).resolve().parent


def test_py_typed_and_stub_ship_with_the_package() -> None:
    assert (PKG / "py.typed").is_file()
    assert (PKG / "_core.pyi").is_file()


def stub_names() -> dict[str, set[str]]:
    """Top-level names of _core.pyi, and for each class the names it declares."""
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
