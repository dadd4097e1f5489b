"""Critical-path cost of the driver's encryption with and without pipellm's interposer.

Builds the driver emulator (tests/driver_emulator) and runs, side by side in one invocation:
- `openssl`: the emulator on the real libcrypto (what the CUDA driver pays per 1 MiB chunk);
- `hits`: under the interposer, a layer cycle it learns (after warm-up nearly every chunk
  is served from a pre-encrypted one);
- `watched`: as `hits`, with the sources registered (`pipellm_cc_watch`): chunks are
  validated by page protection, so a hit copies the ciphertext without reading the source;
- `misses`: under the interposer, a random chunk order it cannot predict;
- `rekeyed`, `rekeyed-watched`: as `hits` and `watched`, with the cipher and key passed again at
  every init (`EVP_EncryptInit_ex(ctx, cipher, NULL, key, iv)`), against `openssl-rekeyed`,
  the same pattern on the real libcrypto (OpenSSL resets the context at each such init);
- `fresh-keys`: a new key at every init and a random order (nothing can be served), against
  `openssl-fresh-keys`: a program that only ever misses;
- `cold`, `cold-watched`: a model load (tensors of 32 chunks, all allocated first, each copied
  once in order, no address copied twice; every chunk counts, none is "warm-up"), against
  `openssl-cold`: only the continuation of each copy can be predicted.
Each run also times a plain memcpy of the same 1 MiB from the same (cold) source: the floor.
The emulator waits GAP_US of "device time" after each chunk, as the driver waits for its
bounce buffer. Figures are medians over the steady state (first quarter skipped).

D2H (device to host), one emulator run under the interposer with a registered receive pool:
per 1 MiB chunk, the driver's decryption calls (Init, SET_TAG, Update, Final) into the pool
(`deferred`: answered after the tag check, decrypted later) and into ordinary memory
(`openssl`: forwarded to the real library), `ready`: from the first call until the pool
chunk's last byte is readable (a read waits for the deferred decryption), and a memcpy of
the same bytes.

    python bench/cc_bench.py [--chunks 800] [--gap-us 400] [--d2h-chunks 400] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from pipellm import cc

ROOT = Path(__file__).resolve().parent.parent
# Chunks per tensor in the emulator's cold order (PER_TENSOR in driver_emulator.c).
COLD_TENSOR_CHUNKS = 32


def build(out: Path) -> Path:
    exe = out / "driver_emulator"
    compiler = shutil.which(os.environ.get("CC", "cc")) or "cc"
    src = ROOT / "tests" / "driver_emulator" / "driver_emulator.c"
    subprocess.run(
        [compiler, "-O2", "-pthread", "-o", str(exe), str(src), "-l:libcrypto.so.3"], check=True
    )
    return exe


def run(exe: Path, args: list[str], env: dict[str, str]) -> tuple[dict[str, float], dict[str, int]]:
    p = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, check=True)
    figures = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", p.stdout)}
    stats: dict[str, int] = {}
    for line in p.stderr.splitlines():
        if line.startswith("pipellm-cc: stats "):
            stats = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    return figures, stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=800)
    ap.add_argument("--gap-us", type=float, default=400.0)
    ap.add_argument("--d2h-chunks", type=int, default=400)
    ap.add_argument("--mode", default="link", choices=["link", "dlopen"])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELLM_CC", "LD_"))}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        shim_env = cc.environment(base, log=True, directory=Path(tmp) / "cc")
        rows = {}
        rekey = {"PIPELLM_EMU_REKEY": "1"}
        fresh = {"PIPELLM_EMU_REKEY": "fresh"}
        watch = {"PIPELLM_EMU_WATCH": "1"}
        # name, environment, chunk order, the OpenSSL row it is compared with
        plan = (
            ("openssl", base, "cycle", "openssl"),
            ("hits", shim_env, "cycle", "openssl"),
            ("watched", {**shim_env, **watch}, "cycle", "openssl"),
            ("misses", shim_env, "random", "openssl"),
            ("openssl-rekeyed", {**base, **rekey}, "cycle", "openssl-rekeyed"),
            ("rekeyed", {**shim_env, **rekey}, "cycle", "openssl-rekeyed"),
            ("rekeyed-watched", {**shim_env, **rekey, **watch}, "cycle", "openssl-rekeyed"),
            ("openssl-fresh-keys", {**base, **fresh}, "random", "openssl-fresh-keys"),
            ("fresh-keys", {**shim_env, **fresh}, "random", "openssl-fresh-keys"),
            ("openssl-cold", base, "cold", "openssl-cold"),
            ("cold", shim_env, "cold", "openssl-cold"),
            ("cold-watched", {**shim_env, **watch}, "cold", "openssl-cold"),
        )
        baseline = {name: ref for name, _, _, ref in plan}
        for name, env, order, _ in plan:
            args = [a.mode, "bench", str(a.chunks), str(a.gap_us), order]
            rows[name] = run(exe, args, env)
        d2h = run(
            exe,
            [a.mode, "bench-d2h", str(a.d2h_chunks)],
            {**shim_env, "PIPELLM_EMU_RECEIVE": "1"},
        )
    print(f"driver emulator ({a.mode}), 1 MiB chunks, {a.gap_us:.0f} us device time per chunk")
    head = ("path", "chunk us", "memcpy us", "/ memcpy", "/ openssl")
    print(f"{head[0]:18} {head[1]:>9} {head[2]:>10} {head[3]:>9} {head[4]:>10}  counters")
    out = {}
    for name, (fig, st) in rows.items():
        c, m = fig["chunk_us"], fig["memcpy_us"]
        ossl = rows[baseline[name]][0]["chunk_us"]
        served = (
            f"hits {st.get('hits', 0)} ({st.get('hits_watched', 0)} watched),"
            f" misses {st.get('misses', 0)}"
            if st
            else "-"
        )
        if st and name.startswith("cold"):
            # Each tensor's first chunk cannot be predicted; the others can.
            after_first = a.chunks - -(-a.chunks // COLD_TENSOR_CHUNKS)
            served += f" ({st.get('hits', 0) / after_first:.0%} after each tensor's first)"
        print(f"{name:18} {c:9.1f} {m:10.1f} {c / m:8.2f}x {c / ossl:9.2f}x  {served}")
        out[name] = {**fig, "vs_memcpy": c / m, "vs_openssl": c / ossl, "stats": st}
    fig, st = d2h
    if fig.get("bad", 1) != 0:
        raise SystemExit(f"D2H bench read back wrong plaintext: {fig}")
    print(f"\nD2H, 1 MiB chunks ({st.get('d2h_deferred', 0)} deferred)")
    print(f"{'path':10} {'chunk us':>9} {'/ memcpy':>9} {'/ openssl':>10}")
    m, o = fig["memcpy_us"], fig["openssl_us"]
    for name, key in (("deferred", "pool_us"), ("openssl", "openssl_us"), ("ready", "ready_us")):
        print(f"{name:10} {fig[key]:9.1f} {fig[key] / m:8.2f}x {fig[key] / o:9.2f}x")
    out["d2h"] = {**fig, "stats": st}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
