"""A plain PyTorch training script: nothing in it knows about Orion.

Run it with ORION_VGPU=1 (and a pool: `orion up`) and its CUDA work runs on a vGPU; run it
without and it trains on this machine's GPU or CPU.
"""

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)

# Synthetic data made here (no downloads): 10 classes of noisy 16x16 patterns.
N, C = 2048, 10
templates = torch.randn(C, 1, 16, 16)
labels = torch.randint(0, C, (N,))
images = templates[labels] + 0.8 * torch.randn(N, 1, 16, 16)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                     batch_size=128, shuffle=True, pin_memory=True)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


model = Net().to(device)
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
if device == "cuda":
    print(f"training on {torch.cuda.get_device_name(0)}, "
          f"{torch.cuda.get_device_properties(0).total_memory >> 20} MiB")
for epoch in range(1, 6):
    t0 = time.time()
    total, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
    print(f"epoch {epoch}: loss {total / seen:.4f}  accuracy {correct / seen:.3f}  "
          f"({time.time() - t0:.1f} s on {device})")
