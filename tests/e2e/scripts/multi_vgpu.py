# Two vGPUs in one program: devices, cross-device copies (with autograd), per-device stats.
import torch

assert torch.cuda.device_count() == 2
a = torch.arange(6.0, device="cuda:0").reshape(2, 3)
b = a.to("cuda:1")
assert b.device == torch.device("cuda", 1) and torch.equal(b.cpu(), a.cpu())
c = torch.empty(2, 3, device="cuda:1")
c.copy_(a)  # cross-device copy_
assert torch.equal(c.cpu(), a.cpu())
try:
    a + b
    raise AssertionError("mixing devices must fail")
except RuntimeError as exc:
    assert "same device" in str(exc)
with torch.cuda.device(1):
    d = torch.ones(3, device="cuda")
    assert d.device.index == 1 and torch.cuda.current_device() == 1
assert torch.cuda.current_device() == 0
torch.cuda.set_device(1)
assert torch.zeros(1, device="cuda").device.index == 1
torch.cuda.set_device(0)
w = torch.ones(3, device="cuda:0", requires_grad=True)
(w.to("cuda:1") * 2).sum().backward()  # gradient flows back across devices
assert w.grad.device.index == 0 and w.grad.tolist() == [2.0, 2.0, 2.0]
big = torch.empty(1024, 1024, device="cuda:1")
assert torch.cuda.memory_allocated(1) >= big.numel() * 4 > torch.cuda.memory_allocated(0)
names = {torch.cuda.get_device_properties(i).name for i in range(2)}
print("RESULT ok", len(names))
