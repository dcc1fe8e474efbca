# MLP + Adam on fixed data; prints the final loss and a parameter checksum.
import torch
import torch.nn as nn

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
X = torch.randn(256, 20)
Y = X[:, :1] * 2 + X[:, 1:2] ** 2
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(),
                      nn.Linear(64, 1)).to(device)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
Xd, Yd = X.to(device), Y.to(device)
for _ in range(30):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(Xd), Yd)
    loss.backward()
    opt.step()
print("final", repr(loss.item()))
print(sum(p.sum().item() for p in model.parameters()))
