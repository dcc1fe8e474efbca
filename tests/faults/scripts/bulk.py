# Moves 32 MiB between host and vGPU in a loop until killed: argv[1] "up" (uploads) or
# "down" (downloads). Prints READY, then XFER n after each transfer.
import sys

import torch

host = torch.arange(8 << 20, dtype=torch.float32)  # 32 MiB
dev = host.to("cuda")
print("READY", flush=True)
n = 0
while True:
    if sys.argv[1] == "up":
        dev = host.to("cuda")
    else:
        back = dev.cpu()
        assert back[-1].item() == host[-1].item()
    n += 1
    print("XFER", n, flush=True)
