"""``x.data = y`` (weight tying, EMA updates, nn.utils.vector_to_parameters) and format
specs on 0-d tensors (f"{loss:.4f}"), on the device the program sees (a vGPU, or the CPU
locally): the values must be those of the same program run locally. On a vGPU it also
prints the memory the program and its session hold before and after a loop of
``.data =`` assignments (nothing may be left behind)."""

import gc

import torch
import torch.nn as nn

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def show(name: str, t: torch.Tensor) -> None:
    h = t.detach().cpu()
    print(f"RESULT {name} {tuple(h.shape)} {h.dtype} {h.flatten().tolist()}")


def assignments() -> None:
    a = torch.zeros(3, device=DEV)
    b = torch.ones(3, device=DEV)
    a.data = b
    show("a-is-b", a)
    b.add_(1)
    show("a-shares-b", a)
    del b
    gc.collect()
    a.mul_(3)
    show("a-after-b-dropped", a)

    x = torch.zeros(2, device=DEV)
    x.data = torch.arange(5.0, device=DEV)
    show("grown", x * 2)
    x.data = x.data.to(torch.float64) / 3
    show("retyped", x)
    x.data = x
    show("self", x + 1)

    big = torch.arange(12.0, device=DEV).view(3, 4)
    v = torch.empty(0, device=DEV)
    v.data = big[1:3, ::2]
    big.fill_(7)
    show("view-of-big", v)
    del big
    gc.collect()
    show("view-outlives-big", v.sum(0))


def parameters() -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(2, 2, device=DEV))
    p.data = torch.full((2, 2), 5.0, device=DEV)
    (p * p).sum().backward()
    show("param", p)
    show("param-grad", p.grad)
    print(f"RESULT param-flags {p.requires_grad} {p.is_leaf} {isinstance(p, nn.Parameter)}")

    m = nn.Linear(3, 2).to(DEV)
    vec = torch.linspace(-1, 1, 8, device=DEV)
    with torch.no_grad():
        nn.utils.vector_to_parameters(vec, m.parameters())
    show("vec-weight", m.weight)
    show("vec-bias", m.bias)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.ones(4, 3, device=DEV)).pow(2).sum().backward()
    opt.step()
    show("vec-trained", nn.utils.parameters_to_vector(m.parameters()))

    enc = nn.Embedding(5, 4).to(DEV)
    dec = nn.Linear(4, 5, bias=False).to(DEV)
    dec.weight.data = enc.weight.data  # the classic weight tying
    with torch.no_grad():
        enc.weight.copy_(torch.arange(20.0, device=DEV).view(5, 4) / 10)
    show("tied", dec(torch.ones(1, 4, device=DEV)))


def formats() -> None:
    loss = torch.tensor(3.14159, device=DEV)
    step = torch.tensor(42, device=DEV)
    vec = torch.tensor([1.5, 2.5], device=DEV)
    print(f"RESULT format {loss:.3f}|{loss:>10.2e}|{step:05d}|{step}|{format(loss, '')}")
    print(f"RESULT format-vector {vec}".replace(", device='cuda:0'", ""))
    try:
        print(f"{vec:.2f}")
    except TypeError as exc:
        print(f"RESULT format-vector-spec TypeError {exc}".replace("RemoteTensor", "Tensor"))


def storages_and_reprs() -> None:
    x = torch.arange(24.0, device=DEV)
    views = [x, x[:4], x.view(4, 6)[1], x[:1].expand(5), x.view(4, 6).t()[2:]]
    print("RESULT view-storages", [v.untyped_storage().nbytes() for v in views])
    p = nn.Parameter(torch.ones(2, device=DEV))
    print("RESULT param-repr", repr(p).splitlines()[0], repr(p.data).startswith("tensor("))


def no_leaks() -> None:
    if DEV != "cuda":
        return
    w = torch.randn(256, 256, device=DEV)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(), torch.cuda.device_memory_used()
    for _ in range(300):
        w.data = w.data * 0.99 + 0.01
    del _
    gc.collect()
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated(), torch.cuda.device_memory_used()
    print(f"MEMORY {before[0] == after[0]} {before[1] == after[1]} {before} {after}")


assignments()
parameters()
formats()
storages_and_reprs()
no_leaks()
