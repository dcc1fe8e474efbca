# nn.DataParallel over the program's vGPUs gives the single-device result (fp32 tolerance).
import os

import torch
import torch.nn as nn

torch.manual_seed(0)
X, Y = torch.randn(64, 10), torch.randn(64, 1)
base = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
ref = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
ref.load_state_dict(base.state_dict())
n = torch.cuda.device_count() if os.environ.get("ORION_VGPU") else 1


def train(model, device, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X.to(device)), Y.to(device))
        loss.backward()
        opt.step()
    return loss.item()


if n > 1:
    dp = nn.DataParallel(base.to("cuda:0"))
    loss = train(dp, "cuda:0")
    params = [p.detach().cpu() for p in dp.module.parameters()]
else:
    loss = train(base, "cpu")
    params = [p.detach() for p in base.parameters()]
print("RESULT", n, repr(loss), sum(float(p.sum()) for p in params))
