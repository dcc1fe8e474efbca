# A short program: takes one vGPU, checks a result, exits (the sequential soak runs many).
import torch

x = torch.arange(1000.0, device="cuda")
assert (x * 2).sum().item() == 999000.0
print("RESULT ok", flush=True)
