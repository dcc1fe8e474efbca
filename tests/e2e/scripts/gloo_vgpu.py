# backend "gloo" (not served by Orion) on vGPU tensors, under torchrun: the collectives run
# on host copies, as gloo does with CUDA tensors; DDP over gloo ends where one host
# device ends with the same batches (computed here on the host, after the DDP run).
import torch
import torch.distributed as dist
import torch.nn as nn
from rank_result import emit_result
from torch.nn.parallel import DistributedDataParallel as DDP

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
res = {"rank": rank, "backend": dist.get_backend()}

x = torch.arange(4.0, device="cuda") + rank
dist.all_reduce(x)
res["sum"] = x.tolist()
b = torch.full((3,), float(rank + 5), device="cuda")
dist.broadcast(b, src=1)
res["bcast"] = b.tolist()
outs = [torch.zeros(2, device="cuda") for _ in range(world)]
dist.all_gather(outs, torch.tensor([rank, rank * 10.0], device="cuda"))
res["gather"] = [o.tolist() for o in outs]
res["devices"] = sorted({str(t.device) for t in (x, b, *outs)})
w = dist.all_reduce(torch.ones(2, device="cuda") * (rank + 1), async_op=True)
w.wait()
res["async_done"] = w.is_completed()

g = torch.Generator().manual_seed(3)
X, Y = torch.randn(3, world, 8, 6, generator=g), torch.randn(3, world, 8, 1, generator=g)


def train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for xs, ys in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
    return [round(v, 5) for p in model.parameters() for v in p.detach().cpu().reshape(-1).tolist()]


torch.manual_seed(0)
ddp = DDP(nn.Linear(6, 1).cuda())
res["ddp"] = train(ddp, [(X[s, rank].cuda(), Y[s, rank].cuda()) for s in range(3)])
torch.manual_seed(0)
res["reference"] = train(nn.Linear(6, 1), [(X[s].reshape(-1, 6), Y[s].reshape(-1, 1))
                                           for s in range(3)])
emit_result(res)
dist.destroy_process_group()
