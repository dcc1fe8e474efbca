# Works steadily on its vGPU and checks its numbers; run beside a program that hits OOM.
import time

import torch

torch.manual_seed(0)
a = torch.randn(256, 256, device="cuda")
expected = None
for _ in range(40):
    r = (a @ a).sum().item()
    expected = r if expected is None else expected
    assert r == expected, (r, expected)
    time.sleep(0.02)
print("RESULT ok", torch.cuda.get_device_name(0))
