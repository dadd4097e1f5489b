"""Serving workloads built from real model shapes (the transfer patterns pipellm predicts).

Model shapes are the published configurations:
- OPT-125M/13B/30B/66B: the `config.json` of facebook/opt-125m, -13b, -30b, -66b on the
  Hugging Face Hub (125M is the small one for quick runs and tests);
  OPT-175B: Table 1 of Zhang et al., "OPT: Open Pre-trained Transformer Language Models"
  (2022) (96 layers, 96 heads, d_model 12288; FFN 4x).
- Llama-2-13B/70B: the `config.json` of meta-llama/Llama-2-13b-hf and -70b-hf.

Byte counts are fp16 (2 bytes per parameter / cached value). Each generator yields the keys
of the host-to-device transfers in the order serving issues them, plus hint events for the
predictors that take hints, so the same stream drives every predictor and the benchmark.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Literal

# The four ways the benchmark replays a workload (replay.run): no encryption, on-demand
# encryption on one thread (as the CC driver does), on demand on worker threads, pipellm.
# Here rather than in replay so that the CLI can list them without numpy.
MODES = ("plain", "cc", "cc-parallel", "pipellm")


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    family: Literal["opt", "llama"]
    source: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_weight_bytes(self) -> int:
        """Bytes of one decoder layer's weights (fp16), biases and norms included."""
        h, f, kv = self.hidden, self.ffn, self.kv_heads * self.head_dim
        if self.family == "opt":
            # q, k, v, out projections with biases; fc1, fc2 with biases; 2 layer norms.
            params = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h
        else:
            # q and o (h x h), k and v (h x kv), gate/up/down (h x f); 2 RMS norms.
            params = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
        return 2 * params

    def kv_block_bytes(self, block_tokens: int = 16) -> int:
        """Bytes of one K (or V) cache block of one layer: vLLM copies each separately."""
        return block_tokens * self.kv_heads * self.head_dim * 2

    def lora_layer_bytes(self, rank: int) -> int:
        """Bytes of one layer of a LoRA adapter on q, k, v, o (A: r x h, B: out x r)."""
        kv = self.kv_heads * self.head_dim
        outs = [self.hidden, kv, kv, self.hidden]
        return sum(2 * (rank * self.hidden + o * rank) for o in outs)


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in [
        ModelShape("opt-125m", 12, 768, 12, 12, 3072, "opt", "hf:facebook/opt-125m config.json"),
        ModelShape("opt-13b", 40, 5120, 40, 40, 20480, "opt", "hf:facebook/opt-13b config.json"),
        ModelShape("opt-30b", 48, 7168, 56, 56, 28672, "opt", "hf:facebook/opt-30b config.json"),
        ModelShape("opt-66b", 64, 9216, 72, 72, 36864, "opt", "hf:facebook/opt-66b config.json"),
        ModelShape("opt-175b", 96, 12288, 96, 96, 49152, "opt", "OPT paper, Table 1"),
        ModelShape("llama-2-13b", 40, 5120, 40, 40, 13824, "llama", "hf:meta-llama/Llama-2-13b-hf"),
        ModelShape("llama-2-70b", 80, 8192, 64, 8, 28672, "llama", "hf:meta-llama/Llama-2-70b-hf"),
    ]
}

# A step of a workload: ("h2d", key) is a transfer to the device; ("hint", kind, key) is
# information a hint-taking predictor gets (a swap-out, a queued adapter).
Event = tuple[str, Hashable] | tuple[str, str, Hashable]


def flexgen_stream(layers: int, steps: int) -> Iterator[Event]:
    """FlexGen-style weight offloading: every decode step streams every layer, in order."""
    for _ in range(steps):
        for i in range(layers):
            yield ("h2d", ("layer", i))


def vllm_swap_stream(
    rounds: int,
    running: int = 8,
    preempted: int = 2,
    blocks_per_seq: int = 4,
    layers: int = 4,
    seed: int = 0,
) -> Iterator[Event]:
    """vLLM V0-style KV swapping under memory pressure. Each round, the `preempted` most
    recently admitted sequences are swapped out (one copy per layer, K/V, block, into CPU
    blocks from a free list), and the sequences swapped out in the previous round come back
    in, first come, first served (vLLM's FCFS policy); a decode step of the batch follows.
    A sequence therefore stays swapped out for one decode step: vLLM's scheduler does not
    swap a sequence back in on the step that preempted it (the memory that forced the
    preemption is still in use then). CPU blocks are reused from the allocator's free list,
    so the same CPU addresses recur, as they do in vLLM. Keys are (cpu block, layer,
    "k"|"v")."""
    rng = random.Random(seed)
    free = list(range(running * blocks_per_seq))  # CPU block ids
    order = list(range(running))
    waiting: list[tuple[int, list[int]]] = []  # swapped out, in swap-out order
    for _ in range(rounds):
        victims = order[-preempted:]
        swapped: list[tuple[int, list[int]]] = []
        for seq in victims:
            cpu = [free.pop() for _ in range(blocks_per_seq)]
            swapped.append((seq, cpu))
            for b in cpu:
                for layer in range(layers):
                    for kv in ("k", "v"):
                        yield ("hint", "swap_out", (b, layer, kv))
        for _seq, cpu in waiting:  # FCFS: first swapped out, first back
            for b in cpu:
                for layer in range(layers):
                    for kv in ("k", "v"):
                        yield ("h2d", (b, layer, kv))
            free.extend(reversed(cpu))
        waiting = swapped
        if rng.random() < 0.05:  # now and then the admission order changes
            rng.shuffle(order)


def multi_lora_stream(
    iterations: int,
    adapters: int = 32,
    batch: int = 4,
    layers: int = 8,
    change_every: int = 40,
    seed: int = 0,
) -> Iterator[Event]:
    """Multi-LoRA serving (S-LoRA/PEFT-style): each decode iteration loads the adapters of the
    running batch, layer by layer, from host memory. The batch changes when requests finish
    (every `change_every` iterations one request leaves and the next queued one joins); the
    queue is known ahead: the scheduler composes the next iteration's batch while the
    current one runs, so the hints for iteration i + 1's adapters come before iteration i's
    loads. Keys are (adapter, layer)."""
    rng = random.Random(seed)
    popularity = [1.0 / (i + 1) for i in range(adapters)]  # Zipf-like

    def draw() -> int:
        return rng.choices(range(adapters), weights=popularity)[0]

    current = [draw() for _ in range(batch)]
    queue = [draw() for _ in range(iterations // change_every + batch)]
    batches: list[list[int]] = []
    for it in range(iterations):
        if it and it % change_every == 0 and queue:
            current = [*current[1:], queue.pop(0)]
        batches.append(sorted(set(current)))

    def hints(adapters_: list[int]) -> Iterator[Event]:
        for a in adapters_:
            for layer in range(layers):
                yield ("hint", "enqueue", (a, layer))

    if batches:
        yield from hints(batches[0])
    for it, loads in enumerate(batches):
        if it + 1 < len(batches):
            yield from hints(batches[it + 1])
        for a in loads:
            for layer in range(layers):
                yield ("h2d", (a, layer))


def random_stream(n: int, keys: int = 1000, seed: int = 0) -> Iterator[Event]:
    rng = random.Random(seed)
    for _ in range(n):
        yield ("h2d", ("rand", rng.randrange(keys)))
