# A loop that replaces a large tensor with a new one each step (x = x + 1): locally it
# holds two of them at a time, and so must a vGPU whose quota fits a few (ORION_GMEM=80).
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.zeros(4 << 20, device=DEV)  # 16 MiB
for _ in range(40):
    x = x + 1
print("RESULT", x[0].item(), x.sum().item())
