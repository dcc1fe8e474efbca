# Works a little, then runs the op the fault-test worker aborts on (faults/abort_worker.py).
import torch

x = torch.ones(1024, device="cuda")
assert (x * 3).sum().item() == 3072
print("READY", flush=True)
print("AFTER", torch.sinh(x).sum().item(), flush=True)  # the worker dies on aten::sinh
