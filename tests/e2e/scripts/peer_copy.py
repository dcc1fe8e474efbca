# Copies between two vGPUs: .to("cuda:1"), copy_ across devices, a non-contiguous source,
# a dtype change, a large tensor and autograd back through a copy. Prints RESULT lines to
# compare with the local run and, on vGPUs, COPY_BYTES: tensor bytes this process moved
# to or from the servers during the copies (0 when the servers copied between themselves).
import os

import torch

remote = bool(os.environ.get("ORION_VGPU"))
d0, d1 = ("cuda:0", "cuda:1") if remote else ("cpu", "cpu")
big_mib = int(os.environ.get("PEER_BIG_MIB", "48"))


def to1(t: torch.Tensor, *args: object) -> torch.Tensor:
    """``t.to("cuda:1")`` on vGPUs; on one local device a copy all the same (a local
    ``.to`` to the same device would return ``t`` itself)."""
    return t.to(d1, *args) if remote else t.clone().to(*args)


def sync() -> None:
    if remote:
        torch.cuda.synchronize()


def moved() -> int:
    if not remote:
        return 0
    from orion_vgpu.client.runtime import get_runtime
    return sum(c.bytes_up + c.bytes_down for c in get_runtime().conns)


g = torch.Generator().manual_seed(0)
a = torch.randn(257, 129, generator=g)
p_host = torch.randn(64, 32, generator=g)
big_host = torch.arange(big_mib << 18, dtype=torch.float32)
x, big, p = a.to(d0), big_host.to(d0), p_host.to(d0).requires_grad_()
z = torch.zeros(257, 129).to(d1)
sync()
before = moved()

y = to1(x)                        # server to server
x.mul_(2)                         # later in-place op on the source: y keeps the old values
z.copy_(x)                        # copy_ across devices: z == 2a
w = to1(x[:, ::2])                # non-contiguous source
h = to1(x, torch.float16)         # device and dtype at once
bb = to1(big)                     # large
loss = (to1(p) * 3).pow(2).sum()
loss.backward()                   # the gradient comes back to cuda:0 through a copy
r = ((y * 2 - z).abs().sum(), w.sum(), h.float().sum(), bb.sum(), bb[-1], loss.detach(),
     p.grad.sum())
devs = sorted({str(t.device) for t in (y, z, w, h, bb)} | {str(p.grad.device)})
sync()
after = moved()

print("RESULT", " ".join(repr(float(v)) for v in r))
print("DEVICES", devs)
print("COPY_BYTES", after - before)
