# torch.compile'd model: forward and training steps (forward and backward compiled, Adam
# eager), with data made on the host as a real program loads it. Prints losses, outputs,
# and on a vGPU how many frames and commands one compiled call sends.
import sys

import torch
import torch.nn as nn

mode = sys.argv[1]  # "eager" or "compile"
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64),
                                  nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return h * torch.sigmoid(h) + torch.ones(4, device=x.device)


model = Net().to(device)
run = torch.compile(model) if mode == "compile" else model
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
data = [(torch.randn(32, 16), torch.randn(32, 4)) for _ in range(6)]
losses = []
for x, y in data:
    x, y = x.to(device), y.to(device)
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(run(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
print("RESULT losses", " ".join(f"{v:.6f}" for v in losses))
model.eval()
xe = torch.randn(8, 16).to(device)
with torch.no_grad():
    out = run(xe)
print("RESULT eval", " ".join(f"{v:.6f}" for v in out.flatten().tolist()))

if mode == "compile" and device == "cuda":
    # Count what one compiled inference call sends.
    from sent_commands import sent_commands

    from orion_vgpu.protocol import messages as m

    calls = 20
    with torch.no_grad():
        torch.cuda.synchronize()
        with sent_commands() as sent:
            for _ in range(calls):
                out = run(xe)
                torch.cuda.synchronize()
    kinds = [k for frame in sent for k in frame if k not in (m.CMD_FREE, m.CMD_SYNC)]
    print("RESULT per-call frames", len(sent) / calls, "graph-runs",
          kinds.count(m.CMD_GRAPH_RUN) / calls, "other-commands",
          (len(kinds) - kinds.count(m.CMD_GRAPH_RUN)) / calls)
