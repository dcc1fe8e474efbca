# Allocates past its vGPU quota: must get torch.cuda.OutOfMemoryError, then keep working.
import torch

x = torch.ones(1024, 1024, device="cuda")  # 4 MiB
try:
    big = torch.empty(64, 1024, 1024, device="cuda")  # 256 MiB > ORION_GMEM=64
    big.fill_(1.0)
    print("RESULT no-oom", big.sum().item())
except torch.cuda.OutOfMemoryError as exc:
    print("RESULT oom", type(exc).__name__, str(exc).splitlines()[0][:60])
print("RESULT after", (x * 2).sum().item())
# The OOM is raised at the offending line, as on a GPU, so a program can catch it there.
before = torch.cuda.memory_allocated()
try:
    torch.randn(128, 1024, 1024, device="cuda")
    print("RESULT late")
except torch.cuda.OutOfMemoryError:
    print("RESULT caught-at-line", torch.cuda.memory_allocated() == before)
stats, nested = torch.cuda.memory_stats(), torch.cuda.memory_stats_as_nested_dict()
print("RESULT stats", stats["num_ooms"],
      nested["allocated_bytes"]["all"]["current"] == torch.cuda.memory_allocated())
