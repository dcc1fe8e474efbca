# torch.cuda.make_graphed_callables (a module and a function) in a training loop, against
# the same loop run eagerly. On a vGPU it also prints how many frames one graphed forward
# and one graphed backward send, and how many graph replays they hold.
import sys

import torch
import torch.nn as nn

mode = sys.argv[1]  # "eager" or "graph"
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(),
                      nn.Linear(64, 1)).to(device)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
data = [(torch.randn(32, 16), torch.randn(32, 1)) for _ in range(8)]


def head(t: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(t) * 2 + t


if mode == "graph":
    sample = torch.randn(32, 16).to(device)
    model = torch.cuda.make_graphed_callables(model, (sample,))
    head = torch.cuda.make_graphed_callables(
        head, (torch.randn(32, 1).to(device).requires_grad_(),))
losses = []
for x, y in data:
    x, y = x.to(device), y.to(device)
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(head(model(x)), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
print("RESULT losses", " ".join(f"{v:.6f}" for v in losses))

if mode == "graph" and device == "cuda":
    from sent_commands import sent_commands

    from orion_vgpu.protocol import messages as m

    x = data[0][0].to(device)
    model(x).sum().backward()  # the ops around the graphs are known to the client now
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with sent_commands() as fwd:
        out = model(x)
    with sent_commands() as bwd:
        out.sum().backward()
    print("RESULT forward frames", len(fwd), "replays", sum(f.count(m.CMD_GRAPH_RUN) for f in fwd),
          "backward frames", len(bwd), "replays", sum(f.count(m.CMD_GRAPH_RUN) for f in bwd))
