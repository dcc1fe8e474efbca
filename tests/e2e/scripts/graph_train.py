# CUDA-graph training (the recipe of PyTorch's docs): capture one step, replay it; the
# result equals the same steps run eagerly. argv: eager|graph [foreach|fused] (Adam's
# implementation; fused is one kernel per step for all parameters).
import sys

import torch
import torch.nn as nn

mode = sys.argv[1]
fused = sys.argv[2:] == ["fused"]
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                      nn.Linear(64, 1)).to(device)
opt = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=(mode == "graph"),
                       fused=fused or None)
data = [(torch.randn(32, 16), torch.randn(32, 1)) for _ in range(12)]
static_x, static_y = data[0][0].to(device), data[0][1].to(device)
losses = []


def step():
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(static_x), static_y)
    loss.backward()
    opt.step()
    return loss


for x, y in data[:3]:  # warm-up (also what builds optimizer state before capture)
    static_x.copy_(x)
    static_y.copy_(y)
    losses.append(step().item())
if mode == "graph":
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        static_loss = step()
    for x, y in data[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        g.replay()
        losses.append(static_loss.item())
else:
    for x, y in data[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        losses.append(step().item())
print("RESULT", " ".join(f"{v:.6f}" for v in losses))
