# Says READY once it holds its vGPU, reads "START END" (unix times) from stdin, then runs
# batches of matmuls (synchronizing after each) until END and prints the work done
# inside the window as JSON.
import json
import sys
import time

import torch

size, batch = int(sys.argv[1]), int(sys.argv[2])
a = torch.randn(size, size, device="cuda")
b = torch.randn(size, size, device="cuda") / size ** 0.5
c = torch.empty(size, size, device="cuda")
torch.mm(a, b, out=c)
torch.cuda.synchronize()
print("READY", torch.cuda.get_device_properties(0).uuid, flush=True)
start, end = (float(x) for x in sys.stdin.readline().split())
marks = []
done = 0
while True:
    for _ in range(batch):
        torch.mm(a, b, out=c)
    torch.cuda.synchronize()
    done += batch
    now = time.time()
    if now >= start:
        marks.append((now, done))
    if now >= end:
        break
inside = [m for m in marks if m[0] <= end]
(t0, n0), (t1, n1) = inside[0], inside[-1]
print(json.dumps({"ops": n1 - n0, "seconds": t1 - t0, "ops_per_s": (n1 - n0) / (t1 - t0)}))
