# Train, save a checkpoint, load it into a fresh model+optimizer, continue: must equal
# continuing without the save/load round trip.
import sys

import torch
import torch.nn as nn

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
path = sys.argv[1]
X, Y = torch.randn(64, 8), torch.randn(64, 1)


def make():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(device)
    return m, torch.optim.Adam(m.parameters(), lr=1e-2)


def train(m, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(m(X.to(device)), Y.to(device))
        loss.backward()
        opt.step()
    return loss.item()


model, opt = make()
train(model, opt, 5)
torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
cont = train(model, opt, 5)
ck = torch.load(path)
first = next(iter(ck["model"].values()))
model2, opt2 = make()
model2.load_state_dict(ck["model"])
opt2.load_state_dict(ck["opt"])
resumed = train(model2, opt2, 5)
print("device", first.device.type)
print("RESULT", repr(cont), repr(resumed))
