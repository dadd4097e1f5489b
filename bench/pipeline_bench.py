"""Pipeline benchmark: what speculation takes off the critical path.

Side by side in one run, on this machine:
  1. critical-path latency of `Pipeline.request` (taking every message, no DMA) for 1, 16,
     64 and 256 MiB: a hit (pre-encrypted, validated by page protection and by fingerprint)
     against on-demand encryption (one thread, as the CC driver does; and with the workers);
  2. the cost of a misprediction (an unpredicted chunk served at the head's position, and a
     skipped prediction) relative to one on-demand chunk encryption;
  3. validation cost per GiB on the request path for fingerprints and page protection, and
     the off-path costs of page protection (the first write after arming, and rewriting a
     whole armed chunk against the same rewrite unwatched). `PIPELLM_WRITE_TRACKER` picks the
     write tracker (see docs/pipeline.md).

Usage: python bench/pipeline_bench.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import pipellm

CHUNK = 4 << 20
KEY = pipellm.SessionKey.generate()


def wait_pre_encrypted(pipe: pipellm.Pipeline, n: int) -> None:
    deadline = time.monotonic() + 60
    while pipe.stats()["chunks_pre_encrypted"] < n:
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not pre-encrypt in time")
        time.sleep(0.0005)


# The device computes between transfers; that is when the workers and the planner finish
# their work. Each timed request comes after this much idle time (a short layer's compute).
IDLE_S = 0.005


def take_all(pipe: pipellm.Pipeline, src: np.ndarray) -> float:
    time.sleep(IDLE_S)
    t0 = time.perf_counter()
    msgs = pipe.request(src).messages()
    dt = time.perf_counter() - t0
    del msgs  # the device is done: staging goes back to the pool
    return dt


def hit_latency(size: int, validation: str, reps: int) -> float:
    src = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    n = -(-size // CHUNK)
    times = []
    with pipellm.Pipeline(
        KEY,
        slots=max(n, 2),
        chunk_bytes=CHUNK,
        workers=2,
        validation=validation,
        max_staging_bytes=max(n, 2) * CHUNK,
    ) as pipe:
        for i in range(reps):
            pipe.predict([src])
            wait_pre_encrypted(pipe, (i + 1) * n)
            times.append(take_all(pipe, src))
        s = pipe.stats()
        assert s["hits"] == reps * n, s
    return statistics.median(times)


def on_demand_latency(size: int, workers: int, reps: int) -> float:
    src = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
    with pipellm.Pipeline(KEY, slots=2, chunk_bytes=CHUNK, workers=workers) as pipe:
        take_all(pipe, src)  # warm-up
        times = [take_all(pipe, src) for _ in range(reps)]
        assert pipe.stats()["hits"] == 0
    return statistics.median(times)


def misprediction_costs(reps: int) -> dict[str, float]:
    """Median critical-path time of one 4 MiB chunk: on demand with an empty ring (the
    reference), unpredicted with a full ring of encrypted predictions (served at the head's
    position as a substitute), and a request that skips one encrypted prediction (a NOP, then
    a hit). Page-protection validation, so the figures are the relinquishing mechanism's own."""
    rng = np.random.default_rng(3)
    preds = [rng.integers(0, 256, CHUNK, dtype=np.uint8) for _ in range(8)]
    x = rng.integers(0, 256, CHUNK, dtype=np.uint8)
    ref, miss, skip = [], [], []
    with pipellm.Pipeline(KEY, slots=8, chunk_bytes=CHUNK, workers=2, validation="protect") as pipe:
        for _ in range(reps):
            ref.append(take_all(pipe, x))
            base = pipe.stats()["chunks_pre_encrypted"]
            pipe.predict(preds)
            wait_pre_encrypted(pipe, base + 8)
            miss.append(take_all(pipe, x))  # displaces preds[0]
            pipe.relinquish()
            time.sleep(0.05)  # let a re-queued prediction in flight settle
            base = pipe.stats()["chunks_pre_encrypted"]
            pipe.predict(preds[:2])
            wait_pre_encrypted(pipe, base + 2)
            skip.append(take_all(pipe, preds[1]))  # NOP for preds[0], then a hit
            pipe.relinquish()
    r, m, k = statistics.median(ref), statistics.median(miss), statistics.median(skip)
    return {"on_demand_s": r, "miss_s": m, "skip_s": k, "miss_ratio": m / r, "skip_ratio": k / r}


def validation_costs(reps: int) -> dict[str, float]:
    """Request-path validation seconds per GiB (from the pipeline's own counters), plus the
    off-path price of page protection: arming (in the workers) and the first write's fault."""
    size = 256 << 20
    src = np.random.default_rng(4).integers(0, 256, size, dtype=np.uint8)
    out: dict[str, float] = {}
    for validation in ("fingerprint", "protect"):
        n = size // CHUNK
        with pipellm.Pipeline(
            KEY,
            slots=n,
            chunk_bytes=CHUNK,
            workers=2,
            validation=validation,
            max_staging_bytes=n * CHUNK,
        ) as pipe:
            for i in range(reps):
                pipe.predict([src])
                wait_pre_encrypted(pipe, (i + 1) * n)
                take_all(pipe, src)
            s = pipe.stats()
            out[f"{validation}_s_per_GiB"] = s["validation_seconds"] / (reps * size / (1 << 30))
    # Off-path costs of page protection, measured on one 4 MiB region.
    from time import perf_counter

    buf = np.zeros(CHUNK, dtype=np.uint8)
    with pipellm.Pipeline(KEY, slots=1, chunk_bytes=CHUNK, workers=1, validation="protect") as pipe:
        t_faults, t_rewrites, t_plain = [], [], []
        for i in range(reps * 4):
            pipe.predict([buf])
            wait_pre_encrypted(pipe, i + 1)
            t0 = perf_counter()
            # The first write after arming, on a watched page (the array's first and last
            # pages are shared with the allocator and fingerprinted instead).
            buf[CHUNK // 2] = i
            t_faults.append(perf_counter() - t0)
            t0 = perf_counter()
            buf[:] = i  # then every other page of the chunk
            t_rewrites.append(perf_counter() - t0)
            take_all(pipe, buf)
            t0 = perf_counter()
            buf[:] = i + 1  # the same rewrite with no watch
            t_plain.append(perf_counter() - t0)
    out["first_write_fault_s"] = statistics.median(t_faults)
    out["rewrite_armed_s"] = statistics.median(t_rewrites)
    out["rewrite_plain_s"] = statistics.median(t_plain)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    reps = 3 if args.quick else 9
    sizes = [1 << 20, 16 << 20, 64 << 20, 256 << 20]
    rows: list[dict[str, Any]] = []
    print(f"write tracker for validation='protect': {pipellm.write_tracker()}")
    print(
        f"chunk {CHUNK >> 20} MiB; medians of {reps} runs; times in ms; each timed request"
        f" follows {IDLE_S * 1e3:.0f} ms of idle (device compute)",
        flush=True,
    )
    print(
        f"{'size':>8} | {'hit/protect':>11} | {'hit/fprint':>10} | {'on-demand 1 thr':>15} |"
        f" {'on-demand 2+1':>13} | {'1 thr / hit':>11}"
    )
    for size in sizes:
        r = {
            "size": size,
            "hit_protect_s": hit_latency(size, "protect", reps),
            "hit_fingerprint_s": hit_latency(size, "fingerprint", reps),
            "on_demand_1_s": on_demand_latency(size, 0, reps),
            "on_demand_workers_s": on_demand_latency(size, 2, reps),
        }
        r["speedup"] = r["on_demand_1_s"] / r["hit_protect_s"]
        rows.append(r)
        print(
            f"{size >> 20:>5} MiB | {r['hit_protect_s'] * 1e3:11.3f} |"
            f" {r['hit_fingerprint_s'] * 1e3:10.3f} | {r['on_demand_1_s'] * 1e3:15.3f} |"
            f" {r['on_demand_workers_s'] * 1e3:13.3f} | {r['speedup']:10.0f}x",
            flush=True,
        )
    mis = misprediction_costs(reps)
    print(
        f"\nmisprediction, one {CHUNK >> 20} MiB chunk: on demand (empty ring)"
        f" {mis['on_demand_s'] * 1e3:.3f} ms; unpredicted with a full ring"
        f" {mis['miss_s'] * 1e3:.3f} ms ({mis['miss_ratio']:.2f}x); skipping one prediction"
        f" {mis['skip_s'] * 1e3:.3f} ms ({mis['skip_ratio']:.2f}x)"
    )
    val = validation_costs(max(2, reps // 3))
    print(
        f"\nvalidation on the request path: fingerprint {val['fingerprint_s_per_GiB'] * 1e3:.2f}"
        f" ms/GiB; page protection {val['protect_s_per_GiB'] * 1e6:.2f} us/GiB;"
        f" first write after arming {val['first_write_fault_s'] * 1e6:.1f} us; the rest of"
        f" the {CHUNK >> 20} MiB chunk rewritten after it {val['rewrite_armed_s'] * 1e6:.0f} us"
        f" (unwatched: {val['rewrite_plain_s'] * 1e6:.0f} us)"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"latency": rows, "misprediction": mis, "validation": val}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
