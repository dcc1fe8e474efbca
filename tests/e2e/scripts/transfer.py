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
# Uploads queue with the ops (small ones as a copy): a source changed right after
# .to("cuda") returns, before any sync, leaves what the vGPU holds as it was.
devs, want = [], []
for n in (1, 100, 4096, 16384, 70_000):  # 16384 floats: the largest copied one (64 KiB)
    h = torch.arange(n, dtype=torch.float32)
    want.append(h.clone())
    devs.append(h.to("cuda"))
    h.fill_(-1)
for d, w in zip(devs, want, strict=True):
    assert torch.equal(d.cpu(), w), w.numel()
big = torch.arange(64 * 1024 * 1024 // 4, dtype=torch.float32)  # 64 MiB
assert torch.equal(big.cuda().cpu(), big)
print("RESULT ok")
