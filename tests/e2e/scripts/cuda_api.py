# What a program sees of CUDA on a vGPU; every check is an assert, "RESULT ok" at the end.
import io
import os
import time

import torch
import torch.nn as nn

gmem = int(os.environ["ORION_GMEM"])
assert torch.cuda.is_available() and torch.cuda.device_count() == 1
assert torch.cuda.current_device() == 0
torch.cuda.set_device(0)
with torch.cuda.device(0):
    pass
assert "Emulated GPU" in torch.cuda.get_device_name(0)
assert torch.cuda.get_device_capability(0) == (8, 0)
assert torch.cuda.get_device_properties(0).total_memory == gmem << 20
assert torch.cuda.mem_get_info()[1] == gmem << 20
assert torch.accelerator.is_available() and torch.accelerator.device_count() == 1
assert torch.accelerator.current_accelerator().type == "cuda"
torch.backends.cudnn.benchmark = True
torch.backends.cudnn.deterministic = True

x = torch.arange(10, device="cuda", dtype=torch.float32)
assert x.device == torch.device("cuda", 0) and x.is_cuda and x.get_device() == 0
assert repr(x) == "tensor([0., 1., 2., 3., 4., 5., 6., 7., 8., 9.], device='cuda:0')"
assert x[x > 4].tolist() == [5.0, 6.0, 7.0, 8.0, 9.0]  # boolean mask: data-dependent shape
assert torch.nonzero(x > 7).tolist() == [[8], [9]]
assert torch.unique(torch.tensor([3, 1, 3, 2], device="cuda")).tolist() == [1, 2, 3]
assert x.sum().item() == 45.0
try:
    x.numpy()
    raise AssertionError("numpy() on a cuda tensor must fail")
except TypeError as exc:
    assert "cuda:0 device type tensor to numpy" in str(exc)
assert torch.cuda.memory_allocated() > 0
assert torch.cuda.max_memory_allocated() >= torch.cuda.memory_allocated()
assert torch.cuda.memory_stats()["allocated_bytes.all.current"] > 0
# Host tensors to the vGPU: autograd sees the copy when it must; lazy conj/neg views send
# their values; a dtype change and a non-contiguous source (the general path) as locally.
leaf = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
(leaf.to("cuda") * 2).sum().backward()
assert leaf.grad.tolist() == [2.0, 2.0, 2.0]
with torch.no_grad():
    assert leaf.to("cuda").grad_fn is None
assert torch.tensor([1 + 2j, 3 - 1j]).conj().to("cuda").cpu().tolist() == [1 - 2j, 3 + 1j]
assert torch.tensor([1.0, -2.0])._neg_view().cuda().cpu().tolist() == [-1.0, 2.0]
assert torch.arange(4, dtype=torch.int32).to("cuda", torch.float16).dtype == torch.float16
nc = torch.arange(6.0).reshape(2, 3).t()
assert nc.to("cuda").cpu().tolist() == nc.tolist()
try:
    torch.ones(2).to("cuda:7")
    raise AssertionError("a device ordinal past ORION_VGPU must fail")
except RuntimeError as exc:
    assert "invalid device ordinal" in str(exc)
# NVML's queries answer from the session: its busy share, the memory it holds.
torch.cuda.utilization()
w = torch.randn(256, 256, device="cuda")
t_end = time.monotonic() + 0.3
while time.monotonic() < t_end:
    w = (w @ w).tanh_()
assert 1 <= torch.cuda.utilization() <= 100
time.sleep(0.2)
assert torch.cuda.utilization() == 0  # nothing ran since the last call
assert torch.cuda.device_memory_used() >= w.nbytes
assert f"process {os.getpid():>10d} uses" in torch.cuda.list_gpu_processes()
try:
    torch.cuda.temperature()
    raise AssertionError("temperature() on a vGPU must fail")
except RuntimeError as exc:
    assert "vGPU does not expose" in str(exc)
del w
torch.cuda.synchronize()
s = torch.cuda.Stream()
with torch.cuda.stream(s):
    y = x * 2
e1, e2 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
e1.record()
e2.record()
e2.synchronize()
assert e1.elapsed_time(e2) >= 0


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight


m = Tied()
opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)  # made before .cuda()
m.cuda()
assert m.out.weight is m.emb.weight, "tied weights stay tied"
assert opt.param_groups[0]["params"][0] is m.emb.weight, "optimizer still holds the params"
m.out(m.emb(torch.tensor([1, 2], device="cuda"))).sum().backward()
opt.step()
assert m.emb.weight.grad.device.type == "cuda"
torch.manual_seed(5)
a = torch.rand(3, device="cuda")
torch.manual_seed(5)
assert torch.equal(a, torch.rand(3, device="cuda")), "seeded randoms repeat"
state = torch.cuda.get_rng_state()
c = torch.rand(2, device="cuda")
torch.cuda.set_rng_state(state)
assert torch.equal(c, torch.rand(2, device="cuda"))
assert x.cpu().device.type == "cpu" and x.double().dtype == torch.float64
assert repr(torch.zeros(2, device="cuda", requires_grad=True)) == \
    "tensor([0., 0.], device='cuda:0', requires_grad=True)"
z = torch.empty(3, device="cuda")
z.copy_(torch.tensor([1.0, 2.0, 3.0]))
host = torch.zeros(3)
host.copy_(z)
assert host.tolist() == [1.0, 2.0, 3.0]
with torch.device("cuda"):
    assert torch.ones(2).device.type == "cuda"
buf = io.BytesIO()
torch.save(z, buf)
buf.seek(0)
assert torch.load(buf).device.type == "cuda"
buf.seek(0)
assert torch.load(buf, map_location="cpu").tolist() == [1.0, 2.0, 3.0]
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(8.0)),
                                     batch_size=4, pin_memory=True)
assert sum(b[0].to("cuda", non_blocking=True).sum().item() for b in loader) == 28.0
assert z.type() == "torch.cuda.FloatTensor" and z.long().type() == "torch.cuda.LongTensor"
assert z.type("torch.cuda.HalfTensor").dtype == torch.float16
assert z.type("torch.DoubleTensor").device.type == "cpu" and z.type(torch.int32).is_cuda
bits = torch.tensor([5, 12], device="cuda")
assert (bits << 1).tolist() == [10, 24] and (bits >> 2).tolist() == [1, 3]
bits <<= 1
assert bits.tolist() == [10, 24] and ((bits & 8) | 1).tolist() == [9, 9]
try:
    torch.eye(2).to_sparse().to("cuda")
    raise AssertionError("a sparse tensor reached the vGPU")
except RuntimeError as exc:
    assert "not supported on a vGPU" in str(exc) and "to_dense" in str(exc), exc
for make, wrong in ((lambda: torch.randn(3, generator=torch.Generator(device="cuda")), "'cuda'"),
                    (lambda: torch.randn(3, device="cuda", generator=torch.Generator()), "'cpu'")):
    try:
        make()
        raise AssertionError("a generator of the other device was accepted")
    except RuntimeError as exc:  # PyTorch's own words for it
        assert f"device type for generator but found {wrong}" in str(exc), exc
# Memory diagnostics and profiler ranges training scripts call (a CPU build raises).
assert "PyTorch CUDA memory summary" in torch.cuda.memory_summary()
assert torch.cuda.memory_stats()["allocated_bytes.all.current"] == torch.cuda.memory_allocated()
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction(0.25)
assert torch.cuda.get_per_process_memory_fraction() == 0.25
for size in (int(total * 0.3) // 4, int(total * 0.3) // 4 + 1):  # new shape, then cached
    try:
        torch.empty(size, device="cuda")
        raise AssertionError("an allocation over the memory fraction succeeded")
    except torch.OutOfMemoryError as exc:
        assert "set_per_process_memory_fraction" in str(exc), exc
torch.cuda.set_per_process_memory_fraction(1.0)
assert torch.empty(int(total * 0.3) // 4, device="cuda").numel() > 0
with torch.cuda.nvtx.range("step {}", 1):
    torch.cuda.nvtx.mark("inside")
    assert torch.cuda.nvtx.range_push("x") == 1 and torch.cuda.nvtx.range_pop() == 1
torch.cuda.set_stream(torch.cuda.current_stream())
r = torch.ones(2, device="cuda")
r.record_stream(torch.cuda.current_stream())
assert r.share_memory_() is r and torch.cuda.can_device_access_peer(0, 0)
assert torch.cuda.memory_snapshot() == [] and torch.cuda.get_allocator_backend() == "native"
torch.cuda.memory._record_memory_history()
gen = torch.Generator(device="cuda")
assert gen.device == torch.device("cuda", 0) and isinstance(gen, torch.Generator)
assert torch.cuda.default_generators[0].device.type == "cuda"
print("RESULT ok")
