"""Runs `pipellm bench --json` for each workload at each simulated link bandwidth and prints
one Markdown table: throughput per mode, overhead against plain, and the machine's
encryption capacity beside the workload's demand. Every row is one `pipellm bench` run, so
the modes in a row were measured side by side.

    python bench/link_sweep.py --links 2 4 6 8 [--json bench/out/link_sweep.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

WORKLOADS = ("flexgen-opt-13b", "vllm-swap-opt-30b", "lora-llama-2-13b")


def run(workload: str, link: float, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pipellm.cli", "bench", "--workload", workload]
    cmd += ["--link-gbps", f"{link:g}", "--json", *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def row(r: dict[str, Any], link: float) -> str:
    modes = r["modes"]
    plain = modes["plain"]["throughput"]
    cap, demand = r["encryption_capacity_Bps"], r["demand_Bps"]
    cells = [r["workload"], f"{link:g} GB/s", f"{cap / 1e9:.1f} / {demand / 1e9:.1f} GB/s"]
    for m in ("plain", "cc", "cc-parallel", "pipellm"):
        t = modes[m]["throughput"]
        cells.append(f"{t:.2f}" if m == "plain" else f"{t:.2f} ({t / plain - 1:+.1%})")
    p = modes["pipellm"]["pipeline"]
    cells.append(f"{p['hits']} / {p['hits'] + p['chunks_on_demand']}")
    verified = all(v["bytes_verified"] == v["bytes"] for v in modes.values())
    cells.append("all" if verified else "NOT ALL")
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--links", type=float, nargs="+", default=[2, 4, 6, 8])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--json", help="also write every run's JSON here")
    ap.add_argument("extra", nargs="*", help="more `pipellm bench` flags (after --)")
    args = ap.parse_args()
    print(
        "| workload | link | capacity / demand | plain tok/s | cc | cc-parallel | pipellm"
        " | hits / chunks | verified |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    runs = []
    for w in args.workloads:
        for link in args.links:
            r = run(w, link, args.extra)
            runs.append(r)
            print(row(r, link), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
