"""Activation checkpointing with dropout, grouped-query attention, and factories with
pin_memory or out= on a vGPU program. Prints RESULT lines; the GQA values are compared with
the same script run locally, the rest must hold on the vGPU as on CUDA."""

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.dropout(torch.tanh(x @ w), 0.5, training=True) @ w


def grads(checkpointed: bool, reentrant: bool) -> torch.Tensor:
    torch.manual_seed(7)
    w = torch.linspace(-1, 1, 64, device=DEV).view(8, 8).requires_grad_()
    x = torch.ones(4, 8, device=DEV)
    y = cp.checkpoint(block, x, w, use_reentrant=reentrant) if checkpointed else block(x, w)
    y.square().sum().backward()
    return w.grad.cpu()


for reentrant in (True, False):
    # the recomputed dropout must draw the forward's mask: the same gradient as without
    same = torch.equal(grads(True, reentrant), grads(False, reentrant))
    print(f"RESULT checkpoint reentrant={reentrant} same-grad={same}", flush=True)

g = torch.Generator().manual_seed(3)
q = torch.randn(2, 8, 6, 16, generator=g)
k = torch.randn(2, 2, 6, 16, generator=g)
v = torch.randn(2, 2, 6, 16, generator=g)
for causal in (False, True):
    out = F.scaled_dot_product_attention(q.to(DEV), k.to(DEV), v.to(DEV), is_causal=causal,
                                         enable_gqa=True).cpu()
    print(f"RESULT gqa causal={causal} {tuple(out.shape)} {round(out.abs().sum().item(), 3)}",
          flush=True)

if DEV == "cuda":
    pinned = torch.empty(3, pin_memory=True)
    print("RESULT pinned-factory", pinned.device.type, tuple(pinned.shape), pinned.is_pinned(),
          flush=True)
    src = torch.arange(4.0)
    pin = src.pin_memory()
    pin.add_(1)  # a pinned copy, as with CUDA: the source keeps its values
    print("RESULT pin-memory", pin.is_pinned(), pin[1:].is_pinned(), src.is_pinned(),
          pin.pin_memory() is pin, src.tolist(), pin.tolist(), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(5)
    out = torch.empty(6, dtype=torch.long, device="cuda")
    torch.randperm(6, generator=gen, out=out)
    print("RESULT randperm-out", sorted(out.tolist()), flush=True)
