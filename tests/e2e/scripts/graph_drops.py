"""make_graphed_callables on a small MLP trained with Adam, the optimizer's state made after
the capture: the backward graph reads forward outputs that its capture dropped, which the
graph must keep (a CUDA graph keeps what its capture used). Prints the losses."""

import torch
import torch.nn.functional as F
from torch import nn

DEV = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()).to(DEV)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x, y = torch.randn(32, 64).to(DEV), torch.randn(32, 64).to(DEV)
fwd = torch.cuda.make_graphed_callables(model, (x,)) if DEV == "cuda" else model
losses = []
for _ in range(4):
    opt.zero_grad(set_to_none=True)
    loss = F.mse_loss(fwd(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
print("RESULT losses", *losses)
