# Holds a vGPU with some memory and works until killed; prints READY once running.
import sys
import time

import torch

x = torch.ones(8 * 1024 * 1024, device="cuda")  # 32 MiB on the server
print("READY", flush=True)
while True:
    x.add_(1)
    x.sum().item()
    time.sleep(0.05)
    if len(sys.argv) > 1:
        break
