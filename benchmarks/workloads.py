"""Workloads timed inside one process; prints one JSON line. Run remote and local alike."""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def tiny_ops(n: int) -> dict:
    x = torch.zeros(1, device=DEV)
    x.add_(1)
    x.item()
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1)
        x.item()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return {"us_per_op": statistics.median(runs)}


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


def cnn_step(steps: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          Block(32), nn.MaxPool2d(2), Block(32), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10)).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(64, 3, 32, 32).to(DEV)
    y = torch.randint(0, 10, (64,)).to(DEV)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"ms_per_step": statistics.median(times) * 1e3}


def mlp_setup(dev: str, capturable: bool = False, fused: bool | None = None) -> tuple:
    """The MLP step's model (4 layers of width 64), Adam, and a batch of 32: (model, opt,
    x, y), seeded (bench_step_parts.py and bench_graphs.py time parts of the same step)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    model = nn.Sequential(*layers).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=capturable, fused=fused)
    return model, opt, torch.randn(32, 64).to(dev), torch.randn(32, 64).to(dev)


def mlp_step(steps: int, graph: bool = False, fused: bool = False) -> dict:
    """4-layer MLP of width 64: forward, backward, Adam step (op-bound). ``fused``: Adam's
    one-kernel implementation (PyTorch's own choice for CUDA graphs), else its default."""
    model, opt, x, y = mlp_setup(DEV, capturable=graph, fused=fused or None)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        step()
    run = step
    if graph:
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(g):
            static = step()
        run = lambda: (g.replay(), static)[1]  # noqa: E731
    sync_every = 20
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(steps):
            loss = run()
            if (i + 1) % sync_every == 0:
                loss.item()
        loss.item()
        times.append((time.perf_counter() - t0) / steps)
    return {"ms_per_step": statistics.median(times) * 1e3}


def mlp_infer(n: int) -> dict:
    """The MLP's forward pass in evaluation, n times, under torch.no_grad() and under
    torch.inference_mode() (which breaks composite ops up on the client: its cost)."""
    model = mlp_setup(DEV)[0].eval()
    x = torch.randn(32, 64).to(DEV)
    out = {}
    for name, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        runs = []
        for _ in range(5):
            with ctx():
                t0 = time.perf_counter()
                for _ in range(n):
                    y = model(x)
                y.sum().item()
            runs.append((time.perf_counter() - t0) / n * 1e6)
        out[f"us_per_forward_{name}"] = statistics.median(runs)
    return out


def xfmr_step(steps: int) -> dict:
    """A small transformer language model's training step: 2 encoder layers, d_model 128,
    4 heads, sequence 64, batch 16, vocabulary 1000, cross-entropy, AdamW."""
    torch.manual_seed(0)
    vocab, d, seq, batch = 1000, 128, 64, 16
    layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=4 * d, dropout=0.1,
                                       batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    embed, head = nn.Embedding(vocab, d), nn.Linear(d, vocab)
    model = nn.ModuleList([embed, encoder, head]).to(DEV)
    mask = nn.Transformer.generate_square_subsequent_mask(seq).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocab, (batch, seq + 1)).to(DEV)
    x, y = tokens[:, :-1], tokens[:, 1:]
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = head(encoder(embed(x), mask=mask, is_causal=True))
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        loss.item()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"ms_per_step": statistics.median(times) * 1e3}


if __name__ == "__main__":
    kind, n = sys.argv[1], int(sys.argv[2])
    kinds = {"tiny": tiny_ops, "cnn": cnn_step, "mlp": mlp_step,
             "mlp_fused": lambda k: mlp_step(k, fused=True),
             "mlp_graph": lambda k: mlp_step(k, graph=True),
             "mlp_graph_fused": lambda k: mlp_step(k, graph=True, fused=True),
             "mlp_infer": mlp_infer, "xfmr": xfmr_step}
    out = kinds[kind](n)
    out["device"] = DEV
    print(json.dumps(out))
