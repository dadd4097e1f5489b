"""Accuracy of each predictor on each serving workload (next transfer predicted exactly).

Usage: python bench/predictor_accuracy.py
Deterministic (seeded workloads); prints a table of hit rates after a 10% warm-up.
"""

from __future__ import annotations

import sys
from typing import Any

from pipellm import AdapterQueue, LayerCycle, Learned, SwapFifo
from pipellm.harness.workloads import (
    flexgen_stream,
    multi_lora_stream,
    random_stream,
    vllm_swap_stream,
)

WORKLOADS = {
    "flexgen (48 layers x 30 steps)": lambda: list(flexgen_stream(48, 30)),
    "vllm-swap (120 rounds)": lambda: list(vllm_swap_stream(120)),
    "multi-lora (600 iterations)": lambda: list(multi_lora_stream(600)),
    "random (5000, 1000 keys)": lambda: list(random_stream(5000)),
}


def predictors() -> dict[str, Any]:
    return {
        "LayerCycle": lambda: LayerCycle([("layer", i) for i in range(48)]),
        "SwapFifo": SwapFifo,
        "AdapterQueue": AdapterQueue,
        "Learned": Learned,
    }


def hit_rate(p: Any, events: list[Any]) -> float:
    warmup = len([e for e in events if e[0] == "h2d"]) // 10
    hits = total = seen = 0
    for ev in events:
        if ev[0] == "hint":
            if ev[1] == "swap_out" and isinstance(p, SwapFifo):
                p.swapped_out(ev[2])
            elif ev[1] == "enqueue" and isinstance(p, AdapterQueue):
                p.enqueue(ev[2])
            continue
        if seen >= warmup:
            total += 1
            hits += p.predict(1)[:1] == [ev[1]]
        p.observe(ev[1])
        seen += 1
    return hits / total


def main() -> int:
    names = list(predictors())
    print(f"{'workload':34} | " + " | ".join(f"{n:>12}" for n in names))
    for wname, make in WORKLOADS.items():
        events = make()
        row = [hit_rate(predictors()[n](), events) for n in names]
        print(f"{wname:34} | " + " | ".join(f"{r * 100:11.1f}%" for r in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
