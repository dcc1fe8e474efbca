# Large uploads and downloads through host buffers (client.hostpool): a download kept by the
# program is not overwritten by the next; an upload is a copy; a loop reuses a few buffers.
# Prints a checksum of the results (the test compares it with a local run), the number of
# buffers the session made and their names.
import torch

from orion_vgpu.client.runtime import get_runtime

dev_name = "cuda" if torch.cuda.is_available() else "cpu"
MIB = 1 << 20
torch.manual_seed(0)
src = torch.randn(4 * MIB)  # 16 MiB: an upload through a buffer
keep = src.clone()
dev = src.to(dev_name, copy=True)  # locally .to("cpu") would be src itself
src.add_(1)  # after .to() returned: the vGPU's copy must not change
sums = [dev.cpu().sum().item()]
first, second = (dev * 2).cpu(), (dev * 3).cpu()  # two downloads alive at once
assert torch.equal(first, keep * 2) and torch.equal(second, keep * 3)
dev.mul_(2)  # in place on the vGPU's (adopted) memory
assert torch.equal(dev.cpu(), keep * 2)
for dtype in (torch.float16, torch.int64, torch.bool, torch.uint8):
    t = (keep * 100).to(dtype)
    back = t.to(dev_name).cpu()
    assert back.dtype == dtype and torch.equal(back, t), dtype
wide = keep.view(1024, 4096).t()  # not contiguous
assert torch.equal(wide.to(dev_name).cpu(), wide)
for i in range(20):
    x = (keep + i).to(dev_name)
    y = (x * 2).cpu()
    assert torch.equal(y, (keep + i) * 2), i
    sums.append(y[::4099].sum().item())
    del x, y
view = first[5:9]
del first
assert torch.equal(view, keep[5:9] * 2)
print("SUMS", " ".join(f"{s:.6e}" for s in sums))
pool = get_runtime().conn(0).host_pool if dev_name == "cuda" else None
print("BUFFERS", len(pool.buffers) if pool else 0)
print("NAMES", " ".join(b.name for b in pool.buffers) if pool else "")
print("RESULT ok")
