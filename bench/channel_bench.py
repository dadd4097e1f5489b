"""Channel benchmark: AES-256-GCM seal throughput of one core, side by side in one run.

Prints, for 64 KiB, 1 MiB and 16 MiB messages:
  - `openssl speed -evp aes-256-gcm` (the system's OpenSSL, what a CC driver links),
  - pipellm's Rust API (criterion bench `seal`, reserve + seal into a preallocated buffer),
  - pipellm's Python API (`Sender.seal`, allocation of the ciphertext included),
  - pyca/cryptography's `AESGCM.encrypt` when installed (holds the GIL);
then the per-call overhead of `Sender.seal` from Python, and a serving pattern: swapping
vLLM-style OPT-30B KV-cache blocks (224 KiB each) in through the channel (seal on the CPU,
open in the receiver model) against plain copies of the same bytes.

Usage: python bench/channel_bench.py [--quick] [--json out.json] [--no-criterion]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import pipellm

ROOT = Path(__file__).resolve().parent.parent
SIZES = [64 << 10, 1 << 20, 16 << 20]


def human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def median_seconds(fn: Callable[[], object], *, budget: float, min_reps: int = 5) -> float:
    """Median wall time of one call of `fn`, over repetitions filling about `budget` seconds."""
    fn()  # warm up (page faults, caches, lazy init)
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < min_reps or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) > 100_000:
            break
    return statistics.median(times)


def openssl_speed(size: int, seconds: int) -> float | None:
    """Bytes/s of the system OpenSSL for one message size, or None if openssl is absent."""
    try:
        out = subprocess.run(
            [
                "openssl",
                "speed",
                "-evp",
                "aes-256-gcm",
                "-bytes",
                str(size),
                "-seconds",
                str(seconds),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    line = next((ln for ln in out.splitlines() if ln.lower().startswith("aes-256-gcm")), None)
    if line is None:
        return None
    kb = float(line.split()[-1].rstrip("k"))  # thousands of bytes per second
    return kb * 1000.0


def criterion_seal(quick: bool) -> dict[int, float]:
    """Bytes/s of pipellm's Rust seal per size, from the criterion bench (bencher format)."""
    args = [
        "cargo",
        "bench",
        "-q",
        "-p",
        "pipellm-bench",
        "--bench",
        "seal",
        "--",
        "--output-format",
        "bencher",
        "seal_into",
    ]
    if quick:
        args += ["--measurement-time", "1", "--warm-up-time", "0.3"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    result: dict[int, float] = {}
    for m in re.finditer(r"pipellm/seal_into/(\d+)\s+\.\.\. bench:\s+([\d,]+) ns/iter", out):
        size, ns = int(m.group(1)), int(m.group(2).replace(",", ""))
        result[size] = size / (ns * 1e-9)
    return result


def python_seal(size: int, budget: float) -> float:
    tx = pipellm.Sender(pipellm.SessionKey.generate())
    src = np.ones(size, dtype=np.uint8)
    return size / median_seconds(lambda: tx.seal(src), budget=budget)


def pyca_seal(size: int, budget: float) -> float | None:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        return None
    aead = AESGCM(bytes(32))
    src = bytes(size)
    nonce = bytes(12)
    return size / median_seconds(lambda: aead.encrypt(nonce, src, b""), budget=budget)


def per_call_overhead(budget: float) -> dict[str, float]:
    """Seconds per `Sender.seal` of 1 byte and of 64 KiB; the 64 KiB figure is compared with
    the Rust API's time for the same size to isolate what the Python layer adds."""
    tx = pipellm.Sender(pipellm.SessionKey.generate())
    one = b"x"
    small = np.ones(64 << 10, dtype=np.uint8)
    reps = 200

    def batch(buf: object) -> Callable[[], None]:
        def run() -> None:
            for _ in range(reps):
                tx.seal(buf)

        return run

    return {
        "seal_1B_s": median_seconds(batch(one), budget=budget) / reps,
        "seal_64KiB_s": median_seconds(batch(small), budget=budget) / reps,
    }


def kv_swap_pattern(blocks: int, budget: float) -> dict[str, float]:
    """vLLM V0 swap-in: one copy per (layer, K/V, block). OPT-30B, block of 16 tokens:
    16 tokens x 7168 hidden x 2 bytes (fp16) = 224 KiB per K or V block per layer
    (hidden size from facebook/opt-30b's config.json). Plain: copy the host block into the
    device-side buffer. CC: seal on the CPU (critical path, one thread as the driver does),
    then the receiver model verifies and decrypts into the same destination."""
    block = 16 * 7168 * 2
    rng = np.random.default_rng(0)
    host = [rng.integers(0, 256, block, dtype=np.uint8) for _ in range(blocks)]
    dev = np.empty(block, dtype=np.uint8)
    key = pipellm.SessionKey.generate()

    def plain() -> None:
        for b in host:
            np.copyto(dev, b)

    tx, rx = pipellm.Sender(key), pipellm.Receiver(key)

    def sealed_send() -> None:
        for b in host:
            rx.open_into(tx.seal(b), dev)

    def seal_only() -> None:
        for b in host:
            tx.seal(b)

    t_plain = median_seconds(plain, budget=budget)
    t_seal = median_seconds(seal_only, budget=budget)
    # A fresh pair so counters line up after the seal-only run consumed IVs.
    tx, rx = pipellm.Sender(key), pipellm.Receiver(key)
    t_cc = median_seconds(sealed_send, budget=budget)
    total = block * blocks
    return {
        "block_bytes": block,
        "blocks": blocks,
        "plain_GBps": total / t_plain / 1e9,
        "seal_GBps": total / t_seal / 1e9,
        "seal_and_open_GBps": total / t_cc / 1e9,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter measurements")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    ap.add_argument("--no-criterion", action="store_true", help="skip the Rust criterion run")
    args = ap.parse_args()
    budget = 0.3 if args.quick else 1.0
    ossl_secs = 1 if args.quick else 2

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()};"
        f" pipellm {pipellm.__version__}",
        flush=True,
    )
    rust = {} if args.no_criterion else criterion_seal(args.quick)
    rows = []
    for size in SIZES:
        ossl = openssl_speed(size, ossl_secs)
        py = python_seal(size, budget)
        pyca = pyca_seal(size, budget)
        rows.append(
            {"size": size, "openssl": ossl, "rust": rust.get(size), "python": py, "pyca": pyca}
        )

    def gbs(v: float | None) -> str:
        return "      -" if v is None else f"{v / 1e9:7.2f}"

    print("\nAES-256-GCM seal, one core, GB/s (10^9 B/s)")
    print(
        f"{'size':>8} | {'openssl':>7} | {'rust':>7} | {'python':>7} | {'pyca':>7} |"
        f" {'rust/openssl':>12}"
    )
    for r in rows:
        ratio = "-" if not (r["rust"] and r["openssl"]) else f"{r['rust'] / r['openssl']:.2f}x"
        print(
            f"{human(r['size']):>8} | {gbs(r['openssl'])} | {gbs(r['rust'])} |"
            f" {gbs(r['python'])} | {gbs(r['pyca'])} | {ratio:>12}"
        )

    oh = per_call_overhead(budget)
    rust64 = rust.get(64 << 10)
    print(
        f"\nSender.seal per call: 1 B {oh['seal_1B_s'] * 1e6:.2f} us; "
        f"64 KiB {oh['seal_64KiB_s'] * 1e6:.2f} us",
        end="",
    )
    if rust64:
        added = oh["seal_64KiB_s"] - (64 << 10) / rust64
        oh["python_added_64KiB_s"] = added
        print(f" (Rust API {(64 << 10) / rust64 * 1e6:.2f} us: Python adds {added * 1e6:.2f} us)")
    else:
        print()

    kv = kv_swap_pattern(blocks=64 if args.quick else 256, budget=budget)
    print(
        f"\nKV-cache swap-in, OPT-30B blocks of {kv['block_bytes'] >> 10} KiB x {kv['blocks']}:"
        f" plain copy {kv['plain_GBps']:.2f} GB/s; seal only {kv['seal_GBps']:.2f} GB/s;"
        f" seal + verified open {kv['seal_and_open_GBps']:.2f} GB/s"
    )

    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": cpu_model(), "seal": rows, "per_call": oh, "kv_swap": kv}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
