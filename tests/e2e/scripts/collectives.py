# torch.distributed collectives with backend "nccl" on vGPUs: each rank prints what it got.
import os
import time

import torch
import torch.distributed as dist
from rank_result import emit_result

local_rank = int(os.environ["LOCAL_RANK"])
dist.init_process_group("nccl", device_id=torch.device(f"cuda:{local_rank}"))
rank, W = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(local_rank)
dev = torch.device(f"cuda:{local_rank}")
res = {"rank": rank, "backend": dist.get_backend()}
t = torch.arange(4.0, device=dev) + rank
for name, op in (("sum", dist.ReduceOp.SUM), ("avg", dist.ReduceOp.AVG),
                 ("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
    a = t.clone()
    dist.all_reduce(a, op=op)
    res[name] = a.tolist()
b = t.clone()
dist.broadcast(b, src=1)
res["broadcast"] = b.tolist()
outs = [torch.empty(4, device=dev) for _ in range(W)]
dist.all_gather(outs, t)
res["all_gather"] = [o.tolist() for o in outs]
big = torch.empty(4 * W, device=dev)
dist.all_gather_into_tensor(big, t)
res["all_gather_into_tensor"] = big.tolist()
rs = torch.empty(2, device=dev)
dist.reduce_scatter_tensor(rs, torch.arange(2.0 * W, device=dev) * (rank + 1))
res["reduce_scatter_tensor"] = rs.tolist()
r = t.clone()
dist.reduce(r, dst=0)
if rank == 0:
    res["reduce"] = r.tolist()
gl = [torch.empty(4, device=dev) for _ in range(W)] if rank == 0 else None
dist.gather(t, gl, dst=0)
if rank == 0:
    res["gather"] = [g.tolist() for g in gl]
sc = torch.empty(2, device=dev)
dist.scatter(sc, [torch.tensor([10.0, 11.0], device=dev) * (i + 1) for i in range(W)]
             if rank == 1 else None, src=1)
res["scatter"] = sc.tolist()
rsl = torch.empty(2, device=dev)
dist.reduce_scatter(rsl, [torch.full((2,), (rank + 1.0) * 10 ** i, device=dev) for i in range(W)])
res["reduce_scatter"] = rsl.tolist()
a2a = torch.empty(2 * W, device=dev)
dist.all_to_all_single(a2a, torch.arange(2.0 * W, device=dev) + 10 * rank)
res["all_to_all_single"] = a2a.tolist()
grid = torch.zeros(4, 2, device=dev)
grid[:, 0].fill_(rank + 1)
dist.all_reduce(grid[:, 0])  # a strided view: the servers must not read it as dense
res["strided"] = grid.tolist()
x = torch.full((3,), float(rank + 1), device=dev)
work = dist.all_reduce(x, async_op=True)
work.wait()
res["async"] = x.tolist()
host = torch.tensor([float(rank + 1)])
dist.all_reduce(host)  # host tensors are staged through the vGPU
res["host"] = host.tolist()
objs = [None] * W
dist.all_gather_object(objs, {"rank": rank})
res["all_gather_object"] = objs
bo = [f"from{rank}"]
dist.broadcast_object_list(bo, src=0)
res["broadcast_object_list"] = bo
sub = dist.new_group([0, 1])
s = torch.full((1,), float(rank + 1), device=dev)
dist.all_reduce(s, group=sub)
res["subgroup"] = s.tolist()
store = dist.distributed_c10d._get_default_store()
if rank == 1:
    time.sleep(1.0)
    store.set("rank1-before-barrier", "1")
dist.barrier()
res["barrier_waited"] = store.check(["rank1-before-barrier"])
dist.destroy_process_group()
emit_result(res)
