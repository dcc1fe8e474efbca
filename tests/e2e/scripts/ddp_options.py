# DDP options on a vGPU, one rank: what works, and what is refused in one line.
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

dist.init_process_group("nccl")
torch.manual_seed(0)
model = nn.Linear(4, 2).cuda()
what = sys.argv[1]
if what == "ok":
    ddp = DDP(model, device_ids=[0], bucket_cap_mb=1)
    x = torch.randn(3, 4)  # on the host: DDP moves it to the module's vGPU
    ddp(x).sum().backward()
    want = x.sum(0).expand(2, 4)  # d(sum(W x + b))/dW, the mean over 1 rank
    print("RESULT", torch.allclose(model.weight.grad.cpu(), want), type(ddp).__name__)
elif what == "hook":
    DDP(model).register_comm_hook(None, lambda state, bucket: None)
elif what == "mixed_precision":
    DDP(model, mixed_precision=object())
