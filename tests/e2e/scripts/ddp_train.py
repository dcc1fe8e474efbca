# DDP with backend "nccl" (torchrun, one vGPU per rank) ends where one device ends with the
# equivalent batch. Without WORLD_SIZE it is that single-device run, emulating argv[1] ranks.
import json
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
from rank_result import emit_result
from torch.nn.parallel import DistributedDataParallel as DDP

STEPS, MICRO, B = 4, 2, 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
        self.aux = nn.Linear(10, 1)  # used by rank 0 on odd steps only

    def forward(self, x, use_aux=False):
        y = self.body(x)
        return y + self.aux(x) if use_aux else y


def data(world):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(STEPS, world, MICRO, B, 10, generator=g),
            torch.randn(STEPS, world, MICRO, B, 1, generator=g))


def make(full):
    """Phase "full" has a layer some steps leave unused; phase "plain" uses every parameter."""
    net = Net()
    return net if full else net.body


def run(model, x, aux):
    return model(x, aux) if isinstance(model, Net) or hasattr(model, "module") and isinstance(
        model.module, Net) else model(x)


def flat(model):
    return [v for p in model.parameters() for v in p.detach().cpu().reshape(-1).tolist()]


def reference(world):
    """Both phases on one device: each step sums every rank's micro-batch gradients / world."""
    out = {}
    X, Y = data(world)
    for phase, full in (("plain", False), ("full", True)):
        torch.manual_seed(0)
        model = make(full)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for s in range(STEPS):
            opt.zero_grad()
            for r in range(world):
                for k in range(MICRO if full else 1):
                    aux = full and s % 2 == 1 and r == 0
                    loss = nn.functional.mse_loss(run(model, X[s, r, k], aux), Y[s, r, k])
                    (loss / world).backward()
                    if r == 0 and k == (MICRO if full else 1) - 1:
                        losses.append(loss.item())
            opt.step()
        out[phase] = {"params": flat(model), "losses": losses}
    return out


def count_transfers():
    """How many tensors this process sends to or fetches from its vGPU (0 if local)."""
    if not os.environ.get("ORION_VGPU"):
        return lambda: 0
    from orion_vgpu.client import transport
    n = [0]
    for name in ("upload", "fetch"):
        orig = getattr(transport.Connection, name)

        def counted(self, *a, _orig=orig, **k):
            n[0] += 1
            return _orig(self, *a, **k)
        setattr(transport.Connection, name, counted)
    return lambda: n[0]


def ddp_run():
    transfers = count_transfers()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    X, Y = data(world)
    out = {"rank": rank, "backend": dist.get_backend()}
    for phase, full in (("plain", False), ("full", True)):
        torch.manual_seed(rank)  # ranks start apart: DDP must give every rank rank 0's model
        model = make(full).to(device)
        ddp = DDP(model, device_ids=[local_rank], find_unused_parameters=full)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        xs, ys = X[:, rank].to(device), Y[:, rank].to(device)
        before = transfers()
        losses = []
        for s in range(STEPS):
            opt.zero_grad()
            for k in range(MICRO if full else 1):
                last = k == (MICRO if full else 1) - 1
                with nullcontext() if last else ddp.no_sync():
                    aux = full and s % 2 == 1 and rank == 0
                    loss = nn.functional.mse_loss(run(ddp, xs[s, k], aux), ys[s, k])
                    loss.backward()
            losses.append(loss.detach())
            opt.step()
        out[phase] = {"transfers_in_loop": transfers() - before,
                      "losses": torch.stack(losses).tolist(), "params": flat(ddp.module)}
        out["isinstance"] = isinstance(ddp, DDP) and isinstance(ddp, nn.parallel.DistributedDataParallel)
        out["state_dict_key"] = next(iter(ddp.state_dict()))
    dist.destroy_process_group()
    return out


if "WORLD_SIZE" in os.environ:
    emit_result(ddp_run())
else:
    print("RESULT " + json.dumps(reference(int(sys.argv[1]) if len(sys.argv) > 1 else 2)))
