"""Replaying a serving workload through the secure channel on a simulated device.

What is measured and what is modelled (printed with every result):
- **Measured**: all CPU work of the host on the wall clock: encryption (on demand or by the
  pipeline's workers), request routing, validation, waiting. Real bytes, real AES-GCM.
- **Modelled**: the device. Its compute is a wait on a device timeline whose durations come
  from an H100 roofline (below); a DMA takes `bytes / link bandwidth` and the link carries one
  transfer at a time. The device's decryption runs in the CPU receiver model, with the clock
  paused (off the timed path; the pipeline's workers are held meanwhile, so they get no free
  time), and checks every byte delivered in every mode.

H100 roofline (NVIDIA H100 SXM5 datasheet): 989 TFLOP/s dense FP16/BF16, 3.35 TB/s HBM3. A
decode step of one layer for a batch of `b` sequences with `ctx` tokens of context takes
max(2 * params * b / FLOPS, (2 * params + KV bytes read) / HBM).

The host issues the transfer for step k once the device has started computing step k - 1
(FlexGen's one-layer prefetch), so in `plain` mode a transfer-bound workload runs at the link
speed and the CC modes show what encryption adds on top. The clock starts after set-up, as
the pipeline is told its first predictions: pipellm gets no head start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._core import MAX_KEEP_ARMED, HostPool, Pipeline, Receiver, SessionKey
from ..predictors import LayerCycle
from ..speculator import Speculator
from .workloads import MODES, ModelShape

H100_FLOPS = 989e12
H100_HBM_BPS = 3.35e12


@dataclass(frozen=True)
class Step:
    """One transfer to the device, then the device compute that needs it."""

    key: Hashable
    buf: np.ndarray
    compute_s: float
    tokens: int  # tokens finished when this step's compute ends
    # Issue the transfer only once the device has started the previous step's compute
    # (FlexGen's one-layer prefetch). False: issue right away (a batch of copies, as vLLM's
    # swap-in or an adapter load issues them back to back).
    sync: bool = True
    # What a hint-taking predictor learns just before this transfer: ("swap_out", key) or
    # ("enqueue", key).
    hints: tuple[tuple[str, Hashable], ...] = ()
    # The device's writes into host buffers just before this transfer (a swap-out's D2H copy
    # into CPU blocks): the replay runs them off the clock, before the hints are passed on.
    writes: tuple[Callable[[], None], ...] = ()


@dataclass
class Workload:
    name: str
    steps: list[Step]
    predictor: Callable[[], Any]  # the hint-taking predictor for the pipellm mode
    note: str
    depth: int = 2  # transfers predicted ahead in the pipellm mode
    chunk_bytes: int = 4 << 20
    # The pipellm mode may keep its sources write-protected between uses. False where no
    # source is used twice in the real workload (a load): buffers reused here only to bound
    # memory must cost what distinct ones would.
    keep_armed: bool = True
    # What a run is judged by: tokens per second, or (a load) the time to move every byte.
    measure: str = "tokens"

    @property
    def bytes_total(self) -> int:
        return sum(s.buf.nbytes for s in self.steps)


def layer_decode_seconds(shape: ModelShape, batch: int, ctx: int) -> float:
    params = shape.layer_weight_bytes() / 2
    kv_read = 2 * batch * ctx * shape.kv_heads * shape.head_dim * 2
    return max(2 * params * batch / H100_FLOPS, (2 * params + kv_read) / H100_HBM_BPS)


def flexgen(
    shape: ModelShape,
    steps: int,
    distinct_layers: int,
    batch: int = 32,
    ctx: int = 512,
    max_layers: int | None = None,
    seed: int = 0,
) -> Workload:
    """FlexGen weight offloading: every decode step streams every layer's weights. Memory
    holds `distinct_layers` real layer buffers (full size); layer i uses buffer
    i % distinct_layers, so the byte counts and chunking are the model's own.
    `max_layers` streams only the first layers of each step (a shorter run, same shapes)."""
    rng = np.random.default_rng(seed)
    nbytes = shape.layer_weight_bytes()
    bufs = [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in range(distinct_layers)]
    t = layer_decode_seconds(shape, batch, ctx)
    n = min(shape.layers, max_layers or shape.layers)
    order = [("layer", i) for i in range(n)]
    plan = [
        Step(key, bufs[i % distinct_layers], t, batch if i == n - 1 else 0)
        for _ in range(steps)
        for i, key in enumerate(order)
    ]
    scaled = "" if n == shape.layers else f" (first {n} of {shape.layers} layers per step)"
    note = (
        f"{shape.name} ({shape.source}): layers of {nbytes / 2**20:.0f} MiB fp16{scaled},"
        f" {distinct_layers} distinct in memory; batch {batch}, context {ctx};"
        f" {steps} decode step(s)"
    )
    return Workload(f"flexgen-{shape.name}", plan, lambda: LayerCycle(order), note)


def load(
    shape: ModelShape,
    distinct_layers: int,
    max_layers: int | None = None,
    seed: int = 0,
) -> Workload:
    """A server start: every layer's weights copied to the device once, in order, one copy
    after another (each issued once the previous one arrived, as a synchronous copy per
    tensor does), no compute in between. Memory holds `distinct_layers` real layer buffers
    (full size; layer i uses buffer i % distinct_layers); the pipellm mode keeps nothing
    armed between uses, so a reused buffer costs what a distinct one would, and it is told
    the order up front (`LoadOnce`)."""
    from ..predictors import LoadOnce

    rng = np.random.default_rng(seed)
    nbytes = shape.layer_weight_bytes()
    bufs = [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in range(distinct_layers)]
    n = min(shape.layers, max_layers or shape.layers)
    order = [("layer", i) for i in range(n)]
    plan = [Step(key, bufs[i % distinct_layers], 0.0, 0) for i, key in enumerate(order)]
    scaled = "" if n == shape.layers else f" (first {n} of {shape.layers} layers)"
    note = (
        f"{shape.name} ({shape.source}): loading {n} layers of {nbytes / 2**20:.0f} MiB fp16"
        f"{scaled}, {n * nbytes / 2**30:.1f} GiB, each copied once ({distinct_layers}"
        f" distinct buffers in memory)"
    )
    return Workload(
        f"load-{shape.name}",
        plan,
        lambda: LoadOnce(order),
        note,
        keep_armed=False,
        measure="load",
    )


def model_decode_seconds(shape: ModelShape, batch: int, ctx: int) -> float:
    """One decode step of the whole model (weights resident on the device)."""
    return shape.layers * layer_decode_seconds(shape, batch, ctx)


def _batched_steps(
    events: Iterable[Any],
    nbytes: int,
    compute_s: float,
    tokens: int,
    rng: np.random.Generator,
    pool: HostPool | None = None,
) -> list[Step]:
    """Turns a hinted event stream into steps: each run of transfers is one batch issued
    back to back (the first waits for the previous compute), the hints before it go with its
    first transfer, and its last transfer carries the device compute that follows (a decode
    step of `tokens` tokens). One real buffer of `nbytes` per distinct key: a numpy array,
    or a slice of `pool` (which then must hold every distinct key's bytes)."""
    bufs: dict[Hashable, np.ndarray] = {}
    offsets: dict[Hashable, int] = {}
    steps: list[Step] = []
    hints: list[tuple[str, Hashable]] = []
    writes: list[Callable[[], None]] = []

    def buf(k: Hashable) -> np.ndarray:
        if k not in bufs:
            data = rng.integers(0, 256, nbytes, dtype=np.uint8)
            if pool is None:
                bufs[k] = data
            else:
                off = offsets[k] = len(bufs) * nbytes
                pool.write(off, data)
                bufs[k] = np.frombuffer(memoryview(pool), dtype=np.uint8, count=nbytes, offset=off)
        return bufs[k]

    def rewrite(k: Hashable) -> Callable[[], None]:
        b = buf(k)

        def write() -> None:
            if pool is None:
                np.add(b, 1, out=b)
            else:
                pool.write(offsets[k], b + 1)

        return write

    def close_batch() -> None:
        last = steps[-1]
        steps[-1] = dataclasses.replace(last, compute_s=compute_s, tokens=tokens)

    prev = "hint"
    for ev in events:
        if ev[0] == "hint":
            if prev == "h2d":
                close_batch()
            hints.append((ev[1], ev[2]))
            if ev[1] == "swap_out":  # the device writes the CPU block
                writes.append(rewrite(ev[2]))
            prev = "hint"
            continue
        k = ev[1]
        steps.append(
            Step(k, buf(k), 0.0, 0, sync=prev == "hint", hints=tuple(hints), writes=tuple(writes))
        )
        hints, writes = [], []
        prev = "h2d"
    if steps:
        close_batch()
    return steps


def vllm_swap(
    shape: ModelShape,
    rounds: int,
    running: int = 8,
    preempted: int = 2,
    blocks_per_seq: int = 4,
    ctx: int = 512,
    seed: int = 0,
    host_pool: bool = True,
) -> Workload:
    """vLLM V0-style KV swapping (see `workloads.vllm_swap_stream`): each round swaps out
    the newly preempted sequences (their CPU blocks are rewritten, off the clock) and swaps
    back in those preempted the round before (one copy per CPU block, layer and K/V, all
    layers of the model, real block size), then the device runs one decode step of the
    batch."""
    from ..predictors import SwapFifo
    from .workloads import vllm_swap_stream

    nbytes = shape.kv_block_bytes()
    rng = np.random.default_rng(seed)
    events = list(vllm_swap_stream(rounds, running, preempted, blocks_per_seq, shape.layers, seed))
    decode = model_decode_seconds(shape, running, ctx)
    # The CPU swap space is one pool that swap-outs write through its alias (see HostPool),
    # as a vLLM integration would allocate it.
    # `host_pool=False`: one numpy array per block, rewritten in place (for comparison).
    keys = {ev[-1] for ev in events}
    pool = HostPool(max(len(keys), 1) * nbytes) if host_pool else None
    steps = _batched_steps(events, nbytes, decode, running, rng, pool)
    per_round = preempted * blocks_per_seq * shape.layers * 2
    note = (
        f"{shape.name} ({shape.source}): KV blocks of 16 tokens, {nbytes >> 10} KiB per"
        f" layer and K/V; {rounds} rounds swapping {preempted} of {running} sequences"
        f" ({per_round} copies per round), a decode step of the batch after each; CPU"
        + (
            " blocks in a HostPool, rewritten through its alias at each swap-out"
            if host_pool
            else " blocks in numpy arrays, rewritten in place at each swap-out"
        )
    )
    return Workload(
        f"vllm-swap-{shape.name}",
        steps,
        SwapFifo,
        note,
        depth=per_round,
        chunk_bytes=1 << 20,
    )


def multi_lora(
    shape: ModelShape,
    iterations: int,
    rank: int = 16,
    adapters: int = 16,
    batch: int = 4,
    change_every: int = 10,
    ctx: int = 512,
    seed: int = 0,
) -> Workload:
    """Multi-LoRA serving (see `workloads.multi_lora_stream`): each decode iteration loads
    the running batch's adapters layer by layer (rank-`rank` adapters on q, k, v, o), then
    the device runs one decode step of the base model."""
    from ..predictors import AdapterQueue
    from .workloads import multi_lora_stream

    nbytes = shape.lora_layer_bytes(rank)
    rng = np.random.default_rng(seed)
    decode = model_decode_seconds(shape, batch, ctx)
    events = multi_lora_stream(iterations, adapters, batch, shape.layers, change_every, seed)
    steps = _batched_steps(events, nbytes, decode, batch, rng)
    note = (
        f"{shape.name} ({shape.source}): rank-{rank} adapters, {nbytes / 2**20:.2f} MiB per"
        f" layer, {adapters} adapters, batch {batch} (one request changes every"
        f" {change_every} iterations); {iterations} decode iterations"
    )
    return Workload(
        f"lora-{shape.name}",
        steps,
        AdapterQueue,
        note,
        depth=2 * batch * shape.layers,
        chunk_bytes=2 << 20,
    )


def _equal(a: np.ndarray, b: np.ndarray, step: int = 16 << 20) -> bool:
    """`np.array_equal` in slices: the comparison's temporary stays small, instead of a
    fresh multi-hundred-MiB mask whose page faults (huge pages zeroed by the kernel) churn
    the memory the timed modes then run on."""
    return a.shape == b.shape and all(
        np.array_equal(a[i : i + step], b[i : i + step]) for i in range(0, a.size, step)
    )


class Clock:
    """Wall clock that can be paused (for work that is not on the timed path). While paused,
    the pipeline's workers are held too, so nobody gets free time."""

    def __init__(self, pipe: Pipeline | None = None) -> None:
        self._t0 = time.perf_counter()
        self._paused = 0.0
        self._pipe = pipe

    def now(self) -> float:
        return time.perf_counter() - self._t0 - self._paused

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if self._pipe is not None:
            self._pipe.hold_workers(True)
        t = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t
            if self._pipe is not None:
                self._pipe.hold_workers(False)

    def sleep_until(self, t: float) -> None:
        while (d := t - self.now()) > 0:
            time.sleep(min(d, 0.05))


class VirtualClock(Clock):
    """A test aid: a clock on which the host's CPU work takes no time and only waits do (a
    wait jumps to its end), and each wait first lets the pipeline's workers finish what they
    were given (`Pipeline.wait_idle`), as a long enough wait would. What a replay on it
    reports then follows from the order of its events, not from the machine's speed or load
    (its throughput is the model's alone: nothing here is measured)."""

    def __init__(self, pipe: Pipeline | None = None) -> None:
        super().__init__(pipe)
        self._virtual = 0.0

    def now(self) -> float:
        return self._virtual

    def sleep_until(self, t: float) -> None:
        if self._pipe is not None and not self._pipe.wait_idle():
            raise RuntimeError("the pipeline's workers did not go idle")
        self._virtual = max(self._virtual, t)


class SimDevice:
    def __init__(self, link_bps: float) -> None:
        self.link_bps = link_bps
        self.link_free = 0.0
        self.compute_free = 0.0

    def dma(self, nbytes: int, ready_at: float) -> float:
        start = max(ready_at, self.link_free)
        self.link_free = start + nbytes / self.link_bps
        return self.link_free

    def compute(self, seconds: float, after: float) -> float:
        start = max(after, self.compute_free)
        self.compute_free = start + seconds
        return start


def run(
    workload: Workload,
    mode: str,
    *,
    link_gbps: float,
    workers: int,
    chunk_bytes: int | None = None,
    depth: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    keep_armed: bool = True,
    virtual_clock: bool = False,
) -> dict[str, Any]:
    """Replays `workload` in `mode`; returns throughput and what was verified. `keep_armed`:
    the `pipellm` mode keeps its sources' pages write-protected between uses.
    `virtual_clock`: for tests, time the run on a `VirtualClock` (results independent of the
    machine's speed, throughput not measured)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    chunk_bytes = chunk_bytes or workload.chunk_bytes
    depth = depth or workload.depth
    key = SessionKey.generate()
    rx = Receiver(key)
    largest = max(s.buf.nbytes for s in workload.steps)
    dst = np.empty(largest, dtype=np.uint8)  # the device's buffer (receiver model)
    chunks_per_step = -(-largest // chunk_bytes)
    # Messages stay alive (holding their staging) from their transfer to the next
    # synchronisation point, where the receiver model checks them: size every pool for the
    # largest such group, so no mode runs short of resident staging.
    group = held = 0
    for s_ in workload.steps:
        if s_.sync:
            group = 0
        group += -(-s_.buf.nbytes // chunk_bytes)
        held = max(held, group)
    pipe: Pipeline | None = None
    spec: Speculator | None = None
    if mode in ("cc", "cc-parallel"):
        # On demand into reused, resident staging buffers (as the driver's bounce buffers):
        # "cc" has no worker, so the calling thread encrypts chunk by chunk and each chunk's
        # DMA starts as soon as it is sealed; "cc-parallel" adds the workers, no speculation.
        slots = max(held, 2)
        pipe = Pipeline(
            key,
            slots=slots,
            chunk_bytes=chunk_bytes,
            workers=0 if mode == "cc" else workers,
            max_staging_bytes=slots * chunk_bytes,
        )
    elif mode == "pipellm":
        slots = held + chunks_per_step * depth
        pipe = Pipeline(
            key,
            slots=slots,
            chunk_bytes=chunk_bytes,
            workers=workers,
            validation="protect",
            max_staging_bytes=slots * chunk_bytes,
            keep_armed=(
                keep_armed_for(workload, chunk_bytes) if keep_armed and workload.keep_armed else 0
            ),
        )
        spec = Speculator(pipe, workload.predictor(), depth=depth)
        for s in workload.steps:
            spec.register(s.key, s.buf)
    # The clock starts after set-up (staging allocation), right after the pipeline was told
    # its first predictions: no head start, so a short run shows pipellm's cold start too.
    clock = (VirtualClock if virtual_clock else Clock)(pipe)
    dev = SimDevice(link_gbps * 1e9)
    if spec is not None:
        spec.prime()
    verified = 0
    compute_start_prev = 0.0
    tokens = 0
    # Transfers not checked yet: the receiver model checks them in batches, with the clock
    # stopped, at each synchronisation point (one pause per batch of copies, not per copy).
    pending: list[tuple[np.ndarray, list[Any] | None]] = []
    pending_bytes = 0

    def check_pending() -> int:
        ok = 0
        with clock.paused():  # the device's decryption, off the timed path
            view = memoryview(dst)
            for src, msgs in pending:
                n = src.nbytes
                if msgs is None:  # plain: the bytes themselves arrive
                    np.copyto(dst[:n], src)
                else:
                    for off, m in msgs:
                        rx.open_into(m, view[off : off + len(m)])
                if _equal(dst[:n], src):
                    ok += n
        pending.clear()
        return ok

    try:
        for k, step in enumerate(workload.steps):
            if k and (step.sync or pending_bytes > 256 << 20):
                verified += check_pending()
                pending_bytes = 0
            if k and step.sync:
                clock.sleep_until(compute_start_prev)  # one-step prefetch, as FlexGen
            if step.writes:
                # The device's writes into host memory (swap-out DMAs): the same in every
                # mode and off the clock; pages kept write-protected by the pipellm mode fault
                # here and are armed afresh when next predicted.
                with clock.paused():
                    for write in step.writes:
                        write()
            if spec is not None and step.hints:
                for kind, hinted in step.hints:
                    spec.hint(kind, hinted)
                spec.flush()
            buf = step.buf
            arrival = clock.now()
            if mode == "plain":
                arrival = dev.dma(buf.nbytes, clock.now())
                pending.append((buf, None))
            else:
                assert pipe is not None
                transfer = spec.request(step.key, buf) if spec else pipe.request(buf)
                msgs = []
                for m in transfer:  # taking a message waits for (or does) its encryption
                    arrival = dev.dma(len(m), clock.now())
                    msgs.append((m.offset, m))
                pending.append((buf, msgs))
            pending_bytes += buf.nbytes
            compute_start_prev = dev.compute(step.compute_s, arrival)
            tokens += step.tokens
            if progress:
                progress(k + 1, len(workload.steps))
        verified += check_pending()
        clock.sleep_until(dev.compute_free)
        elapsed = dev.compute_free
        stats = pipe.stats() if pipe else None
        if pipe is not None:
            with clock.paused():
                for m in pipe.relinquish():
                    rx.open_into(m, bytearray(0))
                assert rx.expected_counter == pipe.stats()["positions_reserved"]
    finally:
        if pipe is not None:
            pipe.close()
    return {
        "throughput": tokens / elapsed,
        "load_Bps": workload.bytes_total / elapsed,
        "elapsed_s": elapsed,
        "tokens": tokens,
        "bytes": workload.bytes_total,
        "bytes_verified": verified,
        "pipeline": stats,
    }


def _distinct_buffers(workload: Workload) -> Iterator[np.ndarray]:
    """The workload's buffers, each once, in order of first use."""
    seen: set[int] = set()
    for st in workload.steps:
        if id(st.buf) not in seen:
            seen.add(id(st.buf))
            yield st.buf


def keep_armed_for(workload: Workload, chunk_bytes: int) -> int:
    """Chunks the `pipellm` mode keeps write-protected between uses: every distinct chunk of
    the workload's buffers, up to the pipeline's bound. A kept chunk that nothing writes is
    never re-armed; one rewritten between uses (a KV block at its swap-out) is armed afresh:
    after a fault for numpy buffers, with none for a HostPool's (written through its
    alias)."""
    n = sum(-(-b.nbytes // chunk_bytes) for b in _distinct_buffers(workload))
    return min(n, MAX_KEEP_ARMED)


def encryption_capacity(
    workload: Workload,
    workers: int,
    chunk_bytes: int = 4 << 20,
    sample_bytes: int = 256 << 20,
    keep_armed: bool = True,
) -> float:
    """Bytes/s the pipeline's workers pre-encrypt on this machine, measured now on the
    workload's own buffers (up to `sample_bytes` of them, cold in cache, with page
    protection as in the `pipellm` mode): the supply side to compare with the demand.
    Where the `pipellm` mode keeps chunks armed between uses, a first pass arms them (and
    is not timed), so the timed pass pays what the steady state pays."""
    key = SessionKey.generate()
    sample: list[np.ndarray] = []
    total = 0
    for b in _distinct_buffers(workload):
        if total >= sample_bytes:
            break
        sample.append(b)
        total += b.nbytes
    n = sum(-(-b.nbytes // chunk_bytes) for b in sample)
    keep = (
        min(n, keep_armed_for(workload, chunk_bytes)) if keep_armed and workload.keep_armed else 0
    )
    with Pipeline(
        key,
        slots=n,
        chunk_bytes=chunk_bytes,
        workers=max(workers, 1),
        validation="protect",
        max_staging_bytes=n * chunk_bytes,
        keep_armed=keep,
    ) as pipe:
        if keep:
            pipe.predict(sample)
            while pipe.stats()["chunks_pre_encrypted"] < n:
                time.sleep(0.0002)
            pipe.relinquish()
            deadline = time.perf_counter() + 10  # a chunk that could not be armed is not kept
            while pipe.stats()["watches_kept"] < keep and time.perf_counter() < deadline:
                time.sleep(0.0002)
        done = pipe.stats()["chunks_pre_encrypted"]
        t0 = time.perf_counter()
        pipe.predict(sample)
        while pipe.stats()["chunks_pre_encrypted"] < done + n:
            time.sleep(0.0002)
        return total / (time.perf_counter() - t0)


def describe_model() -> Sequence[str]:
    return [
        "measured: host CPU work on the wall clock (encryption, routing, validation)",
        f"modelled: device compute from an H100 roofline ({H100_FLOPS / 1e12:.0f} TFLOP/s,"
        f" {H100_HBM_BPS / 1e12:.2f} TB/s), DMA = bytes / link bandwidth, one at a time",
        "verified off the clock: the receiver model decrypts and checks every byte delivered",
    ]
