"""The `pipellm` command.

    pipellm bench [--workload flexgen-opt-13b] [--link-gbps 4] [--workers 2] [--json]

replays a serving workload through the secure channel on a simulated device in four modes
(plain, cc, cc-parallel, pipellm) and prints throughput (for `load-<model>`, a server start
copying every layer once: load time and GB/s) and overhead against plain.

    pipellm run [--workers N] [--depth N] [--log] -- CMD [ARGS...]

runs CMD with the libcrypto interposer loaded (the driver backend for Hopper CC GPUs).

    pipellm soak [--seconds 60 | --ops N] [--threads 4] [--json]

runs mixed serving patterns on threads with mispredictions, source changes, key rotations
and restarts, every byte checked; reports operations, errors (must be 0) and RSS.

    pipellm doctor [--json]

says whether CC mode is on, which libcrypto the driver would load, whether the interposer
is built and loaded, and which backend pipellm will use.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .harness.workloads import MODELS, MODES

if TYPE_CHECKING:
    from .harness import replay

# What `pip install pipellm` alone brings is enough for `run` and `doctor`; `bench` and `soak`
# replay workloads on numpy arrays, which come with the `bench` extra.
_BENCH_EXTRA = "pip install 'pipellm[bench]'"


def _import_replay() -> Any:
    """The replay harness, or a one-line error naming the extra that brings numpy."""
    try:
        from .harness import replay
    except ModuleNotFoundError as e:
        if e.name != "numpy":
            raise
        raise _MissingExtra(f"this command needs numpy: {_BENCH_EXTRA}") from None
    return replay


class _MissingExtra(Exception):
    """A command needs a package of an optional extra that is not installed."""


def _progress(label: str) -> Any:
    def show(done: int, total: int) -> None:
        if not sys.stderr.isatty() and done not in (total,):
            return
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\r  {label:12} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


KINDS = ("flexgen", "vllm-swap", "lora", "load")


# Numeric arguments are checked by argparse itself (these `type=` functions), so that a bad
# value is a one-line usage error with exit code 2, never a traceback or a meaningless run.


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None


def int_in(lo: int, hi: int) -> Any:
    """`type=`: an int in lo..=hi."""

    def parse(text: str) -> int:
        v = _int(text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}, got {v}")
        return v

    parse.__name__ = f"int in {lo}..{hi}"
    return parse


def positive_int(hi: int) -> Any:
    """`type=`: an int in 1..=hi."""
    return int_in(1, hi)


def non_negative_int(hi: int) -> Any:
    """`type=`: an int in 0..=hi."""
    return int_in(0, hi)


def finite_positive_float(hi: float = math.inf) -> Any:
    """`type=`: a finite float > 0 (and <= hi)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(v) and 0 < v <= hi):
            bound = "" if hi == math.inf else f" and at most {hi:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number > 0{bound}, got {text}")
        return v

    parse.__name__ = "finite positive number"
    return parse


# Upper bounds: what a run on one host can use. Beyond them a run would only exhaust memory
# or time (a LoRA rank of 100000 allocates gigabytes; thousands of threads oversubscribe).
MAX_WORKERS = 256  # encryption threads of `bench`
MAX_CC_WORKERS = 64  # the interposer clamps PIPELLM_CC_WORKERS to 1..64
MAX_CC_DEPTH = 256  # and PIPELLM_CC_DEPTH to 1..256
MAX_RANK = 1024  # LoRA adapter rank (typical: 8-64)
MAX_DISTINCT_LAYERS = 32  # full-size layer buffers held in memory at once
MAX_LAYERS = 10_000
MAX_DEPTH = 4096  # transfers predicted ahead
MAX_CHUNK_MIB = 1024
MAX_COUNT = 1_000_000  # steps, rounds, iterations
MAX_THREADS = 256
MAX_OPS = 10**12
MAX_SEED = 2**63 - 1
MAX_LINK_GBPS = 1e6


def make_workload(args: argparse.Namespace) -> replay.Workload | None:
    replay = _import_replay()
    for kind in KINDS:
        model = args.workload.removeprefix(kind + "-")
        if model != args.workload and model in MODELS:
            shape = MODELS[model]
            if kind == "flexgen":
                return replay.flexgen(
                    shape,
                    steps=args.steps,
                    distinct_layers=args.distinct_layers,
                    max_layers=args.max_layers,
                )
            if kind == "load":
                return replay.load(
                    shape,
                    distinct_layers=args.distinct_layers,
                    max_layers=args.load_layers or None,
                )
            if kind == "vllm-swap":
                return replay.vllm_swap(shape, rounds=args.rounds, host_pool=args.host_pool)
            return replay.multi_lora(shape, iterations=args.iterations, rank=args.rank)
    return None


def bench(args: argparse.Namespace) -> int:
    replay = _import_replay()
    w = make_workload(args)
    if w is None:
        names = ", ".join(f"{k}-{m}" for k in KINDS for m in MODELS)
        print(
            f"pipellm bench: unknown workload {args.workload!r}; available: {names}",
            file=sys.stderr,
        )
        return 2
    chunk = (args.chunk_mib << 20) if args.chunk_mib else w.chunk_bytes
    capacity = replay.encryption_capacity(w, args.workers, chunk, keep_armed=args.keep_armed)
    results: dict[str, Any] = {}
    if not args.json:
        print(f"pipellm {__version__} bench: {w.name}\n  {w.note}")
        for line in replay.describe_model():
            print(f"  {line}")
        print(
            f"  link {args.link_gbps:g} GB/s; {args.workers} encryption workers;"
            f" chunks of {chunk / 2**20:g} MiB; host: {os.cpu_count()} cores"
        )
    for mode in args.modes:
        results[mode] = replay.run(
            w,
            mode,
            link_gbps=args.link_gbps,
            workers=args.workers,
            chunk_bytes=chunk,
            depth=args.depth or None,
            progress=None if args.json else _progress(mode),
            keep_armed=args.keep_armed,
        )
    plain = results.get("plain")
    demand = w.bytes_total / plain["elapsed_s"] if plain else None
    out = {
        "workload": w.name,
        "device": f"simulated H100 (roofline), {args.link_gbps:g} GB/s link",
        "note": w.note,
        "modelled": replay.describe_model(),
        "encryption_capacity_Bps": capacity,
        "demand_Bps": demand,
        "modes": {},
    }
    load = w.measure == "load"
    for mode, r in results.items():
        fields = ("throughput", "load_Bps", "elapsed_s", "tokens", "bytes", "bytes_verified")
        entry = {k: r[k] for k in fields}
        if plain:
            rate = "load_Bps" if load else "throughput"
            entry["overhead_vs_plain"] = 1 - r[rate] / plain[rate]
        if r["pipeline"]:
            entry["pipeline"] = r["pipeline"]
        out["modes"][mode] = entry
    if args.plot:
        from .harness import plot

        rows = plot.sweep(
            w,
            args.modes,
            link_gbps=args.link_gbps,
            workers=args.workers,
            chunk_bytes=chunk,
            depth=args.depth or None,
        )
        out["sweep"] = rows
        title = f"{w.name}, link {args.link_gbps:g} GB/s, {args.workers} workers"
        plot.draw(args.plot, title, results, rows)
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"\n  encryption capacity ({args.workers} workers, on this workload):"
        f" {capacity / 1e9:.1f} GB/s; workload demand (bytes per second of plain run):"
        f" {demand / 1e9:.1f} GB/s"
        if demand
        else ""
    )
    if demand and capacity < demand:
        print(
            "  capacity < demand: the CPU is the limit; pipellm cannot beat capacity/demand"
            f" = {capacity / demand:.0%} of plain"
        )
    rate_head = f"{'load s':>8} {'GB/s':>6}" if load else f"{'tokens/s':>10}"
    print(
        f"\n  {'mode':12} {rate_head} {'vs plain':>9} {'hits':>6} {'on-demand':>10} {'verified':>9}"
    )
    for mode, e in out["modes"].items():
        p = e.get("pipeline") or {}
        ov = f"{-e['overhead_vs_plain']:+.1%}" if "overhead_vs_plain" in e else "-"
        ov = ov.replace("-0.0%", "+0.0%")
        od = p.get("bytes_on_demand")
        rate = (
            f"{e['elapsed_s']:8.2f} {e['load_Bps'] / 1e9:6.2f}"
            if load
            else f"{e['throughput']:10.2f}"
        )
        print(
            f"  {mode:12} {rate} {ov:>9} {p.get('hits', '-'):>6}"
            f" {'-' if od is None else f'{od / 2**20:.0f} MiB':>10}"
            f" {'all' if e['bytes_verified'] == e['bytes'] else 'NO':>9}"
        )
    if args.plot:
        print(f"\n  plot written to {args.plot}")
    return 0 if all(e["bytes_verified"] == e["bytes"] for e in out["modes"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pipellm", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="replay a serving workload in plain, cc, cc-parallel, pipellm")
    b.add_argument(
        "--workload",
        default="flexgen-opt-13b",
        help="flexgen-<model>, vllm-swap-<model> or lora-<model>; model one of "
        + ", ".join(MODELS),
    )
    b.add_argument(
        "--link-gbps",
        type=finite_positive_float(MAX_LINK_GBPS),
        default=4.0,
        help="simulated CPU-GPU link bandwidth, GB/s (default 4)",
    )
    b.add_argument(
        "--workers",
        type=positive_int(MAX_WORKERS),
        default=2,
        help=f"encryption threads, 1-{MAX_WORKERS} (default 2)",
    )
    b.add_argument(
        "--steps", type=positive_int(MAX_COUNT), default=1, help="decode steps (default 1)"
    )
    b.add_argument(
        "--max-layers",
        type=non_negative_int(MAX_LAYERS),
        default=16,
        help="layers streamed per step (default 16; 0: all of the model's)",
    )
    b.add_argument(
        "--load-layers",
        type=non_negative_int(MAX_LAYERS),
        default=0,
        help="layers a load-<model> workload copies (default 0: all of the model's)",
    )
    b.add_argument(
        "--distinct-layers",
        type=positive_int(MAX_DISTINCT_LAYERS),
        default=3,
        help=f"distinct layer buffers held in memory, 1-{MAX_DISTINCT_LAYERS} (default 3)",
    )
    b.add_argument(
        "--chunk-mib",
        type=non_negative_int(MAX_CHUNK_MIB),
        default=0,
        help="chunk size in MiB (default, or 0: the workload's, 4 for flexgen)",
    )
    b.add_argument(
        "--rounds", type=positive_int(MAX_COUNT), default=32, help="vllm-swap: preemption rounds"
    )
    b.add_argument(
        "--host-pool",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="vllm-swap: CPU blocks in a HostPool, rewritten through its alias (default: on;"
        " off: numpy arrays rewritten in place)",
    )
    b.add_argument(
        "--keep-armed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pipellm mode: keep sources write-protected between uses (default: on)",
    )
    b.add_argument(
        "--iterations", type=positive_int(MAX_COUNT), default=40, help="lora: decode iterations"
    )
    b.add_argument(
        "--rank",
        type=positive_int(MAX_RANK),
        default=16,
        help=f"lora: adapter rank, 1-{MAX_RANK} (typically 8-64; default 16)",
    )
    b.add_argument(
        "--depth",
        type=non_negative_int(MAX_DEPTH),
        default=0,
        help="transfers predicted ahead (default, or 0: the workload's)",
    )
    b.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    b.add_argument("--json", action="store_true", help="print one JSON document")
    b.add_argument(
        "--plot",
        type=Path,
        metavar="OUT.png",
        help="also draw throughput per mode and an overhead sweep against the"
        " compute/bytes ratio (runs the workload again; needs matplotlib)",
    )
    r = sub.add_parser("run", help="run a command with the libcrypto interposer loaded")
    r.add_argument(
        "--workers",
        type=positive_int(MAX_CC_WORKERS),
        default=None,
        help=f"pre-encryption threads, 1-{MAX_CC_WORKERS}",
    )
    r.add_argument(
        "--depth",
        type=positive_int(MAX_CC_DEPTH),
        default=None,
        help=f"chunks pre-encrypted ahead, 1-{MAX_CC_DEPTH}",
    )
    r.add_argument("--log", action="store_true", help="log events and counters to stderr")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    so = sub.add_parser("soak", help="mixed workloads on threads for a while; errors must be 0")
    so.add_argument(
        "--seconds", type=finite_positive_float(), default=60.0, help="how long (default 60)"
    )
    so.add_argument(
        "--threads",
        type=positive_int(MAX_THREADS),
        default=4,
        help="client threads (default 4)",
    )
    so.add_argument("--seed", type=non_negative_int(MAX_SEED), default=0)
    so.add_argument(
        "--ops",
        type=positive_int(MAX_OPS),
        default=None,
        help="run exactly this many operations (split over the threads) instead of --seconds",
    )
    so.add_argument("--json", action="store_true", help="print one JSON document at the end")
    d = sub.add_parser("doctor", help="what this machine offers pipellm")
    d.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    try:
        return _dispatch(args)
    except _MissingExtra as e:
        print(f"pipellm {args.command}: {e}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "bench":
        if args.max_layers == 0:
            args.max_layers = None
        return bench(args)
    if args.command == "run":
        from . import cc

        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        try:
            cc.run(cmd, workers=args.workers, depth=args.depth, log=args.log)
        except cc.InterposerError as e:
            print(f"pipellm run: {e}", file=sys.stderr)
            return 2
        return 0  # not reached: run() replaces this process
    if args.command == "soak":
        _import_replay()  # soak runs on numpy arrays too: say which extra brings it
        from .harness import soak

        if args.seconds <= 0 or args.threads < 1 or (args.ops is not None and args.ops < 1):
            print(
                "pipellm soak: --seconds must be > 0, --threads >= 1 and --ops >= 1",
                file=sys.stderr,
            )
            return 2
        rep = soak.soak(args.seconds, args.threads, args.seed, ops=args.ops)
        print(soak.to_json(rep) if args.json else soak.render(rep))
        return 0 if rep["errors"] == 0 else 1
    if args.command == "doctor":
        from . import doctor

        rep = doctor.report()
        print(json.dumps(rep, indent=2) if args.json else doctor.render(rep))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
