"""Lazy modules on the device the program sees (a vGPU, or the CPU locally): put there
before their first forward by .to(), .cuda() or device=, converted in dtype, copied; once
the first batch fixes their shapes they train to the same values as locally, and every
parameter and buffer is on the program's device."""

import copy

import torch
import torch.nn as nn

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def run(name: str, make) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    m = make()
    lazy = any(nn.parameter.is_lazy(p) for p in m.parameters())
    x = torch.ones(1, 2, 5, 5, device=DEV) if name.startswith("conv") \
        else torch.linspace(-1, 1, 8, device=DEV).view(2, 4)
    y = m(x)
    y.square().sum().backward()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.step()
    tensors = list(m.parameters()) + list(m.buffers())
    on_dev = all(t.device.type == DEV for t in tensors)
    params = all(isinstance(p, nn.Parameter) and p.grad is not None for p in m.parameters())
    print(f"RESULT {name} lazy={lazy} shapes={[tuple(t.shape) for t in tensors]} "
          f"dtype={tensors[0].dtype} on-device={on_dev} params={params} "
          f"after-step={m(x).sum().item():.5f}", flush=True)


run("to", lambda: nn.LazyLinear(3).to(DEV))
run("cuda", lambda: nn.LazyLinear(3).cuda() if DEV == "cuda" else nn.LazyLinear(3))
run("device-kw", lambda: nn.LazyLinear(3, device=DEV))
run("dtype", lambda: nn.LazyLinear(3, dtype=torch.float64).to(DEV).float())
run("sequential", lambda: nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.LazyLinear(2)).to(DEV))
run("conv-bn", lambda: nn.Sequential(nn.LazyConv2d(3, 3), nn.LazyBatchNorm2d()).to(DEV))
run("deepcopy", lambda: copy.deepcopy(nn.LazyLinear(3).to(DEV)))
