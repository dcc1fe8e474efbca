# Mixed precision with autocast("cuda") and GradScaler: must cast as on a GPU and converge.
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)
X = torch.randn(256, 20)
Y = (X[:, 0] > 0).long()
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2)).to("cuda")
opt = torch.optim.SGD(model.parameters(), lr=0.1)
scaler = torch.amp.GradScaler("cuda")
Xd, Yd = X.to("cuda"), Y.to("cuda")
losses = []
for _ in range(60):
    opt.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        out = model(Xd)
        loss = F.cross_entropy(out, Yd)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    losses.append(loss.item())
print("RESULT", out.dtype, loss.dtype, losses[0], losses[-1], scaler.get_scale())
