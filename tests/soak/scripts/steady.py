# Trains a small model on its vGPU until SIGUSR1, checking every step; prints READY after
# the first step and RESULT ok with the step count at the end.
import signal
import time

import torch
import torch.nn as nn

stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 1)).cuda()
X = torch.randn(256, 64).cuda()
Y = X[:, :1] * 3
steps = 0
while not stop:
    # Plain SGD by hand: torch.optim imports torch._dynamo (about 70 MiB more per program
    # in torch 2.13), and 100 of these programs must fit on the soak's machine at once.
    model.zero_grad()
    loss = nn.functional.mse_loss(model(X), Y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-2 * p.grad
    value = loss.item()
    assert value == value and value < 1e6, value  # finite
    steps += 1
    if steps == 1:
        print("READY", flush=True)
    time.sleep(0.2)  # a working program, not a benchmark: 2 cores are shared by all
print("RESULT ok", steps, flush=True)
