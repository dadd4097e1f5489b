"""`pipellm bench --plot`: throughput per mode, and overhead against the compute/bytes ratio.

The sweep replays the same workload with its device compute scaled (x1/4 ... x16): the more
compute per transferred byte, the more time the encryption has to hide behind, and the lower
the overhead of every CC mode. Needs matplotlib (`pip install matplotlib`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from . import replay

SCALES = (0.25, 1.0, 4.0, 16.0)


def scaled(w: replay.Workload, factor: float) -> replay.Workload:
    steps = [dataclasses.replace(s, compute_s=s.compute_s * factor) for s in w.steps]
    return dataclasses.replace(w, steps=steps)


def sweep(w: replay.Workload, modes: list[str], **run_args: Any) -> list[dict[str, Any]]:
    """Overhead vs plain for each mode at each compute scale."""
    rows = []
    for f in SCALES:
        ws = scaled(w, f)
        plain = replay.run(ws, "plain", **run_args)
        compute = sum(s.compute_s for s in ws.steps)
        row: dict[str, Any] = {"scale": f, "compute_s_per_GB": compute / (ws.bytes_total / 1e9)}
        for m in modes:
            if m != "plain":
                r = replay.run(ws, m, **run_args)
                row[m] = 1 - r["throughput"] / plain["throughput"]
        rows.append(row)
    return rows


def draw(path: Path, title: str, results: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("pipellm bench --plot needs matplotlib: pip install matplotlib") from e
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    modes = list(results)
    a.bar(
        modes,
        [results[m]["throughput"] for m in modes],
        color=["#888", "#c44", "#d93", "#38a"][: len(modes)],
    )
    a.set_ylabel("tokens/s")
    a.set_title("throughput per mode")
    for m in [m for m in modes if m != "plain"]:
        b.plot(
            [r["compute_s_per_GB"] for r in rows], [100 * r[m] for r in rows], marker="o", label=m
        )
    b.set_xscale("log")
    b.set_xlabel("device compute per transferred GB (s/GB)")
    b.set_ylabel("overhead vs plain (%)")
    b.set_title("overhead against compute/bytes")
    b.axhline(5, color="#aaa", linestyle="--", linewidth=1)
    b.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
