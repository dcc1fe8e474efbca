# Memory in use stays flat when a program holds nothing new: temporaries are freed as soon
# as the program drops them, as on a GPU (not when Python's cycle collector runs).
import gc

import torch

gc.disable()  # deterministic: only reference counting frees tensors
x = torch.full((1 << 20,), 1.0, device="cuda")  # 4 MiB held for the whole run
peak = 0
for _ in range(200):
    (x * 2).sum().item()  # a 4 MiB temporary, dropped at once
    peak = max(peak, torch.cuda.memory_allocated())
print("RESULT peak_mib", peak / 2**20, flush=True)
assert peak <= 8 << 20, f"memory in use grew to {peak / 2**20:.0f} MiB for 4 MiB held"
