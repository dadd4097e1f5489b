"""The workload replay and `pipellm bench` (on OPT-125M shapes, small enough for CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipellm.harness import replay
from pipellm.harness.workloads import MODELS

# Where a test counts hits, the replay runs on a virtual clock: each of its waits (the
# device's compute) lets the workers finish what they were given, so what they pre-encrypted
# by the next transfer follows from the order of events, not from the machine's load.


@pytest.mark.parametrize("mode", replay.MODES)
def test_every_mode_delivers_and_verifies_every_byte(mode: str) -> None:
    w = replay.flexgen(MODELS["opt-125m"], steps=2, distinct_layers=2, max_layers=4)
    virtual = mode == "pipellm"  # the other modes run on the wall clock
    r = replay.run(w, mode, link_gbps=8, workers=2, chunk_bytes=1 << 20, virtual_clock=virtual)
    assert r["bytes_verified"] == r["bytes"] == w.bytes_total > 0
    assert r["tokens"] == 2 * 32 and r["throughput"] > 0
    if mode == "pipellm":
        # Every transfer after the first follows a wait: the layer cycle's predictions were
        # all encrypted by then (the first transfer has no wait before it: it may be late).
        assert r["pipeline"]["hits"] > 0, r["pipeline"]


def test_plain_mode_runs_at_link_speed_for_a_transfer_bound_workload() -> None:
    w = replay.flexgen(MODELS["opt-125m"], steps=1, distinct_layers=1, max_layers=4)
    link_time = w.bytes_total / 1e9
    # The model: host work costs nothing on a virtual clock, so the run takes the link's time
    # plus the device's compute, exactly, however loaded the machine is.
    r = replay.run(w, "plain", link_gbps=1, workers=1, chunk_bytes=1 << 20, virtual_clock=True)
    compute = sum(s.compute_s for s in w.steps)
    assert link_time <= r["elapsed_s"] <= link_time + compute + 1e-9
    # On the wall clock, host delays can only add to that (how much is the machine's
    # business, not a verdict).
    r = replay.run(w, "plain", link_gbps=1, workers=1, chunk_bytes=1 << 20)
    assert r["elapsed_s"] >= link_time


def bench(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs `pipellm bench` on a tiny OPT-125M FlexGen run (one layer buffer, 1 MiB chunks)
    unless `args` names another workload."""
    tiny = ["--workload", "flexgen-opt-125m", "--distinct-layers", "1", "--chunk-mib", "1"]
    return subprocess.run(
        [sys.executable, "-m", "pipellm.cli", "bench", *tiny, *args],
        capture_output=True,
        text=True,
        check=check,
    )


def test_cli_json_reports_all_modes() -> None:
    out = bench("--max-layers", "3", "--json").stdout
    doc = json.loads(out)
    assert doc["workload"] == "flexgen-opt-125m"
    assert set(doc["modes"]) == set(replay.MODES)
    for m in doc["modes"].values():
        assert m["throughput"] > 0 and m["bytes_verified"] == m["bytes"]
    assert doc["modes"]["plain"]["overhead_vs_plain"] == 0


def test_cli_rejects_unknown_workloads() -> None:
    r = bench("--workload", "x-y", check=False)  # a later --workload wins
    assert r.returncode == 2 and "available" in r.stderr


@pytest.mark.parametrize("make", ["vllm_swap", "multi_lora"])
@pytest.mark.parametrize("mode", replay.MODES)
def test_swap_and_lora_workloads_verify_every_byte(make: str, mode: str) -> None:
    shape = MODELS["opt-125m"]
    w = (
        # Enough rounds (iterations) that transfers hinted a round ahead get pre-encrypted
        # even on a loaded machine: the first round swaps in nothing and the second's
        # swap-ins are hinted only as they start (the first iteration's adapters, likewise).
        replay.vllm_swap(shape, rounds=6)
        if make == "vllm_swap"
        else replay.multi_lora(shape, iterations=12, adapters=4, batch=2, change_every=2)
    )
    r = replay.run(w, mode, link_gbps=8, workers=2, virtual_clock=mode == "pipellm")
    assert r["bytes_verified"] == r["bytes"] == w.bytes_total > 0
    assert r["tokens"] > 0
    if mode == "pipellm":
        assert r["pipeline"]["hits"] > 0  # the hint-driven predictor pre-encrypted them


def test_cli_plot_draws_a_png(tmp_path: Path) -> None:
    out = tmp_path / "bench.png"
    bench("--max-layers", "2", "--modes", "plain", "cc", "--plot", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode", replay.MODES)
def test_a_model_load_copies_every_layer_once_and_verifies_it(mode: str) -> None:
    shape = MODELS["opt-125m"]
    w = replay.load(shape, distinct_layers=2, max_layers=6)
    assert [s.key for s in w.steps] == [("layer", i) for i in range(6)]
    assert w.bytes_total == 6 * shape.layer_weight_bytes()
    chunk = 1 << 20
    r = replay.run(w, mode, link_gbps=8, workers=2, chunk_bytes=chunk, virtual_clock=True)
    assert r["bytes_verified"] == r["bytes"] == w.bytes_total
    assert r["load_Bps"] > 0
    if mode == "pipellm":
        # Told the order up front (LoadOnce), the pipeline pre-encrypts the next layers while
        # one is copied: every layer after the first is a hit whole (the virtual clock's wait
        # before each copy lets the workers finish what they were given).
        per_layer = -(-shape.layer_weight_bytes() // chunk)
        s = r["pipeline"]
        assert s["hits"] >= 5 * per_layer, s
        assert s["watches_kept"] == 0, "a load keeps nothing armed: each layer costs its arming"


def test_cli_reports_a_load_in_seconds_and_gb_per_s() -> None:
    r = bench("--workload", "load-opt-125m", "--load-layers", "3", "--json")
    doc = json.loads(r.stdout)
    assert doc["workload"] == "load-opt-125m"
    for m in doc["modes"].values():
        assert m["load_Bps"] > 0 and m["bytes_verified"] == m["bytes"]
    text = bench("--workload", "load-opt-125m", "--load-layers", "2").stdout
    assert "load s" in text and "GB/s" in text
