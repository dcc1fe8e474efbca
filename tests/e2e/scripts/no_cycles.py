"""The client frees a vGPU tensor when the program drops it, without waiting for Python's
cycle collector: with gc off, every kind of op (first seen, so probed by the server, and
seen again), autograd, transfers and views is run on fresh tensors, everything is dropped,
and the memory the program holds must be back where it was. Then a gc must find no vGPU
tensor left in a reference cycle."""

import gc

import torch
import torch.nn as nn
import torch.nn.functional as F

from orion_vgpu.client.frontend import RemoteTensor


def workload(seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 256, generator=g).to("cuda")
    y = (x * 2).sum() + x.mean()
    v, i = x.topk(3, dim=1)
    parts = x.split(100)
    nz = (x > 1.5).nonzero()
    w = x.t()[10:20].contiguous().view(-1)
    x.add_(1).relu_()
    m = nn.Linear(256, 8).to("cuda")
    a = torch.randn(4, 256, device="cuda", requires_grad=True)
    loss = F.cross_entropy(m(a), torch.tensor([0, 1, 2, 3], device="cuda"))
    loss.backward()
    back = torch.cat([v.flatten(), w[:5], parts[2].flatten()[:5]]).cpu()
    return float(y.item() + back.sum().item() + nz.shape[0] + a.grad.abs().sum().item())


gc.disable()
torch.ones(1, device="cuda").item()  # the session is open
base = torch.cuda.memory_allocated()
for seed in range(3):  # the first round probes every op; the later ones hit the cache
    workload(seed)
    print("RESULT held after round", seed, torch.cuda.memory_allocated() - base, flush=True)
gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage
gc.collect()
cyclic = sum(isinstance(o, RemoteTensor) for o in gc.garbage)
print("RESULT tensors in cycles", cyclic, flush=True)
