# Rank 0 is inside a collective when its peer goes away (argv[1] "kill": the test kills
# rank 1; "hang": rank 1 never joins and the group's timeout, argv[2] seconds, ends it).
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

dist.init_process_group("nccl", timeout=timedelta(seconds=float(sys.argv[2])))
rank = dist.get_rank()
x = torch.ones(4, device="cuda")
dist.all_reduce(x)
print("JOINED", x.sum().item(), flush=True)
if rank == 1:
    time.sleep(3600)  # alive, never calling the next collective
dist.all_reduce(x)
print("AFTER", x.sum().item(), flush=True)
