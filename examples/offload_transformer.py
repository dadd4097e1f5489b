"""FlexGen-style weight offloading of a small transformer, under pipellm's secure transfers.

The model's layers live in host memory; each decode step moves every layer to the device
right before it runs (`layer.to(device)`) and drops it after, as weight-offloading servers
do. Inside `pipellm.torch.secure_transfers()` those copies go through the secure channel and
the speculative pipeline (the learned predictor finds the layer cycle after the first pass),
and the logits are the same as those of a plain run. No downloads: the model is built from a
config with random weights.

    python examples/offload_transformer.py [--layers 8] [--steps 4]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


class Block(nn.Module):
    """A pre-norm decoder block (causal self-attention + MLP), OPT-style. Attention is
    written out (no fused kernels), so both runs take the same arithmetic path."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        att = scores.masked_fill(causal, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, ffn: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.head = nn.Linear(d, vocab)


def run_offloaded(model: TinyLM, tokens: torch.Tensor, steps: int, device: str) -> torch.Tensor:
    """Greedy decode; the blocks' weights stay in host memory and each block's are copied
    to the device right before it runs (FlexGen's layer-by-layer streaming)."""
    out = []
    x_tokens = tokens
    for _ in range(steps):
        x = model.embed(x_tokens)
        for block in model.blocks:
            weights = {name: p.to(device) for name, p in block.named_parameters()}
            x = torch.func.functional_call(block, weights, (x.to(device),))
            del weights
        logits = model.head(x[:, -1])
        out.append(logits)
        x_tokens = torch.cat([x_tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return torch.stack(out, 1)


def main() -> None:
    import pipellm.torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = TinyLM(vocab=1000, d=256, heads=4, ffn=1024, layers=a.layers).eval()
    tokens = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        reference = run_offloaded(model, tokens, a.steps, "cpu")  # plain: no transfers
        with pipellm.torch.secure_transfers(chunk_bytes=256 << 10) as engine:
            secured = run_offloaded(model, tokens, a.steps, "cuda")
            stats = engine.pipe.stats()
    same = torch.equal(reference, secured)
    print(
        f"layers {a.layers}, steps {a.steps}: logits identical: {same}; "
        f"{engine.copies_to_device} copies to the device, {stats['hits']} of "
        f"{stats['hits'] + stats['chunks_on_demand']} chunks pre-encrypted"
    )
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
