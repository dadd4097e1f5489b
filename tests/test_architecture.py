"""The Rust crates keep the layering docs/architecture.md describes: no module of
`rust/core` or `rust/cc` imports (through a `crate::` path outside tests and comments) a
module that imports it back, directly or through others."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_graph(src: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in src.rglob("*.rs"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "mod":
            parts = parts[:-1]
        if parts == ["lib"]:
            continue
        text = path.read_text()
        cut = text.find("#[cfg(test)]")
        text = re.sub(r"//.*", "", text if cut < 0 else text[:cut])
        refs = set(re.findall(r"crate::([a-z_0-9]+)", text))
        for group in re.findall(r"crate::\{([^}]*)\}", text):
            refs |= {item.strip().split("::")[0] for item in group.split(",") if item.strip()}
        graph.setdefault(parts[0], set()).update(r for r in refs if r != parts[0])
    return {m: {r for r in refs if r in graph} for m, refs in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], dict.fromkeys(graph, 0), []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state[n] == 1:
                found.append([*stack[stack.index(n) :], n])
            elif state[n] == 0:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if state[m] == 0:
            visit(m)
    return found


@pytest.mark.parametrize("crate", ["rust/core/src", "rust/cc/src"])
def test_no_import_circle(crate: str) -> None:
    graph = module_graph(ROOT / crate)
    assert len(graph) > 10, "the source tree was not found"
    assert not cycles(graph), cycles(graph)


def test_the_check_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
