# Host <-> vGPU transfers of many sizes and dtypes come back bit-exact.
import torch

torch.manual_seed(0)
for n in (0, 1, 7, 1000, 8192, 100_000, 3_000_000):
    for dtype in (torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool):
        host = (torch.randn(n) * 100).to(dtype)
        dev = host.to("cuda")
        back = dev.cpu()
        assert back.dtype == dtype and torch.equal(back, host), (n, dtype)
        twice = (dev.to(torch.float32) * 2).cpu()
        assert torch.equal(twice, host.to(torch.float32) * 2), (n, dtype)
big = torch.arange(64 * 1024 * 1024 // 4, dtype=torch.float32)  # 64 MiB
assert torch.equal(big.cuda().cpu(), big)
print("RESULT ok")
