"""The profiler a training script opens with CUDA activity, and torch.export, in a vGPU
program: the profile records the program's ops (a CPU build has no CUDA to trace: that
printed a C++ stack trace per op and could abort), export says what to do instead of
aborting in C++, and the program goes on."""

import torch
from torch.profiler import ProfilerActivity, profile, record_function

x = torch.randn(64, 64, device="cuda")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    with record_function("train_step"):
        (x @ x).relu().sum().item()
names = {e.key for e in prof.key_averages()}
print("RESULT profiler", "train_step" in names, "aten::mm" in names, flush=True)
with torch.autograd.profiler.profile(use_device="cuda") as legacy:
    (x * 2).sum().item()
print("RESULT legacy-profiler", any(e.key == "aten::mul" for e in legacy.key_averages()),
      flush=True)
try:
    torch.export.export(torch.nn.Linear(64, 2).cuda(), (x,))
    print("RESULT export no error", flush=True)
except RuntimeError as exc:
    print("RESULT export", type(exc).__name__, str(exc).split(":")[0], flush=True)
print("RESULT after", (x - x).abs().sum().item(), flush=True)
