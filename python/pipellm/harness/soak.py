"""`pipellm soak`: mixed serving patterns through the pipeline on several threads for a
while (or for an exact number of operations), with random mispredictions, source
modifications, key rotations and pipeline restarts; every byte is checked by a receiver
model. Reports operations, errors (must be 0) and memory (RSS) over time."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._core import HostPool, Pipeline, SessionKey
from ..device import CpuDevice
from ..speculator import Speculator

PATTERNS = ("layer-cycle", "swap-fifo", "adapter-queue", "random")


def _rss_kib() -> tuple[int, int]:
    """(current, peak) resident set size of this process, KiB."""
    cur = peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return cur, peak


@dataclass
class Counters:
    ops: int = 0
    bytes_verified: int = 0
    hits: int = 0
    errors: list[str] = field(default_factory=list)
    restarts: int = 0


class _Client:
    """One thread's serving loop: its own channel, pipeline, receiver and sources."""

    def __init__(self, idx: int, key: SessionKey, seed: int, counters: Counters) -> None:
        self.idx, self.key, self.c = idx, key, counters
        self.rng = random.Random(seed)
        self.pattern = PATTERNS[idx % len(PATTERNS)]
        n = 12
        sizes = [self.rng.choice([4 << 10, 60 << 10, 256 << 10, 1 << 20]) for _ in range(n)]
        gen = np.random.default_rng(seed)
        # Thread kinds, by index mod 4: fingerprints; page protection; fingerprints; page
        # protection with chunks kept armed between uses and sources in a HostPool (written
        # through the pool, never in place).
        self.validation = "protect" if idx % 2 else "fingerprint"
        self.keep_armed = 64 if idx % 4 == 3 else 0
        self.pool: HostPool | None = None
        self.offsets: list[int] = []
        if self.keep_armed:
            self.pool = HostPool(sum(sizes))
            self.sources = []
            off = 0
            for sz in sizes:
                self.pool.write(off, gen.integers(0, 256, sz, dtype=np.uint8))
                view = np.frombuffer(memoryview(self.pool), dtype=np.uint8, count=sz, offset=off)
                self.sources.append(view)
                self.offsets.append(off)
                off += sz
        else:
            self.sources = [gen.integers(0, 256, sz, dtype=np.uint8) for sz in sizes]
        self.step = 0
        self.order = list(range(n))

    def _open(self) -> tuple[Pipeline, CpuDevice, Speculator]:
        # A small usage limit: keys rotate every few MiB, so rotation runs all the time.
        limit = 1 << 20
        pipe = Pipeline(
            self.key,
            channel=self.idx,
            slots=24,
            chunk_bytes=64 << 10,
            workers=1 + self.idx % 2,
            usage_limit=limit,
            validation=self.validation,  # type: ignore[arg-type]
            max_staging_bytes=24 * (64 << 10),
            keep_armed=self.keep_armed,
        )
        # The receiver model checks every message as the device would.
        dev = CpuDevice(self.key, self.idx, usage_limit=limit)
        spec = Speculator(pipe, depth=4)
        for k, s in enumerate(self.sources):
            spec.register(k, s)
        return pipe, dev, spec

    def _next(self) -> int:
        n = len(self.sources)
        self.step += 1
        if self.pattern == "layer-cycle":
            return self.step % n
        if self.pattern == "swap-fifo":
            # blocks come back in the order they left; the set rotates every round
            r = self.step // n
            return (self.step + r) % n
        if self.pattern == "adapter-queue":
            # a queue of adapters that mostly repeats, with arrivals changing it
            if self.rng.random() < 0.05:
                i, j = self.rng.randrange(n), self.rng.randrange(n)
                self.order[i], self.order[j] = self.order[j], self.order[i]
            return self.order[self.step % n]
        return self.rng.randrange(n)

    def run(self, stop: threading.Event, quota: int | None, finished: threading.Semaphore) -> None:
        """Serves until `stop` is set, or `quota` operations are done; then releases
        `finished`."""
        pipe, dev, spec = self._open()
        try:
            while not stop.is_set() and (quota is None or self.c.ops < quota):
                k = self._next()
                if self.rng.random() < 0.05:  # a misprediction: something else is needed
                    k = self.rng.randrange(len(self.sources))
                src = self.sources[k]
                if self.rng.random() < 0.05:  # the source changed since it was predicted
                    i = self.rng.randrange(src.nbytes)
                    if self.pool is None:
                        src[i] ^= 0x5A
                    else:
                        self.pool.write(self.offsets[k] + i, bytes([int(src[i]) ^ 0x5A]))
                expected = src.copy()
                got = np.empty_like(src)
                dev.receive(spec.request(k, src), got)
                if not np.array_equal(got, expected):
                    self.c.errors.append(f"thread {self.idx}: bytes differ for source {k}")
                self.c.ops += 1
                self.c.bytes_verified += expected.nbytes
                if self.rng.random() < 0.002:  # restart: relinquish, close, open again
                    dev.receive(pipe.relinquish(), bytearray(0))  # NOPs only
                    self.c.hits += pipe.stats()["hits"]
                    pipe.close()
                    pipe, dev, spec = self._open()
                    self.c.restarts += 1
        except Exception as e:  # any failure is an error of the soak, reported
            self.c.errors.append(f"thread {self.idx}: {type(e).__name__}: {e}")
        finally:
            self.c.hits += pipe.stats()["hits"]
            pipe.close()
            finished.release()


def soak(
    seconds: float,
    threads: int = 4,
    seed: int = 0,
    report_every: float = 10.0,
    ops: int | None = None,
) -> dict:
    """Runs the soak for `seconds`, or, with `ops`, for exactly that many operations (split
    over the threads; `seconds` is then ignored): a fixed amount of work, however fast the
    machine is."""
    if ops is not None and ops < 1:
        raise ValueError(f"ops must be >= 1, got {ops}")
    key = SessionKey.generate()
    counters = [Counters() for _ in range(threads)]
    stop = threading.Event()
    finished = threading.Semaphore(0)  # released by each client as it ends
    quotas = [None if ops is None else ops // threads + (i < ops % threads) for i in range(threads)]
    clients = [_Client(i, key, seed * 1000 + i, counters[i]) for i in range(threads)]
    ts = [
        threading.Thread(target=c.run, args=(stop, q, finished), daemon=True)
        for c, q in zip(clients, quotas, strict=True)
    ]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    samples: list[tuple[float, int]] = []
    rss0 = None
    next_report = report_every
    ended = 0  # clients that finished (with `ops`: their quota, or an error)
    while True:
        el = time.monotonic() - t0
        if ops is None:
            if el >= seconds:
                break
            time.sleep(min(1.0, max(0.0, seconds - el)))
        else:
            if ended == threads:
                break
            ended += finished.acquire(timeout=1.0)
        el = time.monotonic() - t0
        rss, _ = _rss_kib()
        samples.append((el, rss))
        if rss0 is None and el >= min(10.0, seconds / 4):
            rss0 = rss  # after warm-up: pools, caches and the allocator have settled
        if el >= next_report:
            done = sum(c.ops for c in counters)
            errs = sum(len(c.errors) for c in counters)
            line = f"  {el:6.0f} s  ops {done:9d}  errors {errs}  rss {rss / 1024:7.1f} MiB"
            print(line, flush=True)
            next_report += report_every
        if any(c.errors for c in counters):
            break
    stop.set()
    for t in ts:
        t.join(timeout=60)
    elapsed = time.monotonic() - t0
    rss_end, peak = _rss_kib()
    errors = [e for c in counters for e in c.errors]
    hung = [i for i, t in enumerate(ts) if t.is_alive()]
    errors += [f"thread {i} did not stop" for i in hung]
    ops = sum(c.ops for c in counters)
    return {
        "seconds": elapsed,
        "threads": threads,
        "patterns": [c.pattern for c in clients],
        "ops": ops,
        "ops_per_second": ops / elapsed,
        "bytes_verified": sum(c.bytes_verified for c in counters),
        "hits": sum(c.hits for c in counters),
        "restarts": sum(c.restarts for c in counters),
        "errors": len(errors),
        "error_messages": errors[:20],
        "rss_after_warmup_mib": (rss0 or samples[0][1] if samples else rss_end) / 1024,
        "rss_end_mib": rss_end / 1024,
        "rss_peak_mib": peak / 1024,
        "rss_growth_mib": (rss_end - (rss0 or rss_end)) / 1024,
    }


def render(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"soak: {r['seconds']:.0f} s, {r['threads']} threads ({', '.join(r['patterns'])})",
            f"  operations      {r['ops']} ({r['ops_per_second']:.0f}/s), "
            f"{r['bytes_verified'] / 1e9:.2f} GB verified, {r['hits']} chunk hits, "
            f"{r['restarts']} pipeline restarts",
            f"  errors          {r['errors']}",
            f"  RSS             {r['rss_after_warmup_mib']:.1f} MiB after warm-up, "
            f"{r['rss_end_mib']:.1f} MiB at the end ({r['rss_growth_mib']:+.1f} MiB), "
            f"peak {r['rss_peak_mib']:.1f} MiB",
        ]
        + [f"  ! {m}" for m in r["error_messages"]]
    )


def to_json(r: dict[str, Any]) -> str:
    return json.dumps(r, indent=2)
